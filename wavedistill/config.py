"""Configuration: YAML files mapped onto dataclasses, with typed overrides.

A recipe config has up to seven sections (``features``, ``prepare``, ``teacher``,
``student``, ``train``, ``distill``, ``coupling``); each maps onto one dataclass below, and
every section is optional (defaults apply).  Unknown keys and wrong types are
:class:`~wavedistill.errors.UserError`.  Overrides are ``section.key=value``
strings whose value is parsed as YAML and checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import UserError


@dataclass
class FeatureConfig:
    """Waveform and log-mel parameters; recorded in every cache and checkpoint."""

    sample_rate: int = 8000
    n_fft: int = 512
    win_length: int = 320
    hop_length: int = 80
    n_mels: int = 64
    fmin: float = 40.0
    fmax: float = 4000.0
    log_floor: float = 1e-5

    def validate(self) -> None:
        _positive(self, "sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "log_floor")
        if self.win_length > self.n_fft:
            raise UserError(f"features.win_length ({self.win_length}) exceeds features.n_fft ({self.n_fft}); make it <= n_fft")
        if not (0 <= self.fmin < self.fmax <= self.sample_rate / 2):
            raise UserError(
                f"features.fmin/fmax ({self.fmin}, {self.fmax}) must satisfy 0 <= fmin < fmax <= sample_rate/2 ({self.sample_rate / 2})"
            )


@dataclass
class PrepareConfig:
    """How ``wavedistill prepare`` selects, trims and splits utterances."""

    trim_top_db: float = 40.0
    min_seconds: float = 0.3
    max_seconds: float = 60.0
    valid_fraction: float = 0.04
    test_fraction: float = 0.04
    seed: int = 1234

    def validate(self) -> None:
        _positive(self, "trim_top_db", "min_seconds", "max_seconds")
        for name in ("valid_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 0.5:
                raise UserError(f"prepare.{name}={v} is out of range; use a value in [0, 0.5)")


@dataclass
class TeacherConfig:
    """WaveNet teacher architecture (constructor arguments of :class:`Teacher`)."""

    layers: int = 20
    stacks: int = 2
    kernel_size: int = 2
    residual_channels: int = 64
    gate_channels: int = 128
    skip_channels: int = 64
    cond_channels: int = 64
    upsample_scales: list[int] = field(default_factory=list)  # [] = factor features.hop_length automatically
    n_speakers: int = 0
    speaker_channels: int = 16
    output: Literal["mol", "gaussian"] = "mol"
    mixtures: int = 10
    # log-scale floor: None = -16 for the mixture of logistics, -9 for the Gaussian (REFERENCE.md §3-4)
    log_scale_min: Optional[float] = None
    # Source-filter structure (REFERENCE.md §7; 0 disables): the output location is shifted by the
    # deterministic prediction from x_<t (pre-emphasis α·x_{t-1} and/or order-p LP from the mel).
    preemphasis: float = 0.0
    lpc_order: int = 0
    # Noise injection (LPCNet's teacher-forcing aid; training only, 0 disables): the teacher-forced input (the
    # history the network and the LP prediction read) gets Gaussian noise of this std in the mu-law (mu=255)
    # domain, the target stays clean, so the network learns to correct a history with errors in it, as its own
    # samples have.  Likelihoods, validation and generation never add noise.
    input_noise: float = 0.0

    def validate(self, features: FeatureConfig | None = None) -> None:
        _positive(self, "layers", "stacks", "residual_channels", "gate_channels", "skip_channels", "cond_channels", "mixtures")
        _check_source_filter(self, "teacher", features)
        if not 0.0 <= self.input_noise < 1.0:
            raise UserError(f"teacher.input_noise={self.input_noise} must be in [0, 1) (a std in the mu-law domain; "
                            f"e.g. 0.008, about one 8-bit mu-law step; 0 disables)")
        if self.kernel_size not in (2, 3):
            raise UserError(f"teacher.kernel_size={self.kernel_size} is not supported; use 2 or 3")
        if self.layers % self.stacks:
            raise UserError(f"teacher.layers ({self.layers}) must be a multiple of teacher.stacks ({self.stacks})")
        if self.gate_channels % 2:
            raise UserError(f"teacher.gate_channels ({self.gate_channels}) must be even")
        if self.n_speakers < 0:
            raise UserError("teacher.n_speakers must be >= 0")
        _check_scales(self, "teacher", features)
        if self.log_scale_min is None:
            self.log_scale_min = -16.0 if self.output == "mol" else -9.0


@dataclass
class StudentConfig:
    """IAF student architecture (constructor arguments of :class:`Student`)."""

    flow_layers: list[int] = field(default_factory=lambda: [10, 10, 10, 30])
    stacks_per_flow: list[int] = field(default_factory=lambda: [1, 1, 1, 3])
    kernel_size: int = 3
    residual_channels: int = 64
    gate_channels: int = 128
    cond_channels: int = 64
    upsample_scales: list[int] = field(default_factory=list)  # [] = factor features.hop_length automatically
    distribution: Literal["logistic", "gaussian"] = "logistic"
    log_scale_bound: float = 7.0
    init_log_scale: float = -3.0
    # Source-filter structure (0 disables): the IAFs make an excitation, LP synthesis of order lpc_order
    # (coefficients from the mel) and de-emphasis by preemphasis turn it into the waveform.
    preemphasis: float = 0.0
    lpc_order: int = 0

    def validate(self, features: FeatureConfig | None = None) -> None:
        _positive(self, "residual_channels", "gate_channels", "cond_channels", "log_scale_bound")
        _check_source_filter(self, "student", features)
        if not self.flow_layers or any(n <= 0 for n in self.flow_layers):
            raise UserError(f"student.flow_layers {self.flow_layers} must be a non-empty list of positive layer counts")
        if len(self.stacks_per_flow) != len(self.flow_layers):
            raise UserError("student.stacks_per_flow must have one entry per flow in student.flow_layers")
        for n, s in zip(self.flow_layers, self.stacks_per_flow):
            if s <= 0 or n % s:
                raise UserError(f"student flow with {n} layers cannot be split into {s} stacks; fix student.stacks_per_flow")
        if self.kernel_size not in (2, 3):
            raise UserError(f"student.kernel_size={self.kernel_size} is not supported; use 2 or 3")
        if self.gate_channels % 2:
            raise UserError(f"student.gate_channels ({self.gate_channels}) must be even")
        _check_scales(self, "student", features)


@dataclass
class CouplingConfig:
    """Coupling-flow vocoder, WaveGlow family (constructor arguments of :class:`CouplingVocoder`)."""

    group: int = 8
    steps: int = 6
    early_every: int = 3
    early_channels: int = 2
    layers: int = 4
    residual_channels: int = 32
    kernel_size: int = 3
    cond_channels: int = 32
    upsample_scales: list[int] = field(default_factory=list)  # [] = factor features.hop_length automatically
    clamp: float = 5.0

    def validate(self, features: FeatureConfig | None = None) -> None:
        _positive(self, "group", "steps", "layers", "residual_channels", "cond_channels", "clamp")
        if self.group < 2:
            raise UserError(f"coupling.group={self.group} must be >= 2 (a coupling splits the group's channels)")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise UserError(f"coupling.kernel_size={self.kernel_size} must be odd (the coupling net is centred)")
        if self.early_every < 0 or self.early_channels < 0:
            raise UserError("coupling.early_every and coupling.early_channels must be >= 0 (0 disables early outputs)")
        n_early = (self.steps - 1) // self.early_every if self.early_every and self.early_channels else 0
        if self.group - n_early * self.early_channels < 2:
            raise UserError(f"coupling: {n_early} early outputs of {self.early_channels} channels leave fewer than 2 of "
                            f"coupling.group={self.group} channels; lower early_channels or raise early_every")
        if features is not None and features.hop_length % self.group:
            raise UserError(f"features.hop_length ({features.hop_length}) must be a multiple of coupling.group ({self.group})")
        _check_scales(self, "coupling", features)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by teacher training and distillation."""

    batch_size: int = 4
    segment_samples: int = 8000
    lr: float = 1e-3
    warmup_steps: int = 200
    decay_steps: int = 200000
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    ema_decay: float = 0.999
    grad_accum: int = 1
    max_steps: int = 100000
    # stop (with a checkpoint) once the run has used this many CPU-seconds in total, across resumes;
    # 0 = no limit.  For ablations at equal CPU time.
    max_cpu_seconds: float = 0.0
    mixed_precision: Literal["no", "bf16"] = "no"
    # residual layers: fused Triton kernels on CUDA when available (auto), or forced (see wavedistill.kernels)
    kernels: Literal["auto", "reference", "triton"] = "auto"
    seed: int = 1234
    log_every: int = 10
    valid_every: int = 200
    valid_utterances: int = 8
    valid_segment_samples: int = 16000
    save_every: int = 200
    keep_checkpoints: int = 3
    sample_every: int = 1000
    sample_seconds: float = 0.5
    max_bad_steps: int = 20
    num_threads: int = 0
    # warm start: copy every weight whose name and shape match from this checkpoint (fresh runs only)
    init_from: Optional[str] = None

    def validate(self) -> None:
        _positive(
            self, "batch_size", "segment_samples", "lr", "grad_clip", "grad_accum", "max_steps", "log_every",
            "valid_every", "save_every", "keep_checkpoints", "sample_every", "max_bad_steps", "valid_utterances",
            "valid_segment_samples",
        )
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise UserError("train.warmup_steps and train.decay_steps must be >= 0")
        if not (self.max_cpu_seconds >= 0 and math.isfinite(self.max_cpu_seconds)):
            raise UserError(f"train.max_cpu_seconds={self.max_cpu_seconds} must be a finite number >= 0 (0 = no limit)")


