"""Output distributions of the teacher over 16-bit audio in [-1, 1].

Both distributions expose

* ``log_prob_discrete(params, x)`` — log mass of the 16-bit bin holding ``x``
  (training by maximum likelihood);
* ``log_density(params, x)`` — continuous log-density (scoring student
  samples; never quantise those);
* ``sample(params, noise, temperature)`` — a sample driven by explicit
  uniform noise, so that different generators given the same noise produce the
  same waveform.

All density maths runs in float32 (or float64 when given float64) regardless of
autocast.  Bins: 65536 codes ``-1 + 2i/65535``, half-width ``1/65535``.  The
lowest and highest codes take the whole tail.  The bin mass
``σ(a) − σ(b)`` is computed in log space as
``logσ(a) + logσ(−b) + log(1 − e^{−(a−b)})``, which is exact and stable for any
scale, so no "tiny probability" switch is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

N_CODES = 65536
HALF_BIN = 1.0 / (N_CODES - 1)
LN2 = math.log(2.0)


def log1mexp(d: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-d))`` for ``d > 0``, accurate for small and large ``d``."""
    small = d < LN2
    # Evaluate each branch on a safe argument so that unused branches give no inf/NaN gradients.
    d_small = torch.where(small, d, torch.full_like(d, LN2))
    d_large = torch.where(small, torch.full_like(d, LN2), d)
    return torch.where(small, torch.log(-torch.expm1(-d_small)), torch.log1p(-torch.exp(-d_large)))


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _edges(x: torch.Tensor):
    return x < -1.0 + HALF_BIN, x > 1.0 - HALF_BIN


