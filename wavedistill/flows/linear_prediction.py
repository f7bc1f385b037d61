"""Source-filter structure as flows: linear-prediction synthesis and de-emphasis (REFERENCE.md §7).

Both are affine autoregressive maps with unit diagonal, so ``log|det J| = 0`` and every likelihood and KL term
stays exact:

* :class:`LPSynthesis` — ``x_t = e_t + Σ_k a_k(t)·x_{t-1-k}`` with per-frame predictors from the mel
  (``μ_t = x̂_t``, ``log s_t = 0``); its inverse is LP analysis ``e_t = x_t − x̂_t`` (parallel).
* :class:`Deemphasis` — ``x_t = s_t + α·x_{t-1}`` (``μ_t = α·x_{t-1}``); ``Deemphasis(α).inv`` is pre-emphasis
  ``s_t = x_t − α·x_{t-1}``.

The forward directions are all-pole recurrences, run by :func:`~wavedistill.kernels.lp_recurrence.lp_synthesis`
(compiled on the CPU, blocked on the GPU; gradient w.r.t. the input through the adjoint recurrence).

Context: a :class:`SourceFilterContext` carries the conditioning of the network flows (``cond``; the
:class:`~wavedistill.flows.IAFLayer` reads ``context.cond`` when the context has one) and the
:class:`LPCoefficients` of the filter flows, so one context runs a whole student FlowSequence.  Coefficients
are per frame and held over samples: sample ``t`` uses the frame whose centre (frame ``i`` at sample
``i·hop``, :class:`~wavedistill.data.audio.MelExtractor`'s convention) is nearest to ``start + t``.
``history`` holds the signal before ``t = 0`` (most recent first), so a long signal can be filtered in
pieces with results equal to one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..kernels.lp_recurrence import frame_index, lp_synthesis
from .base import AffineAutoregressive, upcast

__all__ = ["Deemphasis", "LPCoefficients", "LPSynthesis", "SourceFilterContext", "lp_prediction", "preemphasize"]


@dataclass
class LPCoefficients:
    """Per-frame predictors ``a [B or 1, F, p]`` (``x̂_t = Σ_k a[f(t), k]·x_{t-1-k}``) held over samples.

    ``start``: sample 0 of the signal is sample ``start`` of the frames' timeline (e.g. ``context·hop`` when the mel
    carries ``context`` extra frames on the left).  ``history [B, p]``: the signal's samples before ``t = 0``,
    most recent first (``None``: zeros).
    """

    a: torch.Tensor
    hop: int
    start: int = 0
    history: torch.Tensor | None = None

    @property
    def order(self) -> int:
        return self.a.shape[-1]

    def shifted(self, samples: int, history: torch.Tensor | None = None) -> "LPCoefficients":
        """The same predictors for the signal starting ``samples`` later (with that point's ``history``)."""
        return replace(self, start=self.start + int(samples), history=history)

    def per_sample(self, n: int, batch: int, dtype=None) -> torch.Tensor:
        """``[batch, n, p]``: the predictor of every sample (for the reference loops and tests)."""
        idx = frame_index(n, self.a.shape[1], self.hop, self.start, self.a.device)
        a = self.a.expand(batch, -1, -1)[:, idx]
        return a if dtype is None else a.to(dtype)


@dataclass
class SourceFilterContext:
    """Context of a flow sequence with network flows (``cond``) and source-filter flows (``lpc``, ``emphasis_history``)."""

    cond: torch.Tensor | None
    lpc: LPCoefficients | None = None
    emphasis_history: torch.Tensor | None = None  # [B, 1]: the de-emphasised signal just before t = 0


def lp_prediction(x: torch.Tensor, a: torch.Tensor, hop: int, start: int = 0,
                  history: torch.Tensor | None = None) -> torch.Tensor:
    """``x̂ [B, T]``: ``x̂_t = Σ_k a[f(t), k]·x_{t-1-k}`` in parallel (teacher forcing; differentiable in ``x``).

    ``a [B or 1, F, p]``; ``history [B, p]`` (most recent first) or zeros before ``t = 0``.
    """
    B, T = x.shape
    p = a.shape[-1]
    if p == 0:
        return torch.zeros_like(x)
    past = history.flip(-1).to(x.dtype) if history is not None else x.new_zeros(B, p)
    xp = torch.cat([past, x[:, :-1]], dim=1) if T else past  # xp[t + p - 1 - k] = x_{t-1-k}
    lags = xp.unfold(1, p, 1)  # [B, T, p]: window t = x_{t-p} .. x_{t-1}
    coef = LPCoefficients(a, hop, start).per_sample(T, B, x.dtype)
    return torch.einsum("btk,btk->bt", lags.flip(-1), coef)


def preemphasize(x: torch.Tensor, alpha: float, history: torch.Tensor | None = None) -> torch.Tensor:
    """``s_t = x_t − α·x_{t-1}`` (``history [B, 1]``: ``x_{-1}``, else 0)."""
    prev = torch.cat([history.to(x.dtype) if history is not None else x.new_zeros(x.shape[0], 1), x[:, :-1]], dim=1)
    return x - alpha * prev


def _lpc_of(context) -> LPCoefficients:
    lpc = context.lpc if isinstance(context, SourceFilterContext) else context
    if not isinstance(lpc, LPCoefficients):
        raise TypeError("LPSynthesis needs LPCoefficients (or a SourceFilterContext holding them) as its context")
    return lpc


class LPSynthesis(AffineAutoregressive):
    """``x_t = e_t + Σ_k a_k(t)·x_{t-1-k}``: the all-pole LP synthesis filter as a flow (log-det 0).

    The coefficients come from the context (:class:`LPCoefficients`), never from parameters: the flow has none.
    """

    def affine(self, e, context=None):
        lpc = _lpc_of(context)
        e = upcast(e)
        x = lp_synthesis(e, lpc.a, lpc.hop, lpc.start, lpc.history)
        mu = x - e  # = x̂_t, a function of x_<t (hence of e_<t)
        return x, mu, torch.zeros_like(x)

    def inverse(self, x, context=None):
        lpc = _lpc_of(context)
        x = upcast(x)
        e = x - lp_prediction(x, lpc.a.to(x.dtype), lpc.hop, lpc.start, lpc.history)
        return e, x.new_zeros(x.shape[0])


class Deemphasis(AffineAutoregressive):
    """``x_t = s_t + α·x_{t-1}`` as a flow (log-det 0); ``Deemphasis(α).inv`` is pre-emphasis.

    ``x_{-1}`` is ``context.emphasis_history`` when the context is a :class:`SourceFilterContext` holding one, else 0.
    """

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)

    @staticmethod
    def _history(context):
        return context.emphasis_history if isinstance(context, SourceFilterContext) else None

    def affine(self, s, context=None):
        s = upcast(s)
        a = torch.full((1, 1, 1), self.alpha, dtype=s.dtype, device=s.device)
        x = lp_synthesis(s, a, 1, 0, self._history(context))
        return x, x - s, torch.zeros_like(x)

    def inverse(self, x, context=None):
        x = upcast(x)
        return preemphasize(x, self.alpha, self._history(context)), x.new_zeros(x.shape[0])

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
