"""What both Triton kernels need to be built: a JIT for the GPU or the CPU interpreter, and padded widths."""

from __future__ import annotations

import triton


def jit(fn, interpret: bool, **options):
    """``fn`` as a GPU JIT function, or run by Triton's CPU interpreter.

    The kernels are built on first use rather than at import, so ``TRITON_INTERPRET`` matters when a CPU
    launch happens, not when ``triton`` was imported.
    """
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        return triton.jit(fn, **options)


def pow2(n: int, least: int = 16) -> int:
    """``n`` rounded up to a power of two, at least ``least`` (16: the smallest ``tl.dot`` tile)."""
    return max(least, triton.next_power_of_2(max(int(n), 1)))
