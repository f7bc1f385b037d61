"""Cached autoregressive generation for the WaveNet teacher.

The cache is an explicit object: one ring buffer per layer holding that
layer's last ``(k-1)·d`` inputs.  A step reads the taps it needs by index and
overwrites one slot, so the cost per sample is O(layers), independent of the
receptive field and with no shifting copies.

Conditioning: every layer adds ``W_c^l · c_t`` (a 1×1 convolution without
bias) to its gate.  ``c = ConditionNet.upsample(h)`` with ``h`` the frame-rate
features, and the upsampling is linear with one filter shared by all channels,
so ``W_c · upsample(h) == upsample(W_c · h)``.  :class:`FrameConditioning`
holds ``h`` and gives the projections of all layers for a block of samples by
projecting the block's frames (plus ``ConditionNet.upsample_context`` frames
each side) and upsampling the ``L·G`` projected channels: ``2·C·L·G/hop``
FLOPs per sample plus the smoothing filters, instead of ``2·C·L·G`` per sample.
Memory stays bounded (one block of ``L·G`` channels at a time).  A plain
tensor ``c [B, C, T]`` of upsampled conditioning is still accepted by the
generators and projected per sample: that is the reference the tests compare
against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..nn.wavenet import SQRT_HALF, ConditionNet

PROJECTION_BLOCK = 2048  # samples per frame-rate projection block (bounds memory to B·L·G·~2500 floats)


class FrameConditioning:
    """Conditioning of samples ``[start, stop)`` of an utterance, held at frame rate.

    ``h [B, C, F]`` are :meth:`ConditionNet.frames` features; the object stands for
    ``cond.upsample(h)[:, :, start:stop]`` (shape ``[B, C, T]``, ``T = stop - start``)
    without forming it.  :meth:`projections` gives ``W · upsample(h)`` for a block of those
    samples computed as ``upsample(W · h)`` on the frames the block depends on.

    The upsampling is applied as what it is, a banded linear map: output frame ``g``
    (samples ``g·hop .. g·hop+hop-1``) is ``Σ_i p[g+i] · K_g[i]`` over ``|i| <= ctx``
    (``ctx = ConditionNet.upsample_context``), with ``K_g [2·ctx+1, hop]`` the same for
    every frame at least ``2·ctx`` frames from both ends of the utterance and different only
    near the ends (zero padding of each smoothing stage).  The kernels are read off
    ``cond.upsample`` applied to an identity matrix of frames, so they are exact; the
    product costs ``2·(2·ctx+1)`` FLOPs per sample and channel, a few times less than
    the multi-stage convolution and than projecting every sample.
    """

    def __init__(self, cond: ConditionNet, h: torch.Tensor, start: int = 0, stop: int | None = None,
                 _kernels: tuple | None = None):
        full = h.shape[2] * cond.hop
        stop = full if stop is None else stop
        if not 0 <= start <= stop <= full:
            raise ValueError(f"samples [{start}, {stop}) are outside [0, {full})")
        self.cond, self.h, self.start, self.stop = cond, h, int(start), int(stop)
        self._kernels = _kernels

    @classmethod
    def from_mel(cls, cond: ConditionNet, mel: torch.Tensor, speaker: torch.Tensor | None = None) -> "FrameConditioning":
        return cls(cond, cond.frames(mel, speaker))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.h.shape[0], self.h.shape[1], self.stop - self.start)

    @property
    def device(self) -> torch.device:
        return self.h.device

    @property
    def dtype(self) -> torch.dtype:
        return self.h.dtype

    def window(self, a: int, b: int) -> "FrameConditioning":
        """Samples ``[a, b)`` of this window (for generating in pieces with one cache)."""
        b = min(b, self.stop - self.start)
        return FrameConditioning(self.cond, self.h, self.start + a, self.start + b, self._kernels)

    def upsampled(self) -> torch.Tensor:
        """The conditioning itself ``[B, C, T]`` (reference; generation never forms it)."""
        return self.cond.upsample(self.h)[:, :, self.start : self.stop]

    def kernels(self) -> tuple[torch.Tensor, int]:
        """``(M, E)``: ``M = cond.upsample(I_n)`` ``[n, n·hop]`` for ``n = min(F, 2E+1)`` frames, ``E = 2·ctx``."""
        if self._kernels is None:
            ctx = self.cond.upsample_context
            n = min(self.h.shape[2], 4 * ctx + 1)
            eye = torch.eye(n, dtype=self.h.dtype, device=self.h.device)
            with torch.no_grad():
                self._kernels = (self.cond.upsample(eye[None])[0], 2 * ctx)
        return self._kernels

    def _frame_kernel(self, g: int) -> torch.Tensor:
        """``K_g [2·ctx+1, hop]``: coefficients of frames ``g-ctx .. g+ctx`` in output frame ``g``."""
        M, E = self.kernels()
        hop, ctx, F = self.cond.hop, self.cond.upsample_context, self.h.shape[2]
        n = M.shape[0]
        if n == F or g < E:
            pos = g  # position inside the identity window, whose ends are the utterance's
        elif g >= F - E:
            pos = n - (F - g)
        else:
            pos = E  # interior: at least 2·ctx frames from both ends of the window
        K = M.new_zeros(2 * ctx + 1, hop)
        lo, hi = max(0, pos - ctx), min(n, pos + ctx + 1)
        K[lo - (pos - ctx) : hi - (pos - ctx)] = M[lo:hi, pos * hop : (pos + 1) * hop]
        return K

    def projections(self, w: torch.Tensor | None, a: int, b: int) -> torch.Tensor:
        """``[B, D, b-a]``: ``w [D, C]`` applied to the conditioning of samples ``[a, b)`` of this window
        (``w=None``: the conditioning itself).

        Only the frames that influence those samples are projected (``ctx`` each side; frames
        outside the utterance are zeros, and the edge kernels reproduce its zero padding), so
        blocks equal the unblocked ``w · upsample(h)`` up to rounding, and memory is one block.
        """
        return self.projections_tbd(w, a, b).permute(1, 2, 0)

    def projections_tbd(self, w: torch.Tensor | None, a: int, b: int) -> torch.Tensor:
        """As :meth:`projections`, laid out ``[b-a, B, D]`` (contiguous: one row of all layers per step)."""
        hop, ctx, F = self.cond.hop, self.cond.upsample_context, self.h.shape[2]
        s0, s1 = self.start + a, self.start + b
        g0, g1 = s0 // hop, -(-s1 // hop)  # output frames
        f0, f1 = max(0, g0 - ctx), min(F, g1 + ctx)
        h = self.h[:, :, f0:f1].permute(2, 0, 1)  # [frames, B, C]
        p = h if w is None else torch.matmul(h, w.to(h.dtype).t())  # [frames, B, D]: projected at frame rate
        Bn, D = p.shape[1], p.shape[2]
        p = p.reshape(p.shape[0], Bn * D)
        p = torch.nn.functional.pad(p, (0, 0, f0 - (g0 - ctx), (g1 + ctx) - f1))  # frames g0-ctx .. g1+ctx-1
        P = p.unfold(0, 2 * ctx + 1, 1).transpose(1, 2)  # [g1-g0, 2ctx+1, B·D]: frames g-ctx .. g+ctx of frame g
        _, E = self.kernels()
        interior = F > 4 * ctx + 1
        lo = min(g1, max(g0, E)) if interior else g1  # [lo, hi): frames that use the interior kernel
        hi = max(lo, min(g1, F - E)) if interior else g1
        u = p.new_empty(g1 - g0, hop, Bn * D)
        if hi > lo:
            K = self._frame_kernel(E).t()  # [hop, 2ctx+1]
            torch.bmm(K.expand(hi - lo, -1, -1), P[lo - g0 : hi - g0], out=u[lo - g0 : hi - g0])
        for g in list(range(g0, lo)) + list(range(hi, g1)):
            torch.mm(self._frame_kernel(g).t(), P[g - g0], out=u[g - g0])
        return u.view((g1 - g0) * hop, Bn, D)[s0 - g0 * hop : s1 - g0 * hop]


def layer_projections(c, w: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``[B, D, b-a]``: every layer's conditioning projection ``w [D=L·G, C]`` for samples ``[a, b)``.

    ``c`` is a :class:`FrameConditioning` (projected at frame rate, then upsampled) or a tensor
    ``[B, C, T]`` of upsampled conditioning (projected per sample: the reference path).
    """
    if isinstance(c, FrameConditioning):
        return c.projections(w, a, b)
    return torch.matmul(w.to(c.dtype), c[:, :, a:b])


