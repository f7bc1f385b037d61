"""Fused kernels (Triton for GPUs, compiled C++ for CPU training) and the switch that chooses between them and
the reference PyTorch code.

Modes (``WAVEDISTILL_KERNELS`` or :func:`set_mode`):

* ``auto``      — the fused Triton kernels for CUDA tensors when ``triton`` imports; on a CPU, training steps
  (float32, gradients wanted) run the fused CPU stack (:mod:`~wavedistill.kernels.cpu_fused`,
  :mod:`wavedistill.nn.fused_stack`) when its library builds; PyTorch otherwise;
* ``reference`` — always the PyTorch layers;
* ``triton``    — always the kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (Triton's interpreter, which is how CI checks them); anything else is a :class:`UserError`.

Precedence: :func:`set_mode` / :func:`use_mode` (and :func:`configure`, which the training loops call
with ``train.kernels``) > the environment variable > ``auto``.  ``configure("auto")`` defers to the
environment, so ``WAVEDISTILL_KERNELS=reference`` can switch a run with a default config to the reference.

The mode is process-wide state, like ``torch.backends`` flags: it selects an implementation and never
changes results beyond rounding.  Importing this package does not import ``triton``.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..errors import UserError

MODES = ("auto", "reference", "triton")
ENV_VAR = "WAVEDISTILL_KERNELS"
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_mode: str | None = None  # None: follow the environment variable


def _check(mode: str, where: str) -> str:
    if mode not in MODES:
        raise UserError(f"{where}={mode!r} is not a kernel mode; choose one of {', '.join(MODES)}")
    return mode


def get_mode() -> str:
    """The mode in force: the last :func:`set_mode`, else ``$WAVEDISTILL_KERNELS``, else ``auto``."""
    if _mode is not None:
        return _mode
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def set_mode(mode: str | None) -> None:
    """Force ``auto``/``reference``/``triton`` for this process; ``None`` goes back to the environment variable."""
    global _mode
    _mode = None if mode is None else _check(mode, "kernel mode")


@contextlib.contextmanager
def use_mode(mode: str | None):
    """``with use_mode("reference"): ...`` — :func:`set_mode` for a block, restoring the previous setting."""
    global _mode
    previous = _mode
    set_mode(mode)
    try:
        yield
    finally:
        _mode = previous


@contextlib.contextmanager
def restoring():
    """Give back whatever mode was in force when the block began (the training loops' :func:`configure`)."""
    global _mode
    previous = _mode
    try:
        yield
    finally:
        _mode = previous


# The fused layer keeps whole weight tiles in shared memory: above this padded width (R, G/2, S, C),
# the tiles no longer fit one H100 SM (227 KB), so auto mode keeps such layers on PyTorch.
MAX_FUSED_WIDTH = 128


def fusable(layer) -> str | None:
    """Why ``layer`` is too wide for the fused kernel (``None`` when it fits)."""
    p = layer.params()
    widths = {"residual": p.conv_w.shape[1], "gate/2": p.conv_w.shape[0] // 2}
    if p.skip_w is not None:
        widths["skip"] = p.skip_w.shape[0]
    if p.cond_w is not None:
        widths["conditioning"] = p.cond_w.shape[1]
    wide = [f"{k}={v}" for k, v in widths.items() if v > MAX_FUSED_WIDTH]
    if wide:
        return f"{', '.join(wide)} exceeds the fused kernel's {MAX_FUSED_WIDTH} channels"
    return None


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports here (checked once)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1``: Triton kernels may then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def _triton_error(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None if they can)."""
    if not triton_available():
        return "kernels=triton needs the 'triton' package, which does not import here; install it or use kernels=reference"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return (f"kernels=triton needs CUDA tensors (got {device.type}); use kernels=auto or reference, "
            f"or set TRITON_INTERPRET=1 to run the kernels on CPU in Triton's interpreter")


def configure(mode: str, device: torch.device | str | None = None) -> str:
    """Apply the ``train.kernels`` config key; returns the implementation ``device`` will get (for the log):
    ``triton``, ``cpu-fused`` (:mod:`wavedistill.kernels.cpu_fused` for training on a CPU) or ``reference``.

    The training loops call this once before the first step, inside :func:`restoring`, so the setting
    ends with the run.  ``auto`` leaves the mode in force alone (a caller's :func:`use_mode`, else
    ``$WAVEDISTILL_KERNELS``); ``reference``/``triton`` override it.  With a ``device``, an impossible
    ``triton`` fails here, at start-up, as a one-line :class:`UserError` rather than at the first layer.
    """
    if _check(mode, "train.kernels") != "auto":
        set_mode(mode)
    if device is None:
        return get_mode()
    device = torch.device(device)
    mode = get_mode()
    if mode == "triton":
        err = _triton_error(device)
        if err is not None:
            raise UserError(err)
        return "triton"
    if mode == "auto" and device.type == "cuda" and triton_available():
        return "triton"
    if mode == "auto" and device.type == "cpu" and _cpu_fused_available():
        return "cpu-fused"  # training steps with gradients take the fused CPU stack (use_cpu_fused)
    return "reference"


def use_fused(x: torch.Tensor, layer=None) -> bool:
    """Whether ``layer`` should run its fused kernel on ``x`` under the current mode."""
    mode = get_mode()
    if mode == "reference":
        return False
    if mode == "auto":
        return (x.is_cuda and x.dtype in _FUSED_DTYPES and triton_available()
                and not torch.compiler.is_compiling()  # under torch.compile, let the compiler fuse
                and (layer is None or fusable(layer) is None))
    err = _triton_error(x.device)
    if err is not None:
        raise UserError(err)
    if x.dtype not in _FUSED_DTYPES:
        raise UserError(f"kernels=triton supports float32, bfloat16 and float16 tensors, got {x.dtype}; use kernels=reference")
    too_wide = None if layer is None else fusable(layer)
    if too_wide is not None:
        raise UserError(f"kernels=triton: {too_wide}; use kernels=auto or reference for this model")
    return True


def residual_layer(layer, x: torch.Tensor, c: torch.Tensor | None):
    """:class:`~wavedistill.layers.ResidualLayer` forward through the fused kernel: ``(out [B, R, T], skip [B, S, T] or None)``.

    Under autocast every operand is cast to the autocast dtype (as ``nn.Conv1d`` would be); otherwise to
    ``x``'s dtype.  Outputs come in that dtype.
    """
    from .residual_triton import FusedResidualLayer

    p = layer.params()
    R, C = p.conv_w.shape[1], (p.cond_w.shape[1] if p.cond_w is not None else 0)
    if x.dim() != 3 or x.shape[1] != R:
        raise ValueError(f"residual layer expects x [B, {R}, T], got {list(x.shape)}")
    if p.res_w is None and p.skip_w is None:  # nothing to compute: the layer passes x through
        return x, None
    has_cond = p.cond_w is not None and c is not None
    if has_cond and (c.dim() != 3 or c.shape[0] not in (1, x.shape[0]) or c.shape[1] != C or c.shape[2] != x.shape[2]):
        raise ValueError(f"conditioning must be [{x.shape[0]} or 1, {C}, {x.shape[2]}] "
                         f"for x {list(x.shape)}, got {list(c.shape)}")
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def cast(t):
        return None if t is None else t.to(dtype)

    outs = FusedResidualLayer.apply(
        p.dilation, dev == "cpu", cast(x), cast(c) if has_cond else None, cast(p.conv_w), cast(p.conv_b),
        cast(p.cond_w) if has_cond else None, cast(p.res_w), cast(p.res_b), cast(p.skip_w), cast(p.skip_b),
    )
    out = outs[0] if p.res_w is not None else x
    return out, (outs[-1] if p.skip_w is not None else None)


def _cpu_fused_available() -> bool:
    from . import cpu_fused

    return cpu_fused.available()


def use_cpu_fused(x: torch.Tensor) -> bool:
    """Whether a CPU float32 residual stack should train through :class:`wavedistill.nn.fused_stack.FusedStack`
    (the compiled element-wise passes of :mod:`wavedistill.kernels.cpu_fused`): in ``auto`` mode only, not
    under autocast or ``torch.compile``, and only when the library builds here.  The caller checks that
    gradients are wanted (without them the plain time-major layers are as fast and keep inference unchanged)."""
    if get_mode() != "auto" or x.device.type != "cpu" or x.dtype != torch.float32:  # triton: the Triton kernels
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return _cpu_fused_available()
