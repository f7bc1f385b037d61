"""The parallel student: K IAF flows driven by logistic (or Gaussian) noise.

Composed affine IAFs stay affine per timestep::

    μ_tot ← μ_tot·s_k + μ_k,    log s_tot ← log s_tot + log s_k

so one parallel pass gives the waveform ``x`` together with ``μ_tot`` and
``log s_tot``, and ``x_t | z_<t ~ Logistic(μ_tot,t, s_tot,t)`` (Gaussian in the
ClariNet variant).  That is what the distillation losses need: the entropy in
closed form and fresh samples of ``x_t`` for the cross-entropy estimate.

Source-filter students (``lpc_order``/``preemphasis`` > 0, REFERENCE.md §7): the IAFs make an excitation
``e``, and :class:`~wavedistill.flows.LPSynthesis` (coefficients from the mel) and
:class:`~wavedistill.flows.Deemphasis` — affine autoregressive flows with ``log s = 0`` appended to the same
FlowSequence — turn it into ``x``.  Then ``x_t | z_<t ~ Logistic(μ_tot,t + x̂_t, s_tot,t)`` and the losses read
``(x, μ_tot, log s_tot)`` unchanged.  The flows' context is a
:class:`~wavedistill.flows.SourceFilterContext` (conditioning for the IAFs, LP coefficients for the filter).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import FeatureConfig, StudentConfig
from ..flows import Deemphasis, FlowSequence, IAFLayer, LPSynthesis, SourceFilterContext, upcast
from ..nn.wavenet import ConditionNet
from .source_filter import make_source_filter


class Student(nn.Module):
    kind = "student"

    def __init__(self, cfg: StudentConfig, n_mels: int, features: FeatureConfig | None = None):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)
        self.n_mels = n_mels
        self.distribution = cfg.distribution
        self.cond = ConditionNet(n_mels, cfg.cond_channels, cfg.upsample_scales)
        per_flow = cfg.init_log_scale / len(cfg.flow_layers)
        iafs = [
            IAFLayer(n, s, cfg.kernel_size, cfg.residual_channels, cfg.gate_channels, cfg.cond_channels,
                     cfg.log_scale_bound, per_flow)
            for n, s in zip(cfg.flow_layers, cfg.stacks_per_flow)
        ]
        self.source = make_source_filter(cfg, features)  # None unless lpc_order/preemphasis; no parameters
        filters = ([LPSynthesis()] if cfg.lpc_order else []) + ([Deemphasis(cfg.preemphasis)] if cfg.preemphasis else [])
        self.flow = FlowSequence(iafs + filters)  # the filter flows have no parameters: same state dict
        self.n_iaf = len(iafs)

    @property
    def hop(self) -> int:
        return self.cond.hop

    @property
    def receptive_field(self) -> int:
        return sum(f.receptive_field - 1 for f in self.flow.flows[: self.n_iaf]) + 1

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

    def flow_context(self, c: torch.Tensor, mel: torch.Tensor | None = None, context: int = 0):
        """What the flows read: ``c`` itself, or a :class:`SourceFilterContext` with the LP coefficients of ``mel``
        (whose first ``context`` frames lie before sample 0)."""
        if self.source is None:
            return c
        if mel is None:
            raise ValueError("a source-filter student needs the mel for its LP coefficients")
        dtype = torch.float32 if c.dtype in (torch.float16, torch.bfloat16) else c.dtype
        return SourceFilterContext(c, self.source.lpc(mel, context, dtype))

    def transform(self, z: torch.Tensor, c, mel: torch.Tensor | None = None, context: int = 0):
        """Run the flows through the contract: ``(x, μ_tot, log s_tot)``, each ``[B, T]`` (float32 for the last two).

        ``c``: the conditioning, or a ready flow context; ``mel``/``context``: see :meth:`flow_context`."""
        if not isinstance(c, SourceFilterContext):
            c = self.flow_context(c, mel, context)
        return self.flow.affine(z, c)

    def forward(self, z: torch.Tensor, mel: torch.Tensor, context: int = 0):
        """``z [B, T]``, ``mel`` with ``context`` extra frames per side → ``(x, μ_tot, log s_tot)``.

        Training on a CPU, the conditioning stays at frame rate (:class:`~wavedistill.nn.wavenet.BandedConditioning`)
        and each flow projects it per frame: the same maths, a quarter fewer FLOPs."""
        if self.flow.flows[0].net.trains_fused(z, mel.shape[2]):  # the flows are IAFs first, then parameter-free filters
            return self.transform(z, self.cond.banded(mel, context, z.shape[1]), mel, context)
        return self.transform(z, self.condition(mel, context, z.shape[1]), mel, context)

    def transform_chunk(self, z: torch.Tensor, c: torch.Tensor, mels: list[torch.Tensor], skip: int,
                        lengths: list[int], states: list | None):
        """Seamless chunked synthesis for source-filter students (:class:`~wavedistill.inference.synthesis.Vocoder`).

        ``z, c [B, skip + n]``: the IAFs run over all of it (``skip`` leading samples are their history and
        are dropped); the filter flows run on the last ``n`` samples from ``states`` (what the previous chunk
        left, ``None`` at the start), so chunks equal one pass up to rounding.  ``mels[i] [n_mels, F_i]``: the
        frames of row ``i``'s output, frame 0 centred at its first sample, plus one more frame when the
        utterance goes on; ``lengths[i]``: valid output samples of row ``i``.
        Returns ``(x [B, n], new_states)``.
        """
        e, _, _ = FlowSequence(self.flow.flows[: self.n_iaf]).affine(z, c)
        e = e[:, skip:]
        B, n = e.shape
        frames = -(-n // self.hop) + 1
        mel = torch.stack([torch.nn.functional.pad(m[None], (0, frames - m.shape[1]), mode="replicate")[0]
                           if m.shape[1] < frames else m[:, :frames] for m in mels])
        lpc = self.source.lpc(mel, 0, e.dtype)
        p = self.source.lpc_order
        hist_lp = torch.stack([s[0] for s in states]) if states and p else (e.new_zeros(B, p) if p else None)
        hist_em = torch.stack([s[1] for s in states]) if states and self.source.preemphasis else (
            e.new_zeros(B, 1) if self.source.preemphasis else None)
        s = e
        if lpc is not None:
            lpc.history = hist_lp
            s, _, _ = self.flow.flows[self.n_iaf].affine(e, lpc)
        x = s
        if self.source.preemphasis:
            x, _, _ = self.flow.flows[-1].affine(s, SourceFilterContext(None, None, hist_em))

        def tail(sig, prev, k, i, m):  # the last k samples before position m, most recent first
            full = torch.cat([prev[i].flip(0), sig[i, :m]]) if prev is not None else sig[i, :m]
            return full[-k:].flip(0) if k else sig.new_zeros(0)

        new_states = [(tail(s, hist_lp, p, i, lengths[i]), tail(x, hist_em, 1 if self.source.preemphasis else 0, i, lengths[i]))
                      for i in range(B)]
        return x, new_states

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
        c = self.flow_context(self.condition(mel), mel)
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
