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
        h = self.input(x)
        skips = None
        for layer in self.layers:
            h, s = layer(h, c)
            if s is not None:
                skips = s if skips is None else skips + s
        if self.skip_channels > 0:
            h = skips * math.sqrt(1.0 / len(self.layers))
        return self.head(h)


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
        u = h.unsqueeze(1)  # [B, 1, D, F]: the channels are rows of a one-channel image
        for s, conv in zip(self.scales, self.smooth):
            u = conv(u.repeat_interleave(s, dim=3))
        return u.squeeze(1)

    def forward(self, mel: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        return self.upsample(self.frames(mel, speaker))
