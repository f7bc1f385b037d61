"""Linear-prediction coefficients from a log-mel spectrogram (LPCNet's recipe, from a mel).

:class:`MelLPC` maps log-mel frames ``[B, n_mels, F]`` (exactly what :class:`~wavedistill.data.audio.MelExtractor`
makes) to predictors ``a [B, F, p]`` with ``x̂_t = Σ_k a_k x_{t-1-k}``, in float64 throughout:

1. undo the log: ``M = exp(log_mel)`` (the extractor floors the mel at ``features.log_floor`` before the log;
   floored bands come back as that small value);
2. undo the filterbank: the extractor's mel is ``fbᵀ·|X|`` with ``|X|`` the magnitude (``power=1``) of the
   Hann-windowed STFT and ``fb`` torchaudio's Slaney-normalised triangles; ``|X̂| = max(pinv(fbᵀ)·M, 0)``;
3. power spectrum ``|X̂|²``, times the pre-emphasis response ``|1 − α e^{-jω}|²`` when ``α > 0`` (the predictor is
   then the one of the pre-emphasised signal ``s_t = x_t − α x_{t-1}``);
4. autocorrelation ``r = irfft(power)`` (lags ``0..p``), a Gaussian lag window
   ``r_i ·= exp(−½(2π·f₀·i/sr)²)`` with ``f₀ = LAG_WINDOW_HZ`` (bandwidth expansion), and a white-noise floor
   ``r_0 ·= 1 + 10^(NOISE_FLOOR_DB/10)`` (−40 dB), plus a tiny absolute floor so a silent frame has ``r_0 > 0``;
5. Levinson–Durbin of order ``p``.  With ``r_0`` raised above the windowed autocorrelation (a positive
   semi-definite sequence) the Toeplitz matrix is positive definite, so every reflection coefficient has
   ``|k| < 1`` and the synthesis filter ``1/A(z)`` is stable; :func:`levinson` also returns the ``k``'s.
"""

from __future__ import annotations

import math

import torch

from ..config import FeatureConfig
from .audio import MelExtractor

LAG_WINDOW_HZ = 60.0  # Gaussian lag window bandwidth (as speech codecs use at 8 kHz)
NOISE_FLOOR_DB = -40.0  # white-noise correction on r_0
ABS_FLOOR = 1e-12  # added to r_0 so an all-zero spectrum still gives a defined (zero) predictor


def levinson(r: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levinson–Durbin on autocorrelations ``r [..., order+1]`` → ``(a [..., order], k [..., order], err [...])``.

    ``a`` are predictor coefficients (``x̂_t = Σ a_k x_{t-1-k}``), ``k`` the reflection coefficients, ``err`` the
    final prediction-error power.  Runs in the dtype of ``r`` (give it float64).
    """
    a = r.new_zeros(*r.shape[:-1], order)
    ks = r.new_zeros(*r.shape[:-1], order)
    err = r[..., 0].clone()
    for i in range(order):
        acc = r[..., i + 1] - (a[..., :i] * r[..., 1 : i + 1].flip(-1)).sum(-1)
        k = acc / err
        prev = a[..., :i].clone()
        a[..., :i] = prev - k[..., None] * prev.flip(-1)
        a[..., i] = k
        ks[..., i] = k
        err = err * (1.0 - k * k)
    return a, ks, err


def autocorrelation_from_power(power: torch.Tensor, n_fft: int, lags: int, sample_rate: int) -> torch.Tensor:
    """``[..., n_fft//2+1]`` power spectrum → lag-windowed, noise-floored autocorrelation ``[..., lags+1]``."""
    r = torch.fft.irfft(power, n=n_fft, dim=-1)[..., : lags + 1]
    i = torch.arange(lags + 1, dtype=r.dtype, device=r.device)
    r = r * torch.exp(-0.5 * (2 * math.pi * LAG_WINDOW_HZ * i / sample_rate) ** 2)
    r0 = r[..., 0] * (1.0 + 10.0 ** (NOISE_FLOOR_DB / 10.0)) + ABS_FLOOR
    return torch.cat([r0[..., None], r[..., 1:]], dim=-1)


class MelLPC(torch.nn.Module):
    """Log-mel ``[B, n_mels, F]`` → LP predictors ``[B, F, order]`` (float64); see the module docstring.

    ``preemphasis`` α: coefficients of the pre-emphasised signal.  No parameters or buffers, so a model
    holding one keeps its state dict unchanged.
    """

    def __init__(self, features: FeatureConfig, order: int, preemphasis: float = 0.0):
        super().__init__()
        self.order, self.preemphasis = int(order), float(preemphasis)
        self.n_fft, self.sample_rate = features.n_fft, features.sample_rate
        fb = MelExtractor(features).mel.mel_scale.fb.to(torch.float64)  # [n_freqs, n_mels]: mel = fbᵀ·|X|
        # Plain float64 tensors, not buffers: model.float()/.half() must not round them; moved per call.
        self.unmel = torch.linalg.pinv(fb.t())  # [n_freqs, n_mels]
        w = torch.linspace(0, math.pi, fb.shape[0], dtype=torch.float64)
        alpha = self.preemphasis
        self.emphasis = 1.0 - 2.0 * alpha * torch.cos(w) + alpha * alpha

    def power_spectrum(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Estimated power spectrum ``[B, F, n_freqs]`` (of the pre-emphasised signal if α > 0)."""
        mel = torch.exp(log_mel.to(torch.float64))  # [B, n_mels, F]
        mag = torch.matmul(self.unmel.to(mel.device), mel).clamp_min(0.0)  # [B, n_freqs, F]
        return (mag * mag).transpose(1, 2) * self.emphasis.to(mel.device)

    @torch.no_grad()
    def forward(self, log_mel: torch.Tensor, return_reflection: bool = False):
        r = autocorrelation_from_power(self.power_spectrum(log_mel), self.n_fft, self.order, self.sample_rate)
        a, k, _ = levinson(r, self.order)
        return (a, k) if return_reflection else a


def combine_preemphasis(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """Predictor of ``x`` from a predictor ``a [..., p]`` of ``s_t = x_t − α x_{t-1}``: ``[..., p+1]``.

    ``1 − Σ b_k z^{-k} = (1 − α z^{-1})(1 − Σ a_k z^{-k})``, i.e. ``x̂_t = α x_{t-1} + Σ a_k s_{t-1-k}``.
    """
    if alpha == 0.0:
        return a
    pad = torch.nn.functional.pad
    return pad(a, (0, 1)) + alpha * pad(torch.ones_like(a[..., :1]), (0, a.shape[-1])) - alpha * pad(a, (1, 0))
