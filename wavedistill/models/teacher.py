"""The WaveNet teacher: parallel likelihood and autoregressive generation.

``teacher.log_prob(audio, mel)`` scores a whole utterance in one parallel pass
(teacher forcing: the input is the waveform shifted right by one sample).
``teacher.generate(mel)`` samples autoregressively with per-layer ring-buffer
queues (:mod:`wavedistill.generation`); ``teacher.generate_naive(mel)``
recomputes the receptive field at every step and is kept as the reference.

Source-filter structure (``lpc_order``/``preemphasis`` > 0, REFERENCE.md §7): the output distribution's
location is shifted by the deterministic prediction ``x̂_t = Σ_k b_k(t)·x_{t-1-k}`` of the combined
pre-emphasis + LP predictor from the mel (:class:`~wavedistill.models.source_filter.SourceFilter`), computed
from the teacher-forced input, so ``log_prob`` stays one parallel pass.  The network still reads ``x`` (not the
pre-emphasised signal) and is scored on ``x``'s 16-bit codes: with unit Jacobian the shifted distribution is
exactly the excitation's distribution moved to ``x``'s grid, so the discrete NLL is an honest NLL of ``x`` and
bits/sample compare with a plain teacher's.  Generation adds the prediction from its own history.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FeatureConfig, TeacherConfig
from ..flows import lp_prediction
from .source_filter import make_source_filter
from ..nn.distributions import make_distribution, quantize
from ..nn.wavenet import ConditionNet, WaveNet


class Teacher(nn.Module):
    kind = "teacher"

    def __init__(self, cfg: TeacherConfig, n_mels: int, features: FeatureConfig | None = None):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)
        self.n_mels = n_mels
        self.dist = make_distribution(cfg.output, cfg.mixtures, cfg.log_scale_min)
        self.cond = ConditionNet(n_mels, cfg.cond_channels, cfg.upsample_scales, cfg.n_speakers, cfg.speaker_channels)
        self.net = WaveNet(
            1, self.dist.n_params, cfg.layers, cfg.stacks, cfg.kernel_size, cfg.residual_channels,
            cfg.gate_channels, cfg.skip_channels, cfg.cond_channels,
        )
        self.source = make_source_filter(cfg, features)  # None unless lpc_order/preemphasis; no parameters

    # ------------------------------------------------------------------ parallel
    @property
    def hop(self) -> int:
        return self.cond.hop

    @property
    def receptive_field(self) -> int:
        return self.net.receptive_field

    def condition(self, mel: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        return self.cond(mel, speaker)

    def params_from_cond(self, audio: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Distribution parameters ``[B, P, T]`` for every sample, given ``x_<t`` (teacher forcing)."""
        x_in = F.pad(audio[:, :-1], (1, 0)).unsqueeze(1)
        return self.net(x_in.to(c.dtype), c)

    def forward(self, audio: torch.Tensor, mel: torch.Tensor, speaker: torch.Tensor | None = None, context: int = 0) -> torch.Tensor:
        """Parameters for every sample of ``audio [B, T]``; ``mel`` may carry ``context`` extra frames per side."""
        if self.net.trains_fused(audio, mel.shape[2]):  # training on a CPU: conditioning projected per frame (same maths)
            c = self.cond.banded(mel, context, audio.shape[1], speaker)
        else:
            c = self.condition(mel, speaker)
            if context:
                c = c[:, :, context * self.hop : context * self.hop + audio.shape[1]]
        params = self.params_from_cond(audio, c)  # WaveNet.forward takes either form of c
        if self.source is not None:
            params = self.dist.shift(params, self.prediction(audio, mel, context))
        return params

    def prediction(self, audio: torch.Tensor, mel: torch.Tensor, context: int = 0) -> torch.Tensor:
        """Source-filter prediction ``x̂_t`` from ``audio``'s past ``[B, T]`` (float32; zeros before ``t = 0``)."""
        x = audio.float() if audio.dtype != torch.float64 else audio
        lp = self.source.predictor(mel, context, x.dtype)
        return lp_prediction(x, lp.a, lp.hop, lp.start)

    def log_prob(self, audio: torch.Tensor, mel: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """Discretized 16-bit log-likelihood per sample ``[B, T]`` (nats), in one parallel pass."""
        x = quantize(audio.float())
        params = self.forward(x, mel, speaker)
        return self.dist.log_prob_discrete(params, x)

    def log_density(self, audio: torch.Tensor, mel: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous log-density per sample ``[B, T]`` (for scoring student samples)."""
        return self.dist.log_density(self.forward(audio, mel, speaker), audio)

    # ------------------------------------------------------------------ sampling
    def make_noise(self, batch: int, length: int, seed: int | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        g = torch.Generator(device="cpu")
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        return torch.rand(batch, self.dist.n_noise, length, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    @torch.no_grad()
    def generate(self, mel: torch.Tensor, *, noise: torch.Tensor | None = None, seed: int | None = None,
                 temperature: float = 1.0, speaker: torch.Tensor | None = None, progress=None,
                 fast: bool | None = None) -> torch.Tensor:
        """Autoregressive sampling with cached per-layer queues; returns ``[B, frames*hop]``.

        The conditioning projections of all layers are computed at frame rate and upsampled in
        blocks (:class:`wavedistill.generation.FrameConditioning`), never per sample.

        ``fast=None`` uses a compiled generator when one runs here — the persistent Triton kernel
        (:mod:`wavedistill.kernels.ar_triton`) for a float32 CUDA teacher unless
        ``WAVEDISTILL_KERNELS=reference``, the C++ one (:mod:`wavedistill.fastgen`) for a float32 CPU
        teacher — else the Python one; ``True`` requires it; ``False`` forces Python
        (see :func:`wavedistill.generation.select.make_generator`).
        """
        from ..generation.select import make_generator
        from ..generation.cached import FrameConditioning

        c = FrameConditioning.from_mel(self.cond, mel, speaker)  # projected per layer at frame rate, then upsampled
        if noise is None:
            noise = self.make_noise(c.shape[0], c.shape[2], seed, c.device, c.dtype)
        gen = make_generator(self, fast=fast)
        if self.source is None:
            return gen.run(c, noise, temperature=temperature, progress=progress)
        return gen.run(c, noise, temperature=temperature, progress=progress, lpc=self.source.predictor(mel))

    @torch.no_grad()
    def generate_naive(self, mel: torch.Tensor, *, noise: torch.Tensor | None = None, seed: int | None = None,
                       temperature: float = 1.0, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """Reference sampler: recomputes the receptive field for every sample."""
        c = self.condition(mel, speaker)
        B, _, T = c.shape
        if noise is None:
            noise = self.make_noise(B, T, seed, c.device, c.dtype)
        rf = self.receptive_field
        x_in = torch.zeros(B, 1, T + 1, dtype=c.dtype, device=c.device)  # x_in[:, :, t] = x[t-1]
        out = torch.zeros(B, T, dtype=c.dtype, device=c.device)
        coef = self.source.predictor(mel).per_sample(T, B, torch.float32) if self.source is not None else None
        for t in range(T):
            lo = max(0, t + 1 - rf)
            params = self.net(x_in[:, :, lo : t + 1], c[:, :, lo : t + 1])[:, :, -1:]
            if coef is not None:  # x̂_t = Σ_k b_k x_{t-1-k} from the samples generated so far
                past = out[:, max(0, t - coef.shape[2]) : t].flip(1).float()
                params = self.dist.shift(params, (coef[:, t, : past.shape[1]] * past).sum(1, keepdim=True))
            x_t = self.dist.sample(params, noise[:, :, t : t + 1], temperature)[:, 0]
            out[:, t] = x_t
            x_in[:, 0, t + 1] = x_t
        return out
