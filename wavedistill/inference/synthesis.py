"""Synthesis from log-mels: one :class:`Vocoder` for teacher, student and coupling checkpoints.

``Vocoder.load(CKPT).synthesize(mel, seed=0)`` returns ``frames*hop`` samples.
Long inputs can be synthesised in chunks of ``chunk_frames`` frames without
seams: every output sample sees exactly the conditioning and noise it sees in
one unchunked pass.

* Student: each chunk is computed with ``cond.frame_context`` frames of mel
  context on both sides (or the true utterance edge), plus
  ``ceil(receptive_field/hop)+1`` frames of extra output on the left that are
  thrown away, so the causal flows have their full history.  Noise is
  positional (sample ``t`` is fixed by ``(seed, t)``), so chunks agree.
* Coupling flow: non-causal, so each chunk is computed with ``ceil(half_width/hop)+1`` frames of extra
  output on both sides (thrown away) besides the conditioning's frame context; positional noise.
* Teacher: one generation cache (ring buffers and the previous sample) is
  carried from chunk to chunk by ``CachedGenerator.run``; conditioning is computed per chunk with frame context on both
  sides; the noise for the whole utterance is drawn once from the seed.

Noise rows: item ``i`` of a ``[B, n_mels, F]`` batch uses row ``i`` of the
seed's noise (as ``Student.synthesize`` and ``Teacher.generate`` do);
:func:`run_synthesize` gives every utterance row 0, so a file's output depends
only on the checkpoint, its mel and the seed, not on how it was batched.

:func:`run_synthesize` is the ``wavedistill synthesize`` command: audio files
(copy synthesis), ``.npy`` log-mels or list files in, 16-bit PCM WAVs out.
"""

from __future__ import annotations

import math
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.audio import AudioError, MelExtractor, load_audio
from ..checkpoint import load_model, resolve_checkpoint
from ..config import FeatureConfig
from ..errors import UserError
from ..fileio import unique_names, describe_os_error

LIST_SUFFIXES = (".txt", ".list", ".scp")
MAX_SEED = 2**32  # the student's positional noise seeds generators with seed·1000003 + block
MEL_SUFFIX = ".npy"

