"""Objective evaluation: vocoders and a Griffin-Lim baseline against ground truth.

``wavedistill eval`` resynthesises every utterance of a split of a feature
cache from its log-mel with each checkpoint and with Griffin-Lim (librosa),
then scores each system against the recording:

* ``pesq`` — PESQ (ITU-T P.862, package ``pesq``): narrow-band at 8 kHz,
  wide-band at 16 kHz; other rates are resampled to the nearer of the two.
* ``stoi`` — STOI (package ``pystoi``).
* ``mcd_db`` — mel-cepstral distortion in dB: cepstra are the orthonormal
  DCT-II of the natural-log mel spectrum (MFCC-like), coefficients
  ``1..D`` (``c0``, the level, excluded), ``(10/ln 10)·sqrt(2·Σ_d (c_d − c'_d)²)``
  averaged over the speech frames of the reference (frames within
  ``SPEECH_DB`` dB of its loudest; the spectral shape of near-silence at the
  log floor says nothing about a vocoder and would dominate the mean).
* ``f0_rmse_cents`` — RMS difference in cents of the pYIN F0 tracks (librosa)
  over frames voiced in both signals; ``vuv_error`` — fraction of frames
  whose voiced/unvoiced decision differs.  Together they say whether the
  intonation and the voicing of the utterance survive vocoding.
* ``log_mel_l1`` — mean absolute difference of the log-mels.
* ``spectral_convergence`` — ``‖|S| − |Ŝ|‖_F / ‖|S|‖_F`` of the linear STFT magnitudes.

Signals are truncated to the shorter of the two.  A metric that is undefined
for an utterance (PESQ finds no speech, STOI has too few voiced frames) is
recorded as ``null`` with its reason; means skip nulls.

Outputs (each written atomically): ``REPORT/metrics.json``,
``REPORT/report.md``, ``REPORT/spectrograms/<uttid>.png`` for the first
utterances and ``REPORT/wav/<system>/<uttid>.wav``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..version import __version__
from ..data.audio import MelExtractor, write_wav
from ..config import FeatureConfig
from ..data.cache import FeatureCache
from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, describe_os_error
from .likelihood import GAUSSIAN_BASELINE, LIKELIHOOD_SECONDS, WHAT, gaussian_baseline_bits, likelihood_table, model_bits

METRICS = ("pesq", "stoi", "mcd_db", "log_mel_l1", "spectral_convergence", "f0_rmse_cents", "vuv_error")
HIGHER_IS_BETTER = {"pesq": True, "stoi": True, "mcd_db": False, "log_mel_l1": False, "spectral_convergence": False,
                    "f0_rmse_cents": False, "vuv_error": False}
SPEECH_DB = 40.0
F0_MIN, F0_MAX = 50.0, 500.0
GRIFFIN_LIM = "griffin_lim"
GRIFFIN_LIM_ITERS = 32
MCD_ORDER = 24


class MetricUndefined(Exception):
    """A metric has no value for this pair of signals; the message says why."""


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def align(ref, deg) -> tuple[np.ndarray, np.ndarray]:
    """Both signals (or ``[..., frames]`` arrays) truncated to the shorter last axis."""
    ref, deg = _np(ref), _np(deg)
    n = min(ref.shape[-1], deg.shape[-1])
    return ref[..., :n], deg[..., :n]


# --------------------------------------------------------------------------- metrics


def pesq_mode(sample_rate: int) -> tuple[int, str]:
    """``(rate, mode)`` PESQ runs at: 8 kHz narrow-band below 16 kHz, else 16 kHz wide-band."""
    return (8000, "nb") if sample_rate < 16000 else (16000, "wb")


def pesq_score(ref, deg, sample_rate: int) -> float:
    """PESQ MOS-LQO of ``deg`` against ``ref``; raises :class:`MetricUndefined` when PESQ cannot score them."""
    import librosa
    from pesq import BufferTooShortError, NoUtterancesError, PesqError, pesq

    ref, deg = align(ref, deg)
    rate, mode = pesq_mode(sample_rate)
    if rate != sample_rate:
        ref = librosa.resample(ref, orig_sr=sample_rate, target_sr=rate, res_type="soxr_hq")
        deg = librosa.resample(deg, orig_sr=sample_rate, target_sr=rate, res_type="soxr_hq")
    if not np.any(ref) or not np.any(deg):
        raise MetricUndefined("silent signal (PESQ needs speech in both)")
    try:
        value = float(pesq(rate, ref.astype(np.float32), deg.astype(np.float32), mode))
    except NoUtterancesError:
        raise MetricUndefined("PESQ found no utterances (silence or too little speech)") from None
    except BufferTooShortError:
        raise MetricUndefined("signal too short for PESQ") from None
    except PesqError as e:
        raise MetricUndefined(f"PESQ failed ({type(e).__name__}: {e})") from None
    if not math.isfinite(value):
        raise MetricUndefined("PESQ returned a non-finite value")
    return value


def stoi_score(ref, deg, sample_rate: int, extended: bool = False) -> float:
    """STOI (``pystoi``) of ``deg`` against ``ref``; undefined when too few frames remain after silence removal."""
    from pystoi import stoi

    ref, deg = align(ref, deg)
    if not np.any(ref):
        raise MetricUndefined("silent reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(ref, deg, sample_rate, extended=extended))
    for w in caught:
        if "Not enough STFT frames" in str(w.message):
            raise MetricUndefined("too few non-silent frames for STOI")
    if not math.isfinite(value):
        raise MetricUndefined("STOI returned a non-finite value")
    return value


def mel_cepstrum(log_mel, order: int = MCD_ORDER) -> np.ndarray:
    """Cepstra ``[order, frames]`` (coefficients 1..order, c0 dropped) of a natural-log mel ``[n_mels, frames]``."""
    from scipy.fft import dct

    c = dct(_np(log_mel), type=2, norm="ortho", axis=0)
    return c[1 : order + 1]


def speech_frames(log_mel, db: float = SPEECH_DB) -> np.ndarray:
    """Boolean mask of the frames of a natural-log magnitude mel within ``db`` dB of the loudest frame."""
    level = np.log(np.sum(np.exp(_np(log_mel)), axis=0) + 1e-30)  # log of the frame's summed magnitude
    return level >= level.max() - db / 20.0 * np.log(10.0)


def mel_cepstral_distortion(ref_log_mel, deg_log_mel, order: int = MCD_ORDER, frames: np.ndarray | None = None) -> float:
    """Mean over frames (all, or those where ``frames`` is true) of ``(10/ln 10)·sqrt(2·Σ_{d=1..D} (c_d − c'_d)²)`` in dB."""
    ref, deg = align(ref_log_mel, deg_log_mel)
    if frames is not None:
        keep = np.asarray(frames, dtype=bool)[: ref.shape[-1]]
        ref, deg = ref[..., keep], deg[..., keep]
    if ref.shape[-1] == 0:
        raise MetricUndefined("no frames to compare")
    diff = mel_cepstrum(ref, order) - mel_cepstrum(deg, order)
    return float(np.mean(10.0 / np.log(10.0) * np.sqrt(2.0 * np.sum(diff**2, axis=0))))


def f0_track(audio, sample_rate: int, hop_length: int, frame_length: int) -> tuple[np.ndarray, np.ndarray]:
    """pYIN F0 in Hz and the voiced flag per frame (librosa), searched between ``F0_MIN`` and ``F0_MAX``."""
    import librosa

    x = _np(audio).astype(np.float32)
    # two periods of the lowest F0 must fit a frame (at 16 kHz and above, n_fft alone is too short)
    frame_length = max(frame_length, 1 << math.ceil(math.log2(2 * sample_rate / F0_MIN)))
    f0, voiced, _ = librosa.pyin(x, fmin=F0_MIN, fmax=min(F0_MAX, sample_rate / 4), sr=sample_rate,
                                 frame_length=frame_length, hop_length=hop_length, center=True)
    return np.nan_to_num(f0), np.asarray(voiced, dtype=bool)


def f0_errors(ref_track, deg_track) -> tuple[float, float]:
    """``(F0 RMSE in cents over frames voiced in both, voiced/unvoiced decision error rate)``."""
    (f_ref, v_ref), (f_deg, v_deg) = ref_track, deg_track
    n = min(len(v_ref), len(v_deg))
    f_ref, v_ref, f_deg, v_deg = f_ref[:n], v_ref[:n], f_deg[:n], v_deg[:n]
    if not v_ref.any():
        raise MetricUndefined("no voiced frames in the reference")
    vuv = float(np.mean(v_ref != v_deg))
    both = v_ref & v_deg
    if not both.any():
        return math.nan, vuv
    cents = 1200.0 * np.log2(f_deg[both] / f_ref[both])
    return float(np.sqrt(np.mean(cents**2))), vuv


def log_mel_l1(ref_log_mel, deg_log_mel) -> float:
    ref, deg = align(ref_log_mel, deg_log_mel)
    if ref.shape[-1] == 0:
        raise MetricUndefined("no frames to compare")
    return float(np.mean(np.abs(ref - deg)))


def spectral_convergence(ref, deg, n_fft: int, hop_length: int, win_length: int) -> float:
    """``‖|S_ref| − |S_deg|‖_F / ‖|S_ref|‖_F`` of Hann-windowed STFT magnitudes."""
    ref, deg = align(ref, deg)
    if ref.shape[-1] <= n_fft // 2:
        raise MetricUndefined(f"signal shorter than half an FFT frame ({n_fft // 2} samples)")
    window = torch.hann_window(win_length, dtype=torch.float64)

    def mag(x: np.ndarray) -> torch.Tensor:
        return torch.stft(torch.from_numpy(x), n_fft, hop_length, win_length, window, center=True, pad_mode="reflect",
                          return_complex=True).abs()

    s_ref, s_deg = mag(ref), mag(deg)
    norm = torch.linalg.norm(s_ref)
    if norm == 0:
        raise MetricUndefined("silent reference")
    return float(torch.linalg.norm(s_ref - s_deg) / norm)


class Scorer:
    """All metrics of one system's output against the ground truth, with the feature parameters fixed."""

    def __init__(self, features: FeatureConfig):
        self.features = features
        self.mel = MelExtractor(features)
        self._f0_cache: tuple[bytes, tuple] | None = None

    def _reference_f0(self, ref: np.ndarray, track) -> tuple:
        """The reference's F0 track, computed once while consecutive calls score the same reference."""
        import hashlib

        key = hashlib.sha1(np.ascontiguousarray(ref).tobytes()).digest()
        if self._f0_cache is None or self._f0_cache[0] != key:
            self._f0_cache = (key, track(ref))
        return self._f0_cache[1]

    def log_mel(self, audio) -> np.ndarray:
        x = torch.as_tensor(_np(audio), dtype=torch.float32)
        x = MelExtractor.align(x, self.features.hop_length)
        with torch.inference_mode():
            return self.mel(x).double().numpy()

    def score(self, ref, deg) -> tuple[dict[str, float | None], dict[str, str]]:
        """``({metric: value or None}, {metric: reason it is None})``."""
        fc = self.features
        ref, deg = align(ref, deg)
        values: dict[str, float | None] = {}
        reasons: dict[str, str] = {}
        mels: dict[str, np.ndarray] = {}

        def mel_pair():
            if not mels:
                mels["ref"], mels["deg"] = self.log_mel(ref), self.log_mel(deg)
            return mels["ref"], mels["deg"]

        def mcd():
            r, d = mel_pair()
            return mel_cepstral_distortion(r, d, order=min(MCD_ORDER, fc.n_mels - 1), frames=speech_frames(r))

        pitch: dict[str, tuple[float, float]] = {}

        def f0(which: int) -> float:
            if not pitch:
                track = lambda x: f0_track(x, fc.sample_rate, fc.hop_length, fc.n_fft)  # noqa: E731
                rmse, vuv = f0_errors(self._reference_f0(ref, track), track(deg))
                pitch["v"] = (rmse, vuv)
            value = pitch["v"][which]
            if math.isnan(value):
                raise MetricUndefined("no frame voiced in both signals")
            return value

        fns = {
            "pesq": lambda: pesq_score(ref, deg, fc.sample_rate),
            "stoi": lambda: stoi_score(ref, deg, fc.sample_rate),
            "mcd_db": mcd,
            "log_mel_l1": lambda: log_mel_l1(*mel_pair()),
            "spectral_convergence": lambda: spectral_convergence(ref, deg, fc.n_fft, fc.hop_length, fc.win_length),
            "f0_rmse_cents": lambda: f0(0),
            "vuv_error": lambda: f0(1),
        }
        for name, fn in fns.items():
            try:
                values[name] = fn()
            except MetricUndefined as e:
                values[name], reasons[name] = None, str(e)
            except ValueError as e:  # e.g. a mel of a signal too short for one frame
                values[name], reasons[name] = None, str(e).splitlines()[0] if str(e) else type(e).__name__
        return values, reasons


# --------------------------------------------------------------------------- Griffin-Lim


def griffin_lim(log_mel, features: FeatureConfig, n_iter: int = GRIFFIN_LIM_ITERS, seed: int = 0) -> np.ndarray:
    """Waveform ``[frames*hop]`` from a natural-log magnitude mel (librosa NNLS mel inversion + Griffin-Lim).

    The filterbank is librosa's Slaney mel with Slaney norm, which equals the torchaudio
    filterbank :class:`~wavedistill.audio.MelExtractor` uses; the STFT matches it too
    (Hann window of ``win_length``, centred, reflect padding, magnitude not power).
    """
    import librosa

    fc = features
    m = np.exp(_np(log_mel)).astype(np.float32)
    frames = m.shape[-1]
    # a centred STFT of frames*hop samples has frames+1 columns; MelExtractor drops the last: repeat the final frame
    m = np.concatenate([m, m[..., -1:]], axis=-1)
    stft = librosa.feature.inverse.mel_to_stft(m, sr=fc.sample_rate, n_fft=fc.n_fft, power=1.0, fmin=fc.fmin,
                                               fmax=fc.fmax, norm="slaney", htk=False)
    y = librosa.griffinlim(stft, n_iter=n_iter, hop_length=fc.hop_length, win_length=fc.win_length, n_fft=fc.n_fft,
                           window="hann", center=True, pad_mode="reflect", length=frames * fc.hop_length,
                           random_state=seed)
    return np.clip(y, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- the eval command


def system_names(vocoders) -> list[str]:
    """``teacher``/``student``; when a kind repeats, ``kind-<experiment>-<step>`` (parts equal to the kind
    left out, e.g. ``teacher-step-00004000`` and ``teacher-demo`` for ``checkpoints/demo/teacher``), made unique."""
    kinds = [v.kind for v in vocoders]
    names, used = [], {GRIFFIN_LIM, "ground_truth"}
    for v in vocoders:
        if kinds.count(v.kind) == 1:
            base = v.kind
        else:
            p = Path(v.path) if v.path is not None else Path(v.kind)
            parts = (p.parent.parent.name, p.name) if p.parent.name == "checkpoints" else (p.parent.name, p.name)
            base = "-".join([v.kind] + [x for x in parts if x and x != v.kind])
        name, k = base, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def _means(per_utt: dict[str, dict]) -> tuple[dict[str, float | None], dict[str, int]]:
    means, counts = {}, {}
    for m in METRICS:
        vals = [u[m] for u in per_utt.values() if u.get(m) is not None]
        means[m] = float(np.mean(vals)) if vals else None
        counts[m] = len(vals)
    return means, counts


def spectrogram_figure(panels: list[tuple[str, np.ndarray]], features: FeatureConfig, title: str) -> bytes:
    """Stacked log-mel images (one row per system, shared colour scale) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = max(float(p.max()) for _, p in panels)
    vmin = max(min(float(p.min()) for _, p in panels), vmax - 12.0)
    seconds = panels[0][1].shape[1] * features.hop_length / features.sample_rate
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.7 * len(panels) + 0.5), dpi=100, sharex=True, squeeze=False)
    for ax, (name, mel) in zip(axes[:, 0], panels):
        im = ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                       extent=(0.0, mel.shape[1] * features.hop_length / features.sample_rate, 0, mel.shape[0]))
        ax.set_ylabel("mel bin")
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("s")
    axes[-1, 0].set_xlim(0, seconds)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="log-mel", shrink=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def metrics_table(result: dict) -> list[str]:
    """Markdown table: one row per system, the mean of each metric."""
    rate, mode = result["config"]["pesq"]["sample_rate"], result["config"]["pesq"]["mode"]
    heads = {"pesq": f"PESQ ({mode}, {rate // 1000} kHz) ↑", "stoi": "STOI ↑", "mcd_db": "MCD (dB) ↓",
             "log_mel_l1": "log-mel L1 ↓", "spectral_convergence": "spectral conv. ↓",
             "f0_rmse_cents": "F0 RMSE (cents) ↓", "vuv_error": "V/UV error ↓"}
    lines = ["| system | " + " | ".join(heads[m] for m in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, sysres in result["systems"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(sysres["mean"][m]) for m in METRICS) + " |")
    return lines


def render_report(result: dict, pngs: list[tuple[str, str]]) -> str:
    cfg = result["config"]
    lines = [
        "# wavedistill evaluation",
        "",
        f"Data `{cfg['data']}`, split `{cfg['split']}`, {cfg['n_utterances']} utterance(s), seed {cfg['seed']}"
        f"{'' if cfg.get('temperature', 1.0) == 1.0 else ', temperature ' + format(cfg['temperature'], 'g')}; "
        f"means over utterances where a metric is defined (n per metric in metrics.json).",
        "",
        *metrics_table(result),
        "",
        *([*likelihood_table(result), ""] if likelihood_table(result) else []),
        "Systems:",
        "",
    ]
    for name, src in cfg["systems"].items():
        lines.append(f"- `{name}`: {src}")
    if pngs:
        lines += ["", "## Spectrograms", ""]
        for uttid, rel in pngs:
            lines += [f"### {uttid}", "", f"![{uttid}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


MANIFEST = ".wavedistill-eval.json"  # the files an eval wrote into its --out, so that a re-run removes exactly those


def _wav_dir_utterances(wav_dir: Path, vocoders, max_utterances: int | None):
    """``(uttid, audio, mel)`` for the audio files under ``wav_dir`` with the checkpoints' features (no cache needed)."""
    from ..data.audio import AudioError, load_audio
    from ..data.prepare import find_audio_files, make_uttids
    from ..inference.synthesis import LONG_INPUT_SECONDS, _audio_suffixes, long_mel

    if not wav_dir.is_dir():
        raise UserError(f"--wav-dir {wav_dir} is not a directory; point it at a directory of audio files")
    voc = vocoders[0]
    sources = [r for r in find_audio_files(wav_dir) if r.suffix.lower() in _audio_suffixes() - {".npy"}]
    utterances, skipped = [], []
    for rel, uttid in zip(sources, make_uttids(sources)):
        if max_utterances is not None and len(utterances) >= max_utterances:
            break
        try:
            x = MelExtractor.align(load_audio(wav_dir / rel, voc.sample_rate), voc.hop)
            mel = long_mel(voc, x) if x.shape[0] > LONG_INPUT_SECONDS * voc.sample_rate else voc.mel_from_audio(x)
        except AudioError as e:
            skipped.append(f"{rel}: {e}")
            continue
        utterances.append((uttid, torch.from_numpy(x[: mel.shape[1] * voc.hop].copy()), mel))
    if not utterances:
        what = f"{len(sources)} audio files, none usable: {skipped[0]}" if skipped else "no audio files found"
        raise UserError(f"no usable audio in --wav-dir {wav_dir} ({what})")
    for line in skipped:
        print(f"skipped {wav_dir / line}", file=sys.stderr)
    return utterances


def _prepare_out(out: Path, planned: list[str]) -> None:
    """Make ``out`` ready: remove what an earlier eval wrote there (its manifest), refuse a non-empty --out it did not
    write, then record the files this run will write."""
    import json
    import os

    if out.is_dir() and any(out.iterdir()):
        manifest = out / MANIFEST
        if not manifest.is_file():
            raise UserError(f"--out {out} is not empty and was not written by 'wavedistill eval'; "
                            f"choose a new or empty --out")
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{manifest} is corrupt; delete {out} or choose another --out") from None
        for rel in old:
            p = out / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                continue  # never outside --out
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                p.unlink()
        for d in sorted({(out / rel).parent for rel in old}, key=lambda q: -len(q.parts)):
            while d != out and d.is_dir() and not any(d.iterdir()):
                os.rmdir(d)
                d = d.parent
    atomic_write_json(out / MANIFEST, {"files": sorted(planned)})


def run_eval(checkpoints: list[str], data: str | Path | None, out: str | Path, split: str = "test",
             max_utterances: int | None = None, seed: int = 0, device: str = "cpu", spectrograms: int = 3,
             wav_dir: str | Path | None = None, temperature: float = 1.0) -> dict:
    """Score every checkpoint and Griffin-Lim on ``split`` of the feature cache ``data`` (or on the audio files under
    ``wav_dir``, with the checkpoints' features); write the report to ``out``.  ``temperature`` scales the vocoders'
    noise (as in ``synthesize``; the likelihood column does not depend on it)."""
    from tqdm import tqdm

    from ..inference.synthesis import AUTO_CHUNK_SECONDS, Vocoder

    if not checkpoints:
        raise UserError("pass at least one --checkpoint")
    if (data is None) == (wav_dir is None):
        raise UserError("pass either --data (a feature cache) or --wav-dir (a directory of audio files)")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be in [0, {2**32}), got {seed}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0, got {temperature}; 1.0 samples the trained model")
    if max_utterances is not None and max_utterances < 1:
        raise UserError(f"--max-utterances must be >= 1, got {max_utterances}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    vocoders = [Vocoder.load(c, device) for c in checkpoints]
    if wav_dir is not None:
        wav_dir = Path(wav_dir)
        fc = vocoders[0].features
        for c, v in zip(checkpoints[1:], vocoders[1:]):
            if v.features != fc:
                raise UserError(f"checkpoint {c} uses other feature parameters than {checkpoints[0]}; "
                                f"--wav-dir evaluates checkpoints that share their features")
        utterances = _wav_dir_utterances(wav_dir, vocoders, max_utterances)
        ids = [u[0] for u in utterances]
        data, split = wav_dir, "wav-dir"
    else:
        data = Path(data)
        if data.is_dir() and not (data / "summary.json").exists():
            from ..data.prepare import find_audio_files

            if any(find_audio_files(data)):
                raise UserError(f"--data {data} holds audio files, not a feature cache; evaluate them with --wav-dir {data}, "
                                f"or prepare a cache with 'wavedistill prepare --wav-dir {data} --out {data.name}-features'")
        cache = FeatureCache(data)
        fc = cache.features
        have = dataclasses.asdict(fc)
        for c, v in zip(checkpoints, vocoders):
            for key, want in dataclasses.asdict(v.features).items():
                if have[key] != want:
                    raise UserError(f"checkpoint {c} uses features.{key}={want} but data dir {data} was prepared with "
                                    f"{have[key]}; evaluate on a cache prepared with the checkpoint's features")
        ids = cache.ids(split)
        if max_utterances is not None:
            ids = ids[:max_utterances]
        if not ids:
            raise UserError(f"split '{split}' of {data} has no utterances; choose another --split")
        # read every utterance before writing anything: a corrupt cache leaves no partial report
        utterances = [(uttid, *cache.load(uttid)) for uttid in ids]
    chunk_frames = max(1, round(AUTO_CHUNK_SECONDS * fc.sample_rate / fc.hop_length))  # bounded memory, same audio
    names = system_names(vocoders)
    systems = [GRIFFIN_LIM] + names
    scorer = Scorer(fc)
    per_utt: dict[str, dict[str, dict]] = {s: {} for s in systems}
    pngs: list[tuple[str, str]] = []
    lk_utt: dict[str, list] = {n: [] for n in [GAUSSIAN_BASELINE] + names}
    planned = [f"wav/{n}/{u}.wav" for n in systems for u in ids] + [f"spectrograms/{u}.png" for u in ids[:spectrograms]]
    try:
        _prepare_out(out, planned + ["metrics.json", "report.md"])
        for idx, (uttid, audio, mel) in enumerate(tqdm(utterances, desc="eval", unit="utt", file=sys.stderr, disable=None)):
            outputs = {GRIFFIN_LIM: griffin_lim(mel, fc, seed=seed)}
            for name, voc in zip(names, vocoders):
                outputs[name] = voc.synthesize(mel, seed=seed, temperature=temperature, chunk_frames=chunk_frames).float().cpu().numpy()
            for name, y in outputs.items():
                values, reasons = scorer.score(audio, y)
                entry: dict = dict(values)
                if reasons:
                    entry["null_reasons"] = reasons
                per_utt[name][uttid] = entry
                write_wav(out / "wav" / name / f"{uttid}.wav", y, fc.sample_rate)
            lk_utt[GAUSSIAN_BASELINE].append(gaussian_baseline_bits(audio, fc.sample_rate, fc.hop_length))
            for name, voc in zip(names, vocoders):
                lk_utt[name].append(model_bits(voc, audio, mel, seed))
            if idx < spectrograms:
                panels = [("ground truth", scorer.log_mel(audio))] + [
                    ("Griffin-Lim" if n == GRIFFIN_LIM else n, scorer.log_mel(outputs[n])) for n in systems
                ]
                rel = f"spectrograms/{uttid}.png"
                atomic_write_bytes(out / rel, spectrogram_figure(panels, fc, uttid))
                pngs.append((uttid, rel))
        rate, mode = pesq_mode(fc.sample_rate)
        result: dict = {"systems": {}, "config": {
            "data": str(data), "split": split, "seed": seed, "temperature": temperature, "max_utterances": max_utterances, "n_utterances": len(ids),
            "utterances": ids, "device": device, "wavedistill_version": __version__,
            "systems": {GRIFFIN_LIM: f"librosa Griffin-Lim, {GRIFFIN_LIM_ITERS} iterations"}
            | {n: str(v.path) for n, v in zip(names, vocoders)},
            "features": dataclasses.asdict(fc), "pesq": {"sample_rate": rate, "mode": mode},
            "mcd": {"order": min(MCD_ORDER, fc.n_mels - 1), "cepstrum": "orthonormal DCT-II of natural-log mel, c0 excluded",
                    "frames": f"reference frames within {SPEECH_DB:g} dB of its loudest"},
            "f0": {"method": "librosa.pyin", "fmin_hz": F0_MIN, "fmax_hz": min(F0_MAX, fc.sample_rate / 4),
                   "rmse": "cents, over frames voiced in both"},
            "griffin_lim": {"n_iter": GRIFFIN_LIM_ITERS, "seed": seed},
            "higher_is_better": HIGHER_IS_BETTER,
        }}
        for name in systems:
            means, counts = _means(per_utt[name])
            result["systems"][name] = {"mean": means, "count": counts, "per_utterance": per_utt[name]}
        result["likelihood"] = {
            "seconds": LIKELIHOOD_SECONDS,
            "bits_per_sample": {n: (None if any(b is None for b in v) else sum(v) / len(v)) for n, v in lk_utt.items()},
            "per_utterance": {n: dict(zip(ids, v)) for n, v in lk_utt.items()},
            "what": {n: WHAT.get(n if n == GAUSSIAN_BASELINE else v.kind, "no tractable likelihood")
                     for n, v in [(GAUSSIAN_BASELINE, None)] + list(zip(names, vocoders))},
        }
        atomic_write_json(out / "metrics.json", result)
        report = render_report(result, pngs)
        atomic_write_text(out / "report.md", report)
    except OSError as e:
        raise UserError(describe_os_error(e, f"the report under {out}")) from None
    print("\n".join(metrics_table(result) + ([""] + likelihood_table(result) if likelihood_table(result) else [])))
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    return result
