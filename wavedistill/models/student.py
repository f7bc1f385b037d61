"""The parallel student: K IAF flows driven by logistic (or Gaussian) noise.

Composed affine IAFs stay affine per timestep::

    μ_tot ← μ_tot·s_k + μ_k,    log s_tot ← log s_tot + log s_k

so one parallel pass gives the waveform ``x`` together with ``μ_tot`` and
``log s_tot``, and ``x_t | z_<t ~ Logistic(μ_tot,t, s_tot,t)`` (Gaussian in the
ClariNet variant).  That is what the distillation losses need: the entropy in
closed form and fresh samples of ``x_t`` for the cross-entropy estimate.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import StudentConfig
from ..flows import FlowSequence, IAFLayer, upcast
from ..nn.wavenet import ConditionNet


class Student(nn.Module):
    kind = "student"

    def __init__(self, cfg: StudentConfig, n_mels: int):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)
        self.n_mels = n_mels
        self.distribution = cfg.distribution
        self.cond = ConditionNet(n_mels, cfg.cond_channels, cfg.upsample_scales)
        per_flow = cfg.init_log_scale / len(cfg.flow_layers)
        self.flow = FlowSequence(
            IAFLayer(n, s, cfg.kernel_size, cfg.residual_channels, cfg.gate_channels, cfg.cond_channels,
                     cfg.log_scale_bound, per_flow)
            for n, s in zip(cfg.flow_layers, cfg.stacks_per_flow)
        )

    @property
    def hop(self) -> int:
        return self.cond.hop

    @property
    def receptive_field(self) -> int:
        return sum(f.receptive_field - 1 for f in self.flow.flows) + 1

    # ------------------------------------------------------------------ noise
    def noise_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        if self.distribution == "logistic":
            u = u.clamp(1e-6, 1 - 1e-6)
            return torch.log(u) - torch.log1p(-u)
        return torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7))

    def make_noise(self, batch: int, length: int, seed: int | None = None, device=None, dtype=torch.float32,
                   offset: int = 0) -> torch.Tensor:
        """Base noise ``z [B, T]``; sample ``t`` depends only on ``(seed, offset + t)`` in blocks, so chunks agree."""
        g = torch.Generator(device="cpu")
        if seed is None:
            g.seed()
            u = torch.rand(batch, length, generator=g, dtype=torch.float64)
        else:
            u = _positional_uniform(int(seed), batch, offset, length)
        return self.noise_from_uniform(u).to(device=device, dtype=dtype)

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if self.distribution == "logistic":
            return -z - 2.0 * torch.nn.functional.softplus(-z)
        return -0.5 * z * z - 0.5 * math.log(2 * math.pi)

    # ------------------------------------------------------------------ parallel sampling
    def condition(self, mel: torch.Tensor, context: int = 0, length: int | None = None) -> torch.Tensor:
        c = self.cond(mel)
        if context:
            c = c[:, :, context * self.hop : context * self.hop + length]
        return c

    def transform(self, z: torch.Tensor, c: torch.Tensor):
        """Run the flows through the contract: ``(x, μ_tot, log s_tot)``, each ``[B, T]`` (float32 for the last two)."""
        return self.flow.affine(z, c)

    def forward(self, z: torch.Tensor, mel: torch.Tensor, context: int = 0):
        """``z [B, T]``, ``mel`` with ``context`` extra frames per side → ``(x, μ_tot, log s_tot)``."""
        return self.transform(z, self.condition(mel, context, z.shape[1]))

    def sample(self, mel: torch.Tensor, z: torch.Tensor | None = None, seed: int | None = None, context: int = 0):
        """One parallel pass: ``(x, μ_tot, log s_tot)`` for ``frames*hop`` samples (minus context)."""
        T = (mel.shape[2] - 2 * context) * self.hop
        if z is None:
            z = self.make_noise(mel.shape[0], T, seed, mel.device)
        return self(z, mel, context)

    def log_prob_of_sample(self, z: torch.Tensor, log_s_tot: torch.Tensor) -> torch.Tensor:
        """Exact per-sample log-density of the student's own sample ``x(z)``."""
        return self.base_log_prob(upcast(z)) - log_s_tot

    def log_prob(self, x: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """Log-density of any waveform (sequential inverse; slow, for tests and scoring)."""
        c = self.condition(mel)
        z, _ = self.flow.inverse(x, c)
        _, _, log_s_tot = self.flow.affine(z, c)
        return self.base_log_prob(z) - log_s_tot

    @torch.no_grad()
    def synthesize(self, mel: torch.Tensor, seed: int | None = None, temperature: float = 1.0, offset: int = 0,
                   context: int = 0) -> torch.Tensor:
        T = (mel.shape[2] - 2 * context) * self.hop
        z = self.make_noise(mel.shape[0], T, seed, mel.device, offset=offset) * temperature
        x, _, _ = self(z, mel, context)
        return x.clamp(-1.0, 1.0)


def _positional_uniform(seed: int, batch: int, offset: int, length: int, block: int = 4096) -> torch.Tensor:
    """Uniform noise where sample ``t`` is fixed by ``(seed, t)``: block ``b`` comes from generator ``seed·K + b``."""
    out = torch.empty(batch, length, dtype=torch.float64)
    first, last = offset // block, (offset + length - 1) // block if length else offset // block
    pos = 0
    for b in range(first, last + 1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        blk = torch.rand(batch, block, generator=g, dtype=torch.float64)
        lo = max(offset, b * block) - b * block
        hi = min(offset + length, (b + 1) * block) - b * block
        out[:, pos : pos + hi - lo] = blk[:, lo:hi]
        pos += hi - lo
    return out
