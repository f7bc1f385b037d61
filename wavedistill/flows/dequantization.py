"""Uniform dequantization: fitting a continuous density to integer-valued data honestly.

Integer codes ``k`` live in bins of width ``w = 1/scale``; a continuous model ``p`` is fit to
``x = offset + (k + u)/scale`` with ``u ~ U[0, 1)`` per element.  The model's implied discrete
distribution ``P(k) = ∫_bin(k) p(x) dx`` satisfies, by Jensen,

    log P(k) = log E_u[p(x)·w] ≥ E_u[log p(x)] + n·log w,

for an item of ``n`` elements, so ``−E_u[log p(x)] − n·log w`` — the continuous NLL plus the
``−log(bin width)`` term per element — is an UPPER bound on the discrete NLL ``−log P(k)``.  Measured in
bits per element (``/(n·ln 2)``) it is directly comparable with the teacher's bits/sample, which is the
exact ``−log₂`` bin mass of the same 16-bit codes (the teacher's edge codes also take the tails, which
only gives the teacher more mass; the bound still holds for the flow's own discretisation).  Without
the ``−log w`` term a continuous density on ``[−1, 1]`` audio reports ~15 bits/sample too few (``log₂ w``
for ``w = 2/65535``) — not a better model, a different unit.

Variational dequantization (:class:`VariationalDequantizer`, Ho et al. 2019): ``u ~ q(u|k)`` instead of
uniform, ``log P(k) ≥ E_q[log p(x) − log q(u|k)] + n·log w`` (Jensen again), so the bound stays an upper
bound on the discrete NLL for any ``q``; a learned ``q`` can tighten it.

Audio grid (:func:`audio_dequantizer`): the project's 16-bit codes ``i = 0..65535`` sit at
``x_i = −1 + 2i/65535`` (:func:`wavedistill.nn.distributions.quantize`, half-bin ``1/65535``), so
``w = 2/65535`` and bin ``i`` is ``[x_i − 1/65535, x_i + 1/65535)``; an int16 sample ``k ∈ [−32768, 32767]`` is
code ``i = k + 32768``.  Images (:func:`image_dequantizer`): 8-bit ``k = 0..255`` to ``(k + u)/256`` in ``[0, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.distributions import HALF_BIN, N_CODES
from .base import Flow, sum_event


@dataclass(frozen=True)
class UniformDequantizer:
    """Codes ``0..levels−1`` ↔ bins ``[offset + k/scale, offset + (k+1)/scale)``."""

    levels: int
    scale: float
    offset: float = 0.0

    @property
    def log_bin_width(self) -> float:
        return -math.log(self.scale)

    def centres(self, codes: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        return self.offset + (codes.to(dtype) + 0.5) / self.scale

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The code of the bin holding ``x`` (clamped to the valid range), as int64."""
        k = torch.floor((x.double() - self.offset) * self.scale)
        return k.clamp(0, self.levels - 1).long()

    def dequantize(self, codes: torch.Tensor, u: torch.Tensor | None = None, dtype=torch.float64,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """``offset + (k + u)/scale`` with ``u ~ U[0, 1)`` (drawn unless given)."""
        if u is None:
            u = torch.rand(codes.shape, generator=generator, dtype=dtype, device=codes.device)
        return self.offset + (codes.to(dtype) + u.to(dtype)) / self.scale

    def discrete_log_prob_bound(self, log_density: torch.Tensor, n_elements: int) -> torch.Tensor:
        """``log p(x) + n·log w``: averaged over ``u`` a lower bound on ``log P(k)``."""
        return log_density + n_elements * self.log_bin_width

    def bits_per_element(self, log_density: torch.Tensor, n_elements: int) -> torch.Tensor:
        """Upper bound on the discrete NLL in bits per element (average it over items and draws of ``u``)."""
        return -self.discrete_log_prob_bound(log_density, n_elements) / (n_elements * math.log(2.0))


def audio_dequantizer() -> UniformDequantizer:
    """The project's 16-bit grid: code ``i`` centred at ``−1 + 2i/65535``, bin width ``2/65535``."""
    return UniformDequantizer(N_CODES, 1.0 / (2 * HALF_BIN), -1.0 - HALF_BIN)


def image_dequantizer(bits: int = 8) -> UniformDequantizer:
    """``k = 0..2^bits − 1`` to ``(k + u)/2^bits`` in ``[0, 1)``."""
    return UniformDequantizer(2 ** bits, float(2 ** bits), 0.0)


def int16_to_codes(samples: torch.Tensor) -> torch.Tensor:
    """int16 PCM ``[−32768, 32767]`` to the 16-bit codes ``0..65535``."""
    return samples.long() + N_CODES // 2


def codes_to_int16(codes: torch.Tensor) -> torch.Tensor:
    return (codes.long() - N_CODES // 2).to(torch.int16)


class VariationalDequantizer(nn.Module):
    """``q(u | k)``: ``u = sigmoid(y)``, ``y, ladj = flow(ε, context = bin centres)``, ``ε ~ N(0, I)``.

    ``flow`` is any :class:`~wavedistill.flows.base.Flow` on the data's event shape that takes a context
    of that same shape (e.g. ``MaskedCoupling(mask, context_dim=D)`` for vectors).
    ``log q(u|k) = log N(ε) − ladj − Σ log σ'(y)``.
    """

    def __init__(self, dequantizer: UniformDequantizer, flow: Flow):
        super().__init__()
        self.dequantizer, self.flow = dequantizer, flow

    def _log_normal(self, eps):
        return sum_event(-0.5 * eps * eps - 0.5 * math.log(2 * math.pi), self.flow.event_dims)

    def _log_sigmoid_grad(self, y):
        return sum_event(F.logsigmoid(y) + F.logsigmoid(-y), self.flow.event_dims)

    def sample(self, codes: torch.Tensor, dtype=torch.float64, generator: torch.Generator | None = None):
        """``(x, log q(u|k))``: dequantized data and the log-density of its noise."""
        centres = self.dequantizer.centres(codes, dtype)
        eps = torch.randn(codes.shape, generator=generator, dtype=dtype, device=codes.device)
        y, ladj = self.flow(eps, centres)
        log_q = self._log_normal(eps) - ladj - self._log_sigmoid_grad(y)
        return self.dequantizer.dequantize(codes, torch.sigmoid(y), dtype), log_q

    def log_q(self, codes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``log q(u|k)`` of given noise ``u ∈ (0, 1)`` (through the flow's inverse)."""
        centres = self.dequantizer.centres(codes, u.dtype)
        y = torch.log(u) - torch.log1p(-u)
        eps, ladj_inv = self.flow.inverse(y, centres)
        return self._log_normal(eps) + ladj_inv - self._log_sigmoid_grad(y)

    def discrete_log_prob_bound(self, log_density: torch.Tensor, log_q: torch.Tensor, n_elements: int) -> torch.Tensor:
        """``log p(x) − log q(u|k) + n·log w``: in expectation over ``q`` a lower bound on ``log P(k)``."""
        return log_density - log_q + n_elements * self.dequantizer.log_bin_width
