"""Planar and radial flows (Rezende & Mohamed 2015) on vectors ``[B, D]`` (``event_dims = 1``).

Both are sampling-direction flows: ``forward`` is cheap and exact, the inverse is not closed-form
for the planar flow (solved numerically, see :meth:`PlanarFlow.inverse`) and reduces to a quadratic
for the radial flow.  In a :class:`~wavedistill.flows.distribution.FlowDistribution` (whose transform
maps data to base) use them as ``PlanarFlow(D).inv`` so that sampling runs ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Flow


class PlanarFlow(Flow):
    """``y = z + û·tanh(wᵀz + b)``, ``log|det| = log(1 + ûᵀψ)`` with ``ψ = tanh'(wᵀz + b)·w``.

    Invertibility: ``u`` is reparametrised to ``û = u + (m(wᵀu) − wᵀu)·w/‖w‖²`` with
    ``m(a) = −1 + softplus(a)``, so ``wᵀû = m(wᵀu) > −1`` and ``1 + ûᵀψ = 1 + tanh'·wᵀû > 0`` for every
    ``z`` (``tanh' ∈ (0, 1]``): the map is strictly increasing along ``w`` and the identity orthogonal
    to it.
    """

    event_dims = 1

    def __init__(self, dim: int, init_scale: float = 0.1):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) * init_scale)
        self.u = nn.Parameter(torch.randn(dim) * init_scale)
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> torch.Tensor:
        wu = self.w @ self.u
        m = -1.0 + F.softplus(wu)
        return self.u + (m - wu) * self.w / (self.w @ self.w)

    def forward(self, z, context=None):
        u = self.u_hat()
        h = torch.tanh(z @ self.w + self.b)
        y = z + h.unsqueeze(-1) * u
        # 1 + ûᵀψ = 1 + (1 - h²)·wᵀû; wᵀû > -1 so the argument of log1p is > -1.
        ladj = torch.log1p((1 - h * h) * (self.w @ u))
        return y, ladj

    def inverse(self, y, context=None, tol: float | None = None, max_iter: int = 200):
        """Numeric inverse.  Projecting ``y = z + û·tanh(wᵀz + b)`` on ``w`` gives the scalar equation
        ``α + (wᵀû)·tanh(α + b) = wᵀy`` for ``α = wᵀz``; its left side is strictly increasing and
        ``|α − wᵀy| ≤ |wᵀû|``, so bisection on that bracket converges.  It runs (without gradient)
        until the bracket is below ``tol`` (default: 64 machine epsilons of the dtype, relative to the
        bracket's scale), then ``z = y − û·tanh(α + b)`` and ``ladj = −log(1 + ûᵀψ(z))``.
        Gradients flow through the final formula with ``α`` held fixed (it is not differentiated
        through the solve).
        """
        u = self.u_hat()
        with torch.no_grad():
            wu = (self.w @ u).to(y.dtype)
            target = y @ self.w.to(y.dtype)
            b = self.b.to(y.dtype)
            lo = target - wu.abs() - 1e-12
            hi = target + wu.abs() + 1e-12
            if tol is None:
                tol = 64 * torch.finfo(y.dtype).eps
            scale = 1.0 + target.abs().max().item() + wu.abs().item()
            for _ in range(max_iter):
                mid = 0.5 * (lo + hi)
                g = mid + wu * torch.tanh(mid + b) - target
                lo = torch.where(g < 0, mid, lo)
                hi = torch.where(g < 0, hi, mid)
                if (hi - lo).max().item() <= tol * scale:
                    break
            else:
                raise RuntimeError(f"PlanarFlow.inverse: bisection did not converge in {max_iter} iterations")
            alpha = 0.5 * (lo + hi)
        h = torch.tanh(alpha + self.b)
        z = y - h.unsqueeze(-1) * u
        h_z = torch.tanh(z @ self.w + self.b)
        return z, -torch.log1p((1 - h_z * h_z) * (self.w @ u))


class RadialFlow(Flow):
    """``y = z + β·h(α, r)·(z − z₀)``, ``h = 1/(α + r)``, ``r = ‖z − z₀‖``.

    ``α = softplus(α̂) > 0`` and ``β = −α + softplus(β̂) > −α`` (the invertibility condition).
    ``log|det| = (D − 1)·log(1 + βh) + log(1 + βh + βh'(r)·r)``.
    Inverse in closed form: ``r_y = ‖y − z₀‖ = r·(1 + β/(α + r))`` is a quadratic in ``r`` with one
    non-negative root ``r = (−(α + β − r_y) + √((α + β − r_y)² + 4α·r_y))/2``.
    """

    event_dims = 1

    def __init__(self, dim: int, init_scale: float = 0.1):
        super().__init__()
        self.z0 = nn.Parameter(torch.randn(dim) * init_scale)
        self.alpha_raw = nn.Parameter(torch.randn(()) * init_scale)
        self.beta_raw = nn.Parameter(torch.randn(()) * init_scale)

    def _ab(self):
        alpha = F.softplus(self.alpha_raw)
        return alpha, -alpha + F.softplus(self.beta_raw)

    def _ladj(self, r, alpha, beta, dim):
        bh = beta / (alpha + r)
        return (dim - 1) * torch.log1p(bh) + torch.log1p(bh - beta * r / (alpha + r) ** 2)

    def forward(self, z, context=None):
        alpha, beta = self._ab()
        d = z - self.z0
        r = d.norm(dim=-1)
        y = z + (beta / (alpha + r)).unsqueeze(-1) * d
        return y, self._ladj(r, alpha, beta, z.shape[-1])

    def inverse(self, y, context=None):
        alpha, beta = self._ab()
        dy = y - self.z0
        ry = dy.norm(dim=-1)
        c = alpha + beta - ry
        r = 0.5 * (-c + torch.sqrt(c * c + 4 * alpha * ry))
        z = self.z0 + dy / (1 + beta / (alpha + r)).unsqueeze(-1)
        return z, -self._ladj(r, alpha, beta, y.shape[-1])