Progress = Callable[[int], None]
Sink = Callable[[int, torch.Tensor], None]


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device; CUDA without a GPU is a :class:`UserError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device} is not a device; use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} was requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise UserError(f"--device {device} is not supported; use cpu or cuda")
    return dev


class Vocoder:
    """A loaded teacher or student: mel in, waveform out."""

    def __init__(self, model: torch.nn.Module, features: FeatureConfig, config: dict, path: Path | None = None):
        self.model = model
        self.features = features
        self.config = config
        self.path = path
        self._mel: MelExtractor | None = None

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "cpu") -> "Vocoder":
        """Load a step directory, a ``latest``/``best`` link or an experiment directory."""
        dev = resolve_device(device)
        path = resolve_checkpoint(checkpoint)
        model, features, cfg = load_model(path, device=dev)
        return cls(model, features, cfg, path)

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    @property
    def hop(self) -> int:
        return self.model.hop

    @property
    def n_mels(self) -> int:
        return self.features.n_mels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def frame_context(self) -> int:
        """Mel frames each side of a chunk that its conditioning needs."""
        return self.model.cond.frame_context

    @property
    def left_frames(self) -> int:
        """Extra frames of output computed (then dropped) left of a student chunk: covers the flows' history."""
        if self.kind != "student":
            return 0
        return math.ceil(self.model.receptive_field / self.hop) + 1

    # ------------------------------------------------------------------ features
    def mel_from_audio(self, audio: str | Path | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Log-mel ``[n_mels, frames]`` of a file (resampled to the model rate) or of a 1-D array at the model rate.

        Uses the checkpoint's own feature parameters; ``frames = samples // hop``.
        Raises :class:`~wavedistill.audio.AudioError` for unusable audio.
        """
        if isinstance(audio, (str, Path)):
            x = load_audio(audio, self.sample_rate)
        else:
            x = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
            x = np.asarray(x, dtype=np.float32)
            if x.ndim != 1:
                raise AudioError(f"expected mono audio (a 1-D array), got shape {tuple(x.shape)}")
            if x.size == 0:
                raise AudioError("empty (0 samples)")
            if not np.isfinite(x).all():
                raise AudioError("contains NaN or inf samples")
        x = MelExtractor.align(x, self.hop)
        min_samples = max(self.hop, self.features.n_fft // 2 + 1)
        if x.shape[0] < min_samples:
            raise AudioError(f"too short: {x.shape[0]} samples, need at least {min_samples} for one mel frame")
        if self._mel is None:
            self._mel = MelExtractor(self.features)
        with torch.no_grad():
            return self._mel(torch.from_numpy(np.ascontiguousarray(x)))

    # ------------------------------------------------------------------ synthesis
    def synthesize(self, mel, seed: int | None = None, temperature: float = 1.0, chunk_frames: int | None = None,
                   speaker: int | None = None, progress: Progress | None = None) -> torch.Tensor:
        """Waveform ``[B, F*hop]`` from log-mels ``[B, n_mels, F]`` (or ``[F*hop]`` from ``[n_mels, F]``).

        ``seed=None`` draws a fresh seed.  ``chunk_frames`` bounds memory on long inputs; the
        output equals the unchunked one.  ``progress(n)`` is called with the number of
        output samples finished (summed over the batch).  Output is on the model's device.
        """
        mel = torch.as_tensor(mel)
        if mel.dim() not in (2, 3) or mel.shape[-2] != self.n_mels or mel.shape[-1] < 1:
            raise ValueError(f"mel must be [n_mels={self.n_mels}, frames>0] or [batch, n_mels, frames], got {tuple(mel.shape)}")
        single = mel.dim() == 2
        batch = mel[None] if single else mel
        items = list(batch.unbind(0))
        out = torch.stack(self.synthesize_items(items, seed, list(range(len(items))), temperature, chunk_frames, speaker, progress))
        return out[0] if single else out

    @torch.no_grad()  # not inference_mode: callers may feed the output to autograd code (losses, tests)
    def synthesize_items(self, mels: list[torch.Tensor], seed: int | None, rows: list[int] | None = None,
                         temperature: float = 1.0, chunk_frames: int | None = None, speaker: int | None = None,
                         progress: Progress | None = None, sink: Sink | None = None) -> list[torch.Tensor]:
        """Synthesise mels of different lengths together (one batch); item ``i`` uses noise row ``rows[i]``.

        With ``sink``, each chunk of output is handed over as ``sink(i, samples)`` in order (nothing is kept: the
        return value is empty), so memory stays bounded by the chunk size, not by the input length.

        Each item's output equals what it gets alone with the same seed and row: the
        conditioning is computed per item and only the causal networks run batched, so
        padding at the end of shorter items never reaches their valid samples.
        """
        if not mels:
            return []
        rows = list(rows) if rows is not None else [0] * len(mels)
        if len(rows) != len(mels) or min(rows) < 0:
            raise ValueError("rows must give one non-negative noise row per mel")
        if seed is None:
            seed = secrets.randbits(31)
        elif not 0 <= int(seed) < MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}), got {seed}")
        if chunk_frames is not None and int(chunk_frames) < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        mels = [torch.as_tensor(m).to(self.device, self.dtype) for m in mels]
        for m in mels:
            if m.dim() != 2 or m.shape[0] != self.n_mels or m.shape[1] < 1:
                raise ValueError(f"each mel must be [n_mels={self.n_mels}, frames>0], got {tuple(m.shape)}")
        frames = [m.shape[1] for m in mels]
        chunk = int(chunk_frames) if chunk_frames else max(frames)
        outs: list[list[torch.Tensor]] = [[] for _ in mels]
        emit = sink or (lambda i, x: outs[i].append(x))
        if self.kind == "student":
            self._student(mels, frames, int(seed), rows, float(temperature), chunk, progress, emit)
        elif self.kind == "coupling":
            self._speaker(speaker, len(mels))  # single-speaker: refuses a speaker id
            self._coupling(mels, frames, int(seed), rows, float(temperature), chunk, progress, emit)
        else:
            spk = self._speaker(speaker, len(mels))
            self._teacher(mels, frames, int(seed), rows, float(temperature), chunk, spk, progress, emit)
        return [] if sink else [torch.cat(o) for o in outs]

    # ------------------------------------------------------------------ internals
    def _speaker(self, speaker: int | None, batch: int) -> torch.Tensor | None:
        n = getattr(self.model.cfg, "n_speakers", 0)
        if n == 0:
            if speaker is not None:
                raise UserError("this checkpoint is single-speaker; do not pass a speaker id")
            return None
        if speaker is None:
            raise UserError(f"this teacher is multi-speaker (n_speakers={n}); pass a speaker id in [0, {n - 1}]")
        if not 0 <= int(speaker) < n:
            raise UserError(f"speaker id {speaker} is out of range; this teacher has speakers 0..{n - 1}")
        return torch.full((batch,), int(speaker), dtype=torch.long, device=self.device)

    def _cond_window(self, mel: torch.Tensor, first: int, stop: int, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """Sample-rate conditioning ``[C, (stop-first)*hop]`` for frames ``[first, stop)`` of one mel,
        computed from a slice with ``frame_context`` frames each side (or the utterance edge)."""
        ctx, hop = self.frame_context, self.hop
        lo, hi = max(0, first - ctx), min(mel.shape[1], stop + ctx)
        if speaker is None:
            c = self.model.cond(mel[None, :, lo:hi])
        else:
            c = self.model.cond(mel[None, :, lo:hi], speaker[:1])
        return c[0, :, (first - lo) * hop : (stop - lo) * hop]

    def _student(self, mels, frames, seed, rows, temperature, chunk, progress, emit: Sink) -> None:
        model, hop = self.model, self.hop
        n_max = max(frames)
        states: dict[int, tuple] = {}  # source-filter students: each item's filter state where its last chunk ended
        for s in range(0, n_max, chunk):
            e = min(s + chunk, n_max)
            a = max(0, s - self.left_frames)  # first frame computed; [a, s) is history, discarded
            active = [i for i, f in enumerate(frames) if f > s]
            length = (e - a) * hop
            cs, zs = [], []
            for i in active:
                e_i = min(e, frames[i])
                cs.append(F.pad(self._cond_window(mels[i], a, e_i), (0, length - (e_i - a) * hop)))
                z = _row(lambda n: model.make_noise(n, (e_i - a) * hop, seed, self.device, offset=a * hop), rows[i])
                zs.append(F.pad(z, (0, length - z.shape[0])))
            z = torch.stack(zs) * temperature
            if model.source is not None:  # the LP/de-emphasis recurrences carry their state from chunk to chunk
                ends = [min(e, frames[i]) for i in active]
                x, new = model.transform_chunk(z, torch.stack(cs), [mels[i][:, s : min(e_i + 1, frames[i])] for i, e_i in zip(active, ends)],
                                               (s - a) * hop, [(e_i - s) * hop for e_i in ends], [states[i] for i in active] if s else None)
                states.update(zip(active, new))
                x = torch.nn.functional.pad(x, ((s - a) * hop, 0))  # keep the layout of the plain path below
            else:
                x, _, _ = model.transform(z, torch.stack(cs))
            x = x.clamp(-1.0, 1.0)
            done = 0
            for k, i in enumerate(active):
                e_i = min(e, frames[i])
                emit(i, x[k, (s - a) * hop : (e_i - a) * hop])
                done += (e_i - s) * hop
            if progress is not None:
                progress(done)

    def _coupling(self, mels, frames, seed, rows, temperature, chunk, progress, emit: Sink) -> None:
        """Coupling flow (non-causal, finite receptive field): each chunk ``[s, e)`` is computed over
        ``[s − pad, e + pad)`` frames (clipped to the utterance), ``pad`` covering the model's half-width, and
        cropped; noise is positional.  Items run one at a time, so no item sees another's padding."""
        model, hop = self.model, self.hop
        pad = math.ceil(model.half_width / hop) + 1
        for i, (mel, f) in enumerate(zip(mels, frames)):
            for s in range(0, f, chunk):
                e = min(s + chunk, f)
                a, b = max(0, s - pad), min(f, e + pad)
                c = self._cond_window(mel, a, b)[None]
                z = _row(lambda n: model.make_noise(n, (b - a) * hop, seed, self.device, self.dtype, offset=a * hop), rows[i])
                x = model.inverse(z[None] * temperature, c)[0].clamp(-1.0, 1.0)
                emit(i, x[(s - a) * hop: (e - a) * hop])
                if progress is not None:
                    progress((e - s) * hop)

    def _teacher(self, mels, frames, seed, rows, temperature, chunk, speaker, progress, emit: Sink) -> None:
        from ..generation.cached import FrameConditioning
        from ..generation.select import make_generator

        model, hop = self.model, self.hop
        B, n_max = len(mels), max(frames)
        gen = make_generator(model)  # compiled CPU generator when available, else the Python one
        cache = gen.new_cache(B)  # ring buffers and the previous sample carry over from chunk to chunk
        noise = torch.full((B, model.dist.n_noise, n_max * hop), 0.5, dtype=self.dtype, device=self.device)
        for i, f in enumerate(frames):
            noise[i, :, : f * hop] = _row(lambda n: model.make_noise(n, f * hop, seed, self.device, self.dtype), rows[i])
        ends = torch.tensor([f * hop for f in frames])
        pos = 0

        def advance(n: int) -> None:  # count only samples inside each item's length
            nonlocal pos
            valid = int((ends.clamp(max=pos + n) - pos).clamp(min=0).sum())
            pos += n
            if progress is not None:
                progress(valid)

        # One item (the CPU default): the conditioning of every layer projected at frame rate, as in
        # Teacher.generate and bench.  Items of different lengths together: per-sample conditioning computed
        # per item (frame-rate projections use end-of-utterance kernels, one utterance per batch row).
        frame_rate = FrameConditioning.from_mel(model.cond, mels[0][None], speaker) if B == 1 else None
        for s in range(0, n_max, chunk):
            e = min(s + chunk, n_max)
            if frame_rate is not None:
                c = frame_rate.window(s * hop, e * hop)
            else:
                c = torch.zeros(B, model.cfg.cond_channels, (e - s) * hop, dtype=self.dtype, device=self.device)
                for i, f in enumerate(frames):
                    if f > s:
                        e_i = min(e, f)
                        c[i, :, : (e_i - s) * hop] = self._cond_window(mels[i], s, e_i, speaker)
            if model.source is None:
                y = gen.run(c, noise[:, :, s * hop : e * hop], temperature, cache, progress=advance)
            else:  # source-filter teacher: the predictor of each item's frames (the last one repeated past its end)
                if s == 0:
                    lp = model.source.predictor(torch.stack([F.pad(m[None], (0, n_max - m.shape[1]), mode="replicate")[0] for m in mels]))
                y = gen.run(c, noise[:, :, s * hop : e * hop], temperature, cache, progress=advance, lpc=lp.shifted(s * hop))
            for i, f in enumerate(frames):
                if f > s:
                    emit(i, y[i, : (min(e, f) - s) * hop])


def _row(make: Callable[[int], torch.Tensor], row: int) -> torch.Tensor:
    """Row ``row`` of the noise ``make(row + 1)`` draws (rows come from one stream, in order)."""
    return make(row + 1)[row]


# --------------------------------------------------------------------------- the synthesize command

AUTO_CHUNK_SECONDS = 10.0  # default --chunk-seconds: bounded memory whatever the input length, same output
LONG_INPUT_SECONDS = 60.0  # audio longer than this gets its log-mel computed block by block
MEL_BLOCK_SECONDS = 30.0


class InputError(Exception):
    """One input cannot be used; the message is a one-line reason."""


@dataclass
class Job:
    source: str  # as shown to the user
    mel: torch.Tensor
    name: str = ""
    out: Path | None = None
    frames: int = field(init=False)

    def __post_init__(self) -> None:
        self.frames = int(self.mel.shape[1])


def _audio_suffixes() -> set[str]:
    import soundfile as sf

    return {f".{k.lower()}" for k in sf.available_formats()} | {".aif", ".oga", ".opus", MEL_SUFFIX}


def expand_inputs(inputs: list[str]) -> list[tuple[str, Path | None, str | None]]:
    """Inputs in order: list files expanded (relative entries resolved against the list's directory), directories
    searched recursively for audio and ``.npy`` files (other files there are not inputs and are ignored).

    Each entry is ``(label, path, None)`` for an audio/.npy path, or ``(label, None, reason)`` for a
    list file that cannot be read (or a nested list), or a directory without inputs.
    """
    from ..data.prepare import find_audio_files

    out: list[tuple[str, Path | None, str | None]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            suffixes = _audio_suffixes()
            found = [p / rel for rel in find_audio_files(p) if rel.suffix.lower() in suffixes]
            if not found:
                out.append((item, None, "directory holds no audio or .npy files"))
            out.extend((str(q), q, None) for q in found)
            continue
        if p.suffix.lower() not in LIST_SUFFIXES:
            out.append((str(p), p, None))
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            out.append((item, None, "does not exist"))
            continue
        except (OSError, UnicodeDecodeError) as e:
            out.append((item, None, f"list file cannot be read ({e.__class__.__name__}: {e})"))
            continue
        for line in text.splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            q = Path(entry)
            q = q if q.is_absolute() else p.parent / q
            if q.suffix.lower() in LIST_SUFFIXES:
                out.append((str(q), None, f"listed in {item}, but list files cannot be nested"))
            else:
                out.append((str(q), q, None))
    return out


def long_mel(vocoder: Vocoder, audio: np.ndarray) -> torch.Tensor:
    """The log-mel of long audio computed block by block: the same frames as one pass (every frame's window lies
    inside its block, or meets the true edge, which is reflected as in one pass) without one huge STFT."""
    hop = vocoder.hop
    audio = MelExtractor.align(audio, hop)
    n = audio.shape[0] // hop
    margin = math.ceil(vocoder.features.n_fft / 2 / hop) + 1
    block = max(1, round(MEL_BLOCK_SECONDS * vocoder.sample_rate / hop))
    parts = []
    for s in range(0, n, block):
        e = min(n, s + block)
        lo, hi = max(0, s - margin), min(n, e + margin)
        m = vocoder.mel_from_audio(audio[lo * hop : hi * hop])
        parts.append(m[:, s - lo : e - lo])
    return torch.cat(parts, dim=1)


def load_mel_input(vocoder: Vocoder, path: Path) -> torch.Tensor:
    """Log-mel ``[n_mels, frames]`` of one input: a ``.npy`` log-mel or an audio file; :class:`InputError` if unusable."""
    if not path.exists():
        raise InputError("does not exist")
    if path.is_dir():
        raise InputError("is a directory; pass audio files, .npy log-mels or a list file")
    if path.suffix.lower() != MEL_SUFFIX:
        try:
            x = load_audio(path, vocoder.sample_rate)
            if x.shape[0] > LONG_INPUT_SECONDS * vocoder.sample_rate:
                return long_mel(vocoder, x)
            return vocoder.mel_from_audio(x)
        except AudioError as e:
            raise InputError(str(e)) from None
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"not a readable .npy file ({msg})") from None
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"holds {getattr(arr, 'dtype', type(arr).__name__)} data; expected a float log-mel [n_mels, frames]")
    n = vocoder.n_mels
    if arr.ndim != 2:
        raise InputError(f"has shape {tuple(arr.shape)}; expected a log-mel [n_mels={n}, frames]")
    if arr.shape[0] != n:
        hint = " (transposed? the layout is [n_mels, frames])" if arr.shape[1] == n else ""
        raise InputError(f"has {arr.shape[0]} mel channels but the checkpoint expects {n}{hint}")
    if arr.shape[1] == 0:
        raise InputError("empty (0 frames)")
    if not np.isfinite(arr).all():
        raise InputError("contains NaN or inf values")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Jobs sorted by length and cut into groups of ``batch_size`` (similar lengths together)."""
    order = sorted(jobs, key=lambda j: (j.frames, j.name))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class WavStream:
    """A WAV file written chunk by chunk into a temporary file next to ``path``, renamed into place by :meth:`commit`.

    16-bit PCM is scaled exactly as :func:`~wavedistill.data.audio.write_wav` does (clip, ×32768, round); other
    subtypes get the clipped float samples.  A different output rate is produced by a streaming soxr resampler.
    """

    def __init__(self, path: Path, model_rate: int, out_rate: int, subtype: str):
        import os
        import tempfile

        import soundfile as sf

        self.path = path
        self.subtype = subtype
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.file = sf.SoundFile(str(self.tmp), mode="w", samplerate=out_rate, channels=1, subtype=subtype, format="WAV")
        self.resampler = None
        if out_rate != model_rate:
            import soxr

            self.resampler = soxr.ResampleStream(model_rate, out_rate, 1, dtype="float32", quality="HQ")

    def _put(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        if self.subtype == "PCM_16":
            x64 = np.clip(x.astype(np.float64), -1.0, 1.0)
            self.file.write(np.clip(np.round(x64 * 32768.0), -32768, 32767).astype(np.int16))
        else:
            self.file.write(np.clip(x, -1.0, 1.0).astype(np.float32))

    def write(self, samples: torch.Tensor) -> None:
        x = samples.detach().to("cpu", torch.float32).numpy().reshape(-1)
        if self.resampler is not None:
            x = self.resampler.resample_chunk(x)
        self._put(x)

    def commit(self) -> None:
        import os

        if self.resampler is not None:
            self._put(self.resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self.file.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def run_synthesize(checkpoint: str | Path, inputs: list[str], out_dir: str | Path, device: str = "cpu", seed: int = 0,
                   temperature: float = 1.0, batch_size: int | None = None, chunk_seconds: float | None = AUTO_CHUNK_SECONDS,
                   speaker: int | None = None, sample_rate: int | None = None, subtype: str = "PCM_16",
                   skip_existing: bool = False) -> dict:
    """Synthesise every usable input into ``OUT_DIR/<stem>.wav``; unusable inputs are reported and skipped.

    Output is written as it is produced (chunks of ``chunk_seconds``), so memory does not grow with the output.
    ``batch_size`` None means 1 on CPU (batching only pays on a GPU) and 4 on CUDA.
    Returns ``{"outputs", "skipped", "existing", "renamed", "audio_seconds", "wall_seconds", "real_time_factor"}``.
    """
    import soundfile as sf
    from tqdm import tqdm

    if not inputs:
        raise UserError("no inputs given; pass audio files, directories, .npy log-mels or list files")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 <= seed < MAX_SEED:
        raise UserError(f"--seed must be in [0, {MAX_SEED}), got {seed}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0, got {temperature}")
    if chunk_seconds is not None and not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise UserError(f"--chunk-seconds must be a positive number, got {chunk_seconds}")
    if sample_rate is not None and not 1000 <= sample_rate <= 384000:
        raise UserError(f"--sample-rate must be an integer rate in Hz between 1000 and 384000, got {sample_rate}")
    wav_subtypes = sf.available_subtypes("WAV")
    if subtype not in wav_subtypes:
        raise UserError(f"--subtype {subtype} is not a WAV sample format; choose one of {', '.join(sorted(wav_subtypes))}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} exists and is not a directory; choose another --out-dir")

    voc = Vocoder.load(checkpoint, device)
    voc._speaker(speaker, 1)  # validate before any work
    sr, hop = voc.sample_rate, voc.hop
    out_rate = sample_rate or sr
    if batch_size is None:
        batch_size = 4 if voc.device.type == "cuda" else 1
    chunk_frames = max(1, round(chunk_seconds * sr / hop)) if chunk_seconds else None

    jobs: list[Job] = []
    skipped: list[tuple[str, str]] = []
    for label, p, reason in expand_inputs(inputs):
        try:
            if p is None:
                raise InputError(reason)
            jobs.append(Job(label, load_mel_input(voc, p)))
        except InputError as e:
            skipped.append((label, str(e)))
    if not jobs:
        shown = "; ".join(f"{src}: {why}" for src, why in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise UserError(f"nothing to synthesize: all {len(skipped)} input(s) are unusable ({shown})")
    for src, why in skipped:
        print(f"skipped {src}: {why}", file=sys.stderr, flush=True)

    renamed = []
    for job, name in zip(jobs, unique_names([Path(j.source).stem for j in jobs])):
        job.name, job.out = name, out_dir / f"{name}.wav"
        if name != Path(job.source).stem:
            renamed.append((job.source, str(job.out)))
    for src, dst in renamed:  # names collided: say which input went where
        print(f"renamed: {src} -> {dst}", flush=True)
    existing = [j for j in jobs if skip_existing and j.out.exists()]
    if existing:
        print(f"--skip-existing: {len(existing)} output(s) already exist and are kept", flush=True)
        jobs = [j for j in jobs if j not in existing]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(describe_os_error(e, f"--out-dir {out_dir}")) from None

    total_seconds = sum(j.frames for j in jobs) * hop / sr
    written: list[str] = []
    done = 0.0
    t_start = time.perf_counter()
    with tqdm(total=round(total_seconds, 3), unit="s", desc="synthesize", file=sys.stderr, disable=None,
              bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}{postfix}]") as bar:

        def advance(samples: int) -> None:
            nonlocal done
            done += samples / sr
            bar.update(samples / sr)
            bar.set_postfix_str(f"RTF {(time.perf_counter() - t_start) / max(done, 1e-9):.3f}", refresh=False)

        for group in batches(jobs, batch_size):
            streams: list[WavStream] = []
            try:
                for job in group:
                    streams.append(WavStream(job.out, sr, out_rate, subtype))
                voc.synthesize_items([j.mel for j in group], seed, [0] * len(group), temperature, chunk_frames,
                                     speaker, advance, sink=lambda i, x: streams[i].write(x))
                for job, stream in zip(group, streams):
                    stream.commit()
                    written.append(str(job.out))
            except OSError as e:
                raise UserError(describe_os_error(e, str(group[len(streams) - 1].out if streams else out_dir))) from None
            finally:
                for stream in streams:
                    if stream.tmp.exists():
                        stream.discard()
            for job in group:
                job.mel = job.mel[:, :0]  # done: free the input
    wall = time.perf_counter() - t_start
    rtf = wall / total_seconds if total_seconds else 0.0
    notes = []
    if existing:
        notes.append(f"{len(existing)} existing output(s) kept")
    if skipped:
        notes.append(f"{len(skipped)} input(s) skipped (exit status 1)")
    note = (", " + ", ".join(notes)) if notes else ""
    print(f"synthesized {len(written)} file(s), {total_seconds:.2f} s of audio in {wall:.2f} s "
          f"(real-time factor {rtf:.3f}){note} -> {out_dir}", flush=True)
    return {
        "outputs": written,
        "skipped": [{"input": s, "reason": r} for s, r in skipped],
        "existing": [str(j.out) for j in existing],
        "renamed": [{"input": s, "output": d} for s, d in renamed],
        "audio_seconds": total_seconds,
        "wall_seconds": wall,
        "real_time_factor": rtf,
    }