@dataclass
class DistillConfig:
    """Loss weights and estimator settings for probability density distillation."""

    loss: Literal["parallel_wavenet", "clarinet"] = "parallel_wavenet"
    ce_samples: int = 16
    kl_weight: float = 1.0
    # steps trained on the STFT loss alone (no teacher pass) before the KL term joins; 0: KL from the start
    kl_start_step: int = 0
    stft_weight: float = 1.0
    stft_fft_sizes: list[int] = field(default_factory=lambda: [512, 256, 128])
    stft_hop_sizes: list[int] = field(default_factory=lambda: [128, 64, 32])
    stft_win_sizes: list[int] = field(default_factory=lambda: [512, 256, 128])
    # γ in KL(P_S(c1)‖P_T(c1)) − γ·KL(P_S(c1)‖P_T(c2)) with mismatched c2; the paper uses 0.3, 0 disables.
    contrastive_weight: float = 0.0
    clarinet_reg: float = 4.0
    student_log_scale_min: float = -7.0
    kl_clip_min: float = -100.0
    kl_clip_max: float = 10.0

    def validate(self) -> None:
        _positive(self, "ce_samples")
        if not (len(self.stft_fft_sizes) == len(self.stft_hop_sizes) == len(self.stft_win_sizes)):
            raise UserError("distill.stft_fft_sizes, stft_hop_sizes and stft_win_sizes must have the same length")
        for n, h, w in zip(self.stft_fft_sizes, self.stft_hop_sizes, self.stft_win_sizes):
            if n <= 0 or h <= 0 or w <= 0 or w > n:
                raise UserError(f"STFT resolution (fft={n}, hop={h}, win={w}) is invalid; need positive sizes and win <= fft")
        for name in ("kl_weight", "stft_weight", "contrastive_weight", "clarinet_reg", "kl_start_step"):
            if getattr(self, name) < 0:
                raise UserError(f"distill.{name} must be >= 0")


