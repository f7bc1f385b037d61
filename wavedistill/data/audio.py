"""Waveform I/O and log-mel features.

Reading goes through soundfile (any format libsndfile knows: WAV in any bit
depth, FLAC, OGG, ...), resampling through soxr (via librosa), silence
trimming through librosa and the mel filterbank through torchaudio.  Audio is
never normalised: levels are the recording's own.
"""

from __future__ import annotations

import contextlib
import sys
import os

import io
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch
import torchaudio

from ..config import FeatureConfig
from ..fileio import atomic_write_bytes


class AudioError(Exception):
    """A file cannot be used as training audio; the message is a one-line reason."""


def _soundfile_reason(e: Exception) -> str:
    msg = getattr(e, "error_string", None) or str(e) or type(e).__name__
    msg = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return msg.rstrip(".")


@contextlib.contextmanager
def native_stderr_silenced():
    """Discard what C libraries write to file descriptor 2 (libmpg123 inside libsndfile prints a warning for
    some non-audio bytes); the reason a file is unusable is reported on one line by the caller instead."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load_audio(path: str | Path, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Read ``path`` as float32 mono at ``sample_rate`` Hz (1-D array).

    Multichannel audio is averaged to mono; other rates are resampled (soxr,
    deterministic).  ``max_seconds`` (optional) refuses longer files from
    their header, before decoding them.  Raises :class:`AudioError` for files
    that are unreadable, empty, too long or contain non-finite samples.
    """
    try:
        with native_stderr_silenced(), sf.SoundFile(str(path)) as f:
            frames, rate = f.frames, f.samplerate
            if max_seconds is not None and frames > max_seconds * rate:
                raise AudioError(f"too long: {frames / rate:.1f} s, limit is {max_seconds:g} s")
            data = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as e:
        raise AudioError(f"not a readable audio file ({_soundfile_reason(e)})") from None
    if data.shape[0] == 0:
        raise AudioError("empty (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError("contains NaN or inf samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(mono, dtype=np.float32)


def trim_silence(audio: np.ndarray, top_db: float, frame_length: int = 512, hop_length: int = 128) -> np.ndarray:
    """Remove leading and trailing parts quieter than ``top_db`` below the loudest frame.

    The defaults (64 ms frames, 16 ms hop at 8 kHz) suit telephone-band speech.
    """
    trimmed, _ = librosa.effects.trim(audio, top_db=top_db, frame_length=frame_length, hop_length=hop_length)
    return trimmed


class MelExtractor(torch.nn.Module):
    """Log-mel spectrogram with exactly ``T // hop_length`` frames.

    Frame ``i`` is centred at sample ``i * hop_length`` (reflect padding), so
    audio aligned with :meth:`align` and its mel line up sample for frame.
    Input ``[..., T]`` float32, output ``[..., n_mels, T // hop_length]``.
    """

    def __init__(self, features: FeatureConfig):
        super().__init__()
        self.hop_length = features.hop_length
        self.n_fft = features.n_fft
        self.log_floor = features.log_floor
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=features.sample_rate,
            n_fft=features.n_fft,
            win_length=features.win_length,
            hop_length=features.hop_length,
            f_min=features.fmin,
            f_max=features.fmax,
            n_mels=features.n_mels,
            power=1.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )

    @staticmethod
    def align(audio, hop: int):
        """Truncate the last axis of ``audio`` (array or tensor) to a multiple of ``hop``."""
        n = audio.shape[-1] // hop * hop
        return audio[..., :n]

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        frames = audio.shape[-1] // self.hop_length
        if audio.shape[-1] <= self.n_fft // 2:
            raise ValueError(f"audio of {audio.shape[-1]} samples is too short for a mel spectrogram with n_fft={self.n_fft}")
        mel = self.mel(audio)[..., :frames]
        return torch.log(torch.clamp(mel, min=self.log_floor))


def write_wav(path: str | Path, audio, sample_rate: int) -> None:
    """Write mono ``audio`` (array or tensor in [-1, 1]) as 16-bit PCM WAV, atomically.

    Samples are clipped to [-1, 1] and scaled by 32768 (the convention soundfile
    uses when it reads 16-bit PCM back), so a read-back is within 1/32768.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().to("cpu", torch.float32).numpy()
    x = np.clip(np.asarray(audio, dtype=np.float64).reshape(-1), -1.0, 1.0)
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, int(sample_rate), format="WAV", subtype="PCM_16")
    atomic_write_bytes(path, buf.getvalue())
