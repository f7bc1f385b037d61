"""Glow's building blocks (Kingma & Dhariwal 2018): ActNorm, invertible 1×1 convolution, squeeze.

Each works on vectors ``[B, C]`` (``spatial_dims=0``, ``event_dims=1``), 1-D signals ``[B, C, T]``
(``spatial_dims=1``, ``event_dims=2``) and 2-D ``[B, C, H, W]`` (``spatial_dims=2``, ``event_dims=3``);
the per-channel log-determinant is multiplied by the number of positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .base import Flow


def _positions(x: torch.Tensor, spatial_dims: int) -> int:
    n = 1
    for s in x.shape[x.dim() - spatial_dims:]:
        n *= s
    return n


def _per_channel(v: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``[C]`` to a shape that broadcasts against ``[B, C, *spatial]``."""
    return v.reshape(v.shape[0], *([1] * spatial_dims))


class ActNorm(Flow):
    """``y = (x + b)·exp(log s)`` per channel; ``log|det| = positions·Σ log s``.

    Data-dependent initialisation on the first ``forward`` (the data direction): ``b = −mean``,
    ``log s = −½·log(var + eps)`` per channel over the batch and positions, so the first output has
    zero mean and unit variance.  Under an initialised ``torch.distributed`` process group the
    per-channel sums, sums of squares and counts (float64) are all-reduced first, so 1 and N processes
    see identical statistics.  A zero-variance channel gets ``log s = −½·log(eps)`` (finite).
    ``inverse`` never initialises.  The ``initialized`` flag is a buffer, so it travels in the state dict.
    """

    def __init__(self, channels: int, spatial_dims: int = 0, eps: float = 1e-6):
        super().__init__()
        self.spatial_dims, self.eps = spatial_dims, eps
        self.event_dims = spatial_dims + 1
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``b`` and ``log s`` from ``x`` (all-reducing the moments across processes when distributed)."""
        xd = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # [C, N]
        stats = torch.stack([xd.sum(1), (xd * xd).sum(1), torch.full_like(xd[:, 0], xd.shape[1])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        s, ss, n = stats
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        self.bias.copy_(-mean.to(self.bias.dtype))
        self.log_scale.copy_((-0.5 * torch.log(var + self.eps)).to(self.log_scale.dtype))
        self.initialized.fill_(1)

    def forward(self, x, context=None):
        if not bool(self.initialized):
            self.initialize(x)
        ls = _per_channel(self.log_scale, self.spatial_dims).to(x.dtype)
        y = (x + _per_channel(self.bias, self.spatial_dims).to(x.dtype)) * torch.exp(ls)
        ladj = self.log_scale.to(x.dtype).sum() * _positions(x, self.spatial_dims)
        return y, ladj.expand(x.shape[0])

    def inverse(self, y, context=None):
        ls = _per_channel(self.log_scale, self.spatial_dims).to(y.dtype)
        x = y * torch.exp(-ls) - _per_channel(self.bias, self.spatial_dims).to(y.dtype)
        ladj = -self.log_scale.to(y.dtype).sum() * _positions(y, self.spatial_dims)
        return x, ladj.expand(y.shape[0])


class InvertibleConv1x1(Flow):
    """Invertible 1×1 convolution (a channel-mixing matrix at every position), LU-parametrised.

    ``W = P·L·(U + diag(sign·exp(log|s|)))`` with ``P`` a fixed permutation and ``sign`` fixed ±1
    (buffers), ``L`` unit lower triangular and ``U`` strictly upper triangular (learned), ``log|s|``
    learned.  ``log|det W| = Σ log|s|`` exactly (never a ``logdet`` of a raw matrix); the sign of
    ``det W`` is ``det P·Π sign`` and may be negative.  The inverse weight is computed in float64 from
    the factors (two triangular solves) and cast back.  Initialised from a random orthogonal matrix.
    """

    def __init__(self, channels: int, spatial_dims: int = 1, seed: int | None = None):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.event_dims = spatial_dims + 1
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        w0 = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))[0]
        p, l, u = torch.linalg.lu(w0)
        s = torch.diagonal(u)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(l.float())
        self.upper = nn.Parameter(torch.triu(u, 1).float())
        self.log_abs_s = nn.Parameter(torch.log(s.abs()).float())

    def _factors(self, dtype):
        eye = torch.eye(self.lower.shape[0], dtype=dtype, device=self.lower.device)
        mask = self.lower_mask.to(dtype)
        lower = self.lower.to(dtype) * mask + eye
        upper = self.upper.to(dtype) * mask.T + torch.diag(self.sign.to(dtype) * torch.exp(self.log_abs_s.to(dtype)))
        return self.perm.to(dtype), lower, upper

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        p, lower, upper = self._factors(dtype)
        return p @ lower @ upper

    def inverse_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``W⁻¹ = U'⁻¹·L⁻¹·Pᵀ`` by triangular solves in float64, cast to ``dtype``."""
        p, lower, upper = self._factors(torch.float64)
        eye = torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return (u_inv @ l_inv @ p.T).to(dtype)

    def _mix(self, x, w):
        return torch.einsum("ij,bj...->bi...", w, x)

    def forward(self, x, context=None):
        ladj = self.log_abs_s.to(x.dtype).sum() * _positions(x, self.spatial_dims)
        return self._mix(x, self.weight(x.dtype)), ladj.expand(x.shape[0])

    def inverse(self, y, context=None):
        ladj = -self.log_abs_s.to(y.dtype).sum() * _positions(y, self.spatial_dims)
        return self._mix(y, self.inverse_weight(y.dtype)), ladj.expand(y.shape[0])


class Squeeze1d(Flow):
    """``[B, C, T] → [B, C·f, T/f]``: groups of ``f`` consecutive samples become channels (``log|det| = 0``)."""

    event_dims = 2

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x, context=None):
        b, c, t = x.shape
        if t % self.factor:
            raise ValueError(f"Squeeze1d: length {t} is not a multiple of the factor {self.factor}")
        y = x.reshape(b, c, t // self.factor, self.factor).permute(0, 1, 3, 2).reshape(b, c * self.factor, t // self.factor)
        return y, x.new_zeros(b)

    def inverse(self, y, context=None):
        b, cf, t = y.shape
        if cf % self.factor:
            raise ValueError(f"Squeeze1d.inverse: {cf} channels is not a multiple of the factor {self.factor}")
        c = cf // self.factor
        x = y.reshape(b, c, self.factor, t).permute(0, 1, 3, 2).reshape(b, c, t * self.factor)
        return x, y.new_zeros(b)


class Squeeze2d(Flow):
    """``[B, C, H, W] → [B, 4C, H/2, W/2]``: each 2×2 patch becomes 4 channels (``log|det| = 0``)."""

    event_dims = 3

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze2d: height and width must be even, got {h}×{w}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y, context=None):
        b, c4, h, w = y.shape
        if c4 % 4:
            raise ValueError(f"Squeeze2d.inverse: {c4} channels is not a multiple of 4")
        c = c4 // 4
        x = y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)
        return x, y.new_zeros(b)


def unsqueeze1d(factor: int = 2) -> Flow:
    """``[B, C·f, T/f] → [B, C, T]`` (the inverse of :class:`Squeeze1d` as a flow)."""
    return Squeeze1d(factor).inv


def unsqueeze2d() -> Flow:
    """``[B, 4C, H/2, W/2] → [B, C, H, W]`` (the inverse of :class:`Squeeze2d` as a flow)."""
    return Squeeze2d().inv
