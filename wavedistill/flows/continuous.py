"""Continuous normalizing flow (Chen et al. 2018; FFJORD, Grathwohl et al. 2019) on vectors ``[B, D]``.

``dx/dt = f(t, x)``; the instantaneous change of variables gives ``d log|det ∂x(t)/∂x(0)|/dt =
tr(∂f/∂x)``.  ``forward`` integrates ``[x, 0]`` from ``t = 0`` to ``T`` and returns ``(x(T), ∫₀ᵀ tr)``;
``inverse`` integrates from ``T`` to ``0`` and returns ``(x(0), −∫₀ᵀ tr)``.

The trace is exact (``D`` autograd passes; small ``D``) or Hutchinson's estimator ``εᵀ(∂f/∂x)ε`` with
Rademacher or Gaussian ``ε`` — drawn ONCE per solve and held fixed while the solver runs (re-drawing
inside the solve makes the dynamics noisy and the adaptive solver's step count explode).  The solver
is ``torchdiffeq.odeint`` (``adjoint=True``: ``odeint_adjoint``, constant memory) with ``method``,
``atol``, ``rtol`` (default dopri5, 1e-5/1e-5 as in FFJORD's toys); ``nfe`` holds the number of
dynamics evaluations of the last solve.  ``context`` is passed to the dynamics as ``f(t, x, context)``
when the dynamics accepts it (``takes_context=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Flow


def exact_trace(fx: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``tr(∂f/∂x)`` per row, one autograd pass per dimension."""
    tr = torch.zeros(x.shape[0], dtype=fx.dtype, device=fx.device)
    for i in range(x.shape[1]):
        tr = tr + torch.autograd.grad(fx[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0][:, i]
    return tr


def hutchinson_trace(fx: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Unbiased ``εᵀ(∂f/∂x)ε`` (``E[εεᵀ] = I``), one vector-Jacobian product."""
    vjp = torch.autograd.grad(fx, x, eps, create_graph=create_graph)[0]
    return (vjp * eps).sum(-1)


def draw_noise(like: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    raise ValueError(f"unknown Hutchinson noise {kind!r} (use 'rademacher' or 'gaussian')")


class TimeMLP(nn.Module):
    """Default dynamics ``f(t, x)``: an MLP on ``[x, t]`` with softplus activations (smooth, for the solver)."""

    def __init__(self, dim: int, hidden: int = 64, layers: int = 2):
        super().__init__()
        mods, f = [], dim + 1
        for _ in range(layers):
            mods += [nn.Linear(f, hidden), nn.Softplus()]
            f = hidden
        mods.append(nn.Linear(f, dim))
        self.net = nn.Sequential(*mods)

    def forward(self, t, x):
        return self.net(torch.cat([x, t.expand(x.shape[0], 1).to(x.dtype)], dim=-1))


class _Augmented(nn.Module):
    """``(t, (x, ·)) -> (f, tr ∂f/∂x)`` for the solver; counts evaluations."""

    def __init__(self, cnf: "CNF"):
        super().__init__()
        self.dynamics = cnf.dynamics
        self.cnf = [cnf]  # not a submodule (no parameter duplication)
        self.eps = None
        self.context = None

    def forward(self, t, state):
        x = state[0]
        cnf = self.cnf[0]
        cnf.nfe += 1
        create = torch.is_grad_enabled() and cnf.training_graph  # the caller's grad mode, not the one below
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            fx = self.dynamics(t, x, self.context) if cnf.takes_context else self.dynamics(t, x)
            if cnf.trace == "exact":
                tr = exact_trace(fx, x, create_graph=create)
            else:
                tr = hutchinson_trace(fx, x, self.eps, create_graph=create)
        if not create:
            fx, tr = fx.detach(), tr.detach()
        return fx, tr


class CNF(Flow):
    """Continuous normalizing flow ``x(T) = x(0) + ∫₀ᵀ f(t, x) dt`` (see module docstring).

    ``trace``: ``"exact"`` or ``"hutchinson"``; ``noise``: ``"rademacher"`` or ``"gaussian"``;
    ``method``/``atol``/``rtol``/``options`` go to ``torchdiffeq.odeint`` (e.g. ``method="rk4",
    options={"step_size": 0.125}`` for a fixed-step solve); ``adjoint=True`` uses ``odeint_adjoint``.
    """

    event_dims = 1

    def __init__(self, dim: int, dynamics: nn.Module | None = None, T: float = 1.0, trace: str = "exact",
                 noise: str = "rademacher", method: str = "dopri5", atol: float = 1e-5, rtol: float = 1e-5,
                 options: dict | None = None, adjoint: bool = False, takes_context: bool = False):
        super().__init__()
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"unknown trace {trace!r} (use 'exact' or 'hutchinson')")
        draw_noise(torch.zeros(1), noise)  # validate early
        self.dynamics = dynamics if dynamics is not None else TimeMLP(dim)
        self.T, self.trace, self.noise = float(T), trace, noise
        self.method, self.atol, self.rtol, self.options, self.adjoint = method, atol, rtol, options, adjoint
        self.takes_context = takes_context
        self.nfe = 0
        self.training_graph = True  # build a differentiable graph through the trace when grad is enabled

    def _solve(self, x, t0, t1, context, noise=None):
        from torchdiffeq import odeint, odeint_adjoint

        aug = _Augmented(self)
        aug.context = context
        if self.trace == "hutchinson":
            aug.eps = draw_noise(x, self.noise) if noise is None else noise  # one draw, fixed for this solve
        self.nfe = 0
        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        state = (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
        kw = dict(method=self.method, atol=self.atol, rtol=self.rtol, options=self.options)
        if self.adjoint:
            xs, ls = odeint_adjoint(aug, state, ts, adjoint_params=tuple(self.dynamics.parameters()), **kw)
        else:
            xs, ls = odeint(aug, state, ts, **kw)
        return xs[-1], ls[-1]

    def forward(self, x, context=None, noise: torch.Tensor | None = None):
        """``(x(T), ∫₀ᵀ tr ∂f/∂x dt)``; ``noise`` fixes the Hutchinson draw (else one fresh draw per solve)."""
        return self._solve(x, 0.0, self.T, context, noise)

    def inverse(self, y, context=None, noise: torch.Tensor | None = None):
        """``(x(0), −∫₀ᵀ tr dt)`` by integrating backwards from ``T`` to 0."""
        return self._solve(y, self.T, 0.0, context, noise)
