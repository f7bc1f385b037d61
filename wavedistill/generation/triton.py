"""Persistent Triton kernel for autoregressive WaveNet teacher generation (one program per stream).

The cached generators (:class:`~wavedistill.generation.CachedGenerator` in PyTorch,
:class:`~wavedistill.fastgen.FastCachedGenerator` in C++ on the CPU) run one step as
tens of small operations; on a GPU that is a kernel launch per layer per sample, and
the launches, not the arithmetic, set the speed.  Here one kernel launch runs a whole
block of time steps: program ``b`` owns batch row (stream) ``b`` and loops over the
steps and, inside each step, over the layers, entirely on the device (the idea of
NVIDIA's nv-wavenet persistent kernels, written from scratch for this model).

Per step and layer ``l`` (kernel size ``k`` in {2, 3}, dilation ``d``, ring length
``m = (k-1)·d``), with ``h`` the layer input held in registers::

    taps      x_j = ring_l[(t - (k-1-j)·d) mod m]          j < k-1, read from global memory
    store     ring_l[t mod m] = h                          (the oldest slot, just read)
    gate      a = Σ_j Wa_j x_j + Wa_{k-1} h + cond_a[t, l]   b likewise  (cond includes the conv bias)
    unit      z = tanh(a) · sigmoid(b)
    residual  h ← h·√½ + Wr z + br        (Wr, br already × √½; skipped for the last layer,
                                            which in a skip-stack WaveNet has no residual projection)
    skip      s ← s + Ws z + bs

then the head ``p = W2 relu(W1 relu(s·√(1/L)) + b1) + b2`` and the sample, drawn
from explicit uniforms exactly as :meth:`DiscretizedMixtureOfLogistics.sample` /
:meth:`DiscretizedGaussian.sample` draw it: Gumbel-max over the logits (the first
maximum wins, as ``torch.argmax``), then the logistic inverse CDF
``μ + e^{max(log s, floor)}·T·(log u − log1p(−u))`` (or ``μ + e^{…}·T·Φ⁻¹(u)``), clamped
to [−1, 1].  Like the other generators the output is that continuous clamped value;
nothing is quantized.  The sample becomes the next step's input.

Matrix-vector products are ``tl.sum(W * x[None, :], axis=1)`` (via ``tl.reduce``, see
below) over channel dimensions padded to powers of two (weights are zero-padded once
on the host; ring and conditioning reads are masked).  The gated channels are walked
in chunks of ``BH`` rows so a weight tile stays at ~4k elements whatever the width;
each chunk's ``z`` feeds the residual and skip sums immediately, so ``z`` is never
materialised.  Tiles alternate orientation (gate ``[BH, R]`` reduced over columns,
residual/skip ``[BH, R|S]`` reduced over rows), so the residual update comes out in the
layout the next layer's gate reads it in.  The head's hidden layer is chunked the same way
(``BS`` rows), each chunk feeding the output sums.

Weights are **reloaded from global memory every step** (they stay L2-resident:
~2 MB at the demo size, 20 layers × 64 residual channels, against 50 MB of H100 L2),
not kept in registers: one program runs on one SM, whose 256 KB register file cannot
hold them, and keeping a few layers resident would need the layer loop unrolled per
layer.  All streams share the L2 copy.

Memory layouts (float32, contiguous unless said otherwise; ``B`` streams, ``L`` layers,
``R``/``H = G/2``/``S`` residual/half-gate/skip channels, ``·P`` the padded size)::

    ring   flat; layer l is GenerationCache.buffers[l] = [m_l, B, R] at slot offset off_l
    meta   int32 [L, 2]: (m_l, off_l)
    cond   [B, n_steps, L·G]: c projected by every layer's conditioning weights plus the conv bias,
           computed in PyTorch once per launch (one batched matmul), never per step
    noise  [B, n_noise, n_steps], any strides (MoL: K logits uniforms then one logistic uniform)
    wg     [L, k, 2, HP, RP]  gate weights, [tap, tanh|sigmoid half, out, in]
    wr     [L, HP, RP], br [L, RP]   residual (in, out), × √½; zero for the last layer
    ws     [L, HP, SP], bs [L, SP]   skip (in, out)
    h1w    [SP, SP] (out, in), h1b [SP];  h2w [3, SP, KP] (in, out) and h2b [3, KP] for the
           groups logits / means / log-scales (a Gaussian uses means and log-scales, column 0)

Barriers: within a program the ring slot a layer overwrites is the one its oldest tap
just read, so a ``tl.debug_barrier()`` separates every thread's tap loads from the
store, and a second one orders the store before any later dependent load.  The kernel
is launched with ``num_stages=1`` so no load is software-pipelined across them.
Streams never communicate, so programs beyond the number of SMs simply queue.

Performance has not been measured on a GPU yet (the session that wrote this had none):
``TILE`` and ``NUM_WARPS`` were chosen so that an offline compile for sm_90 (Triton's
bundled ptxas, no device; not re-checked by a test) reported no register spills from the
demo width up to R=512, G=512, S=256, and ``wavedistill
bench`` reports ``teacher-persistent`` (one stream) and ``teacher-persistent-x16``.

Interpretation: the kernel is built on first use, for the GPU or for Triton's CPU
interpreter (tensors on the CPU; only when ``TRITON_INTERPRET=1``, for tests), so it
does not matter when ``triton`` was first imported.  For that reason the body calls only
Triton builtins: reductions are ``tl.reduce`` with ``triton.language.standard``'s own
combine functions (the interpreter recognises them and uses numpy), and tanh, sigmoid,
``log1p`` and the normal quantile are written out.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton.language as tl

from ..nn.distributions import DiscretizedGaussian, DiscretizedMixtureOfLogistics
from .cached import CachedGenerator, FrameConditioning, GenerationCache, layer_projections
from ..kernels import _build
from ..kernels._build import pow2

__all__ = ["TritonARGenerator", "unsupported_reason"]

TILE = 4096  # elements per weight tile: 16 float32 registers per thread with 8 warps
NUM_WARPS = 8  # one program per SM runs alone there: more warps keep more weight loads in flight
COND_BUDGET = 1 << 25  # floats of precomputed conditioning per launch (128 MB); sets the steps per launch


def _ar_steps(
    cond_ptr, noise_ptr, nsb, nsc, nst, ring_ptr, meta_ptr,
    w_in_ptr, b_in_ptr, wg_ptr, wr_ptr, br_ptr, ws_ptr, bs_ptr, h1w_ptr, h1b_ptr, h2w_ptr, h2b_ptr,
    x_ptr, out_ptr, osb, par_ptr, psb, pst,
    B, L, n_steps, t0, temperature, log_scale_min, skip_scale,
    R: tl.constexpr, H: tl.constexpr, K: tl.constexpr, KS: tl.constexpr, MOL: tl.constexpr,
    RP: tl.constexpr, HP: tl.constexpr, SP: tl.constexpr, KP: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr,
    STORE_PARAMS: tl.constexpr,
):
    """``n_steps`` generation steps of stream ``program_id(0)``; layouts in the module docstring."""
    tl.static_assert((KS == 2) or (KS == 3), "kernel size must be 2 or 3")
    pid = tl.program_id(0).to(tl.int64)
    cols_r = tl.arange(0, RP)
    in_r = cols_r < R
    rows_c = tl.arange(0, BH)
    cols_s = tl.arange(0, SP)
    rows_s = tl.arange(0, BS)
    kk = tl.arange(0, KP)
    in_k = kk < K
    G = 2 * H
    slot = B * R  # floats per ring slot (all streams)
    w_in = tl.load(w_in_ptr + cols_r)
    b_in = tl.load(b_in_ptr + cols_r)
    x = tl.load(x_ptr + pid)  # the previous sample
    for step in range(n_steps):
        ta = t0 + step  # absolute step: ring positions
        h = x * w_in + b_in
        skip = tl.full([SP], 0.0, tl.float32)
        cond_t = cond_ptr + (pid * n_steps + step) * (L * G)
        for l in range(L):
            m = tl.load(meta_ptr + 2 * l).to(tl.int64)
            ring = ring_ptr + tl.load(meta_ptr + 2 * l + 1).to(tl.int64) * slot + pid * R
            d = m // (KS - 1)
            x0 = tl.load(ring + ((ta + m - (KS - 1) * d) % m) * slot + cols_r, mask=in_r, other=0.0)
            if KS == 3:
                x1 = tl.load(ring + ((ta + m - d) % m) * slot + cols_r, mask=in_r, other=0.0)
            tl.debug_barrier()  # every thread has read its taps before the oldest slot is overwritten
            tl.store(ring + (ta % m) * slot + cols_r, h, mask=in_r)
            tl.debug_barrier()  # the new entry is visible to every thread of this program
            res = tl.load(br_ptr + l * RP + cols_r)
            sk = tl.load(bs_ptr + l * SP + cols_s)
            wg_l = wg_ptr + l * (KS * 2 * HP * RP)
            for c0 in range(0, HP, BH):
                rows = c0 + rows_c
                in_h = rows < H
                a = tl.load(cond_t + l * G + rows, mask=in_h, other=0.0)
                b = tl.load(cond_t + l * G + H + rows, mask=in_h, other=0.0)
                tile = rows[:, None] * RP + cols_r[None, :]
                a += tl.reduce(tl.load(wg_l + tile) * x0[None, :], 1, tl.standard._sum_combine)
                b += tl.reduce(tl.load(wg_l + HP * RP + tile) * x0[None, :], 1, tl.standard._sum_combine)
                if KS == 3:
                    a += tl.reduce(tl.load(wg_l + 2 * HP * RP + tile) * x1[None, :], 1, tl.standard._sum_combine)
                    b += tl.reduce(tl.load(wg_l + 3 * HP * RP + tile) * x1[None, :], 1, tl.standard._sum_combine)
                cur = wg_l + (KS - 1) * 2 * HP * RP
                a += tl.reduce(tl.load(cur + tile) * h[None, :], 1, tl.standard._sum_combine)
                b += tl.reduce(tl.load(cur + HP * RP + tile) * h[None, :], 1, tl.standard._sum_combine)
                # tanh(a) = 1 - 2/(e^{2a} + 1): absolute error ~1e-7 (relative error grows only near 0,
                # where z is small anyway), saturates cleanly when e^{2a} overflows or underflows
                z = (1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)) * (1.0 / (1.0 + tl.exp(-b)))
                if l < L - 1:  # a skip stack's last layer has no residual projection
                    wr = tl.load(wr_ptr + l * (HP * RP) + tile)
                    res += tl.reduce(wr * z[:, None], 0, tl.standard._sum_combine)
                ws = tl.load(ws_ptr + l * (HP * SP) + rows[:, None] * SP + cols_s[None, :])
                sk += tl.reduce(ws * z[:, None], 0, tl.standard._sum_combine)
            h = h * 0.7071067811865476 + res
            skip += sk

        # head: two ReLU 1x1 layers, the hidden one in chunks of BS channels feeding the output sums
        s0 = tl.maximum(skip * skip_scale, 0.0)
        logits = tl.load(h2b_ptr + kk)
        means = tl.load(h2b_ptr + KP + kk)
        logs = tl.load(h2b_ptr + 2 * KP + kk)
        for r0 in range(0, SP, BS):
            rows = r0 + rows_s
            w1 = tl.load(h1w_ptr + rows[:, None] * SP + cols_s[None, :])
            s1 = tl.reduce(w1 * s0[None, :], 1, tl.standard._sum_combine) + tl.load(h1b_ptr + rows)
            s1 = tl.maximum(s1, 0.0)
            head = h2w_ptr + rows[:, None] * KP + kk[None, :]
            if MOL:
                logits += tl.reduce(tl.load(head) * s1[:, None], 0, tl.standard._sum_combine)
            means += tl.reduce(tl.load(head + SP * KP) * s1[:, None], 0, tl.standard._sum_combine)
            logs += tl.reduce(tl.load(head + 2 * SP * KP) * s1[:, None], 0, tl.standard._sum_combine)
        nz = noise_ptr + pid * nsb + step * nst
        par = par_ptr + pid * psb + step * pst
        if MOL:
            # Gumbel-max; the first maximum wins (torch.argmax)
            u = tl.load(nz + kk * nsc, mask=in_k, other=0.5)
            u = tl.minimum(tl.maximum(u, 1e-10), 1.0 - 1e-7)
            v = tl.where(in_k, logits - tl.log(-tl.log(u)), float("-inf"))
            best = tl.reduce(v, 0, tl.standard._elementwise_max)
            idx = tl.reduce(tl.where(v == best, kk, KP), 0, tl.standard._elementwise_min)
            pick = kk == idx
            mu = tl.reduce(tl.where(pick, means, 0.0), 0, tl.standard._sum_combine)
            ls = tl.reduce(tl.where(pick, logs, 0.0), 0, tl.standard._sum_combine)
            u = tl.load(nz + K * nsc)
            u = tl.minimum(tl.maximum(u, 1e-5), 1.0 - 1e-5)
            w = 1.0 - u  # log1p(-u) = log(w)·(-u)/(w - 1): exact rounding of w cancels (w != 1 here)
            noise_val = tl.log(u) - tl.log(w) * u / (1.0 - w)
            if STORE_PARAMS:
                tl.store(par + kk, logits, mask=in_k)
                tl.store(par + K + kk, means, mask=in_k)
                tl.store(par + 2 * K + kk, logs, mask=in_k)
        else:
            mu = tl.reduce(tl.where(kk == 0, means, 0.0), 0, tl.standard._sum_combine)
            ls = tl.reduce(tl.where(kk == 0, logs, 0.0), 0, tl.standard._sum_combine)
            u = tl.load(nz)
            u = tl.minimum(tl.maximum(u, 1e-6), 1.0 - 1e-6)
            # normal quantile in float64: Acklam's rational approximations (relative error < 1.2e-9)
            q = u.to(tl.float64)
            p = tl.minimum(q, 1.0 - q)
            r = tl.sqrt(-2.0 * tl.log(p))
            tail = ((((( -7.784894002430293e-03 * r - 3.223964580411365e-01) * r - 2.400758277161838e+00) * r
                       - 2.549732539343734e+00) * r + 4.374664141464968e+00) * r + 2.938163982698783e+00) / (
                ((( 7.784695709041462e-03 * r + 3.224671290700398e-01) * r + 2.445134137142996e+00) * r
                 + 3.754408661907416e+00) * r + 1.0)
            tail = tl.where(q > 0.5, -tail, tail)
            c = q - 0.5
            s = c * c
            mid = ((((( -3.969683028665376e+01 * s + 2.209460984245205e+02) * s - 2.759285104469687e+02) * s
                      + 1.383577518672690e+02) * s - 3.066479806614716e+01) * s + 2.506628277459239e+00) * c / (
                ((((( -5.447609879822406e+01 * s + 1.615858368580409e+02) * s - 1.556989798598866e+02) * s
                   + 6.680131188771972e+01) * s - 1.328068155288572e+01) * s + 1.0))
            noise_val = tl.where(p < 0.02425, tail, mid).to(tl.float32)
            if STORE_PARAMS:
                tl.store(par + kk, means, mask=kk < 1)
                tl.store(par + 1 + kk, logs, mask=kk < 1)
        ls = tl.maximum(ls, log_scale_min)
        x = mu + tl.exp(ls) * temperature * noise_val
        x = tl.minimum(tl.maximum(x, -1.0), 1.0)
        tl.store(out_ptr + pid * osb + step, x)
    tl.store(x_ptr + pid, x)


@functools.cache
def _kernel(interpret: bool):
    """The kernel for the GPU or for Triton's CPU interpreter, built on first use of either."""
    # the step counters change between launches: no recompile for each value (==1, divisible by 16)
    return _build.jit(_ar_steps, interpret, do_not_specialize=["n_steps", "t0"])