@dataclass
class Config:
    """A whole recipe config."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)

    def validate(self) -> "Config":
        self.features.validate()
        self.prepare.validate()
        self.teacher.validate(self.features)
        self.student.validate(self.features)
        self.train.validate()
        self.distill.validate()
        self.coupling.validate()  # the checks against features run where a coupling model is built
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- what each key means

# One line per key, shown by ``wavedistill config --show``; tests/test_everyday.py checks that every field has one.
KEY_DOCS: dict[str, str] = {
    "features.sample_rate": "audio sample rate in Hz (inputs are resampled to it)",
    "features.n_fft": "FFT size of the log-mel analysis",
    "features.win_length": "analysis window length in samples (<= n_fft)",
    "features.hop_length": "samples per mel frame (the upsampling factor of the conditioning)",
    "features.n_mels": "number of mel bands",
    "features.fmin": "lowest mel filter frequency in Hz",
    "features.fmax": "highest mel filter frequency in Hz (<= sample_rate/2)",
    "features.log_floor": "magnitude floor before the log (log-mel = log(max(mel, floor)))",
    "prepare.trim_top_db": "trim leading/trailing audio quieter than this many dB below the peak",
    "prepare.min_seconds": "skip utterances shorter than this after trimming",
    "prepare.max_seconds": "skip utterances longer than this",
    "prepare.valid_fraction": "fraction of utterances held out for validation",
    "prepare.test_fraction": "fraction of utterances held out for testing",
    "prepare.seed": "seed of the train/valid/test split",
    "teacher.layers": "residual layers of the WaveNet (a multiple of stacks)",
    "teacher.stacks": "dilation cycles; dilations restart at 1 in each stack",
    "teacher.kernel_size": "dilated convolution width (2 or 3)",
    "teacher.residual_channels": "channels of the residual stream",
    "teacher.gate_channels": "channels before the gated tanh*sigmoid unit (even)",
    "teacher.skip_channels": "channels of the skip connections summed into the output head",
    "teacher.cond_channels": "channels of the upsampled mel conditioning",
    "teacher.upsample_scales": "mel upsampling factors; their product must be hop_length ([] = derive)",
    "teacher.n_speakers": "speaker-embedding table size (0 = single speaker)",
    "teacher.speaker_channels": "speaker-embedding width",
    "teacher.output": "output distribution: mol (mixture of logistics) or gaussian (ClariNet)",
    "teacher.mixtures": "mixture components of the mol output",
    "teacher.log_scale_min": "floor of the output log-scale (null = -16 for mol, -9 for gaussian)",
    "student.flow_layers": "residual layers of each IAF flow",
    "student.stacks_per_flow": "dilation cycles of each flow (one entry per flow)",
    "student.kernel_size": "dilated convolution width (2 or 3)",
    "student.residual_channels": "channels of each flow's residual stream",
    "student.gate_channels": "channels before the gated unit (even)",
    "student.cond_channels": "channels of the upsampled mel conditioning",
    "student.upsample_scales": "mel upsampling factors; their product must be hop_length ([] = derive)",
    "student.distribution": "noise and output family: logistic (Parallel WaveNet) or gaussian (ClariNet)",
    "student.log_scale_bound": "soft bound b on each flow's log-scale (b*tanh(a/b))",
    "student.init_log_scale": "initial bias of each flow's log-scale head",
    "train.batch_size": "global batch (segments per step, over all processes)",
    "train.segment_samples": "audio samples per training segment",
    "train.lr": "peak learning rate (Adam)",
    "train.warmup_steps": "linear learning-rate warm-up steps",
    "train.decay_steps": "cosine-decay steps after warm-up",
    "train.min_lr_ratio": "final learning rate as a fraction of lr",
    "train.weight_decay": "Adam weight decay",
    "train.grad_clip": "gradient-norm clipping threshold",
    "train.ema_decay": "decay of the exponential moving average of the weights used for generation",
    "train.grad_accum": "micro-batches accumulated per optimizer step",
    "train.max_steps": "stop after this many optimizer steps (--max-steps overrides; remembered on resume)",
    "train.max_cpu_seconds": "stop (validated, checkpointed) once the run has used this much CPU time, summed over resumes; 0 = no limit",
    "teacher.preemphasis": "pre-emphasis coefficient α (y_t = x_t - α x_{t-1}) folded into the output's location shift; 0 disables",
    "teacher.lpc_order": "order of the linear predictor computed from the mel that shifts the output distribution; 0 disables",
    "teacher.input_noise": "training only: std of Gaussian noise added in the mu-law domain to the teacher-forced history "
                           "(LPCNet noise injection; the target stays clean); 0 disables",
    "student.preemphasis": "de-emphasis α applied after the IAF and LP synthesis flows (x_t = y_t + α x_{t-1}); 0 disables",
    "student.lpc_order": "order of the LP synthesis flow (from the mel) applied to the IAF's excitation; 0 disables",
    "train.mixed_precision": "no or bf16 autocast (densities and KL terms stay fp32)",
    "train.kernels": "residual layers: auto (Triton on CUDA when available), reference or triton",
    "train.seed": "seed of initialisation, batches and noise",
    "train.log_every": "steps between logged training scalars",
    "train.valid_every": "steps between validations",
    "train.valid_utterances": "validation utterances scored",
    "train.valid_segment_samples": "samples of each validation utterance scored",
    "train.save_every": "steps between checkpoints",
    "train.keep_checkpoints": "step checkpoints kept (latest and best are never pruned)",
    "train.sample_every": "steps between generated samples in TensorBoard and EXP/samples",
    "train.sample_seconds": "length of those samples in seconds (teacher)",
    "train.max_bad_steps": "stop after this many non-finite steps in a row",
    "train.num_threads": "torch CPU threads (0 = torch's default)",
    "train.init_from": "warm start: copy matching weights from this checkpoint (fresh runs only)",
    "distill.loss": "parallel_wavenet (Monte Carlo cross-entropy) or clarinet (closed-form Gaussian KL)",
    "distill.ce_samples": "teacher-scored draws per timestep in the cross-entropy estimate",
    "distill.kl_weight": "weight of the KL term",
    "distill.kl_start_step": "steps on the STFT loss alone (no teacher pass) before the KL term joins (0: from the start)",
    "distill.stft_weight": "weight of the multi-resolution STFT-magnitude loss",
    "distill.stft_fft_sizes": "FFT sizes of the STFT loss resolutions",
    "distill.stft_hop_sizes": "hop sizes of the STFT loss resolutions",
    "distill.stft_win_sizes": "window sizes of the STFT loss resolutions",
    "distill.contrastive_weight": "gamma of the contrastive term with mismatched conditioning (0 = off)",
    "distill.clarinet_reg": "lambda of ClariNet's log-scale regulariser",
    "distill.student_log_scale_min": "student log-scale clip before the KL",
    "distill.kl_clip_min": "lower clip of the per-step KL",
    "distill.kl_clip_max": "upper clip of the per-step KL",
    "coupling.group": "samples folded into channels by the squeeze (WaveGlow: 8); divides hop_length",
    "coupling.steps": "flow steps, each ActNorm -> invertible 1x1 conv -> affine coupling",
    "coupling.early_every": "output early_channels to the Gaussian after every this many steps (0 = no early outputs)",
    "coupling.early_channels": "channels sent to the base distribution at each early output",
    "coupling.layers": "layers of each coupling's non-causal WaveNet (dilations 1, 2, 4, ...)",
    "coupling.residual_channels": "channels of each coupling WaveNet's residual stream",
    "coupling.kernel_size": "width of the coupling WaveNet's centred dilated convolutions (odd)",
    "coupling.cond_channels": "channels of the upsampled mel conditioning (times group after the fold)",
    "coupling.upsample_scales": "mel upsampling factors; their product must be hop_length ([] = derive)",
    "coupling.clamp": "soft bound of the coupling log-scales (clamp*(2/pi)*atan(s/clamp))",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def describe_keys(cfg: "Config | None" = None) -> list[tuple[str, str, Any, str]]:
    """``(section.key, type, value, meaning)`` for every config key; values from ``cfg`` or the defaults (unvalidated)."""
    cfg = cfg if cfg is not None else Config()
    rows = []
    for section, cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            rows.append((key, _type_name(hints[f.name]), getattr(getattr(cfg, section), f.name), KEY_DOCS.get(key, "")))
    return rows


def format_keys(cfg: "Config | None" = None) -> str:
    """The ``wavedistill config --show`` table: one line per key, grouped by section."""
    rows = describe_keys(cfg)
    w_key = max(len(r[0]) for r in rows)
    w_val = max(len(f"{r[2]!s}") for r in rows) if rows else 0
    w_type = max(len(r[1]) for r in rows)
    lines, last = [], None
    for key, tname, value, meaning in rows:
        section = key.split(".")[0]
        if section != last:
            lines.append(("" if last is None else "\n") + f"{section}:")
            last = section
        shown = "null" if value is None else str(value)
        lines.append(f"  {key:<{w_key}}  {shown:<{w_val}}  {tname:<{w_type}}  {meaning}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- parsing


def _positive(obj: Any, *names: str) -> None:
    section = _SECTION_OF.get(type(obj), type(obj).__name__)
    for name in names:
        v = getattr(obj, name)
        if v <= 0:
            raise UserError(f"{section}.{name}={v} must be positive")


_SECTION_OF = {
    FeatureConfig: "features",
    PrepareConfig: "prepare",
    TeacherConfig: "teacher",
    StudentConfig: "student",
    TrainConfig: "train",
    DistillConfig: "distill",
    CouplingConfig: "coupling",
}


def auto_upsample_scales(hop: int) -> list[int]:
    """Factor ``hop`` into as few balanced scales of about 8 or less as possible (80 → [4, 4, 5], 256 → [4, 8, 8])."""
    primes, n, p = [], hop, 2
    while n > 1:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if not primes:
        return [1]
    scales = [1] * max(1, math.ceil(math.log(hop) / math.log(8) - 1e-9))
    for q in sorted(primes, reverse=True):
        i = min(range(len(scales)), key=lambda j: scales[j])
        if scales[i] * q <= max(8, q):
            scales[i] *= q
        else:
            scales.append(q)
    return sorted(s for s in scales if s > 1) or [1]


def _check_source_filter(cfg, name: str, features: FeatureConfig | None) -> None:
    if not (isinstance(cfg.preemphasis, (int, float)) and 0.0 <= cfg.preemphasis < 1.0):
        raise UserError(f"{name}.preemphasis={cfg.preemphasis!r} must be a number in [0, 1) (0 disables)")
    if not isinstance(cfg.lpc_order, int) or isinstance(cfg.lpc_order, bool) or not 0 <= cfg.lpc_order <= 64:
        raise UserError(f"{name}.lpc_order={cfg.lpc_order!r} must be an integer in [0, 64] (0 disables)")
    if features is not None and cfg.lpc_order >= features.n_fft // 2:
        raise UserError(f"{name}.lpc_order={cfg.lpc_order} must be below features.n_fft/2 ({features.n_fft // 2})")


def _check_scales(section: Any, name: str, features: "FeatureConfig | None") -> None:
    if any(s <= 0 for s in section.upsample_scales):
        raise UserError(f"{name}.upsample_scales {section.upsample_scales} must all be positive")
    if features is None:
        return
    if not section.upsample_scales:
        section.upsample_scales = auto_upsample_scales(features.hop_length)
    if math.prod(section.upsample_scales) != features.hop_length:
        raise UserError(
            f"the product of {name}.upsample_scales {section.upsample_scales} must equal features.hop_length "
            f"({features.hop_length}); fix one of them or leave upsample_scales empty to derive it"
        )


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise a one-line UserError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(a, str) for a in allowed):
            # YAML 1.1 reads no/off/yes/on as booleans: map them back onto the allowed words
            words = ("yes", "true", "on") if value else ("no", "false", "off")
            value = next((a for a in allowed if a in words), value)
        if value not in allowed:
            raise UserError(f"{where}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{where}={value!r} must be a list, e.g. [1, 2]")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise UserError(f"{where}={value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}={value!r} must be a number")
        try:
            value = float(value)
        except OverflowError:
            raise UserError(f"{where}={value!r} must be finite") from None
        if not math.isfinite(value):
            raise UserError(f"{where}={value!r} must be finite")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section '{where}' must be a mapping of key: value, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise UserError(f"unknown config key '{where}.{unknown[0]}'{did_you_mean(unknown[0], names, where)}; "
                        f"valid keys in '{where}': {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = _check_type(value, tp, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def config_from_dict(data: Any) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("a config file must be a YAML mapping with sections such as 'features:' and 'teacher:'")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(map(str, data)) - set(hints))
    if unknown:
        raise UserError(f"unknown config section '{unknown[0]}'{did_you_mean(unknown[0], hints)}; valid sections: {', '.join(hints)}")
    return Config(**{k: _build(hints[k], v, k) for k, v in data.items()})


def did_you_mean(word: str, choices, section: str | None = None) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``word``, or ``""``."""
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean '{section}.{close[0]}'?)" if section else f" (did you mean '{close[0]}'?)"


