"""Building blocks shared by the teacher and the student.

* :class:`ResidualLayer` — causal dilated convolution, conditioning, gated
  tanh·sigmoid unit, residual and skip projections.
* :class:`WaveNet` — a stack of residual layers with dilation cycles.
* :class:`ConditionNet` — log-mel normalisation, frame-rate context
  convolution, learned upsampling to sample rate and optional speaker
  embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

SQRT_HALF = math.sqrt(0.5)
BAND_MAX_FRAMES = 512  # frame-rate conditioning for training segments up to this many frames (see trains_fused)


@dataclass(frozen=True)
class ResidualParams:
    """A residual layer's parameters by name (the tensors themselves: autograd flows through them).

    Convolution layouts: ``conv_w [G, R, k]`` (tap ``j`` multiplies ``x[t-(k-1-j)·d]``), ``conv_b [G]``,
    ``cond_w [G, C, 1]`` or None, ``res_w [R, G/2, 1]``/``res_b`` (None in a skip stack's last layer),
    ``skip_w [S, G/2, 1]``/``skip_b`` (None without skips).
    """

    dilation: int
    conv_w: torch.Tensor
    conv_b: torch.Tensor
    cond_w: torch.Tensor | None
    res_w: torch.Tensor | None
    res_b: torch.Tensor | None
    skip_w: torch.Tensor | None
    skip_b: torch.Tensor | None


@dataclass(frozen=True)
class StepLayer:
    """One layer linearised for step-by-step generation (detached, ``[in, out]`` matrices).

    ``w_taps [k·R, G]`` multiplies the stacked taps ``[x_{t-(k-1)d}; …; x_t]``; ``w_out [G/2, R+S]`` and
    ``b_out`` give ``[residual | skip]`` with the residual path already scaled by √½ (zero for a layer
    whose residual output is never read).
    """

    dilation: int
    w_taps: torch.Tensor
    b_conv: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor


@dataclass(frozen=True)
class StepWeights:
    """A WaveNet's weights by name in the layout every step-by-step generator reads (Python, C++, Triton)."""

    kernel_size: int
    residual: int
    gate: int
    skip: int
    skip_scale: float
    w_in: torch.Tensor  # [R]
    b_in: torch.Tensor  # [R]
    layers: list  # [StepLayer]
    w_cond: torch.Tensor  # [L·G, C]: all layers' conditioning projections stacked
    h1w: torch.Tensor  # [S, S] (in, out)
    h1b: torch.Tensor
    h2w: torch.Tensor  # [S, P]
    h2b: torch.Tensor

    @property
    def dilations(self) -> list[int]:
        return [layer.dilation for layer in self.layers]


@dataclass(frozen=True)
class BandedConditioning:
    """Conditioning kept at frame rate for training: ``c[:, :, t] = Σ_j w[t, j]·frames[:, :, i0[t] + j]``.

    ``frames [B, C, F]`` (from :meth:`ConditionNet.frames`), ``i0 [T]``/``w [T, J]`` from
    :meth:`ConditionNet.upsample_band`.  :meth:`WaveNet.forward` accepts it in place of ``c``: on the fused CPU
    training path every layer's projection is then computed per frame (:meth:`WaveNet.forward_banded`), elsewhere
    it is expanded with :meth:`dense` — the same maths either way.
    """

    frames: torch.Tensor
    i0: torch.Tensor
    w: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.frames.dtype

    @property
    def shape(self) -> tuple:
        return (self.frames.shape[0], self.frames.shape[1], self.w.shape[0])

    def dense(self) -> torch.Tensor:
        """The upsampled conditioning ``[B, C, T]``."""
        J = self.w.shape[1]
        idx = self.i0[:, None] + torch.arange(J, device=self.i0.device)[None, :]  # [T, J]
        win = self.frames[:, :, idx]  # [B, C, T, J]
        return (win * self.w.to(self.frames.dtype)).sum(-1)


class ResidualLayer(nn.Module):
    """``forward(x, c) -> (x_out, skip)``; causal in ``x``, pointwise in ``c``."""

    def __init__(self, residual: int, gate: int, skip: int, cond: int, kernel_size: int, dilation: int,
                 residual_out: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.conv = nn.Conv1d(residual, gate, kernel_size, dilation=dilation)
        self.cond = nn.Conv1d(cond, gate, 1, bias=False) if cond > 0 else None
        # The last layer of a skip-stack WaveNet feeds only the skip sum: no residual projection
        # (an unused parameter would also break DistributedDataParallel).
        self.res = nn.Conv1d(gate // 2, residual, 1) if residual_out else None
        self.skip = nn.Conv1d(gate // 2, skip, 1) if skip > 0 else None

    @property
    def padding(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    def params(self) -> ResidualParams:
        """This layer's parameters by name (read by the fused kernels and the weight export)."""
        res, skip, cond = self.res, self.skip, self.cond
        return ResidualParams(
            self.dilation, self.conv.weight, self.conv.bias, cond.weight if cond is not None else None,
            res.weight if res is not None else None, res.bias if res is not None else None,
            skip.weight if skip is not None else None, skip.bias if skip is not None else None,
        )

    def gate_input(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = self.conv(F.pad(x, (self.padding, 0)))
        if self.cond is not None and c is not None:
            h = h + self.cond(c)
        return h

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None):
        if kernels.use_fused(x, self):  # fused Triton kernel (see wavedistill.kernels for the switch)
            return kernels.residual_layer(self, x, c)
        a, b = self.gate_input(x, c).chunk(2, dim=1)
        z = torch.tanh(a) * torch.sigmoid(b)
        out = (x + self.res(z)) * SQRT_HALF if self.res is not None else x
        skip = self.skip(z) if self.skip is not None else None
        return out, skip

    # ------------------------------------------------------------------ time-major GEMM form
    def stacked_weight(self, with_cond: bool) -> torch.Tensor:
        """``[K·R (+ C), G]``: the conv taps, oldest first, then the conditioning projection, as GEMM rows.

        Row block ``k`` multiplies ``x[t − (K−1−k)·d]`` (the conv's tap ``k``); derived from the
        parameters at every call, so gradients reach ``conv.weight`` and ``cond.weight`` unchanged.
        """
        w = self.conv.weight.permute(2, 1, 0).reshape(-1, self.conv.out_channels)  # [K·R, G]
        if with_cond:
            w = torch.cat([w, self.cond.weight[:, :, 0].t()], dim=0)
        return w

    def out_weight(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``([H, R + S], [R + S])``: the residual and skip 1×1 projections side by side (either may be absent)."""
        mods = [m for m in (self.res, self.skip) if m is not None]
        if not mods:
            return None
        w = torch.cat([m.weight[:, :, 0] for m in mods], dim=0).t()
        b = torch.cat([m.bias for m in mods])
        return w, b

    def forward_time_major(self, x: torch.Tensor, c: torch.Tensor | None = None):
        """The same layer on ``x [B, T, R]`` and ``c [B or 1, T, C]``: ``(out [B, T, R], skip [B, T, S] or None)``.

        Two GEMMs over all ``B·T`` samples: the taps and the conditioning stacked along the
        reduction, ``[x_{t−(K−1)d} … x_t, c_t] @ stacked_weight``, then the gate and both output
        projections side by side, ``z @ [W_res | W_skip]``.  Same maths as :meth:`forward`.
        """
        B, T, R = x.shape
        if self.res is None and self.skip is None:
            return x, None
        with_cond = self.cond is not None and c is not None
        if with_cond and not (c.requires_grad or self.cond.weight.requires_grad):
            # conditioning that needs no gradient (a frozen teacher): its projection is a constant
            # addend, and backward skips its share of the stacked GEMM
            cproj = torch.addmm(self.conv.bias, c.expand(B, -1, -1).reshape(B * T, -1), self.cond.weight[:, :, 0].t())
            stacked = StackTaps.apply(x, None, self.kernel_size, self.dilation)
            h = torch.addmm(cproj, stacked.view(B * T, -1), self.stacked_weight(False))
        else:
            stacked = StackTaps.apply(x, c.expand(B, -1, -1) if with_cond else None, self.kernel_size, self.dilation)
            h = torch.addmm(self.conv.bias, stacked.view(B * T, -1), self.stacked_weight(with_cond))
        a, b = h.chunk(2, dim=1)  # chunk, not slicing: its backward concatenates instead of zero-filling
        z = torch.tanh(a) * torch.sigmoid(b)
        w, bias = self.out_weight()
        y = torch.addmm(bias, z, w)
        if self.res is None:
            return x, y.view(B, T, -1)
        if self.skip is None:
            return (x + y.view(B, T, R)) * SQRT_HALF, None
        y_res, y_skip = y.split([R, y.shape[1] - R], dim=1)
        return (x + y_res.view(B, T, R)) * SQRT_HALF, y_skip.view(B, T, -1)


class StackTaps(torch.autograd.Function):
    """``x [B, T, R]``, ``c [B, T, C]`` or None → ``[B, T, K·R (+ C)]`` = ``[x_{t−(K−1)d}, …, x_{t−d}, x_t, c_t]``
    (zeros before the start): the GEMM operand of a dilated causal convolution.

    One write of the stacked rows forward; backward adds the tap blocks' gradients back, shifted, into
    one ``[B, T, R]`` gradient (autograd's slicing and padding would zero-fill a full tensor per tap).
    """

    @staticmethod
    def forward(ctx, x, c, kernel_size: int, dilation: int):
        B, T, R = x.shape
        C = c.shape[2] if c is not None else 0
        out = x.new_empty(B, T, kernel_size * R + C)
        for k in range(kernel_size):
            s = min((kernel_size - 1 - k) * dilation, T)
            out[:, :s, k * R : (k + 1) * R] = 0
            out[:, s:, k * R : (k + 1) * R] = x[:, : T - s]
        if c is not None:
            out[:, :, kernel_size * R :] = c
        ctx.shape = (kernel_size, dilation, R, c is not None)
        return out

    @staticmethod
    def backward(ctx, g):
        kernel_size, dilation, R, has_c = ctx.shape
        T = g.shape[1]
        gx = g[:, :, (kernel_size - 1) * R : kernel_size * R].clone(memory_format=torch.contiguous_format)
        for k in range(kernel_size - 1):
            s = (kernel_size - 1 - k) * dilation
            if s < T:
                gx[:, : T - s] += g[:, s:, k * R : (k + 1) * R]
        gc = g[:, :, kernel_size * R :] if has_c and ctx.needs_input_grad[1] else None
        return gx, gc, None, None


class WaveNet(nn.Module):
    """Causal WaveNet mapping ``x [B, in, T]`` (and ``c [B, cond, T]``) to ``[B, out, T]``.

    Output at time t depends on inputs at times <= t only.  With
    ``skip_channels == 0`` (the IAF flows) the head reads the final residual
    stream instead of a skip sum.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layers: int,
        stacks: int,
        kernel_size: int,
        residual_channels: int,
        gate_channels: int,
        skip_channels: int,
        cond_channels: int,
    ):
        super().__init__()
        per_stack = layers // stacks
        self.dilations = [2 ** (i % per_stack) for i in range(layers)]
        self.kernel_size = kernel_size
        self.skip_channels = skip_channels
        self.input = nn.Conv1d(in_channels, residual_channels, 1)
        last = len(self.dilations) - 1
        self.layers = nn.ModuleList(
            ResidualLayer(residual_channels, gate_channels, skip_channels, cond_channels, kernel_size, d,
                          residual_out=not (skip_channels > 0 and i == last))
            for i, d in enumerate(self.dilations)
        )
        head_in = skip_channels if skip_channels > 0 else residual_channels
        self.head1 = nn.Conv1d(head_in, head_in, 1)
        self.head2 = nn.Conv1d(head_in, out_channels, 1)

    @property
    def receptive_field(self) -> int:
        return (self.kernel_size - 1) * sum(self.dilations) + 1

    @torch.no_grad()
    def step_weights(self) -> StepWeights:
        """The named, detached weight export that every step-by-step generator reads (skip-stack WaveNets)."""
        k, R = self.kernel_size, self.input.out_channels
        layers = []
        for layer in self.layers:
            p = layer.params()
            w_taps = torch.cat([p.conv_w[:, :, j].t() for j in range(k)], dim=0).contiguous()  # [k*R, G]
            if p.res_w is not None:
                w_res, b_res = p.res_w[:, :, 0].t() * SQRT_HALF, p.res_b * SQRT_HALF
            else:  # last layer: its residual output is never read
                w_res = p.skip_w.new_zeros(p.skip_w.shape[1], R)
                b_res = p.skip_b.new_zeros(R)
            w_out = torch.cat([w_res, p.skip_w[:, :, 0].t()], dim=1)
            b_out = torch.cat([b_res, p.skip_b])
            layers.append(StepLayer(p.dilation, w_taps, p.conv_b.detach(), w_out.detach().contiguous(), b_out.detach()))
        return StepWeights(
            kernel_size=k, residual=R, gate=self.layers[0].conv.out_channels, skip=self.skip_channels,
            skip_scale=math.sqrt(1.0 / len(self.layers)),
            w_in=self.input.weight[:, 0, 0].detach(), b_in=self.input.bias.detach(), layers=layers,
            w_cond=torch.cat([layer.params().cond_w[:, :, 0] for layer in self.layers], dim=0).detach(),
            h1w=self.head1.weight[:, :, 0].detach().t().contiguous(), h1b=self.head1.bias.detach(),
            h2w=self.head2.weight[:, :, 0].detach().t().contiguous(), h2b=self.head2.bias.detach(),
        )

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head2(F.relu(self.head1(F.relu(h))))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, out, T]``.  PyTorch layers run :meth:`forward_time_major` (GEMMs over ``B·T`` rows);
        the fused Triton kernels, where :mod:`wavedistill.kernels` selects them, :meth:`forward_channels`.
        With gradients on a CPU, the layers run as one :class:`~wavedistill.nn.fused_stack.FusedStack`."""
        if isinstance(c, BandedConditioning):
            if self.trains_fused(x, c.frames.shape[2]) and not kernels.use_fused(x, self.layers[0]):
                return self.forward_banded(x, c.frames, c.i0, c.w)
            c = c.dense()
        if kernels.use_fused(x, self.layers[0]):
            return self.forward_channels(x, c)
        B, _, T = x.shape
        h = self._input_time_major(x)
        ct = c.transpose(1, 2).contiguous() if c is not None else None
        if self._wants_fused(h, ct):
            h = self._fused_layers(h, ct)
        else:
            skips = None
            for layer in self.layers:
                h, s = layer.forward_time_major(h, ct)
                if s is not None:
                    skips = s if skips is None else skips + s
            if self.skip_channels > 0:
                h = skips * math.sqrt(1.0 / len(self.layers))
        return self._head_time_major(h)

    def _input_time_major(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T = x.shape
        h = torch.addmm(self.input.bias, x.transpose(1, 2).reshape(B * T, -1), self.input.weight[:, :, 0].t())
        return h.view(B, T, -1)

    def _head_time_major(self, h: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        h = F.relu(h).reshape(B * T, -1)
        h = F.relu(torch.addmm(self.head1.bias, h, self.head1.weight[:, :, 0].t()))
        y = torch.addmm(self.head2.bias, h, self.head2.weight[:, :, 0].t())
        return y.view(B, T, -1).transpose(1, 2).contiguous()

    def trains_fused(self, x: torch.Tensor, frames: int = 0) -> bool:
        """Whether :meth:`forward_banded` can run for input ``x`` with ``frames`` conditioning frames: gradients
        wanted, CPU float32, library built, and a training-sized segment (the band is found from an
        ``[F, F·hop]`` matrix, so long utterances scored with gradients take the plain layers)."""
        return frames <= BAND_MAX_FRAMES and self._wants_fused(x, None, cond_ok=True)

    def forward_banded(self, x: torch.Tensor, frames: torch.Tensor, band_i0: torch.Tensor, band_w: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the conditioning given at frame rate, ``frames [B, C, F]``, and its upsampling as a
        banded map (``c[:, :, t] = Σ_j band_w[t, j]·frames[:, :, band_i0[t] + j]``, from
        :meth:`ConditionNet.upsample_band`).  Every layer's projection ``W_cond·c`` is then computed on the
        frames (``hop``× fewer rows) and upsampled inside the fused gate pass: the same maths as
        ``forward(x, upsample(frames))`` with a quarter fewer FLOPs.  Needs :meth:`trains_fused`."""
        from .fused_stack import FusedStack

        B, _, T = x.shape
        h = self._input_time_major(x)
        if frames.shape[0] != B:  # one conditioning for the whole batch
            frames = frames.expand(B, -1, -1)
        w_all = torch.cat([m.cond.weight[:, :, 0] for m in self.layers], dim=0).t()  # [C, L·G]
        P = torch.matmul(frames.transpose(1, 2), w_all).contiguous()  # [B, F, L·G]: every layer's projection per frame
        out = FusedStack.apply(h, None, None, P, band_w, band_i0, self._spec(False), *self._stack_weights(False))
        h = out * math.sqrt(1.0 / len(self.layers)) if self.skip_channels > 0 else out
        return self._head_time_major(h)

    def _spec(self, with_cond: bool):
        from .fused_stack import StackSpec

        first = self.layers[0]
        return StackSpec(self.kernel_size, tuple(self.dilations), first.conv.in_channels, first.conv.out_channels,
                         self.skip_channels, tuple(m.res is not None for m in self.layers), with_cond)

    def _stack_weights(self, with_cond: bool) -> list:
        weights = []
        for m in self.layers:
            w_out, b_out = m.out_weight()
            weights += [m.stacked_weight(with_cond), m.conv.bias, w_out, b_out]
        return weights

    def _wants_fused(self, h: torch.Tensor, ct: torch.Tensor | None, cond_ok: bool = False) -> bool:
        """Train through :class:`~wavedistill.nn.fused_stack.FusedStack`: gradients wanted, CPU float32, library built."""
        if not torch.is_grad_enabled():
            return False
        if not (h.requires_grad or (ct is not None and ct.requires_grad)
                or any(p.requires_grad for p in self.parameters())):
            return False
        if (ct is not None or cond_ok) and self.layers[0].cond is None:
            return False
        if self.input.weight.dtype != torch.float32 or (ct is not None and ct.dtype != torch.float32):
            return False
        return all(m.res is not None or m.skip is not None for m in self.layers) and kernels.use_cpu_fused(h)

    def _fused_layers(self, h: torch.Tensor, ct: torch.Tensor | None) -> torch.Tensor:
        """The residual layers on ``h [B, T, R]`` through :class:`FusedStack`: the scaled skip sum (or the
        final residual stream without skips).  Same maths as :meth:`ResidualLayer.forward_time_major`."""
        from .fused_stack import FusedStack

        B, T, _ = h.shape
        frozen_cond = ct is not None and not (ct.requires_grad or any(m.cond.weight.requires_grad for m in self.layers))
        with_cond = ct is not None and not frozen_cond
        if with_cond and ct.shape[0] != B:
            ct = ct.expand(B, -1, -1).contiguous()  # the gradient of a broadcast row set is summed by autograd
        cadd = None
        if frozen_cond:  # a constant addend: all layers' projections in one GEMM, no gradient to compute
            w_all = torch.cat([m.cond.weight[:, :, 0] for m in self.layers], dim=0).t()  # [C, L·G]
            cadd = ct.expand(B, -1, -1).reshape(B * T, -1).mm(w_all).view(B, T, -1)
        out = FusedStack.apply(h, ct if with_cond else None, cadd, None, None, None, self._spec(with_cond),
                               *self._stack_weights(with_cond))
        return out * math.sqrt(1.0 / len(self.layers)) if self.skip_channels > 0 else out

    def forward_channels(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """The channel-major formulation ``[B, C, T]`` layer by layer through :meth:`ResidualLayer.forward`
        (1-D convolutions, or the fused kernels); the reference the time-major path is tested against."""
        h = self.input(x)
        skips = None
        for layer in self.layers:
            h, s = layer(h, c)
            if s is not None:
                skips = s if skips is None else skips + s
        if self.skip_channels > 0:
            h = skips * math.sqrt(1.0 / len(self.layers))
        return self.head(h)


def stretch_smooth(u: torch.Tensor, w: torch.Tensor, s: int) -> torch.Tensor:
    """``conv(repeat_interleave(u, s), w)`` along the last axis, ``w`` of ``2s+1`` taps, zero padding ``s``.

    Polyphase form: output sample ``i·s + r`` reads only frames ``i−1, i, i+1``, with weights
    ``A[q, r] = Σ_{j : ⌊(r+j−s)/s⌋ = q−1} w_j``; so it is one ``[…·F, 3] @ [3, s]`` product over a
    sliding window (no stretched copy, 3 instead of ``2s+1`` multiply-adds per output, and a
    backward of the same size).  Equal to the convolution up to float rounding, at the edges too
    (the conv's zero padding is exactly one zero frame on each side).
    """
    j = torch.arange(2 * s + 1, device=w.device)
    r = torch.arange(s, device=w.device)
    phase = torch.div(r[:, None] + j[None, :] - s, s, rounding_mode="floor") + 1  # [s, 2s+1] in {0, 1, 2}
    a = (w[None, :, None] * F.one_hot(phase, 3).to(w.dtype)).sum(1).t()  # [3, s]
    win = F.pad(u, (1, 1)).unfold(-1, 3, 1)  # [..., F, 3], a view
    return (win @ a.to(u.dtype)).flatten(-2)


class ConditionNet(nn.Module):
    """Log-mel frames ``[B, n_mels, F]`` → conditioning ``[B, cond, F*hop]``.

    Normalises with the corpus statistics (buffers saved with the model), mixes
    neighbouring frames with a small convolution, then upsamples by repeated
    nearest-neighbour stretching followed by a learned smoothing filter per
    scale (the product of ``upsample_scales`` is the hop length).

    ``forward(mel) == upsample(frames(mel))``: :meth:`frames` gives the frame-rate
    features ``[B, cond, F]``, :meth:`upsample` stretches any ``[B, D, F]`` to
    ``[B, D, F*hop]``.  Autoregressive generation projects the frames with every
    layer's conditioning weights first and upsamples the projections
    (:class:`wavedistill.generation.FrameConditioning`).
    """

    def __init__(self, n_mels: int, cond_channels: int, upsample_scales: list[int], n_speakers: int = 0, speaker_channels: int = 16):
        super().__init__()
        self.register_buffer("mel_mean", torch.zeros(n_mels))
        self.register_buffer("mel_std", torch.ones(n_mels))
        self.pre = nn.Conv1d(n_mels, cond_channels, 5, padding=2)
        self.scales = list(upsample_scales)
        self.smooth = nn.ModuleList()
        for s in self.scales:
            conv = nn.Conv2d(1, 1, (1, 2 * s + 1), padding=(0, s), bias=False)
            nn.init.constant_(conv.weight, 1.0 / (2 * s + 1))
            self.smooth.append(conv)
        self.speaker = nn.Embedding(n_speakers, cond_channels) if n_speakers > 0 else None

    @property
    def hop(self) -> int:
        return math.prod(self.scales)

    @property
    def upsample_context(self) -> int:
        """Frames on each side that influence one output sample through :meth:`upsample` alone."""
        samples = 0  # half-width of the smoothing filters, in output samples
        scale = 1
        for s in reversed(self.scales):
            samples += s * scale
            scale *= s
        return math.ceil(samples / self.hop) + 1

    @property
    def frame_context(self) -> int:
        """Frames on each side that influence one output sample (for chunking): the 5-tap frame conv and the upsampling."""
        return 2 + self.upsample_context

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mel_mean.copy_(mean)
        self.mel_std.copy_(std.clamp_min(1e-3))

    def frames(self, mel: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """Frame-rate features ``[B, cond, F]``: normalisation, frame conv, activation, speaker embedding."""
        x = (mel - self.mel_mean[:, None]) / self.mel_std[:, None]
        x = F.leaky_relu(self.pre(x), 0.2)
        if self.speaker is not None:
            if speaker is None:
                raise ValueError("this model needs a speaker id")
            x = x + self.speaker(speaker)[:, :, None]
        return x

    def upsample(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, D, F]`` → ``[B, D, F*hop]`` for any number of channels ``D``.

        Linear, and the same filter for every channel (zero padding at the edges), so it commutes
        with any per-frame channel mixing: ``W·upsample(h) == upsample(W·h)`` up to rounding.
        """
        u = h
        for s, conv in zip(self.scales, self.smooth):
            u = stretch_smooth(u, conv.weight.view(-1), s)
        return u

    def upsample_band(self, frames: int, length: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`upsample` of ``frames`` frames as a banded matrix, for output samples ``offset … offset+length-1``:
        ``upsample(h)[..., offset + t] == Σ_j w[t, j]·h[..., i0[t] + j]`` (``i0 [length]`` int64, ``w [length, J]``,
        differentiable in the smoothing filters).  ``J`` is the widest support, a few frames."""
        key = (frames, length, offset)
        cache = self.__dict__.setdefault("_band_cache", {})
        if key not in cache:
            if len(cache) >= 16:  # training uses one segment shape; never let odd shapes pile up
                cache.clear()
            with torch.no_grad():  # the support, from all-positive filters (a superset of any filters' support)
                u = torch.eye(frames, dtype=torch.float64)[None]
                for s in self.scales:
                    u = stretch_smooth(u, torch.ones(2 * s + 1, dtype=torch.float64), s)
                sup = u[0, :, offset : offset + length] != 0  # [F, length]
                if sup.shape[1] != length:
                    raise ValueError(f"samples {offset}..{offset + length} exceed {frames} frames × hop {self.hop}")
                first = sup.to(torch.int8).argmax(0)
                last = frames - 1 - sup.flip(0).to(torch.int8).argmax(0)
                J = int((last - first).max()) + 1
                cache[key] = (first.clamp(max=frames - J).contiguous(), J)
        i0, J = cache[key]
        dev, dtype = self.smooth[0].weight.device, self.smooth[0].weight.dtype
        m = self.upsample(torch.eye(frames, dtype=dtype, device=dev)[None])[0, :, offset : offset + length]  # [F, length]
        i0 = i0.to(dev)
        w = m.gather(0, i0[None, :] + torch.arange(J, device=dev)[:, None]).t().contiguous()
        return i0, w

    def banded(self, mel: torch.Tensor, context: int, length: int, speaker: torch.Tensor | None = None) -> BandedConditioning:
        """``forward(mel)[:, :, context·hop : context·hop + length]`` as a :class:`BandedConditioning` (nothing upsampled)."""
        frames = self.frames(mel, speaker)
        i0, w = self.upsample_band(frames.shape[2], length, context * self.hop)
        return BandedConditioning(frames, i0, w)

    def upsample_reference(self, h: torch.Tensor) -> torch.Tensor:
        """:meth:`upsample` as literally defined (stretch, then the smoothing convolution); for tests."""
        u = h.unsqueeze(1)  # [B, 1, D, F]: the channels are rows of a one-channel image
        for s, conv in zip(self.scales, self.smooth):
            u = conv(u.repeat_interleave(s, dim=3))
        return u.squeeze(1)

    def forward(self, mel: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        return self.upsample(self.frames(mel, speaker))
