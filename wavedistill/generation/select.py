"""The one place that chooses a step-by-step generator: persistent Triton kernel, compiled C++ or Python.

Every generator has the :class:`Generator` interface: ``new_cache(batch)`` gives a
:class:`~wavedistill.generation.cached.GenerationCache` (ring buffers, previous sample) and
``run(c, noise, temperature, cache, progress)`` generates ``[B, T]`` from conditioning ``c`` (a
:class:`~wavedistill.generation.cached.FrameConditioning` at frame rate, or upsampled ``[B, C, T]``) and
uniform noise; a cache carries state from one call to the next, so long inputs generate in chunks.
Generators for source-filter teachers (``teacher.source``: linear prediction / pre-emphasis) also take
``lpc=`` (the window's :class:`~wavedistill.flows.LPCoefficients`) and carry ``cache.lp_history``: the
Python and the C++ generator do; the Triton one does not.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .. import kernels
from ..errors import UserError
from . import cpp
from .cached import CachedGenerator, GenerationCache


class Generator(Protocol):
    def new_cache(self, batch: int) -> GenerationCache: ...

    def run(self, c, noise: torch.Tensor, temperature: float = 1.0, cache: GenerationCache | None = None,
            progress=None, lpc=None) -> torch.Tensor: ...


def make_generator(teacher, fast: bool | None = None, threads: int = 1):
    """The generator :meth:`Teacher.generate` should use.

    ``fast=None``: the compiled generator for the teacher's device when it can run there, else the
    Python :class:`~wavedistill.generation.CachedGenerator`; ``fast=True``: the compiled one or an
    error saying why not; ``fast=False``: the Python one.  Compiled means the persistent Triton
    kernel (:class:`~wavedistill.generation.triton.TritonARGenerator`) for a CUDA teacher, or under
    ``WAVEDISTILL_KERNELS=triton`` (CPU tensors then need ``TRITON_INTERPRET=1``), and
    :class:`FastCachedGenerator` on the CPU otherwise (``threads``: see there).
    ``WAVEDISTILL_KERNELS=reference`` keeps CUDA teachers on the Python generator.

    Source-filter teachers (``teacher.source``: linear prediction / pre-emphasis) never take the Triton
    path, whatever the kernel mode (the Triton generator does not add the prediction; see
    :func:`~wavedistill.generation.triton.unsupported_reason`): a float32 CPU teacher gets
    :class:`FastCachedGenerator`, anything else the Python generator (``fast=None``) or a ``ValueError``
    saying why (``fast=True``).
    """
    if fast is False:
        return CachedGenerator(teacher)
    if getattr(teacher, "source", None) is not None:  # LP / pre-emphasis: the C++ or the Python generator
        if cpp.supports(teacher):
            return cpp.FastCachedGenerator(teacher, threads=threads)
        if fast:
            p = next(teacher.parameters())
            why = cpp.build_error() if p.device.type == "cpu" and p.dtype == torch.float32 else f"got {p.dtype} on {p.device}"
            raise ValueError("fast generation of a teacher with linear prediction / pre-emphasis needs the C++ generator "
                             f"(a float32 teacher on the CPU; the Triton generator does not add the prediction): {why}")
        return CachedGenerator(teacher)

    mode = kernels.get_mode()
    if mode == "triton" or next(teacher.parameters()).device.type == "cuda":
        if not kernels.triton_available():
            reason = "the 'triton' package does not import here"
        else:
            from . import triton as ar_triton

            reason = ar_triton.unsupported_reason(teacher)
            if reason is None:
                return ar_triton.TritonARGenerator(teacher)
        if mode == "triton" and not fast:  # the user's switch (config or WAVEDISTILL_KERNELS): a user error
            raise UserError(f"kernels=triton cannot generate with this teacher: {reason}; use kernels=auto or reference")
        if fast:
            raise ValueError(f"fast generation is unavailable: {reason}")
        return CachedGenerator(teacher)
    if fast is None and not cpp.supports(teacher):
        return CachedGenerator(teacher)
    return cpp.FastCachedGenerator(teacher, threads=threads)
