"""A small flow library: one contract for every invertible transform.

Contract (:class:`Flow`)::

    y, log_det = flow(x, c)     # forward and per-timestep log|∂y_t/∂x_t| together
    x = flow.inverse(y, c)      # the inverse, written once per flow

``log_det`` has the shape of ``x`` minus nothing: one value per element whose
Jacobian is triangular, so ``log_det.sum(-1)`` is ``log|det J|``.  Composition
(:class:`FlowSequence`) sums the log-determinants.

:class:`IAFLayer` is the Parallel WaveNet flow: a causal WaveNet (no skip
stack) reads ``z_<t`` (the input shifted right by one step) and the
conditioning and emits a shift ``μ_t`` and a smoothly bounded log-scale
``log s_t``; ``x_t = z_t·s_t + μ_t``.  Sampling is one parallel pass; the
inverse is sequential (tests, scoring real audio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import WaveNet


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 (densities and log-scales never run in bf16); others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def soft_bound(a: torch.Tensor, bound: float) -> torch.Tensor:
    """Smoothly bound ``a`` to ``(-bound, bound)`` (``bound·tanh(a/bound)``; identity near 0)."""
    return bound * torch.tanh(a / bound)


class Flow(nn.Module):
    """Invertible transform ``forward(x, c) -> (y, log_det)`` with ``inverse(y, c) -> x``."""

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None):  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class AffineFlow(Flow):
    """Element-wise affine map with given shift/log-scale: the output composition of an IAF."""

    def __init__(self, shift: torch.Tensor, log_scale: torch.Tensor):
        super().__init__()
        self.shift, self.log_scale = shift, log_scale

    def forward(self, x, c=None):
        return x * torch.exp(self.log_scale) + self.shift, self.log_scale.expand_as(x)

    def inverse(self, y, c=None):
        return (y - self.shift) * torch.exp(-self.log_scale)


class IAFLayer(Flow):
    """Inverse autoregressive flow layer on ``[B, T]`` signals."""

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
        """``μ_t, log s_t`` from ``z_<t``; both ``[B, T]`` in float32."""
        h = upcast(self.net(F.pad(z[:, :-1], (1, 0)).unsqueeze(1).to(c.dtype if c is not None else z.dtype), c))
        return h[:, 0], soft_bound(h[:, 1], self.bound)

    def forward(self, z, c=None):
        mu, log_s = self.shift_log_scale(z, c)
        return upcast(z) * torch.exp(log_s) + mu, log_s

    def inverse(self, x, c=None):
        """Sequential inverse: ``z_t = (x_t - μ_t(z_<t)) / s_t(z_<t)``, one step at a time."""
        B, T = x.shape
        z = torch.zeros_like(x)
        rf = self.receptive_field
        for t in range(T):
            lo = max(0, t + 1 - rf)
            cc = c[:, :, lo : t + 1] if c is not None else None
            mu, log_s = self.shift_log_scale(z[:, lo : t + 1], cc)
            z[:, t] = ((x[:, t] - mu[:, -1]) * torch.exp(-log_s[:, -1])).to(z.dtype)
        return z


class FlowSequence(Flow):
    """Composition ``f_K ∘ … ∘ f_1``; log-determinants add."""

    def __init__(self, flows):
        super().__init__()
        self.flows = nn.ModuleList(flows)

    def forward(self, x, c=None):
        log_det = torch.zeros_like(upcast(x))
        for f in self.flows:
            x, ld = f(x, c)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, y, c=None):
        for f in reversed(self.flows):
            y = f.inverse(y, c)
        return y
