"""The flow contract every invertible transform of wavedistill obeys.

::

    y, ladj = flow(x, context)            # forward and log|det ∂y/∂x| in one call
    x, ladj_inv = flow.inverse(y, context)  # ladj_inv = -ladj at the same point

``ladj`` is summed over the flow's event dimensions (the last ``event_dims`` of ``x``), so it has the
batch shape: ``[B]`` for vectors ``[B, D]``, 1-D signals ``[B, T]`` and ``[B, C, T]`` (event_dims 2) alike.
Composition (:class:`FlowSequence`) sums the log-determinants.  A flow without a closed-form inverse
either computes it numerically (and says so in its docstring) or raises :class:`InverseNotAvailable`.

Affine autoregressive flows (:class:`AffineAutoregressive`: IAF, MAF, pre-emphasis, linear prediction)
also report the elementwise map ``y_t = x_t·exp(log s_t) + μ_t`` through ``affine(x, context) ->
(y, μ, log s)`` where ``μ_t, log s_t`` depend only on the past.  Composed through
:meth:`FlowSequence.affine` they stay affine per timestep (``μ_tot ← μ_tot·s + μ``,
``log s_tot ← log s_tot + log s``): that is what the student's closed-form entropy and the
Parallel WaveNet / ClariNet cross-entropy read.
"""

from __future__ import annotations

import torch
from torch import nn


class InverseNotAvailable(NotImplementedError):
    """Raised by a flow whose inverse is neither closed-form nor computed numerically."""


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 (densities and log-scales never run in bf16); others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def soft_bound(a: torch.Tensor, bound: float) -> torch.Tensor:
    """Smoothly bound ``a`` to ``(-bound, bound)`` (``bound·tanh(a/bound)``; identity near 0)."""
    return bound * torch.tanh(a / bound)


def sum_event(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    """Sum the last ``event_dims`` dimensions (the per-element log-determinant to one value per item)."""
    return t.sum(dim=tuple(range(t.dim() - event_dims, t.dim()))) if event_dims else t


class Flow(nn.Module):
    """Invertible transform: ``forward(x, context) -> (y, ladj)``, ``inverse(y, context) -> (x, ladj)``."""

    event_dims: int = 1

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None):
        raise InverseNotAvailable(f"{type(self).__name__} has no inverse")

    @property
    def inv(self) -> "Flow":
        """The inverse as a flow of its own (forward and inverse swapped)."""
        return InverseFlow(self)


class InverseFlow(Flow):
    """``f.inv``: runs ``f.inverse`` forward and ``f.forward`` backward."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow
        self.event_dims = flow.event_dims

    def forward(self, x, context=None):
        return self.flow.inverse(x, context)

    def inverse(self, y, context=None):
        return self.flow(y, context)

    @property
    def inv(self) -> Flow:
        return self.flow


class AffineAutoregressive(Flow):
    """Elementwise affine map whose shift and log-scale at ``t`` depend only on the past.

    Subclasses implement :meth:`affine`; ``forward`` and the log-determinant follow from it.
    ``inverse`` is sequential in general (each subclass says how it inverts).
    """

    def affine(self, x: torch.Tensor, context: torch.Tensor | None = None):  # pragma: no cover - interface
        """``(y, μ, log s)`` with ``y = x·exp(log s) + μ`` elementwise."""
        raise NotImplementedError

    def forward(self, x, context=None):
        y, _, log_s = self.affine(x, context)
        return y, sum_event(log_s.expand_as(y), self.event_dims)


def affine_map(x: torch.Tensor, shift: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``x·exp(log s) + μ`` with ``x`` upcast first (the one place this map is written)."""
    return upcast(x) * torch.exp(log_scale) + shift


def affine_unmap(y: torch.Tensor, shift: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """The inverse map ``(y - μ)·exp(-log s)``."""
    return (y - shift) * torch.exp(-log_scale)


class AffineFlow(AffineAutoregressive):
    """Elementwise affine map with fixed shift/log-scale tensors (no dependence on ``x``)."""

    def __init__(self, shift: torch.Tensor, log_scale: torch.Tensor):
        super().__init__()
        self.shift, self.log_scale = shift, log_scale

    def affine(self, x, context=None):
        return affine_map(x, self.shift, self.log_scale), self.shift, self.log_scale

    def inverse(self, y, context=None):
        ls = self.log_scale.expand_as(y)
        return affine_unmap(y, self.shift, self.log_scale), -sum_event(ls, self.event_dims)


class FlowSequence(Flow):
    """Composition ``f_K ∘ … ∘ f_1``; log-determinants add."""

    def __init__(self, flows):
        super().__init__()
        self.flows = nn.ModuleList(flows)
        dims = {f.event_dims for f in self.flows}
        self.event_dims = dims.pop() if len(dims) == 1 else max(dims, default=1)

    def forward(self, x, context=None):
        ladj = None
        for f in self.flows:
            x, ld = f(x, context)
            ladj = ld if ladj is None else ladj + ld
        return x, ladj

    def inverse(self, y, context=None):
        ladj = None
        for f in reversed(self.flows):
            y, ld = f.inverse(y, context)
            ladj = ld if ladj is None else ladj + ld
        return y, ladj

    def affine(self, x, context=None):
        """``(y, μ_tot, log s_tot)`` when every member is :class:`AffineAutoregressive` (elementwise, ``[B, T]``)."""
        mu_tot = torch.zeros_like(upcast(x))
        log_s_tot = torch.zeros_like(mu_tot)
        for f in self.flows:
            if not isinstance(f, AffineAutoregressive):
                raise TypeError(f"{type(f).__name__} is not affine autoregressive; FlowSequence.affine needs every member to be")
            x, mu, log_s = f.affine(x, context)
            mu_tot = mu_tot * torch.exp(log_s) + mu
            log_s_tot = log_s_tot + log_s
        return x, mu_tot, log_s_tot
