"""A coupling-flow vocoder of the WaveGlow family (Prenger et al. 2019): density and sampling both parallel.

The waveform ``x [B, T]`` is squeezed into groups of ``group`` samples, ``[B, group, T/group]``
(:class:`~wavedistill.flows.Squeeze1d`); the mel is upsampled to sample rate by a
:class:`~wavedistill.nn.wavenet.ConditionNet` and folded the same way, ``[B, C·group, T/group]``.  Then
``steps`` flow steps, each ActNorm → invertible 1×1 convolution (LU) → affine
:class:`~wavedistill.flows.ChannelCoupling` whose net is a non-causal WaveNet-style stack
(:class:`CouplingNet`, last layer zero-initialised) reading the kept half and the folded conditioning.
Every ``early_every`` steps ``early_channels`` channels leave for the base distribution (WaveGlow's early
outputs).  Base: standard Gaussian over all ``T`` values.  All transforms come from :mod:`wavedistill.flows`
through the contract ``y, ladj = f(x, ctx)`` / ``x, ladj = f.inverse(y, ctx)``.

Data → noise (``transform``) scores a waveform in one pass; noise → data (``inverse``) synthesises in one
pass.  The base noise has the waveform's layout: ``z [B, T]``, squeezed exactly like ``x``, so sample ``t``
of the noise is fixed by ``(seed, t)`` (positional, as for the student) and chunked synthesis equals one pass.

Receptive field: each coupling net sees ``(kernel−1)/2·Σ dilations`` grouped steps either side, so the whole
model sees :attr:`CouplingVocoder.half_width` samples either side of a sample (plus the conditioning's frames).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import CouplingConfig, FeatureConfig
from ..flows import ActNorm, ChannelCoupling, FlowSequence, InvertibleConv1x1, Squeeze1d
from ..nn.wavenet import ConditionNet
from .student import _positional_uniform

LOG_2PI = math.log(2 * math.pi)


class CouplingNet(nn.Module):
    """Non-causal WaveNet-style coupling net: ``cat(x_kept, cond) [B, kept + Cc, N]`` → ``[B, out, N]``.

    Input 1×1 conv, ``layers`` centred dilated convolutions (dilation ``2^i``) with a gated tanh·sigmoid unit
    and a 1×1 conditioning projection, residual and skip 1×1 convolutions, and a zero-initialised 1×1 output
    layer on the skip sum (so the coupling starts as the identity).
    """

    def __init__(self, kept: int, out: int, cond: int, layers: int, channels: int, kernel_size: int):
        super().__init__()
        self.kept, self.layers, self.channels = kept, layers, channels
        self.dilations = [2 ** i for i in range(layers)]
        self.kernel_size = kernel_size
        self.start = nn.Conv1d(kept, channels, 1)
        self.cond = nn.Conv1d(cond, 2 * channels * layers, 1)  # every layer's conditioning projection at once
        self.dilated = nn.ModuleList(
            nn.Conv1d(channels, 2 * channels, kernel_size, dilation=d, padding=(kernel_size - 1) // 2 * d)
            for d in self.dilations)
        self.res_skip = nn.ModuleList(nn.Conv1d(channels, 2 * channels if i < layers - 1 else channels, 1)
                                      for i in range(layers))
        self.end = nn.Conv1d(channels, out, 1)
        nn.init.zeros_(self.end.weight)
        nn.init.zeros_(self.end.bias)

    @property
    def half_width(self) -> int:
        """Grouped steps either side of a position that reach its output."""
        return (self.kernel_size - 1) // 2 * sum(self.dilations)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x, c = inp[:, : self.kept], inp[:, self.kept:]
        h = self.start(x)
        conds = self.cond(c).chunk(self.layers, dim=1)
        skip = None
        for i, (conv, rs) in enumerate(zip(self.dilated, self.res_skip)):
            a, b = (conv(h) + conds[i]).chunk(2, dim=1)
            r = rs(torch.tanh(a) * torch.sigmoid(b))
            if i < self.layers - 1:
                h = h + r[:, : self.channels]
                r = r[:, self.channels:]
            skip = r if skip is None else skip + r
        return self.end(skip)


class CouplingVocoder(nn.Module):
    kind = "coupling"
    source = None  # no source-filter structure

    def __init__(self, cfg: CouplingConfig, n_mels: int, features: FeatureConfig | None = None):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)
        self.n_mels = n_mels
        self.group = cfg.group
        self.cond = ConditionNet(n_mels, cfg.cond_channels, cfg.upsample_scales)
        if self.cond.hop % cfg.group:
            raise ValueError(f"hop {self.cond.hop} is not a multiple of group {cfg.group}")
        self.squeeze = Squeeze1d(cfg.group)
        steps, self.early_at, c = [], [], cfg.group
        for k in range(cfg.steps):
            if k and cfg.early_every and cfg.early_channels and k % cfg.early_every == 0:
                self.early_at.append(k)
                c -= cfg.early_channels
            net = CouplingNet(c // 2, 2 * (c - c // 2), cfg.cond_channels * cfg.group, cfg.layers,
                              cfg.residual_channels, cfg.kernel_size)
            steps.append(FlowSequence([ActNorm(c, spatial_dims=1), InvertibleConv1x1(c, spatial_dims=1),
                                       ChannelCoupling(c, spatial_dims=1, context_channels=cfg.cond_channels * cfg.group,
                                                       clamp=cfg.clamp, net=net)]))
        self.steps = nn.ModuleList(steps)

    @property
    def hop(self) -> int:
        return self.cond.hop

    @property
    def half_width(self) -> int:
        """Samples either side of an output sample whose noise (and conditioning) reaches it."""
        return sum(s.flows[2].net.half_width for s in self.steps) * self.group

    @property
    def receptive_field(self) -> int:
        return 2 * self.half_width + self.group

    # ------------------------------------------------------------------ conditioning and noise
    def condition(self, mel: torch.Tensor, context: int = 0, length: int | None = None) -> torch.Tensor:
        """Sample-rate conditioning ``[B, C, T]`` (``context`` frames each side of ``mel`` cropped away)."""
        c = self.cond(mel)
        if context:
            c = c[:, :, context * self.hop: context * self.hop + length]
        return c

    def _fold(self, c: torch.Tensor) -> torch.Tensor:
        return self.squeeze(c)[0]

    def make_noise(self, batch: int, length: int, seed: int | None = None, device=None, dtype=torch.float32,
                   offset: int = 0) -> torch.Tensor:
        """Gaussian base noise ``z [B, T]``; sample ``t`` depends only on ``(seed, offset + t)``, so chunks agree."""
        if seed is None:
            u = torch.rand(batch, length, dtype=torch.float64)
        else:
            u = _positional_uniform(int(seed), batch, offset, length)
        return torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7)).to(device=device, dtype=dtype)

    @staticmethod
    def base_log_prob(z: torch.Tensor) -> torch.Tensor:
        """``log N(z; 0, I)`` summed over the waveform: ``[B, T]`` → ``[B]``."""
        return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI

    # ------------------------------------------------------------------ the flow
    def transform(self, x: torch.Tensor, c: torch.Tensor):
        """Data → noise: ``x [B, T]``, ``c [B, C, T]`` → ``(z [B, T], log|det ∂z/∂x| [B])``."""
        if x.shape[-1] % self.group:
            raise ValueError(f"length {x.shape[-1]} is not a multiple of group {self.group}")
        h, ladj = self.squeeze(x[:, None])
        ctx = self._fold(c.to(x.dtype))
        early = []
        for k, step in enumerate(self.steps):
            if k in self.early_at:
                early.append(h[:, : self.cfg.early_channels])
                h = h[:, self.cfg.early_channels:]
            h, ld = step(h, ctx)
            ladj = ladj + ld
        z, _ = self.squeeze.inverse(torch.cat(early + [h], dim=1))
        return z[:, 0], ladj

    def inverse_and_log_det(self, z: torch.Tensor, c: torch.Tensor):
        """Noise → data in one parallel pass: ``z [B, T]``, ``c [B, C, T]`` → ``(x [B, T], log|det ∂x/∂z| [B])``.

        The log-determinant gives the sample's own density, ``log q(x) = log N(z) − log|det ∂x/∂z|``, and the
        entropy ``H(q) = T/2·log(2πe) + E[log|det ∂x/∂z|]`` (what distillation into this flow reads)."""
        if z.shape[-1] % self.group:
            raise ValueError(f"length {z.shape[-1]} is not a multiple of group {self.group}")
        zz, ladj = self.squeeze(z[:, None])
        ctx = self._fold(c.to(z.dtype))
        e = self.cfg.early_channels
        early = [zz[:, i * e: (i + 1) * e] for i in range(len(self.early_at))]
        h = zz[:, len(self.early_at) * e:]
        for k in reversed(range(len(self.steps))):
            h, ld = self.steps[k].inverse(h, ctx)
            ladj = ladj + ld
            if k in self.early_at:
                h = torch.cat([early.pop(), h], dim=1)
        return self.squeeze.inverse(h)[0][:, 0], ladj

    def inverse(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Noise → data in one parallel pass: ``z [B, T]``, ``c [B, C, T]`` → ``x [B, T]``."""
        return self.inverse_and_log_det(z, c)[0]

    def log_prob_from_cond(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``log p(x | c)`` of a continuous waveform, summed over samples: ``[B]``."""
        z, ladj = self.transform(x, c)
        return self.base_log_prob(z) + ladj

    def forward(self, x: torch.Tensor, mel: torch.Tensor, context: int = 0) -> torch.Tensor:
        """``log p(x | mel)`` ``[B]`` for ``x [B, T]`` and ``mel`` with ``context`` extra frames each side."""
        return self.log_prob_from_cond(x, self.condition(mel, context, x.shape[-1]))

    log_prob = forward

    @torch.no_grad()
    def synthesize(self, mel: torch.Tensor, seed: int | None = None, temperature: float = 1.0, offset: int = 0,
                   context: int = 0) -> torch.Tensor:
        """One parallel inverse pass with noise ``σ·z`` (``σ`` = ``temperature``), clamped to [−1, 1]."""
        T = (mel.shape[2] - 2 * context) * self.hop
        c = self.condition(mel, context, T)
        z = self.make_noise(mel.shape[0], T, seed, mel.device, c.dtype, offset=offset) * temperature
        return self.inverse(z, c).clamp(-1.0, 1.0)
