"""Sylvester normalizing flows (van den Berg et al. 2018) on vectors ``[B, D]``.

``y = z + Q·R₁·tanh(R₂·Qᵀ·z + b)`` with ``Q`` a ``D×M`` matrix of orthonormal columns and ``R₁, R₂``
``M×M`` upper triangular.  By the matrix determinant lemma and ``QᵀQ = I``,
``det(∂y/∂z) = det(I_M + diag(h')·R₂·R₁) = Π (1 + r1ᵢᵢ·r2ᵢᵢ·h'ᵢ)`` (a product of an upper-triangular
matrix's diagonal), so ``log|det| = Σ log|1 + r1ᵢᵢ r2ᵢᵢ h'((R₂Qᵀz + b)ᵢ)|``.  The diagonals are
``tanh`` of free parameters, so ``r1ᵢᵢ·r2ᵢᵢ ∈ (−1, 1)`` and, with ``h' = tanh' ∈ (0, 1]``, every factor is
positive: the flow is invertible.

Three ways to build ``Q``:

* :class:`OrthogonalSylvester` — iterative orthogonalisation ``Q ← Q(I + ½(I − QᵀQ))`` of a free
  matrix, with a convergence check that raises :class:`OrthogonalizationError`;
* :class:`HouseholderSylvester` — a product of Householder reflections (``M = D``);
* :class:`TriangularSylvester` — a fixed permutation (identity or reversal, ``M = D``).

Parameters are free ``nn.Parameter`` s (no amortisation; wrap them in a hyper-network to amortise).
The inverse is numeric (damped Newton, see :meth:`SylvesterFlow.inverse`).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Flow


class OrthogonalizationError(RuntimeError):
    """The iterative orthogonalisation did not reach ``‖QᵀQ − I‖ ≤ tol`` in the allowed iterations."""


def orthogonalize(q: torch.Tensor, max_iter: int = 100, tol: float | None = None) -> torch.Tensor:
    """Orthonormalise the columns of ``q`` (``D×M``, ``M ≤ D``) by ``Q ← Q(I + ½(I − QᵀQ))``.

    ``q`` is first divided by its Frobenius norm (so every singular value is ≤ 1, inside the
    iteration's basin ``(0, √3)``); the iteration then converges quadratically to the orthogonal
    polar factor.  Stops when ``max|QᵀQ − I| ≤ tol`` (default 1e-12 in float64, 1e-5 otherwise) and
    raises :class:`OrthogonalizationError` if that has not happened after ``max_iter`` iterations
    (e.g. a rank-deficient ``q``: a zero singular value stays zero).
    """
    if tol is None:
        tol = 1e-12 if q.dtype == torch.float64 else 1e-5
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    q = q / q.norm()
    for _ in range(max_iter):
        qtq = q.transpose(-1, -2) @ q
        err = (qtq - eye).abs().max().item()
        if err <= tol:
            return q
        q = q @ (eye + 0.5 * (eye - qtq))
    err = (q.transpose(-1, -2) @ q - eye).abs().max().item()
    if err <= tol:
        return q
    raise OrthogonalizationError(f"orthogonalisation did not converge: max|QᵀQ - I| = {err:.3g} > {tol:.3g} after "
                                 f"{max_iter} iterations (is the matrix rank-deficient?)")


class SylvesterFlow(Flow):
    """Shared maths; subclasses provide :meth:`q` (``D×M``, orthonormal columns)."""

    event_dims = 1

    def __init__(self, dim: int, m: int, init_scale: float = 0.1):
        super().__init__()
        self.dim, self.m = dim, m
        self.r1_raw = nn.Parameter(torch.randn(m, m) * init_scale)
        self.r2_raw = nn.Parameter(torch.randn(m, m) * init_scale)
        self.diag1_raw = nn.Parameter(torch.randn(m) * init_scale + 0.5)
        self.diag2_raw = nn.Parameter(torch.randn(m) * init_scale + 0.5)
        self.b = nn.Parameter(torch.randn(m) * init_scale)
        self.register_buffer("triu_mask", torch.triu(torch.ones(m, m), diagonal=1), persistent=False)

    def q(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def r_matrices(self):
        """``R₁, R₂`` (upper triangular, ``tanh`` diagonals) and their diagonals."""
        d1, d2 = torch.tanh(self.diag1_raw), torch.tanh(self.diag2_raw)
        mask = self.triu_mask.to(d1.dtype)
        r1 = self.r1_raw * mask + torch.diag(d1)
        r2 = self.r2_raw * mask + torch.diag(d2)
        return r1, r2, d1, d2

    def _parts(self):
        q = self.q()
        r1, r2, d1, d2 = self.r_matrices()
        return q @ r1, r2 @ q.transpose(-1, -2), d1 * d2  # A = Q R1 (D×M), B = R2 Qᵀ (M×D)

    def forward(self, z, context=None):
        a, bmat, d12 = self._parts()
        pre = z @ bmat.transpose(-1, -2) + self.b
        h = torch.tanh(pre)
        y = z + h @ a.transpose(-1, -2)
        ladj = torch.log1p(d12 * (1 - h * h)).sum(-1)
        return y, ladj

    def inverse(self, y, context=None, tol: float | None = None, max_iter: int = 100):
        """Numeric inverse by damped Newton on ``F(z) = z + A·tanh(Bz + b) − y`` (``A = QR₁``, ``B = R₂Qᵀ``).

        Starts at ``z = y``; each step solves ``(I + A·diag(h')·B)·δ = F(z)`` (the Jacobian, invertible by
        construction) and halves the step until the residual decreases.  Stops when
        ``max|F(z)| ≤ tol`` (default 1e-10 in float64, 1e-5 otherwise) and raises ``RuntimeError``
        otherwise after ``max_iter`` iterations.  Runs without gradient; the returned ``ladj`` is
        ``−log|det|`` at the solution (differentiable in the parameters with ``z`` held fixed).
        """
        if tol is None:
            tol = 1e-10 if y.dtype == torch.float64 else 1e-5
        with torch.no_grad():
            a, bmat, _ = self._parts()
            a, bmat, b = a.to(y.dtype), bmat.to(y.dtype), self.b.to(y.dtype)
            eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)

            def resid(z):
                return z + torch.tanh(z @ bmat.T + b) @ a.T - y

            z = y.clone()
            res = resid(z)
            for _ in range(max_iter):
                err = res.abs().max().item()
                if err <= tol:
                    break
                h = torch.tanh(z @ bmat.T + b)
                jac = eye + torch.einsum("dm,bm,me->bde", a, 1 - h * h, bmat)
                delta = torch.linalg.solve(jac, res.unsqueeze(-1)).squeeze(-1)
                step = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
                norm0 = res.norm(dim=-1)
                for _ in range(30):
                    cand = z - step * delta
                    rc = resid(cand)
                    worse = (rc.norm(dim=-1) > norm0) & (norm0 > tol)
                    if not worse.any():
                        break
                    step = torch.where(worse.unsqueeze(-1), step * 0.5, step)
                z, res = cand, rc
            else:
                if res.abs().max().item() > tol:
                    raise RuntimeError(f"SylvesterFlow.inverse: Newton did not converge in {max_iter} iterations")
        _, ladj = self.forward(z)
        return z, -ladj


class OrthogonalSylvester(SylvesterFlow):
    """``Q`` (``D×M``) from a free matrix by :func:`orthogonalize` (raises if it does not converge)."""

    def __init__(self, dim: int, m: int | None = None, init_scale: float = 0.1, max_iter: int = 100):
        m = dim if m is None else m
        if not 1 <= m <= dim:
            raise ValueError(f"OrthogonalSylvester needs 1 <= m <= dim, got m={m}, dim={dim}")
        super().__init__(dim, m, init_scale)
        self.max_iter = max_iter
        self.q_raw = nn.Parameter(torch.eye(dim, m) + torch.randn(dim, m) * init_scale)

    def q(self):
        return orthogonalize(self.q_raw, self.max_iter)


class HouseholderSylvester(SylvesterFlow):
    """``Q = H_1 ⋯ H_K``, ``H_k = I − 2·v_k v_kᵀ/‖v_k‖²`` (exactly orthogonal, ``M = D``)."""

    def __init__(self, dim: int, reflections: int = 2, init_scale: float = 0.1):
        super().__init__(dim, dim, init_scale)
        self.v = nn.Parameter(torch.randn(reflections, dim))

    def q(self):
        q = torch.eye(self.dim, dtype=self.v.dtype, device=self.v.device)
        for v in self.v:
            q = q - 2 * torch.outer(q @ v, v) / (v @ v)
        return q


class TriangularSylvester(SylvesterFlow):
    """``Q`` a fixed permutation: the identity, or the reversal (alternate it between layers)."""

    def __init__(self, dim: int, reverse: bool = False, init_scale: float = 0.1):
        super().__init__(dim, dim, init_scale)
        perm = torch.eye(dim)
        self.register_buffer("perm", perm.flip(0) if reverse else perm)

    def q(self):
        return self.perm.to(self.r1_raw.dtype)