def _chunk_rows(rows: int, cols: int) -> int:
    """Rows per weight tile: a power of two with ``rows·cols <= TILE`` where possible, 16 to ``rows``."""
    fit = max(1, TILE // cols)
    return min(rows, max(16, 1 << (fit.bit_length() - 1)))


def kernel_constants(R: int, H: int, S: int, K: int, kernel_size: int, mol: bool) -> dict:
    """The kernel's compile-time arguments for these channel counts (``K``: mixtures, 1 for a Gaussian)."""
    RP, HP, SP = pow2(R), pow2(H), pow2(S)
    return dict(R=R, H=H, K=K, KS=kernel_size, MOL=mol, RP=RP, HP=HP, SP=SP, KP=pow2(K, 2),
                BH=_chunk_rows(HP, max(RP, SP)), BS=_chunk_rows(SP, SP))


def unsupported_reason(teacher) -> str | None:
    """Why :class:`TritonARGenerator` cannot run ``teacher`` here (``None`` if it can)."""
    from ..kernels import get_mode, interpreting, triton_available

    if get_mode() == "reference":
        return "WAVEDISTILL_KERNELS=reference selects the PyTorch generator"
    if not triton_available():
        return "the 'triton' package does not import here"
    p = next(teacher.parameters())
    if p.dtype != torch.float32:
        return f"the Triton generator needs a float32 teacher, got {p.dtype}"
    if p.device.type != "cuda" and not (p.device.type == "cpu" and interpreting()):
        return f"the Triton generator needs a CUDA teacher (or TRITON_INTERPRET=1 on the CPU), got {p.device.type}"
    if not isinstance(teacher.dist, (DiscretizedMixtureOfLogistics, DiscretizedGaussian)):
        return f"unsupported output distribution {type(teacher.dist).__name__}"
    if teacher.net.kernel_size not in (2, 3):
        return f"the Triton generator supports kernel sizes 2 and 3, got {teacher.net.kernel_size}"
    if teacher.net.skip_channels <= 0:
        return "the Triton generator needs a skip-stack WaveNet"
    if getattr(teacher, "source", None) is not None:
        return "the Triton generator does not add linear prediction / pre-emphasis (the C++ and Python ones do)"
    return None


class TritonARGenerator:
    """Drop-in for :class:`~wavedistill.generation.CachedGenerator` that runs the step loop in one
    persistent Triton kernel per block of steps (one program per batch row).

    The teacher's weights are linearised once (through :class:`CachedGenerator`, so the same
    matrices) and padded into the layouts of the module docstring.  :meth:`run` has the
    ``CachedGenerator.run`` contract and uses :class:`GenerationCache` objects, so a cache can
    pass between this and the other generators.  ``block``: steps per launch (``None``: as many
    as keep the precomputed conditioning under ``COND_BUDGET`` floats).
    """

    block: int | None = None

    def __init__(self, teacher):
        reason = unsupported_reason(teacher)
        if reason is not None:
            raise ValueError(reason)
        self.ref = ref = CachedGenerator(teacher)
        self.teacher = teacher
        self.device = ref.device
        self.interpret = self.device.type == "cpu"
        self.dist = ref.dist
        self.mol = isinstance(ref.dist, DiscretizedMixtureOfLogistics)
        self.n_noise = ref.dist.n_noise
        self._pack()

    @torch.no_grad()
    def _pack(self) -> None:
        ref, dev, w = self.ref, self.device, self.ref.weights
        k, L, R, G, S = w.kernel_size, len(w.layers), w.residual, w.gate, w.skip
        H = G // 2
        K = ref.dist.k if self.mol else 1
        self.consts = consts = kernel_constants(R, H, S, K, k, self.mol)
        RP, HP, SP, KP = consts["RP"], consts["HP"], consts["SP"], consts["KP"]
        f32 = dict(dtype=torch.float32, device=dev)
        wg = torch.zeros(L, k, 2, HP, RP, **f32)
        wr = torch.zeros(L, HP, RP, **f32)
        br = torch.zeros(L, RP, **f32)
        ws = torch.zeros(L, HP, SP, **f32)
        bs = torch.zeros(L, SP, **f32)
        for l, layer in enumerate(w.layers):
            taps, w_out, b_out = layer.w_taps.reshape(k, R, G), layer.w_out, layer.b_out  # taps: [tap, in, out]
            wg[l, :, 0, :H, :R] = taps[:, :, :H].transpose(1, 2)
            wg[l, :, 1, :H, :R] = taps[:, :, H:].transpose(1, 2)
            wr[l, :H, :R], br[l, :R] = w_out[:, :R], b_out[:R]  # zero for the last layer (CachedGenerator)
            ws[l, :H, :S], bs[l, :S] = w_out[:, R:], b_out[R:]
        h1w = torch.zeros(SP, SP, **f32)
        h1w[:S, :S] = w.h1w.t()  # [out, in]
        h1b = torch.zeros(SP, **f32)
        h1b[:S] = w.h1b
        h2w = torch.zeros(3, SP, KP, **f32)
        h2b = torch.zeros(3, KP, **f32)
        groups = ([0, 1, 2], [K * g for g in range(3)]) if self.mol else ([1, 2], [0, 1])
        for g, start in zip(*groups):
            h2w[g, :S, :K] = w.h2w[:, start : start + K]
            h2b[g, :K] = w.h2b[start : start + K]
        w_in = torch.zeros(RP, **f32)
        b_in = torch.zeros(RP, **f32)
        w_in[:R], b_in[:R] = w.w_in, w.b_in
        offsets = [0]
        for m in ref.sizes[:-1]:
            offsets.append(offsets[-1] + m)
        self.meta = torch.tensor([[m, o] for m, o in zip(ref.sizes, offsets)], dtype=torch.int32, device=dev)
        self.weights = (w_in, b_in, wg.contiguous(), wr, br, ws, bs, h1w, h1b, h2w, h2b)
        self.w_cond = w.w_cond.to(**f32).contiguous()  # [L*G, C]
        self.cond_bias = torch.cat([layer.b_conv for layer in w.layers]).to(**f32)  # [L*G]
        self.dims = dict(L=L, k=k, R=R, H=H, G=G, S=S, K=K, P=ref.dist.n_params, C=w.w_cond.shape[1])

    def new_cache(self, batch: int) -> GenerationCache:
        return self.ref.new_cache(batch)

    def cond_block(self, c, start: int, stop: int) -> torch.Tensor:
        """``[B, stop-start, L·G]``: every layer's conditioning projection plus its conv bias.

        ``c``: a :class:`~wavedistill.generation.FrameConditioning` (projected at frame rate, then
        upsampled) or upsampled ``[B, C, T]`` (projected per sample: the reference).
        """
        return (layer_projections(c, self.w_cond, start, stop).transpose(1, 2) + self.cond_bias).contiguous()

    @torch.no_grad()
    def run(self, c: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0, cache: GenerationCache | None = None,
            progress=None, return_params: bool = False):
        """Conditioning ``c [B, C, T]`` and uniforms ``noise [B, n_noise, T]`` → samples ``[B, T]``
        (and, with ``return_params``, the distribution parameters of every step ``[B, P, T]``)."""
        B, C, T = c.shape
        dims = self.dims
        if c.device != self.device or noise.device != self.device:
            raise ValueError(f"c and noise must be on the teacher's device {self.device}")
        if C != dims["C"]:
            raise ValueError(f"c has {C} channels, the teacher expects {dims['C']}")
        if noise.dim() != 3 or noise.shape[0] != B or noise.shape[1] < self.n_noise or noise.shape[2] < T:
            raise ValueError(f"noise must be [B={B}, {self.n_noise}, >={T}], got {tuple(noise.shape)}")
        cf = FrameConditioning(c.cond, c.h.float(), c.start, c.stop) if isinstance(c, FrameConditioning) else c.to(torch.float32)
        nf = noise.to(torch.float32)  # as dist.sample casts it
        cache = cache or self.new_cache(B)
        R = dims["R"]
        for buf, m in zip(cache.buffers, self.ref.sizes):
            if buf.shape != (m, B, R) or buf.device != self.device:
                raise ValueError("cache does not match this generator and batch size")
        ring = torch.cat([b.reshape(-1).to(torch.float32) for b in cache.buffers])
        if cache.x_prev is not None:
            x_state = cache.x_prev.detach().to(device=self.device, dtype=torch.float32).reshape(B).clone()
        else:
            x_state = torch.zeros(B, dtype=torch.float32, device=self.device)
        out = torch.empty(B, T, dtype=torch.float32, device=self.device)
        params = torch.empty(B, T, dims["P"], dtype=torch.float32, device=self.device) if return_params else out
        block = self.block or max(1, COND_BUDGET // (B * dims["L"] * dims["G"]))
        kernel = _kernel(self.interpret)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            self._launch(kernel, cf, nf, ring, x_state, out, params, cache, block, temperature, return_params, progress)
        for buf, part in zip(cache.buffers, ring.split([b.numel() for b in cache.buffers])):
            buf.copy_(part.view_as(buf))
        cache.x_prev = x_state
        if return_params:
            return out, params.permute(0, 2, 1)
        return out

    def _launch(self, kernel, cf, nf, ring, x_state, out, params, cache, block, temperature, return_params, progress):
        """One kernel launch per block of steps; the ring, ``x_state`` and ``cache.t`` carry over."""
        B, T = out.shape
        dims = self.dims
        for start in range(0, T, block):
            stop = min(T, start + block)
            cond = self.cond_block(cf, start, stop)
            nz = nf[:, :, start:stop]
            par = params[:, start:] if return_params else out
            kernel[(B,)](
                cond, nz, *nz.stride(), ring, self.meta, *self.weights,
                x_state, out[:, start:], out.stride(0), par, par.stride(0), par.stride(1) if return_params else 0,
                B, dims["L"], stop - start, cache.t, float(temperature), float(self.dist.log_scale_min),
                float(self.ref.skip_scale), **self.consts, STORE_PARAMS=return_params,
                num_warps=NUM_WARPS, num_stages=1,
            )
            cache.t += stop - start
            if progress is not None:
                progress(stop - start)

    @torch.no_grad()
    def generate(self, mel: torch.Tensor, *, noise: torch.Tensor | None = None, seed: int | None = None,
                 temperature: float = 1.0, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`Teacher.generate`: log-mel ``[B, n_mels, F]`` → waveform ``[B, F·hop]``; pass
        ``noise`` (uniforms ``[B, n_noise, F·hop]``) for a reproducible result, else ``seed``."""
        c = FrameConditioning.from_mel(self.teacher.cond, mel, speaker)
        if noise is None:
            noise = self.teacher.make_noise(c.shape[0], c.shape[2], seed, c.device, torch.float32)
        return self.run(c, noise, temperature)

