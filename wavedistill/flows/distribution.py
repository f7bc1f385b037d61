"""A distribution defined by a base distribution and a flow.

``FlowDistribution(base, transform)``: ``transform`` maps data ``x`` to base ``z`` (the normalizing
direction), so ``log p(x) = log p_base(z) + ladj`` with ``z, ladj = transform(x)``, and a sample is
``x = transform.inverse(z)``.  A flow whose cheap direction is sampling (IAF, planar, Sylvester, the
student's IAF layers) enters as ``flow.inv``.

* :meth:`FlowDistribution.forward_kl_loss` — maximum likelihood on data (forward KL up to the data
  entropy);
* :meth:`FlowDistribution.reverse_kl_loss` — ``E_q[log q(x) − log p̃(x)]`` for an unnormalised target
  log-density ``log p̃`` (equals ``KL(q‖p) − log Z``), with reparametrised samples.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Flow


class StandardNormal(nn.Module):
    """``N(0, I)`` over an event of shape ``event_shape``; dtype/device follow the module (``.double()``)."""

    def __init__(self, *event_shape: int):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.register_buffer("_ref", torch.zeros(()))

    def log_prob(self, z):
        n = math.prod(self.event_shape)
        dims = tuple(range(z.dim() - len(self.event_shape), z.dim()))
        return -0.5 * (z * z).sum(dims) - 0.5 * n * math.log(2 * math.pi)

    def rsample(self, n: int, generator: torch.Generator | None = None):
        return torch.randn((n, *self.event_shape), generator=generator, dtype=self._ref.dtype, device=self._ref.device)


class StandardLogistic(StandardNormal):
    """Independent standard logistics (the student's noise) over ``event_shape``."""

    def log_prob(self, z):
        dims = tuple(range(z.dim() - len(self.event_shape), z.dim()))
        return (-z - 2 * nn.functional.softplus(-z)).sum(dims)

    def rsample(self, n: int, generator: torch.Generator | None = None):
        u = torch.rand((n, *self.event_shape), generator=generator, dtype=self._ref.dtype, device=self._ref.device)
        u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
        return torch.log(u) - torch.log1p(-u)


class FlowDistribution(nn.Module):
    """``p(x) = p_base(T(x))·|det ∂T/∂x|`` with ``T = transform`` (data → base)."""

    def __init__(self, base: nn.Module, transform: Flow):
        super().__init__()
        self.base, self.transform = base, transform

    def log_prob(self, x, context=None):
        z, ladj = self.transform(x, context)
        return self.base.log_prob(z) + ladj

    def rsample_and_log_prob(self, n: int, context=None, generator: torch.Generator | None = None):
        """A reparametrised sample and its own log-density in one pass (no inverse of the sampling path)."""
        z = self.base.rsample(n, generator)
        x, ladj_inv = self.transform.inverse(z, context)  # ladj_inv = log|det ∂x/∂z|
        return x, self.base.log_prob(z) - ladj_inv

    def sample(self, n: int, context=None, generator: torch.Generator | None = None):
        with torch.no_grad():
            return self.rsample_and_log_prob(n, context, generator)[0]

    def forward_kl_loss(self, x, context=None):
        """Mean negative log-likelihood of data ``x`` (forward KL minus the data entropy)."""
        return -self.log_prob(x, context).mean()

    def reverse_kl_loss(self, target_log_density, n: int, context=None, generator: torch.Generator | None = None):
        """``E_q[log q(x) − log p̃(x)]`` over ``n`` reparametrised samples (``= KL(q‖p) − log Z``)."""
        x, log_q = self.rsample_and_log_prob(n, context, generator)
        return (log_q - target_log_density(x)).mean()
