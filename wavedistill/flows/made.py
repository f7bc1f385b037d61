"""MADE conditioners (Germain et al. 2015) and the vector MAF / IAF built on them.

:class:`MADE` masks an MLP by degrees so output ``i`` (shift and raw log-scale of variable ``i``)
depends only on inputs earlier in ``order``.  :class:`MADEAffine` is the elementwise affine map
``y = x·exp(log s(x_<)) + μ(x_<)`` with ``log s = bound·tanh(raw/bound)``
(:func:`~wavedistill.flows.base.soft_bound`): an :class:`~wavedistill.flows.base.AffineAutoregressive`
flow, so it composes through ``FlowSequence.affine`` like the student's IAF layers.  ``forward`` is one
parallel pass; ``inverse`` is sequential (``D`` passes).

The two named flows differ only in which direction is the cheap one:

* :class:`MAF` — ``forward`` maps data ``x`` to base ``z`` (the density direction, parallel); sampling
  is the sequential ``inverse``.  Use it directly in a ``FlowDistribution`` (transform: data → base).
* :class:`IAF` — ``forward`` maps base ``z`` to data ``x`` (sampling, parallel); density evaluation of
  arbitrary ``x`` is the sequential ``inverse``.  Use it as ``IAF(D).inv`` in a ``FlowDistribution``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AffineAutoregressive, affine_map, affine_unmap, soft_bound, sum_event


def made_degrees(dim: int, hidden: list[int], order: torch.Tensor | None = None, context_dim: int = 0):
    """Degrees of inputs (``1..D`` in ``order``; context inputs 0) and hidden units (cycling ``1..D−1``)."""
    deg_in = torch.arange(1, dim + 1) if order is None else order.long() + 1
    degrees = [torch.cat([deg_in, torch.zeros(context_dim, dtype=torch.long)])]
    for h in hidden:
        degrees.append(torch.arange(h) % max(dim - 1, 1) + 1 if dim > 1 else torch.zeros(h, dtype=torch.long))
    return deg_in, degrees


def made_masks(dim: int, hidden: list[int], outputs_per_dim: int, order: torch.Tensor | None = None,
               context_dim: int = 0) -> list[torch.Tensor]:
    """Masks ``[out, in]`` for each layer: hidden ``k ≥ in``, output ``d_out > in`` (strictly autoregressive)."""
    deg_in, degrees = made_degrees(dim, hidden, order, context_dim)
    masks = [(degrees[i + 1].unsqueeze(1) >= degrees[i].unsqueeze(0)).float() for i in range(len(hidden))]
    deg_out = deg_in.repeat(outputs_per_dim)
    masks.append((deg_out.unsqueeze(1) > degrees[-1].unsqueeze(0)).float())
    return masks


class MaskedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


class MADE(nn.Module):
    """Masked MLP ``[B, D (+ context)] → [B, outputs_per_dim·D]`` (output block ``k`` is ``[k·D, (k+1)·D)``)."""

    def __init__(self, dim: int, hidden: list[int] = (64, 64), outputs_per_dim: int = 2, order: torch.Tensor | None = None,
                 context_dim: int = 0):
        super().__init__()
        hidden = list(hidden)
        masks = made_masks(dim, hidden, outputs_per_dim, order, context_dim)
        sizes = [dim + context_dim] + hidden + [outputs_per_dim * dim]
        layers = []
        for i, m in enumerate(masks):
            layers.append(MaskedLinear(sizes[i], sizes[i + 1], m))
            if i < len(masks) - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.dim, self.context_dim = dim, context_dim
        self.register_buffer("order", torch.arange(dim) if order is None else order.long())

    def forward(self, x, context=None):
        return self.net(x if context is None else torch.cat([x, context.to(x.dtype)], dim=-1))


class MADEAffine(AffineAutoregressive):
    """``y = x·exp(log s(x_<)) + μ(x_<)`` on ``[B, D]`` with a MADE conditioner (see module docstring).

    ``order`` (a permutation of ``0..D−1``; ``order[i]`` is variable ``i``'s rank) sets the autoregressive
    order: variable ``i`` depends on the variables of lower rank.  Alternate it (e.g. reversed) between layers.  The last layer starts at zero shift and ``log s = init_log_scale``.
    """

    event_dims = 1

    def __init__(self, dim: int, hidden=(64, 64), order: torch.Tensor | None = None, context_dim: int = 0,
                 log_scale_bound: float = 5.0, init_log_scale: float = 0.0):
        super().__init__()
        self.bound = log_scale_bound
        self.made = MADE(dim, hidden, 2, order, context_dim)
        last = self.made.net[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[dim:] = init_log_scale

    def shift_log_scale(self, x, context=None):
        mu, raw = self.made(x, context).chunk(2, dim=-1)
        return mu, soft_bound(raw, self.bound)

    def affine(self, x, context=None):
        mu, log_s = self.shift_log_scale(x, context)
        return affine_map(x, mu, log_s), mu, log_s

    def inverse(self, y, context=None):
        """Sequential: the variable of rank ``k`` at step ``k``, from the already-recovered lower ranks."""
        x = torch.zeros_like(y)
        for k in torch.argsort(self.made.order).tolist():  # variables by increasing degree
            mu, log_s = self.shift_log_scale(x, context)
            x = x.clone()
            x[:, k] = affine_unmap(y[:, k], mu[:, k], log_s[:, k])
        _, log_s = self.shift_log_scale(x, context)
        return x, -sum_event(log_s, 1)


class MAF(MADEAffine):
    """Masked autoregressive flow: ``forward`` is the density direction (data → base, parallel)."""


class IAF(MADEAffine):
    """Inverse autoregressive flow: ``forward`` is the sampling direction (base → data, parallel)."""