class DiscretizedMixtureOfLogistics:
    """K-component mixture of logistics; params are ``[B, 3K, T]`` (logits, means, log-scales)."""

    def __init__(self, mixtures: int = 10, log_scale_min: float = -16.0):
        self.k = mixtures
        self.log_scale_min = log_scale_min

    @property
    def n_params(self) -> int:
        return 3 * self.k

    @property
    def n_noise(self) -> int:
        return self.k + 1

    def shift(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Params with every component's location moved by ``delta [B, T]`` (float32 out)."""
        logits, means, log_scales = _float(params).split(self.k, dim=1)
        return torch.cat([logits, means + _float(delta)[:, None], log_scales], dim=1)

    def split(self, params: torch.Tensor):
        params = _float(params)
        logits, means, log_scales = params.split(self.k, dim=1)
        return logits, means, log_scales.clamp(min=self.log_scale_min)

    def log_prob_discrete(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T]`` on the 16-bit grid → log-probability ``[B, T]``."""
        logits, mu, log_s = self.split(params)
        x = _float(x).unsqueeze(1)
        inv_s = torch.exp(-log_s)
        centered = x - mu
        plus = (centered + HALF_BIN) * inv_s
        minus = (centered - HALF_BIN) * inv_s
        log_cdf_plus = F.logsigmoid(plus)
        log_sf_minus = F.logsigmoid(-minus)
        mid = log_cdf_plus + log_sf_minus + log1mexp(2.0 * HALF_BIN * inv_s)
        low, high = _edges(x)
        lp = torch.where(low, log_cdf_plus, torch.where(high, log_sf_minus, mid))
        return torch.logsumexp(lp + F.log_softmax(logits, dim=1), dim=1)

    def log_density(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Continuous log-density of ``x [B, T]`` (or ``[B, S, T]`` samples per step)."""
        logits, mu, log_s = self.split(params)
        log_w = F.log_softmax(logits, dim=1)
        x = _float(x)
        if x.dim() == 3:  # [B, S, T] → [B, S, K, T]
            mu, log_s, log_w = mu.unsqueeze(1), log_s.unsqueeze(1), log_w.unsqueeze(1)
            x = x.unsqueeze(2)
            dim = 2
        else:
            x = x.unsqueeze(1)
            dim = 1
        u = (x - mu) * torch.exp(-log_s)
        lp = u - log_s - 2.0 * F.softplus(u)
        return torch.logsumexp(lp + log_w, dim=dim)

    def sample(self, params: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``noise [B, K+1, T]`` uniform in (0, 1) → sample ``[B, T]``."""
        logits, mu, log_s = self.split(params)
        u_mix = noise[:, : self.k].to(logits.dtype).clamp(1e-10, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(u_mix))
        idx = torch.argmax(logits + gumbel, dim=1, keepdim=True)
        m = mu.gather(1, idx).squeeze(1)
        ls = log_s.gather(1, idx).squeeze(1)
        u = noise[:, self.k].to(logits.dtype).clamp(1e-5, 1.0 - 1e-5)
        x = m + torch.exp(ls) * temperature * (torch.log(u) - torch.log1p(-u))
        return x.clamp(-1.0, 1.0)


class DiscretizedGaussian:
    """Single Gaussian (the ClariNet teacher); params are ``[B, 2, T]`` (mean, log-scale)."""

    def __init__(self, log_scale_min: float = -9.0):
        self.log_scale_min = log_scale_min

    n_params = 2
    n_noise = 1

    def shift(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Params with the mean moved by ``delta [B, T]`` (float32 out)."""
        params = _float(params)
        return torch.cat([params[:, :1] + _float(delta)[:, None], params[:, 1:]], dim=1)

    def split(self, params: torch.Tensor):
        params = _float(params)
        mu, log_s = params[:, 0], params[:, 1]
        return mu, log_s.clamp(min=self.log_scale_min)

    def log_prob_discrete(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Computed in float64: float32 ``log_ndtr`` gradients vanish or blow up in the far tail."""
        out_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
        mu, log_s = self.split(params.double())
        x = x.double()
        inv_s = torch.exp(-log_s)
        a = (x - mu + HALF_BIN) * inv_s
        b = (x - mu - HALF_BIN) * inv_s
        # Φ(a) − Φ(b) = Φ(−b) − Φ(−a): work in the lower tail where log Φ is accurate.
        right = (a + b) > 0
        hi = torch.where(right, -b, a)
        lo = torch.where(right, -a, b)
        log_hi = torch.special.log_ndtr(hi)
        log_lo = torch.special.log_ndtr(lo)
        gap = (log_hi - log_lo).clamp_min(1e-30)
        mid = log_hi + log1mexp(gap)
        low, high = _edges(x)
        lp = torch.where(low, torch.special.log_ndtr(a), torch.where(high, torch.special.log_ndtr(-b), mid))
        return lp.to(out_dtype)

    def log_density(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mu, log_s = self.split(params)
        x = _float(x)
        if x.dim() == 3:
            mu, log_s = mu.unsqueeze(1), log_s.unsqueeze(1)
        z = (x - mu) * torch.exp(-log_s)
        return -0.5 * z * z - log_s - 0.5 * math.log(2 * math.pi)

    def sample(self, params: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        mu, log_s = self.split(params)
        u = noise[:, 0].to(mu.dtype).clamp(1e-6, 1.0 - 1e-6)
        x = mu + torch.exp(log_s) * temperature * torch.special.ndtri(u)
        return x.clamp(-1.0, 1.0)


def make_distribution(kind: str, mixtures: int, log_scale_min: float | None):
    """``log_scale_min=None`` takes the default floor: -16 for the mixture, -9 for the Gaussian."""
    if kind == "mol":
        return DiscretizedMixtureOfLogistics(mixtures, -16.0 if log_scale_min is None else log_scale_min)
    if kind == "gaussian":
        return DiscretizedGaussian(-9.0 if log_scale_min is None else log_scale_min)
    raise ValueError(f"unknown output distribution {kind!r}")


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Snap audio onto the 16-bit code grid ``-1 + 2i/65535`` (clamped to [-1, 1]).

    Computed in float64 and rounded once to ``x.dtype``, so every grid point is
    the nearest representable value and quantising twice changes nothing.
    """
    i = torch.clamp(torch.round((x.double() + 1.0) * ((N_CODES - 1) / 2.0)), 0, N_CODES - 1)
    return (i * (2.0 / (N_CODES - 1)) - 1.0).to(x.dtype)