class DuplicateKeyError(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a mapping that repeats a key is an error (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise DuplicateKeyError(f"key '{key}' appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a YAML file such as recipes/demo/conf/teacher.yaml")
    try:
        loader = UniqueKeyLoader(path.read_text(encoding="utf-8"))  # a SafeLoader: plain data only, never objects
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except DuplicateKeyError as e:
        raise UserError(f"config file {path}: {e}; keep one of them") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"config file {path} is not valid YAML ({first}); fix the syntax") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config mapping (checked later)."""
    data = dict(data or {})
    hints = typing.get_type_hints(Config)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form section.key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"override key '{key}' must be section.key (e.g. teacher.layers=10)")
        section, name = parts
        if section not in hints:
            raise UserError(f"unknown config section '{section}' in override '{item}'{did_you_mean(section, hints)}; "
                            f"valid sections: {', '.join(hints)}")
        fields_ = {f.name for f in dataclasses.fields(hints[section])}
        if name not in fields_:
            raise UserError(f"unknown config key '{section}.{name}' in override{did_you_mean(name, fields_, section)}; "
                            f"valid keys: {', '.join(sorted(fields_))}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        sec = dict(data.get(section) or {})
        sec[name] = value
        data[section] = sec
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data = read_yaml(path) if path is not None else {}
    if data is not None and not isinstance(data, dict):
        raise UserError(f"config file {path} must be a YAML mapping with sections such as 'features:' and 'teacher:'")
    data = apply_overrides(data or {}, overrides or [])
    return config_from_dict(data).validate()


def section_from_dict(cls: type, data: Any, where: str) -> Any:
    """Build one section dataclass from a mapping (used for checkpoints)."""
    return _build(cls, data, where)
