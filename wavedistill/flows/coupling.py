"""Coupling flows: NICE (additive coupling + scaling) and RealNVP (affine coupling).

A coupling layer splits its input into a conditioning part ``x_a`` (kept) and a transformed part
``x_b``; a net reads ``x_a`` (and an optional context) and gives ``(log s, t)``:
``y_b = x_b·exp(log s) + t`` (RealNVP) or ``y_b = x_b + t`` (NICE, ``log|det| = 0``).  Both directions
are one parallel pass.  The log-scale is soft-clamped, ``clamp·(2/π)·atan(s/clamp)``, and the net's last
layer is zero-initialised so every coupling starts as the identity.

* :class:`MaskedCoupling` — a binary mask over the event (``[D]`` for vectors with an MLP net,
  ``[C, H, W]`` for images with a conv net): :func:`alternating_mask`, :func:`checkerboard_mask`;
* :class:`ChannelCoupling` — splits channels of ``[B, C, T]`` (``spatial_dims=1``) or ``[B, C, H, W]``
  (``spatial_dims=2``), with an optional conditioning context ``[B, Cc, T]`` / ``[B, Cc, H, W]`` fed
  to the net; the net is pluggable (any module ``[B, C_a + Cc, ...] -> [B, 2·C_b, ...]``).
* :class:`Scaling` — NICE's diagonal scaling layer; :class:`Permutation` — a fixed permutation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Flow, sum_event


def soft_clamp(s: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """``clamp·(2/π)·atan(s/clamp)`` (identity near 0, bounded by ``±clamp``); ``None`` = no clamp."""
    return s if clamp is None else clamp * (2 / math.pi) * torch.atan(s / clamp)


def alternating_mask(dim: int, parity: int = 0) -> torch.Tensor:
    """``[dim]`` mask with ones on even (``parity=0``) or odd (``parity=1``) positions (1 = kept)."""
    return ((torch.arange(dim) + parity) % 2 == 0).float()


def checkerboard_mask(height: int, width: int, parity: int = 0, channels: int = 1) -> torch.Tensor:
    """``[channels, height, width]`` checkerboard (1 = kept) for image couplings."""
    i = torch.arange(height).unsqueeze(1) + torch.arange(width).unsqueeze(0)
    return ((i + parity) % 2 == 0).float().expand(channels, height, width).clone()


def _zero_last(net: nn.Module) -> nn.Module:
    last = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return net


def mlp(in_features: int, out_features: int, hidden: int = 64, layers: int = 2, zero_last: bool = True) -> nn.Module:
    """A small MLP (``layers`` hidden layers, ReLU) with a zero-initialised last layer."""
    mods, f = [], in_features
    for _ in range(layers):
        mods += [nn.Linear(f, hidden), nn.ReLU()]
        f = hidden
    mods.append(nn.Linear(f, out_features))
    net = nn.Sequential(*mods)
    return _zero_last(net) if zero_last else net


def conv_net(in_channels: int, out_channels: int, hidden: int = 32, spatial_dims: int = 1, kernel_size: int = 3,
             zero_last: bool = True) -> nn.Module:
    """Default coupling net: conv(k) → ReLU → conv(1) → ReLU → conv(k), last layer zero-initialised."""
    conv = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
    pad = kernel_size // 2
    net = nn.Sequential(conv(in_channels, hidden, kernel_size, padding=pad), nn.ReLU(), conv(hidden, hidden, 1), nn.ReLU(),
                        conv(hidden, out_channels, kernel_size, padding=pad))
    return _zero_last(net) if zero_last else net


class _CouplingMaths:
    """The one place the coupling map is written."""

    affine: bool
    clamp: float | None

    def _scale_shift(self, h: torch.Tensor, split_dim: int):
        if self.affine:
            log_s, t = h.chunk(2, dim=split_dim)
            return soft_clamp(log_s, self.clamp), t
        return None, h

    @staticmethod
    def _couple(xb, log_s, t):
        return xb + t if log_s is None else xb * torch.exp(log_s) + t

    @staticmethod
    def _uncouple(yb, log_s, t):
        return yb - t if log_s is None else (yb - t) * torch.exp(-log_s)


class MaskedCoupling(Flow, _CouplingMaths):
    """Coupling with a binary mask over the event: ``y = m⊙x + (1−m)⊙(x·exp(log s(m⊙x)) + t(m⊙x))``.

    ``mask`` of shape ``[D]`` acts on vectors ``[B, D]`` (default net: :func:`mlp`; an optional vector
    context ``[B, context_dim]`` is concatenated to the net input); of shape ``[C, H, W]`` it acts on
    images (default net: 2-D :func:`conv_net`, context ``[B, Cc, H, W]`` concatenated on channels).
    ``affine=False`` is NICE's additive coupling.
    """

    def __init__(self, mask: torch.Tensor, affine: bool = True, hidden: int = 64, clamp: float | None = 5.0,
                 context_dim: int = 0, net: nn.Module | None = None):
        super().__init__()
        if mask.dim() not in (1, 3):
            raise ValueError(f"MaskedCoupling: mask must be [D] or [C, H, W], got shape {tuple(mask.shape)}")
        self.register_buffer("mask", mask.float())
        self.affine, self.clamp = affine, clamp
        self.event_dims = mask.dim()
        out_mult = 2 if affine else 1
        if net is None:
            if mask.dim() == 1:
                net = mlp(mask.shape[0] + context_dim, out_mult * mask.shape[0], hidden)
            else:
                net = conv_net(mask.shape[0] + context_dim, out_mult * mask.shape[0], hidden, spatial_dims=2)
        self.net = net

    def _params(self, x, context):
        m = self.mask.to(x.dtype)
        inp = x * m
        if context is not None:
            inp = torch.cat([inp, context.to(x.dtype)], dim=-self.event_dims)
        log_s, t = self._scale_shift(self.net(inp), split_dim=-self.event_dims)
        keep = 1 - m
        return (None if log_s is None else log_s * keep), t * keep

    def forward(self, x, context=None):
        log_s, t = self._params(x, context)
        y = self._couple(x, log_s, t)
        return y, self._ladj(y, log_s)

    def inverse(self, y, context=None):
        log_s, t = self._params(y, context)  # the kept part is unchanged, so the net sees the same input
        x = self._uncouple(y, log_s, t)
        return x, -self._ladj(y, log_s)

    def _ladj(self, y, log_s):
        if log_s is None:
            return y.new_zeros(y.shape[: y.dim() - self.event_dims])
        return sum_event(log_s, self.event_dims)


class ChannelCoupling(Flow, _CouplingMaths):
    """Channel-split coupling for ``[B, C, T]`` (``spatial_dims=1``) or ``[B, C, H, W]`` (``spatial_dims=2``).

    The first ``C//2`` channels (``x_a``; the last ones with ``swap=True``) are kept; the net reads
    ``cat(x_a, context)`` and gives ``log s, t`` for the other channels.  ``net`` is pluggable: any module
    mapping ``[B, C_a + context_channels, ...]`` to ``[B, 2·C_b, ...]`` (``C_b`` channels for
    ``affine=False``); default :func:`conv_net` with a zero-initialised last layer.
    """

    def __init__(self, channels: int, spatial_dims: int = 1, context_channels: int = 0, affine: bool = True,
                 hidden: int = 32, clamp: float | None = 5.0, swap: bool = False, net: nn.Module | None = None):
        super().__init__()
        if channels < 2:
            raise ValueError(f"ChannelCoupling needs at least 2 channels, got {channels}")
        if spatial_dims not in (1, 2):
            raise ValueError(f"ChannelCoupling: spatial_dims must be 1 or 2, got {spatial_dims}")
        self.event_dims = spatial_dims + 1
        self.affine, self.clamp, self.swap = affine, clamp, swap
        ca = channels // 2
        self.sizes = (ca, channels - ca) if not swap else (channels - ca, ca)
        c_kept, c_tr = (self.sizes[0], self.sizes[1]) if not swap else (self.sizes[1], self.sizes[0])
        self.context_channels = context_channels
        self.net = net if net is not None else conv_net(c_kept + context_channels, (2 if affine else 1) * c_tr, hidden,
                                                        spatial_dims)

    def _split(self, x):
        a, b = torch.split(x, list(self.sizes), dim=1)
        return (b, a) if self.swap else (a, b)  # (kept, transformed)

    def _join(self, kept, tr):
        return torch.cat([tr, kept] if self.swap else [kept, tr], dim=1)

    def _params(self, kept, context):
        inp = kept if context is None else torch.cat([kept, context.to(kept.dtype)], dim=1)
        return self._scale_shift(self.net(inp), split_dim=1)

    def forward(self, x, context=None):
        kept, xb = self._split(x)
        log_s, t = self._params(kept, context)
        return self._join(kept, self._couple(xb, log_s, t)), self._ladj(x, log_s)

    def inverse(self, y, context=None):
        kept, yb = self._split(y)
        log_s, t = self._params(kept, context)
        return self._join(kept, self._uncouple(yb, log_s, t)), -self._ladj(y, log_s)

    def _ladj(self, x, log_s):
        if log_s is None:
            return x.new_zeros(x.shape[0])
        return sum_event(log_s, self.event_dims)


class Scaling(Flow):
    """NICE's scaling layer: ``y = x·exp(s)`` with a learned ``s`` of the event shape (``log|det| = Σ s``)."""

    def __init__(self, event_shape, init: float = 0.0):
        super().__init__()
        event_shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        self.event_dims = len(event_shape)
        self.log_scale = nn.Parameter(torch.full(event_shape, float(init)))

    def forward(self, x, context=None):
        ls = self.log_scale.to(x.dtype)
        return x * torch.exp(ls), sum_event(ls.expand_as(x), self.event_dims)

    def inverse(self, y, context=None):
        ls = self.log_scale.to(y.dtype)
        return y * torch.exp(-ls), -sum_event(ls.expand_as(y), self.event_dims)


class Permutation(Flow):
    """A fixed permutation of the last dimension (vectors; ``log|det| = 0``).  Default: reversal."""

    event_dims = 1

    def __init__(self, dim: int, perm: torch.Tensor | None = None):
        super().__init__()
        perm = torch.arange(dim - 1, -1, -1) if perm is None else perm.long()
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x, context=None):
        return x[..., self.perm], x.new_zeros(x.shape[:-1])

    def inverse(self, y, context=None):
        return y[..., self.inv_perm], y.new_zeros(y.shape[:-1])