def conditioning_window(c, a: int, b: int):
    """Samples ``[a, b)`` of ``c`` (a tensor ``[B, C, T]`` or a :class:`FrameConditioning`)."""
    return c.window(a, b) if isinstance(c, FrameConditioning) else c[:, :, a:b]


@dataclass
class GenerationCache:
    """Per-layer ring buffers ``[(k-1)·d, B, R]`` and the current time step."""

    buffers: list[torch.Tensor] = field(default_factory=list)
    t: int = 0
    x_prev: torch.Tensor | None = None  # the last generated sample (input of the next step)
    lp_history: torch.Tensor | None = None  # [B, order]: the last samples, most recent first (source-filter teachers)

    @classmethod
    def empty(cls, sizes: list[int], batch: int, channels: int, dtype, device) -> "GenerationCache":
        return cls([torch.zeros(m, batch, channels, dtype=dtype, device=device) for m in sizes], 0)

    def reset(self) -> None:
        for b in self.buffers:
            b.zero_()
        self.t = 0
        self.x_prev = None
        self.lp_history = None


class CachedGenerator:
    """Runs a :class:`~wavedistill.teacher.Teacher` one sample at a time with linearised weights."""

    block = 1024  # samples per conditioning-projection block (and per progress callback)

    def __init__(self, teacher):
        self.dist = teacher.dist
        self.weights = w = teacher.net.step_weights()  # the one named export all generators read
        self.k = w.kernel_size
        self.dilations = w.dilations
        self.sizes = [(self.k - 1) * d for d in self.dilations]
        self.skip_scale = w.skip_scale
        p = next(teacher.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.layers = w.layers
        self.res_channels = w.residual
        self.w_cond = w.w_cond  # [L*G, C]
        self.gate = w.gate

    def new_cache(self, batch: int) -> GenerationCache:
        return GenerationCache.empty(self.sizes, batch, self.res_channels, self.dtype, self.device)

    def cond_block(self, c, start: int, stop: int) -> torch.Tensor:
        """``[stop-start, L, B, G]`` conditioning projections for a block of steps.

        ``c``: a :class:`FrameConditioning` (projected at frame rate) or upsampled ``[B, C, T]``
        (projected per sample, the reference); see :func:`layer_projections`.
        """
        blk = layer_projections(c, self.w_cond, start, stop)  # [B, L*G, T]
        B, _, T = blk.shape
        return blk.reshape(B, len(self.layers), self.gate, T).permute(3, 1, 0, 2).contiguous()

    def step(self, x_prev: torch.Tensor, cond_t: torch.Tensor, cache: GenerationCache) -> torch.Tensor:
        """One step: ``x_prev [B]`` (the previous sample) → distribution params ``[B, P]``."""
        t = cache.t
        h = x_prev[:, None] * self.weights.w_in + self.weights.b_in  # [B, R]
        skip = None
        R = self.res_channels
        half = self.gate // 2
        for i, layer in enumerate(self.layers):
            buf = cache.buffers[i]
            m = self.sizes[i]
            d = self.dilations[i]
            taps = [buf[(t - (self.k - 1 - j) * d) % m] for j in range(self.k - 1)]
            g = torch.addmm(layer.b_conv, torch.cat(taps + [h], dim=1), layer.w_taps) + cond_t[i]
            z = torch.tanh(g[:, :half]) * torch.sigmoid(g[:, half:])
            o = torch.addmm(layer.b_out, z, layer.w_out)
            buf[t % m] = h
            h = h * SQRT_HALF + o[:, :R]
            skip = o[:, R:] if skip is None else skip + o[:, R:]
        w = self.weights
        s = torch.relu(skip * self.skip_scale)
        s = torch.relu(torch.addmm(w.h1b, s, w.h1w))
        cache.t = t + 1
        return torch.addmm(w.h2b, s, w.h2w)

    @torch.no_grad()
    def run(self, c, noise: torch.Tensor, temperature: float = 1.0, cache: GenerationCache | None = None,
            progress=None, lpc=None) -> torch.Tensor:
        """Conditioning ``c`` (:class:`FrameConditioning`, or upsampled ``[B, C, T]``) and uniform
        ``noise [B, n_noise, T]`` → samples ``[B, T]``; ``cache`` carries over between calls.

        ``lpc`` (:class:`~wavedistill.flows.LPCoefficients` of this window, source-filter teachers): the
        location of every step is shifted by ``Σ_k a_k(t)·x_{t-1-k}`` over the generated history (kept in
        ``cache.lp_history``, so chunks continue seamlessly)."""
        B, _, T = c.shape
        cache = cache or self.new_cache(B)
        out = torch.zeros(B, T, dtype=self.dtype, device=self.device)
        x_prev = cache.x_prev if cache.x_prev is not None else torch.zeros(B, dtype=self.dtype, device=self.device)
        hist = None
        if lpc is not None:
            p = lpc.order
            hist = cache.lp_history if cache.lp_history is not None else torch.zeros(B, p, dtype=torch.float32, device=self.device)
        for start in range(0, T, self.block):
            stop = min(T, start + self.block)
            cb = self.cond_block(c, start, stop)
            coef = lpc.shifted(start).per_sample(stop - start, B, torch.float32) if lpc is not None else None
            for t in range(start, stop):
                params = self.step(x_prev, cb[t - start], cache)[:, :, None]
                if coef is not None:
                    params = self.dist.shift(params, (coef[:, t - start] * hist).sum(1, keepdim=True))
                x_prev = self.dist.sample(params, noise[:, :, t : t + 1], temperature)[:, 0]
                if hist is not None:
                    hist = torch.cat([x_prev[:, None].float(), hist[:, :-1]], dim=1)
                out[:, t] = x_prev
            if progress is not None:
                progress(stop - start)
        cache.x_prev = x_prev
        cache.lp_history = hist
        return out
