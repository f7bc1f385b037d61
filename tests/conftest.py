"""Shared fixtures: small synthetic audio written into tmp_path, the demo corpus, a default config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from wavedistill.config import Config

DEMO_WAV_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")


def speech_like(sample_rate: int = 8000, seconds: float = 1.0, silence: float = 0.2, f0: float = 140.0, peak: float = 0.5, seed: int = 0) -> np.ndarray:
    """A voiced-speech stand-in: decaying harmonics of a wobbling f0 under a syllable envelope.

    ``silence`` seconds of digital silence lead and trail; the voiced middle has
    30 ms fades and a peak absolute amplitude of exactly ``peak``.
    """
    rng = np.random.default_rng(seed)
    n_total = int(round(seconds * sample_rate))
    n_sil = int(round(silence * sample_rate))
    n = n_total - 2 * n_sil
    t = np.arange(n) / sample_rate
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(f) / sample_rate
    voiced = np.zeros(n)
    for k in range(1, 20):
        if k * f0 * 1.05 < sample_rate / 2:
            voiced += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2
    fade = int(0.03 * sample_rate)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    envelope[:fade] *= ramp
    envelope[-fade:] *= ramp[::-1]
    voiced *= envelope
    voiced *= peak / np.abs(voiced).max()
    out = np.zeros(n_total)
    out[n_sil : n_sil + n] = voiced
    return out.astype(np.float32)


@pytest.fixture
def write_audio(tmp_path):
    """Factory: ``write_audio(name, data=None, sample_rate=8000, subtype=None, format=None) -> Path`` under tmp_path."""

    def _write(name: str, data: np.ndarray | None = None, sample_rate: int = 8000, subtype: str | None = None, format: str | None = None) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            data = speech_like(sample_rate)
        sf.write(str(path), data, sample_rate, subtype=subtype, format=format)
        return path

    return _write


@pytest.fixture
def good_wav(write_audio) -> Path:
    """1.0 s of speech-like 16-bit 8 kHz audio with 0.2 s of silence at each end."""
    return write_audio("good.wav", subtype="PCM_16")


@pytest.fixture
def demo_wav_dir() -> Path:
    if not DEMO_WAV_DIR.is_dir():
        pytest.skip(f"demo corpus {DEMO_WAV_DIR} is not installed")
    return DEMO_WAV_DIR


@pytest.fixture
def small_config() -> Config:
    """Default features (8 kHz, hop 80, 64 mels) and prepare settings."""
    return Config().validate()


@pytest.fixture
def single_thread():
    """Tiny models step fastest single-threaded (and do not fight other jobs); restore the setting afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def flatten_mixture_logits(teacher) -> None:
    """Constant mixture logits for a 4-component MoL teacher: every component ties unless the noise decides."""
    with torch.no_grad():
        teacher.net.head2.weight[:4] = 0.0
        teacher.net.head2.bias[:4] = 0.0


def extreme_uniforms(batch: int, channels: int, steps: int, zeros: slice, ones: slice, seed: int = 7) -> torch.Tensor:
    """Uniform noise crowded at and beyond the sampler's clamps: values near 0 and 1, exact 0s and 1s."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, channels, steps, generator=g, dtype=torch.float64) ** 12
    noise = torch.where(torch.rand(u.shape, generator=g, dtype=torch.float64) < 0.5, u, 1.0 - u)
    noise[:, :, zeros] = 0.0
    noise[:, :, ones] = 1.0
    return noise.float()


def lively_teacher(output: str, mixtures: int, kernel_size: int, residual: int, gate: int, skip: int, layers: int,
                   stacks: int, seed: int):
    """A random float32 teacher (8 conditioning channels, 5 mels, hop 6) with livelier gates and narrower output
    distributions than at initialisation, so generated samples mostly stay inside (-1, 1) instead of clamping."""
    from wavedistill.config import TeacherConfig
    from wavedistill.models.teacher import Teacher

    cfg = TeacherConfig(layers=layers, stacks=stacks, kernel_size=kernel_size, residual_channels=residual,
                        gate_channels=gate, skip_channels=skip, cond_channels=8, upsample_scales=[2, 3],
                        output=output, mixtures=mixtures, log_scale_min=-9.0)
    cfg.validate()
    torch.manual_seed(seed)
    t = Teacher(cfg, n_mels=5).eval()
    with torch.no_grad():
        for p in t.net.layers.parameters():
            p.mul_(1.5)
        t.net.head2.weight.mul_(0.5)
        if output == "mol":
            t.net.head2.bias[2 * mixtures :] = -2.5
        else:
            t.net.head2.bias[1] = -2.5
    return t


def randomize(flow, scale=0.3, seed=0):
    """Move every parameter off its (often identity) initialisation so the tests see real dependence."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return flow
