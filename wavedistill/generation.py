"""Cached autoregressive generation for the WaveNet teacher.

The cache is an explicit object: one ring buffer per layer holding that
layer's last ``(k-1)·d`` inputs.  A step reads the taps it needs by index and
overwrites one slot, so the cost per sample is O(layers), independent of the
receptive field and with no shifting copies.  Conditioning projections for all
layers are computed in blocks of many samples at once (one matrix product per
block), never one sample at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .layers import SQRT_HALF


@dataclass
class GenerationCache:
    """Per-layer ring buffers ``[(k-1)·d, B, R]`` and the current time step."""

    buffers: list[torch.Tensor] = field(default_factory=list)
    t: int = 0
    x_prev: torch.Tensor | None = None  # the last generated sample (input of the next step)

    @classmethod
    def empty(cls, sizes: list[int], batch: int, channels: int, dtype, device) -> "GenerationCache":
        return cls([torch.zeros(m, batch, channels, dtype=dtype, device=device) for m in sizes], 0)

    def reset(self) -> None:
        for b in self.buffers:
            b.zero_()
        self.t = 0
        self.x_prev = None


class CachedGenerator:
    """Runs a :class:`~wavedistill.teacher.Teacher` one sample at a time with linearised weights."""

    block = 1024  # samples per conditioning-projection block

    def __init__(self, teacher):
        net = teacher.net
        self.dist = teacher.dist
        self.k = net.kernel_size
        self.dilations = list(net.dilations)
        self.sizes = [(self.k - 1) * d for d in self.dilations]
        self.skip_scale = math.sqrt(1.0 / len(net.layers))
        p = next(teacher.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.w_in = net.input.weight[:, 0, 0].detach()  # [R]
        self.b_in = net.input.bias.detach()
        self.layers = []
        for layer in net.layers:
            w = layer.conv.weight.detach()  # [G, R, k]; tap j multiplies x[t-(k-1-j)d]
            w_taps = torch.cat([w[:, :, j].t() for j in range(self.k)], dim=0).contiguous()  # [k*R, G]
            if layer.res is not None:
                w_res, b_res = layer.res.weight[:, :, 0].t() * SQRT_HALF, layer.res.bias * SQRT_HALF
            else:  # last layer: its residual output is never read
                w_res = layer.skip.weight.new_zeros(layer.skip.in_channels, net.input.out_channels)
                b_res = layer.skip.bias.new_zeros(net.input.out_channels)
            w_out = torch.cat([w_res, layer.skip.weight[:, :, 0].t()], dim=1)
            b_out = torch.cat([b_res, layer.skip.bias])
            self.layers.append((w_taps, layer.conv.bias.detach(), w_out.detach().contiguous(), b_out.detach()))
        self.res_channels = net.input.out_channels
        self.w_cond = torch.cat([layer.cond.weight[:, :, 0] for layer in net.layers], dim=0).detach()  # [L*G, C]
        self.gate = net.layers[0].conv.out_channels
        self.h1w, self.h1b = net.head1.weight[:, :, 0].detach().t().contiguous(), net.head1.bias.detach()
        self.h2w, self.h2b = net.head2.weight[:, :, 0].detach().t().contiguous(), net.head2.bias.detach()

    def new_cache(self, batch: int) -> GenerationCache:
        return GenerationCache.empty(self.sizes, batch, self.res_channels, self.dtype, self.device)

    def cond_block(self, c: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``[stop-start, L, B, G]`` conditioning projections for a block of steps."""
        blk = torch.einsum("gc,bct->tbg", self.w_cond, c[:, :, start:stop])
        T, B, _ = blk.shape
        return blk.reshape(T, B, len(self.layers), self.gate).transpose(1, 2).contiguous()

    def step(self, x_prev: torch.Tensor, cond_t: torch.Tensor, cache: GenerationCache) -> torch.Tensor:
        """One step: ``x_prev [B]`` (the previous sample) → distribution params ``[B, P]``."""
        t = cache.t
        h = x_prev[:, None] * self.w_in + self.b_in  # [B, R]
        skip = None
        R = self.res_channels
        half = self.gate // 2
        for i, (w_taps, b_conv, w_out, b_out) in enumerate(self.layers):
            buf = cache.buffers[i]
            m = self.sizes[i]
            d = self.dilations[i]
            taps = [buf[(t - (self.k - 1 - j) * d) % m] for j in range(self.k - 1)]
            g = torch.addmm(b_conv, torch.cat(taps + [h], dim=1), w_taps) + cond_t[i]
            z = torch.tanh(g[:, :half]) * torch.sigmoid(g[:, half:])
            o = torch.addmm(b_out, z, w_out)
            buf[t % m] = h
            h = h * SQRT_HALF + o[:, :R]
            skip = o[:, R:] if skip is None else skip + o[:, R:]
        s = torch.relu(skip * self.skip_scale)
        s = torch.relu(torch.addmm(self.h1b, s, self.h1w))
        cache.t = t + 1
        return torch.addmm(self.h2b, s, self.h2w)

    @torch.no_grad()
    def run(self, c: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0, cache: GenerationCache | None = None,
            progress=None) -> torch.Tensor:
        B, _, T = c.shape
        cache = cache or self.new_cache(B)
        out = torch.zeros(B, T, dtype=self.dtype, device=self.device)
        x_prev = cache.x_prev if cache.x_prev is not None else torch.zeros(B, dtype=self.dtype, device=self.device)
        for start in range(0, T, self.block):
            stop = min(T, start + self.block)
            cb = self.cond_block(c, start, stop)
            for t in range(start, stop):
                params = self.step(x_prev, cb[t - start], cache)
                x_prev = self.dist.sample(params[:, :, None], noise[:, :, t : t + 1], temperature)[:, 0]
                out[:, t] = x_prev
            if progress is not None:
                progress(stop - start)
        cache.x_prev = x_prev
        return out
