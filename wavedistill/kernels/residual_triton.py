"""Fused Triton forward of one :class:`~wavedistill.layers.ResidualLayer`, with a recompute backward.

Tensor layouts (all channel-major, as ``nn.Conv1d`` uses them)::

    x      [B, R, T]   residual stream (any strides)
    c      [B, C, T]   upsampled conditioning, or None (batch 1 is broadcast)
    w_conv [G, R, K]   dilated causal conv, tap k multiplies x[:, t - (K-1-k)·d]; b_conv [G]
    w_cond [G, C, 1]   conditioning projection (no bias)
    w_res  [R, H, 1]   residual projection, H = G/2; b_res [R]   (None in a skip stack's last layer)
    w_skip [S, H, 1]   skip projection; b_skip [S]                (None when the net has no skip stack)
    out    [B, R, T]   (x + w_res·z + b_res)·√½, or x itself without w_res
    skip   [B, S, T]   w_skip·z + b_skip, with z = tanh(h[:H])·sigmoid(h[H:]), h = conv(x) + b_conv + w_cond·c

One program computes one (batch, time block) tile: the K taps and the
conditioning projection as ``tl.dot`` products accumulated in float32, the
gate, and both output projections, so the gate pre-activations and ``z``
never reach memory.  Channel counts are padded to powers of two (at least
16, the smallest ``tl.dot`` tile) with masked loads.

Conditioning is projected inside the kernel rather than passed in as a
precomputed ``[B, G, T]`` tensor.  Per sample the layer does
2·G·(K·R + C) + 2·H·(R + S) FLOPs (66 kFLOP at R=64, G=128, C=S=64, K=2)
against 2·(2R + C + S) bytes of bf16 traffic (512 B): about 128 FLOP/B, under
the ~300 FLOP/B at which an H100 stops being bandwidth-bound, so bytes decide.
In-kernel, ``c`` costs C values per sample.  Precomputed, the kernel would
read G = 2C values instead (512 → 640 B) after a separate GEMM launch that
reads ``c`` and writes them (+384 B): twice the traffic for the same FLOPs.
(This is the analysis, not a measurement: no GPU was available when the
kernel was written.)

Dot operands are cast to ``DOT_T``: the input dtype on a GPU (a no-op), float32
in the interpreter, whose ``tl.dot`` would multiply bf16 bit patterns as
integers.  bf16×bf16 products are exact in float32, so both accumulate the same
values.

The backward (:class:`FusedResidualLayer`) saves only the inputs, recomputes
``h`` with PyTorch ops and forms every gradient from it; it is not itself
differentiable (no double backward).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _build
from ._build import pow2

SQRT_HALF = math.sqrt(0.5)
BLOCK_T = 64  # time steps per program where the launch is not autotuned (the interpreter, tests)
NUM_WARPS = 4
# GPU launches pick among these once per layer shape and dtype (triton.autotune).  An offline compile for
# sm_90 (no device) showed no register spills for all four at R=64, G=128, S=C=64 in bf16 (not re-checked by
# a test); which one wins was not measured here.
AUTOTUNE = [(32, 4), (64, 4), (64, 8), (128, 8)]  # (BLOCK, num_warps)


def _residual_layer_fwd(
    x_ptr, c_ptr, w_ptr, b_ptr, wc_ptr, wr_ptr, br_ptr, ws_ptr, bs_ptr, out_ptr, skip_ptr,
    T, dilation,
    sxb, sxr, sxt,
    scb, scc, sct,
    swg, swr, swk,
    swcg, swcc,
    swrr, swrh,
    swss, swsh,
    R: tl.constexpr, H: tl.constexpr, S: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
    RP: tl.constexpr, HP: tl.constexpr, SP: tl.constexpr, CP: tl.constexpr,
    HAS_COND: tl.constexpr, HAS_RES: tl.constexpr, HAS_SKIP: tl.constexpr,
    PRECISION: tl.constexpr, DOT_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """Kernel body; built into a JIT or an interpreted kernel by :func:`_kernel` (outputs are contiguous).

    Uses only Triton's builtins (no ``tl.sigmoid`` and other helpers from ``triton.language.standard``):
    those helpers are JIT functions that the interpreter can call only if ``TRITON_INTERPRET=1`` was set
    before ``triton`` was imported, while this kernel must also run interpreted when it was not.
    """
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_t = (pid_t * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # int64: R·T may pass 2^31 on long inputs
    offs_r = tl.arange(0, RP)
    offs_h = tl.arange(0, HP)
    in_t = offs_t < T
    in_r = offs_r < R
    in_h = offs_h < H
    w_mask = in_h[:, None] & in_r[None, :]
    x_base = x_ptr + b * sxb

    # tap K-1 reads x[:, t] itself: load it once and keep it for the residual sum
    x0 = tl.load(x_base + offs_r[:, None] * sxr + offs_t[None, :] * sxt, mask=in_r[:, None] & in_t[None, :], other=0.0).to(DOT_T)
    wa = tl.load(w_ptr + offs_h[:, None] * swg + offs_r[None, :] * swr + (K - 1) * swk, mask=w_mask, other=0.0).to(DOT_T)
    wb = tl.load(w_ptr + (offs_h[:, None] + H) * swg + offs_r[None, :] * swr + (K - 1) * swk, mask=w_mask, other=0.0).to(DOT_T)
    acc_a = tl.dot(wa, x0, input_precision=PRECISION)
    acc_b = tl.dot(wb, x0, input_precision=PRECISION)
    for k in tl.static_range(K - 1):
        tt = offs_t - (K - 1 - k) * dilation  # causal: left zero padding
        xk = tl.load(x_base + offs_r[:, None] * sxr + tt[None, :] * sxt,
                     mask=in_r[:, None] & ((tt >= 0) & (tt < T))[None, :], other=0.0).to(DOT_T)
        wa = tl.load(w_ptr + offs_h[:, None] * swg + offs_r[None, :] * swr + k * swk, mask=w_mask, other=0.0).to(DOT_T)
        wb = tl.load(w_ptr + (offs_h[:, None] + H) * swg + offs_r[None, :] * swr + k * swk, mask=w_mask, other=0.0).to(DOT_T)
        acc_a = tl.dot(wa, xk, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(wb, xk, acc_b, input_precision=PRECISION)

    if HAS_COND:
        offs_c = tl.arange(0, CP)
        in_c = offs_c < C
        cc = tl.load(c_ptr + b * scb + offs_c[:, None] * scc + offs_t[None, :] * sct,
                     mask=in_c[:, None] & in_t[None, :], other=0.0).to(DOT_T)
        wc_mask = in_h[:, None] & in_c[None, :]
        wca = tl.load(wc_ptr + offs_h[:, None] * swcg + offs_c[None, :] * swcc, mask=wc_mask, other=0.0).to(DOT_T)
        wcb = tl.load(wc_ptr + (offs_h[:, None] + H) * swcg + offs_c[None, :] * swcc, mask=wc_mask, other=0.0).to(DOT_T)
        acc_a = tl.dot(wca, cc, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(wcb, cc, acc_b, input_precision=PRECISION)

    acc_a += tl.load(b_ptr + offs_h, mask=in_h, other=0.0).to(tl.float32)[:, None]
    acc_b += tl.load(b_ptr + H + offs_h, mask=in_h, other=0.0).to(tl.float32)[:, None]
    # tanh(a) = sign(a)·(1 - e)/(1 + e) with e = exp(-2|a|): no overflow for any a; padded rows give z = 0
    e = tl.exp(-2.0 * tl.abs(acc_a))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(acc_a < 0, -th, th)
    z = (th / (1.0 + tl.exp(-acc_b))).to(x_ptr.dtype.element_ty).to(DOT_T)  # rounded like the reference's z

    if HAS_RES:
        wr = tl.load(wr_ptr + offs_r[:, None] * swrr + offs_h[None, :] * swrh, mask=in_r[:, None] & in_h[None, :], other=0.0).to(DOT_T)
        res = tl.dot(wr, z, input_precision=PRECISION)
        res += tl.load(br_ptr + offs_r, mask=in_r, other=0.0).to(tl.float32)[:, None]
        out = (x0.to(tl.float32) + res) * 0.7071067811865476
        tl.store(out_ptr + b * R * T + offs_r[:, None] * T + offs_t[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=in_r[:, None] & in_t[None, :])
    if HAS_SKIP:
        offs_s = tl.arange(0, SP)
        in_s = offs_s < S
        ws = tl.load(ws_ptr + offs_s[:, None] * swss + offs_h[None, :] * swsh, mask=in_s[:, None] & in_h[None, :], other=0.0).to(DOT_T)
        sk = tl.dot(ws, z, input_precision=PRECISION)
        sk += tl.load(bs_ptr + offs_s, mask=in_s, other=0.0).to(tl.float32)[:, None]
        tl.store(skip_ptr + b * S * T + offs_s[:, None] * T + offs_t[None, :], sk.to(skip_ptr.dtype.element_ty),
                 mask=in_s[:, None] & in_t[None, :])


@functools.cache
def _kernel(interpret: bool, autotuned: bool):
    """The kernel as a GPU JIT function (optionally autotuned over :data:`AUTOTUNE`), or run by Triton's CPU
    interpreter.  Built on first use, so ``TRITON_INTERPRET`` matters when a CPU launch happens, not when
    this module is imported."""
    kernel = _build.jit(_residual_layer_fwd, interpret)
    if autotuned:
        configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in AUTOTUNE]
        kernel = triton.autotune(configs, key=["R", "H", "S", "C", "K", "HAS_COND", "HAS_RES", "HAS_SKIP",
                                               "PRECISION"])(kernel)
    return kernel


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _precision(dtype: torch.dtype) -> str:
    # float32 follows the switch that governs the reference convolution (cuDNN's TF32 flag)
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def residual_forward(x, c, w_conv, b_conv, w_cond, w_res, b_res, w_skip, b_skip, dilation: int,
                     interpret: bool = False, block_t: int | None = None):
    """Launch the fused forward; returns ``(out or None, skip or None)`` (``out`` is None without ``w_res``).

    Every tensor must share ``x``'s dtype and device; ``c`` is None or ``[B or 1, C, T]``.
    ``interpret`` runs Triton's CPU interpreter on CPU tensors.  ``block_t`` (time steps per program)
    None autotunes on a GPU and uses :data:`BLOCK_T` in the interpreter.
    """
    B, R, T = x.shape
    G, _, K = w_conv.shape
    has_cond = w_cond is not None and c is not None
    has_res, has_skip = w_res is not None, w_skip is not None
    C = w_cond.shape[1] if has_cond else 0
    S = w_skip.shape[0] if has_skip else 0
    out = torch.empty(B, R, T, dtype=x.dtype, device=x.device) if has_res else None
    skip = torch.empty(B, S, T, dtype=x.dtype, device=x.device) if has_skip else None
    if T == 0 or B == 0:
        return out, skip
    c = c.expand(B, -1, -1) if has_cond else None

    def ptr(t):  # an absent tensor's pointer is never read (its HAS_* flag is off)
        return x if t is None else t

    def strides(t, n):
        return t.stride()[:n] if t is not None else (0,) * n

    autotuned = block_t is None and not interpret
    launch = {} if autotuned else {"BLOCK": block_t or BLOCK_T, "num_warps": NUM_WARPS}

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK"]), B)

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # launch on x's GPU
        _kernel(interpret, autotuned)[grid](
            x, ptr(c), w_conv, b_conv, ptr(w_cond if has_cond else None), ptr(w_res), ptr(b_res), ptr(w_skip),
            ptr(b_skip), ptr(out), ptr(skip),
            T, dilation, *x.stride(), *strides(c, 3), *w_conv.stride(), *strides(w_cond if has_cond else None, 2),
            *strides(w_res, 2), *strides(w_skip, 2),
            R=R, H=G // 2, S=S, C=C, K=K, RP=pow2(R), HP=pow2(G // 2), SP=pow2(S), CP=pow2(C),
            HAS_COND=has_cond, HAS_RES=has_res, HAS_SKIP=has_skip, PRECISION=_precision(x.dtype),
            DOT_T=tl.float32 if interpret else _TL_DTYPE[x.dtype], **launch,
        )
    return out, skip


class FusedResidualLayer(torch.autograd.Function):
    """Autograd wrapper: Triton forward, recompute-based PyTorch backward.

    ``apply(dilation, interpret, x, c, w_conv, b_conv, w_cond, w_res, b_res, w_skip, b_skip)`` returns the
    outputs that exist, in the order ``(out, skip)``: both, or only one of them.
    """

    @staticmethod
    def forward(ctx, dilation, interpret, x, c, w_conv, b_conv, w_cond, w_res, b_res, w_skip, b_skip):
        out, skip = residual_forward(x, c, w_conv, b_conv, w_cond, w_res, b_res, w_skip, b_skip, dilation, interpret)
        ctx.dilation = dilation
        ctx.c_batch = c.shape[0] if c is not None else 0
        ctx.save_for_backward(x, c, w_conv, b_conv, w_cond, w_res, w_skip)
        return tuple(t for t in (out, skip) if t is not None)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, c, w_conv, b_conv, w_cond, w_res, w_skip = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):  # operands already share one dtype
            return FusedResidualLayer._backward(ctx, x, c, w_conv, b_conv, w_cond, w_res, w_skip, grads)

    @staticmethod
    def _backward(ctx, x, c, w_conv, b_conv, w_cond, w_res, w_skip, grads):
        need = ctx.needs_input_grad  # (dilation, interpret, x, c, w_conv, b_conv, w_cond, w_res, b_res, w_skip, b_skip)
        grads = list(grads)
        g_out = grads.pop(0) if w_res is not None else None
        g_skip = grads.pop(0) if w_skip is not None else None
        d, K = ctx.dilation, w_conv.shape[2]
        pad = (K - 1) * d
        has_cond = w_cond is not None and c is not None
        if has_cond:
            c = c.expand(x.shape[0], -1, -1)

        # recompute the gate pre-activations; elementwise gate maths in float32
        x_pad = F.pad(x, (pad, 0))
        h = F.conv1d(x_pad, w_conv, b_conv, dilation=d)
        if has_cond:
            h = h + F.conv1d(c, w_cond)
        a, bg = h.float().chunk(2, dim=1)
        ta, sb = torch.tanh(a), torch.sigmoid(bg)
        z = (ta * sb).to(x.dtype)

        g_z = None
        g_w_res = g_b_res = g_w_skip = g_b_skip = None
        if g_out is not None:
            g_res = g_out * SQRT_HALF
            g_z = torch.matmul(w_res[:, :, 0].t(), g_res)
            if need[7]:
                g_w_res = torch.einsum("brt,bht->rh", g_res, z)[:, :, None]
            if need[8]:
                g_b_res = g_res.sum((0, 2))
        if g_skip is not None:
            gz_s = torch.matmul(w_skip[:, :, 0].t(), g_skip)
            g_z = gz_s if g_z is None else g_z + gz_s
            if need[9]:
                g_w_skip = torch.einsum("bst,bht->sh", g_skip, z)[:, :, None]
            if need[10]:
                g_b_skip = g_skip.sum((0, 2))
        g_zf = g_z.float()
        g_h = torch.cat([g_zf * sb * (1.0 - ta * ta), g_zf * ta * sb * (1.0 - sb)], dim=1).to(x.dtype)
        del a, bg, ta, sb, z, g_z, g_zf

        g_xpad, g_w_conv, g_b_conv = torch.ops.aten.convolution_backward(
            g_h, x_pad, w_conv, [w_conv.shape[0]], [1], [0], [d], False, [0], 1, [need[2], need[4], need[5]])
        g_x = None
        if need[2]:
            g_x = g_xpad[:, :, pad:]
            if g_out is not None:  # the residual sum (without it the layer returns x itself, outside this function)
                g_x = g_x + g_out * SQRT_HALF
        g_c = g_w_cond = None
        if has_cond and need[3]:
            g_c = torch.matmul(w_cond[:, :, 0].t(), g_h)
            if ctx.c_batch != g_c.shape[0]:  # c was broadcast over the batch
                g_c = g_c.sum(0, keepdim=True)
        if has_cond and need[6]:
            g_w_cond = torch.einsum("bgt,bct->gc", g_h, c)[:, :, None]
        return (None, None, g_x, g_c, g_w_conv, g_b_conv, g_w_cond, g_w_res, g_b_res, g_w_skip, g_b_skip)
