"""Inverse autoregressive flow on ``[B, T]`` signals with a WaveNet conditioner (Parallel WaveNet's flow).

The conditioner (a causal WaveNet without skip stack) reads ``z_<t`` — the input shifted right by one
step — and the conditioning and emits a shift ``μ_t`` and a smoothly bounded log-scale ``log s_t``;
the elementwise map is :func:`~wavedistill.flows.base.affine_map`: ``x_t = z_t·s_t + μ_t``.
Sampling is one parallel pass; the inverse is sequential (tests, scoring real audio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.wavenet import WaveNet
from .base import AffineAutoregressive, affine_map, soft_bound, upcast


class IAFLayer(AffineAutoregressive):
    """One IAF flow: WaveNet conditioner ``(z_<t, c) -> (μ_t, log s_t)`` and the affine map."""

    def __init__(self, layers: int, stacks: int, kernel_size: int, residual_channels: int, gate_channels: int,
                 cond_channels: int, log_scale_bound: float = 7.0, init_log_scale: float = -1.0):
        super().__init__()
        self.bound = log_scale_bound
        self.net = WaveNet(1, 2, layers, stacks, kernel_size, residual_channels, gate_channels, 0, cond_channels)
        # Start near a fixed small scale and zero shift; training moves away from it.
        nn.init.zeros_(self.net.head2.weight)
        with torch.no_grad():
            self.net.head2.bias.copy_(torch.tensor([0.0, init_log_scale]))

    @property
    def receptive_field(self) -> int:
        return self.net.receptive_field + 1  # shifted by one step

    def shift_log_scale(self, z: torch.Tensor, c: torch.Tensor | None):
        """The conditioner: ``μ_t, log s_t`` from ``z_<t``; both ``[B, T]`` in float32."""
        h = upcast(self.net(F.pad(z[:, :-1], (1, 0)).unsqueeze(1).to(c.dtype if c is not None else z.dtype), c))
        return h[:, 0], soft_bound(h[:, 1], self.bound)

    def affine(self, z, context=None):
        mu, log_s = self.shift_log_scale(z, _cond(context))
        return affine_map(z, mu, log_s), mu, log_s

    def inverse(self, x, context=None):
        """Sequential inverse: ``z_t = (x_t - μ_t(z_<t)) / s_t(z_<t)``, one step at a time."""
        c = _cond(context)
        B, T = x.shape
        z = torch.zeros_like(x)
        ladj = torch.zeros(B, dtype=upcast(x).dtype, device=x.device)
        rf = self.receptive_field
        for t in range(T):
            lo = max(0, t + 1 - rf)
            cc = c[:, :, lo : t + 1] if c is not None else None
            mu, log_s = self.shift_log_scale(z[:, lo : t + 1], cc)
            z[:, t] = ((x[:, t] - mu[:, -1]) * torch.exp(-log_s[:, -1])).to(z.dtype)
            ladj = ladj - log_s[:, -1]
        return z, ladj


def _cond(context):
    """The conditioning tensor: ``context`` itself, or ``context.cond`` for a composite context
    (:class:`~wavedistill.flows.linear_prediction.SourceFilterContext`)."""
    return getattr(context, "cond", context)
