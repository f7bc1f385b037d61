"""The residual stack of a WaveNet as one autograd function for CPU training (GEMMs + fused passes).

:meth:`wavenet.WaveNet.forward` runs its layers time-major (``[B·T, channels]`` rows, two GEMMs a layer).
Under autograd each layer also leaves a dozen element-wise ATen ops — stacking the taps, ``tanh``, ``σ``,
their product, the residual add and scale, the skip sum, and as many again backward — each a full pass over
``[B·T, channels]`` memory.  :class:`FusedStack` computes the same maths for all layers with the GEMMs in
PyTorch and every element-wise step in one pass of :mod:`wavedistill.kernels.cpu_fused`:

forward, layer ``l`` (``x`` the residual stream, ``c`` conditioning):
    ``h = [x_{t−(K−1)d}, …, x_t, c_t] @ W_st + b``  (or taps only, plus a precomputed addend ``cadd_l``);
    ``z = tanh(h_a)·σ(h_b)``; ``y = z @ W_out``; ``x ← (x + y_res + b_res)·√½``; ``skips += y_skip + b_skip``
backward, layers in reverse, with the skip gradient ``g_S`` shared by every layer:
    ``g_y = [√½·g_x | g_S]``; ``g_z = g_y @ W_outᵀ``; ``g_h`` from the saved ``tanh``/``σ``;
    ``g_x ← √½·g_x + Σ_k shift_k((g_h @ W_stᵀ)_k)``, and the weight gradients as GEMMs.

Saved per layer: the layer's input ``x`` and ``z`` (only when weights need gradients) and ``[tanh | σ]``;
the stacked taps are rebuilt in the backward pass rather than kept.  Float32 CPU only; the layers'
parameters are read in the layout of :meth:`~wavedistill.nn.wavenet.ResidualLayer.stacked_weight` /
:meth:`~wavedistill.nn.wavenet.ResidualLayer.out_weight`, so gradients reach them through autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..kernels import cpu_fused as fk

SQRT_HALF = math.sqrt(0.5)


@dataclass(frozen=True)
class StackSpec:
    kernel_size: int
    dilations: tuple
    residual: int
    gate: int
    skip: int
    has_res: tuple  # per layer: does it write the residual stream (False only for a skip stack's last layer)
    with_cond: bool  # the conditioning rows are part of each W_st (else ``cadd`` or no conditioning)


class FusedStack(torch.autograd.Function):
    """``(x [B, T, R], ct, cadd, P, band_w, band_i0, spec, *weights)`` → skip sum ``[B, T, S]`` (unscaled) when
    ``spec.skip > 0``, else the final residual stream ``[B, T, R]``.

    Conditioning, any of: ``ct [B|1, T, C]`` as rows of the stacked GEMM (``spec.with_cond``); ``cadd [B, T, L·G]``
    added to the pre-activations (column block ``l`` for layer ``l``); a frame-rate projection ``P [B, F, L·G]``
    upsampled on the fly, ``Σ_j band_w[t, j]·P[b, band_i0[t] + j]`` (see :mod:`wavedistill.kernels.cpu_fused`).
    ``weights`` = per layer ``W_st [K·R (+C), G], b_conv [G], W_out [G/2, R_l + S], b_out``.
    """

    @staticmethod
    def forward(ctx, x, ct, cadd, P, band_w, band_i0, spec: StackSpec, *weights):
        _check_shapes(x, ct, cadd, P, band_w, band_i0, spec, weights)
        B, T, R = x.shape
        N, K, G, S = B * T, spec.kernel_size, spec.gate, spec.skip
        H = G // 2
        L = len(spec.dilations)
        C = ct.shape[2] if spec.with_cond else 0
        need_w = any(ctx.needs_input_grad[7:])
        cur = x.contiguous().view(N, R)
        ctc = ct.contiguous() if spec.with_cond else None
        stacked = x.new_empty(N, K * R + C)
        skips = x.new_empty(N, S) if S else None
        ys: dict = {}  # one output buffer per projection width (a skip stack's last layer has no residual part)
        inputs, zs, tss = [], [], []
        for l in range(L):
            W_st, b_conv, W_out, b_out = weights[4 * l : 4 * l + 4]
            fk.taps(cur.view(B, T, R), ctc, K, spec.dilations[l], stacked)
            h = torch.mm(stacked, W_st)  # the bias is added in the gate pass (no broadcast copy for addmm)
            z = x.new_empty(N, H)
            band = (P[:, :, l * G : (l + 1) * G], band_i0, band_w) if P is not None else None
            fk.gate(h, cadd[:, :, l * G : (l + 1) * G] if cadd is not None else None, z, T, band,
                    b_conv.detach().contiguous())
            width = W_out.shape[1]
            if width not in ys:
                ys[width] = x.new_empty(N, width)
            yl = torch.mm(z, W_out, out=ys[width])
            new = x.new_empty(N, R) if spec.has_res[l] else None
            fk.residual(cur, yl, b_out, new, skips, R if spec.has_res[l] else 0, S, SQRT_HALF,
                        0 if not S else (1 if l == 0 else 2))
            inputs.append(cur if need_w else None)
            zs.append(z if need_w else None)
            tss.append(h)
            if new is not None:
                cur = new
        ctx.spec, ctx.shape = spec, (B, T, R, C)
        ctx.inputs, ctx.zs, ctx.tss = inputs, zs, tss
        ctx.save_for_backward(ctc if spec.with_cond else None, P, band_w, band_i0, *weights)
        out = skips if S else cur
        return out.view(B, T, -1)

    @staticmethod
    @once_differentiable  # the backward consumes what forward saved: one backward pass, no double backward
    def backward(ctx, gout):
        spec = ctx.spec
        B, T, R, C = ctx.shape
        N, K, G, S = B * T, spec.kernel_size, spec.gate, spec.skip
        H = G // 2
        L = len(spec.dilations)
        ctc, P, band_w, band_i0, *weights = ctx.saved_tensors
        need_x, need_ct, need_cadd, need_P, need_bw = ctx.needs_input_grad[:5]
        need_w = ctx.needs_input_grad[7:]
        gout = gout.contiguous().view(N, -1)
        gS = gout if S else None
        gS_colsum = gS.sum(0, dtype=torch.float64) if S else None  # the skip part of every layer's bias gradient
        g_x = None if S else gout
        gy_buf = gout.new_empty(N, R + S)
        gz = gout.new_empty(N, H)
        rows = K * R + (C if need_ct else 0)  # rows of W_st whose input gradient is needed
        gst = gout.new_empty(N, rows)
        stacked = gout.new_empty(N, K * R + C) if any(need_w[4 * l] for l in range(L)) else None
        gx_bufs = [gout.new_empty(N, R), gout.new_empty(N, R)]
        gcadd = gout.new_zeros(N, L * G) if need_cadd else None
        gct = gout.new_zeros(N, C) if need_ct else None
        gP = torch.zeros_like(P) if P is not None and (need_P or need_bw) else None
        gbw = torch.zeros_like(band_w) if gP is not None else None
        grads = [None] * len(weights)
        for l in reversed(range(L)):
            W_st, b_conv, W_out, b_out = weights[4 * l : 4 * l + 4]
            has_res = spec.has_res[l]
            db_out = gout.new_zeros(W_out.shape[1], dtype=torch.float64) if need_w[4 * l + 3] else None
            if has_res:
                gy = fk.pack_gy(g_x if g_x is not None else gx_bufs[0].zero_(), gS, SQRT_HALF, gy_buf, db_out)
            else:
                gy = gS
                if db_out is not None:
                    db_out += gS_colsum if gS_colsum is not None else gS.sum(0, dtype=torch.float64)
            if need_w[4 * l + 2]:
                grads[4 * l + 2] = ctx.zs[l].t().mm(gy)
            if db_out is not None:
                grads[4 * l + 3] = db_out.to(gout.dtype)
            torch.mm(gy, W_out.t(), out=gz)
            db_conv = gout.new_zeros(G, dtype=torch.float64) if need_w[4 * l + 1] else None
            gh = fk.gate_backward(gz, ctx.tss[l], gcadd[:, l * G : (l + 1) * G] if need_cadd else None, db_conv)
            ctx.tss[l] = None
            if db_conv is not None:
                grads[4 * l + 1] = db_conv.to(gout.dtype)
            if gP is not None:
                sl = slice(l * G, (l + 1) * G)
                fk.band_backward(gh, (P[:, :, sl], band_i0, band_w), gP[:, :, sl], gbw, B, T)
            if need_w[4 * l]:
                fk.taps(ctx.inputs[l].view(B, T, R), ctc, K, spec.dilations[l], stacked)
                grads[4 * l] = stacked.t().mm(gh)
            if l == 0 and not need_x and not need_ct:
                break
            g = torch.mm(gh, W_st[:rows].t(), out=gst)
            if need_ct:
                gct += g[:, K * R :]
            out = gx_bufs[1] if g_x is gx_bufs[0] else gx_bufs[0]
            g_x = fk.taps_backward(g, g_x if has_res else None, SQRT_HALF, B, T, R, K, spec.dilations[l], out)
        ctx.inputs = ctx.zs = ctx.tss = None
        gx = g_x.view(B, T, R).clone() if need_x else None
        gct_out = gct.view(B, T, C) if need_ct else None
        gcadd = gcadd.view(B, T, L * G) if gcadd is not None else None
        return (gx, gct_out, gcadd, gP if need_P else None, gbw if need_bw else None, None, None, *grads)


def _check_shapes(x, ct, cadd, P, band_w, band_i0, spec: StackSpec, weights) -> None:
    """The C passes index raw memory: every operand's shape is checked here (a mismatch would read or write
    out of bounds, or silently pair rows wrongly)."""
    L, G = len(spec.dilations), spec.gate
    if x.dim() != 3 or x.shape[2] != spec.residual or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"FusedStack needs x [B, T, {spec.residual}] float32 on the CPU, got {tuple(x.shape)} {x.dtype}")
    B, T, _ = x.shape
    if len(weights) != 4 * L:
        raise ValueError(f"FusedStack needs 4 weights per layer ({4 * L}), got {len(weights)}")
    if spec.with_cond:
        if ct is None or ct.dim() != 3 or ct.shape[0] not in (1, B) or ct.shape[1] != T:
            raise ValueError(f"conditioning must be [{B} or 1, {T}, C], got {None if ct is None else tuple(ct.shape)}")
        if weights[0].shape[0] != spec.kernel_size * spec.residual + ct.shape[2]:
            raise ValueError(f"stacked weight rows {weights[0].shape[0]} do not match the taps and {ct.shape[2]} conditioning channels")
    if cadd is not None and tuple(cadd.shape) != (B, T, L * G):
        raise ValueError(f"conditioning addend must be [{B}, {T}, {L * G}], got {tuple(cadd.shape)}")
    if P is not None:
        if P.dim() != 3 or P.shape[0] != B or P.shape[2] != L * G or not P.is_contiguous():
            raise ValueError(f"frame-rate projections must be contiguous [{B}, F, {L * G}], got {tuple(P.shape)}")
        if band_w is None or band_i0 is None or band_w.dim() != 2 or band_w.shape[0] != T or tuple(band_i0.shape) != (T,):
            raise ValueError(f"band must be i0 [{T}] and w [{T}, J]")
        if T and (int(band_i0.min()) < 0 or int(band_i0.max()) + band_w.shape[1] > P.shape[1]):
            raise ValueError(f"band reaches frames outside 0..{P.shape[1] - 1}")

