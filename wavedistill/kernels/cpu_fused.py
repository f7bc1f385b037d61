"""Fused element-wise passes of the time-major residual stack on the CPU (``csrc/fused_layer.cpp``).

The training step of a WaveNet on the CPU is GEMMs (which MKL already runs near the machine's peak) and
element-wise work between them: stacking the taps, the gate ``tanh(a)·σ(b)``, the residual and skip sums,
and their backward passes.  As ATen ops each of those reads and writes whole ``[B·T, channels]`` tensors
several times; these kernels do each in one pass (tanh/exp vectorised by glibc's libmvec), which
:class:`wavedistill.nn.fused_stack.FusedStack` strings between the GEMMs.

Built on first use like the other compiled CPU paths (:mod:`wavedistill.kernels.cbuild`, ~2 s); when it
cannot be built (no compiler, ``WAVEDISTILL_NO_FASTGEN=1``) :func:`available` is False and the PyTorch
layers run.  Float32 CPU tensors only; every array passed must be contiguous row-major.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cbuild

_SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_layer.cpp"
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
# -fopenmp links libgomp.so.1 by soname: the copy PyTorch has already loaded, so one OpenMP thread pool serves
# PyTorch's GEMMs and these passes (two runtimes would spin against each other on a 2-core machine)
_LDFLAGS = ["-fopenmp"]
_ABI = 4
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_LIBRARY = cbuild.CompiledLibrary("wavedistill_fused_layer", _SOURCE, _CFLAGS, _LDFLAGS, "wf_abi_version", _ABI, {
    "wf_taps": [_P, _P, _I, _I, _P, _I] + [_I] * 7,
    "wf_taps_bwd": [_P, _I, _P, _F, _P] + [_I] * 6,
    "wf_gate": [_P, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _P, _I, _I, _I, _I],
    "wf_band_bwd": [_P, _P, _I, _I, _P, _P, _I, _P, _P, _I, _I, _I, _I],
    "wf_gate_bwd": [_P, _P, _P, _I, _P, _I, _I, _I],
    "wf_residual": [_P, _P, _I, _P, _P, _P, _I, _I, _I, _F, _I, _I],
    "wf_pack_gy": [_P, _P, _F, _P, _P, _I, _I, _I, _I],
})
_lib = None  # the loaded library, set by available()


def available() -> bool:
    """Whether the library builds and loads here (built on the first call)."""
    global _lib
    _lib = _LIBRARY.load()
    return _lib is not None


def build_error() -> str | None:
    return _LIBRARY.error()


def _L():
    return _lib if _lib is not None else _LIBRARY.load()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def taps(x: torch.Tensor, cond: torch.Tensor | None, kernel_size: int, dilation: int, out: torch.Tensor) -> torch.Tensor:
    """``out [B·T, K·R + C]`` ← ``[x_{t−(K−1)d}, …, x_t, cond_t]`` for ``x [B, T, R]``, ``cond [B or 1, T, C]``."""
    B, T, R = x.shape
    C = cond.shape[2] if cond is not None else 0
    cb = 0 if cond is None or cond.shape[0] == 1 else T * C
    _L().wf_taps(_ptr(x), _ptr(cond), C, cb, _ptr(out), out.shape[1], B, T, R, C, kernel_size, dilation, _threads())
    return out


def taps_backward(g: torch.Tensor, gres: torch.Tensor | None, scale: float, B: int, T: int, R: int,
                  kernel_size: int, dilation: int, out: torch.Tensor) -> torch.Tensor:
    """``out [B·T, R]`` ← ``scale·gres + Σ_k g[t + (K−1−k)d, tap k]`` (the adjoint of :func:`taps`, taps only)."""
    _L().wf_taps_bwd(_ptr(g), g.stride(0), _ptr(gres), float(scale), _ptr(out), B, T, R, kernel_size, dilation,
                     _threads())
    return out


def gate(h: torch.Tensor, add: torch.Tensor | None, z: torch.Tensor, T: int, band=None,
         bias: torch.Tensor | None = None) -> None:
    """In place: ``h [N, 2H]`` ← ``[tanh(a) | σ(b)]`` of ``h`` (+ ``bias [2H]``) (+ ``add [B, T, ≥2H]``, any strides
    with unit channel stride) (+ the banded conditioning ``band = (P [B, F, ≥2H] view, i0 [T] int64, w [T, J])``:
    row ``(b, t)`` adds ``Σ_j w[t, j]·P[b, i0[t] + j]``); ``z [N, H]`` ← their product.  ``N = B·T``."""
    N, H = z.shape
    if add is not None:
        assert add.stride(2) == 1
    if bias is not None:
        assert bias.is_contiguous() and bias.numel() == 2 * H
    P, i0, w = band if band is not None else (None, None, None)
    if P is not None:
        assert P.stride(2) == 1 and i0.dtype == torch.int64 and i0.is_contiguous() and w.is_contiguous()
    _L().wf_gate(_ptr(h), h.stride(0), _ptr(bias), _ptr(add), add.stride(1) if add is not None else 0,
                 add.stride(0) if add is not None else 0, _ptr(P), P.stride(1) if P is not None else 0,
                 P.stride(0) if P is not None else 0, _ptr(i0), _ptr(w), w.shape[1] if w is not None else 0,
                 _ptr(z), N, T, H, _threads())


def band_backward(g: torch.Tensor, band, gP: torch.Tensor, gw: torch.Tensor, B: int, T: int) -> None:
    """Accumulate the gradients of :func:`gate`'s banded conditioning for pre-activation gradient ``g [B·T, G]``:
    ``gP`` (same layout as the band's ``P`` view) and ``gw [T, J]`` (contiguous)."""
    P, i0, w = band
    assert gP.stride() == P.stride() and gw.is_contiguous()
    _L().wf_band_bwd(_ptr(g), _ptr(P), P.stride(1), P.stride(0), _ptr(i0), _ptr(w), w.shape[1], _ptr(gP), _ptr(gw),
                     B, T, g.shape[1], _threads())


def gate_backward(gz: torch.Tensor, ts: torch.Tensor, copy: torch.Tensor | None = None,
                  colsum: torch.Tensor | None = None) -> torch.Tensor:
    """In place: ``ts = [tanh | σ]`` ← the pre-activation gradient for ``gz [N, H]`` (also into ``copy``; its column
    sums, the bias gradient, added to ``colsum [2H]`` float64)."""
    N, H = gz.shape
    assert colsum is None or (colsum.dtype == torch.float64 and colsum.numel() == 2 * H)
    _L().wf_gate_bwd(_ptr(gz), _ptr(ts), _ptr(copy), copy.stride(0) if copy is not None else 0, _ptr(colsum), N, H,
                     _threads())
    return ts


def residual(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None,
             skips: torch.Tensor | None, R: int, S: int, scale: float, skip_mode: int) -> None:
    """``out = (x + y[:, :R] + b[:R])·scale``; ``skips`` ``=`` (mode 1) or ``+=`` (mode 2) the skip columns + bias."""
    _L().wf_residual(_ptr(x), _ptr(y), y.stride(0), _ptr(bias), _ptr(out), _ptr(skips), y.shape[0], R, S,
                     float(scale), skip_mode, _threads())


def pack_gy(gx: torch.Tensor, gs: torch.Tensor | None, scale: float, out: torch.Tensor,
            colsum: torch.Tensor | None = None) -> torch.Tensor:
    """``out [N, R + S]`` ← ``[scale·gx | gs]`` (its column sums added to ``colsum [R + S]`` float64)."""
    N, R = gx.shape
    S = gs.shape[1] if gs is not None else 0
    assert colsum is None or (colsum.dtype == torch.float64 and colsum.numel() == R + S)
    _L().wf_pack_gy(_ptr(gx), _ptr(gs), float(scale), _ptr(out), _ptr(colsum), N, R, S, _threads())
    return out
