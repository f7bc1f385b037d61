"""The linear-prediction synthesis recurrence with per-frame coefficients, fast, with its adjoint.

::

    y[t] = e[t] + Σ_k a[f(t), k] · y[t-1-k]          (k < p; y[-1-k] = history[k], zeros if none)

``a [B or 1, F, p]`` holds one predictor per frame; sample ``t`` uses frame
``f(t) = clamp(floor((start + t + hop//2) / hop), 0, F-1)`` (the frame whose centre, at sample ``i·hop`` of the
coefficients' own timeline, is nearest).  :func:`lp_synthesis` is differentiable in ``e`` only (the
coefficients come from the mel and need no gradient): its backward is the adjoint recurrence, the same
filter run backwards in time with the transposed coefficients,
``g_e[t] = g_y[t] + Σ_k a[f(t+1+k), k] · g_e[t+1+k]``.

Two implementations compute the same thing (to rounding):

* a compiled CPU loop (``csrc/lp_recurrence.cpp``, plain C ABI through :mod:`ctypes`, built on first use
  like the compiled generator, ~1 s): float32 and float64 on the CPU; ~1.5·10⁷ samples/s per row at p = 16
  (one core, measured by ``benchmarks/lp_gain.py``);
* a blocked PyTorch path for any device (the GPU): the signal is cut into ``nb`` blocks of ``L`` samples;
  all blocks run their recurrence at once from zero state together with the ``p`` responses to a unit
  history (``L`` vectorised steps), the states at the block boundaries are then chained (``nb`` small
  matrix products) and each block adds its homogeneous response to its true initial state.  Exact up to
  rounding; ``O(T·p²)`` work, ``L + nb ≈ 2·sqrt(T·p)`` sequential steps instead of ``T``.

``WAVEDISTILL_LP_RECURRENCE=blocked`` forces the blocked path on the CPU too (tests compare both).
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

import torch

from . import cbuild

_SOURCE = Path(__file__).resolve().parent / "csrc" / "lp_recurrence.cpp"
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno"]
_ABI = 1
_p, _i64 = ctypes.c_void_p, ctypes.c_int64
_LIBRARY = cbuild.CompiledLibrary("wavedistill_lp_recurrence", _SOURCE, _CFLAGS, None, "lpr_abi_version", _ABI, {
    "lpr_forward_f32": [_p] * 4 + [_i64] * 7, "lpr_forward_f64": [_p] * 4 + [_i64] * 7,
    "lpr_adjoint_f32": [_p] * 3 + [_i64] * 7, "lpr_adjoint_f64": [_p] * 3 + [_i64] * 7,
})
_lib = None  # the loaded library, set by _load()


def _load():
    """Build (once per CPU kind and source version) and load the library; ``None`` with :func:`build_error` if impossible."""
    global _lib
    _lib = _LIBRARY.load()
    return _lib


def compiled_available() -> bool:
    return _load() is not None


def build_error() -> str | None:
    return _LIBRARY.error()


def frame_index(n: int, frames: int, hop: int, start: int, device=None) -> torch.Tensor:
    """``f(t)`` for ``t < n``: the frame (of ``frames``) whose centre is nearest to sample ``start + t``."""
    t = torch.arange(n, device=device, dtype=torch.int64)
    return torch.div(start + t + hop // 2, hop, rounding_mode="floor").clamp(0, frames - 1)


def _use_compiled(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if os.environ.get("WAVEDISTILL_LP_RECURRENCE", "").strip().lower() == "blocked":
        return False
    return _load() is not None


def _c_forward(e, a, history, hop, start):
    B, n = e.shape
    y = torch.empty_like(e)
    fn = _lib.lpr_forward_f32 if e.dtype == torch.float32 else _lib.lpr_forward_f64
    fn(e.data_ptr(), a.data_ptr(), history.data_ptr() if history is not None else None, y.data_ptr(),
       B, n, a.shape[0], a.shape[1], a.shape[2], hop, start)
    return y


def _c_adjoint(g, a, hop, start):
    B, n = g.shape
    ge = torch.empty_like(g)
    fn = _lib.lpr_adjoint_f32 if g.dtype == torch.float32 else _lib.lpr_adjoint_f64
    fn(g.data_ptr(), a.data_ptr(), ge.data_ptr(), B, n, a.shape[0], a.shape[1], a.shape[2], hop, start)
    return ge


def blocked_recurrence(e: torch.Tensor, coef: torch.Tensor, history: torch.Tensor | None = None,
                       block: int | None = None) -> torch.Tensor:
    """``y[t] = e[t] + Σ_k coef[:, t, k]·y[t-1-k]`` with per-sample ``coef [B, T, p]``, in blocks (any device)."""
    B, T = e.shape
    p = coef.shape[2]
    if T == 0 or p == 0:
        return e.clone()
    L = block or max(p, min(T, int(math.sqrt(T * max(p, 1))) + 1))
    L = max(L, p)
    nb = -(-T // L)
    pad = nb * L - T
    E = torch.nn.functional.pad(e, (0, pad)).view(B * nb, L)
    A = torch.nn.functional.pad(coef, (0, 0, 0, pad)).view(B * nb, L, p)
    R = B * nb
    # Signal 0: the block's input from zero state; signal 1+m: zero input, unit history at lag m.
    hist = torch.zeros(R, p + 1, p, dtype=e.dtype, device=e.device)
    hist[:, 1:, :] = torch.eye(p, dtype=e.dtype, device=e.device)
    Y = torch.empty(R, p + 1, L, dtype=e.dtype, device=e.device)
    for t in range(L):
        new = torch.einsum("rsk,rk->rs", hist, A[:, t])
        new[:, 0] += E[:, t]
        Y[:, :, t] = new
        hist = torch.cat([new[:, :, None], hist[:, :, :-1]], dim=2)
    Y = Y.view(B, nb, p + 1, L)
    y0, H = Y[:, :, 0], Y[:, :, 1:]  # [B, nb, L], [B, nb, p, L]
    state = history.to(e.dtype) if history is not None else e.new_zeros(B, p)  # [B, p], most recent first
    states = []
    tail = torch.arange(L - 1, L - 1 - p, -1, device=e.device)  # positions L-1, L-2, ... (most recent first)
    for j in range(nb):
        states.append(state)
        state = y0[:, j, tail] + torch.einsum("bm,bmk->bk", state, H[:, j][:, :, tail])
    S = torch.stack(states, dim=1)  # [B, nb, p]
    y = y0 + torch.einsum("bjm,bjml->bjl", S, H)
    return y.reshape(B, nb * L)[:, :T]


def _per_sample(a, n, hop, start, B):
    idx = frame_index(n, a.shape[1], hop, start, a.device)
    return a.expand(B, -1, -1)[:, idx]  # [B, n, p]


def _blocked_forward(e, a, history, hop, start):
    return blocked_recurrence(e, _per_sample(a.to(e.dtype), e.shape[1], hop, start, e.shape[0]), history)


def _blocked_adjoint(g, a, hop, start):
    B, n = g.shape
    p = a.shape[2]
    coef = _per_sample(a.to(g.dtype), n, hop, start, B)  # [B, n, p]
    # u[τ] = g_e[n-1-τ] obeys u[τ] = v[τ] + Σ_k coef[n-τ+k, k]·u[τ-1-k] (terms with n-τ+k >= n vanish).
    tau = torch.arange(n, device=g.device)[:, None]
    k = torch.arange(p, device=g.device)[None, :]
    src = n - tau + k
    valid = src < n
    rev = torch.gather(coef, 1, src.clamp(max=n - 1).expand(B, -1, -1)) * valid
    return blocked_recurrence(g.flip(1), rev).flip(1)


class _LPSynthesis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, a, history, hop, start):
        a = a.to(e.dtype).contiguous()
        e = e.contiguous()
        history = history.to(e.dtype).contiguous() if history is not None else None
        if _use_compiled(e):
            y = _c_forward(e, a, history, hop, start)
        else:
            y = _blocked_forward(e, a, history, hop, start)
        ctx.save_for_backward(a)
        ctx.hop, ctx.start = hop, start
        return y

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        g = g.contiguous()
        ge = _c_adjoint(g, a, ctx.hop, ctx.start) if _use_compiled(g) else _blocked_adjoint(g, a, ctx.hop, ctx.start)
        return ge, None, None, None, None


def lp_synthesis(e: torch.Tensor, a: torch.Tensor, hop: int, start: int = 0,
                 history: torch.Tensor | None = None) -> torch.Tensor:
    """``y [B, T]`` from excitation ``e [B, T]``, per-frame predictors ``a [B or 1, F, p]`` and the optional
    signal before ``t = 0`` (``history [B, p]``, most recent first).  Differentiable in ``e``."""
    if e.dim() != 2 or a.dim() != 3 or a.shape[0] not in (1, e.shape[0]) or a.shape[1] < 1:
        raise ValueError(f"lp_synthesis needs e [B, T] and a [B or 1, F>0, p], got {tuple(e.shape)} and {tuple(a.shape)}")
    if a.shape[2] == 0:
        return e
    if history is not None and history.shape != (e.shape[0], a.shape[2]):
        raise ValueError(f"history must be [B, p] = {(e.shape[0], a.shape[2])}, got {tuple(history.shape)}")
    return _LPSynthesis.apply(e, a.detach(), None if history is None else history.detach(), int(hop), int(start))
