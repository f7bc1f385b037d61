"""Training throughput: the teacher step and the distillation step, timed by phase, with counted FLOPs.

Each step is built here from the models, the losses and the optimizer exactly as the training loops
(:mod:`wavedistill.train`) run one step with ``grad_accum=1`` and ``mixed_precision=no`` on one process:
``zero_grad(set_to_none)`` → forward and loss → ``loss.backward()`` → the finite check on the loss →
``clip_grad_norm_(grad_clip)`` and its finite check → ``Adam.step()`` → ``LambdaLR.step()`` →
``EMA.update``.  The ``.item()`` reads of the logged terms are part of the step, as in the loops.
Not timed: drawing the segments from the corpus (synthetic audio and mels of the training shape stand in:
the cost of a step does not depend on the values) and the logging, validation and checkpointing.

Phases (wall clock, ``time.perf_counter``; CPU ops are synchronous, CUDA is synchronised at each mark):

* teacher step: ``forward`` (conditioning, WaveNet, discretized NLL), ``backward: loss`` (autograd down
  to the network output), ``backward: network`` (the rest of backward), ``optimizer`` (clip, Adam, LR,
  EMA);
* distillation step: ``noise`` (the step's uniform draw → logistic noise), ``student pass``,
  ``teacher pass``, ``losses`` (the rest of the loss call: Monte-Carlo cross-entropy, entropy, STFT,
  ``.item()``), ``backward: losses+teacher`` (autograd until the gradient of the student's waveform is
  complete: the loss terms and the teacher's input gradient), ``backward: student`` (the rest),
  ``optimizer``.

The two passes are timed with forward hooks on the student and teacher modules, the backward split with
a tensor hook on the network output (teacher) or on the student's waveform (distillation); so the real
:class:`~wavedistill.train.losses.DistillationLoss` is timed, not a copy.

Wall time is the measure; the process's CPU time per step is reported beside it (``samples_per_cpu_second``):
on a machine shared with other jobs, a one-thread step's CPU time is what its wall time would be on an idle
core (less the cache and memory-bandwidth contention), so old/new comparisons there read it first.  With
several threads it also counts OpenMP threads spinning at barriers.

FLOPs per sample are counted with :class:`torch.utils.flop_counter.FlopCounterMode` over one whole
forward+backward (matmuls and convolutions; elementwise work is not counted) and divided by the samples
in the batch; GFLOP/s = FLOPs per step / median step time; the fraction is against a 2048² float32
matmul timed in the same run.

This module imports the package by absolute name (``wavedistill.…``) so that ``benchmarks/train_speed.py``
can load this very file against an older checkout of the package (side-by-side comparisons).
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager

import torch

import wavedistill
from wavedistill.checkpoint import load_model
from wavedistill.config import load_config
from wavedistill.eval.bench import peak_gflops
from wavedistill.models.student import Student
from wavedistill.models.teacher import Teacher
from wavedistill.nn.distributions import quantize
from wavedistill.train.losses import DistillationLoss
from wavedistill.train.state import EMA, lr_lambda

LN2 = math.log(2.0)
STEPS = ("teacher", "distill")


class PhaseClock:
    """Named wall-clock marks within one step; ``phases()`` gives the seconds between consecutive marks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((name, time.perf_counter()))

    def phases(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (_, t0), (name, t1) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + (t1 - t0)
        return out


@contextmanager
def _module_marks(clock_ref: list, module: torch.nn.Module, start: str, end: str):
    """Mark ``start`` just before ``module``'s forward and ``end`` just after it (while ``clock_ref[0]`` is set)."""
    def pre(*_):
        if clock_ref[0] is not None:
            clock_ref[0].mark(start)

    def post(*_):
        if clock_ref[0] is not None:
            clock_ref[0].mark(end)

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def synthetic_batch(features, batch: int, segment: int, hop: int, context: int, seed: int, device):
    """Audio ``[B, T]`` on the 16-bit grid (a few harmonics plus noise) and a log-mel with ``context`` frames per side."""
    g = torch.Generator().manual_seed(seed)
    frames = max(1, segment // hop)
    T = frames * hop
    t = torch.arange(T, dtype=torch.float64) / features.sample_rate
    f0 = 100.0 + 150.0 * torch.rand(batch, 1, generator=g, dtype=torch.float64)
    audio = sum(0.2 / k * torch.sin(2 * math.pi * k * f0 * t) for k in range(1, 5))
    audio = audio + 0.01 * torch.randn(batch, T, generator=g, dtype=torch.float64)
    mel = torch.randn(batch, features.n_mels, frames + 2 * context, generator=g) - 4.0
    return quantize(audio.float().clamp(-1, 1)).to(device), mel.to(device)


def _build(cls, model_cfg, features):
    """``cls(model_cfg, n_mels[, features])``: the feature parameters only for source-filter models, so the
    harness also drives older checkouts of the package (``--compare``), whose models take two arguments."""
    if getattr(model_cfg, "lpc_order", 0) or getattr(model_cfg, "preemphasis", 0.0):
        return cls(model_cfg, features.n_mels, features)
    return cls(model_cfg, features.n_mels)


class _Step:
    """One training step of a model with Adam, LambdaLR and EMA, as the loops run it."""

    kind: str

    def __init__(self, model, tc, device):
        self.model, self.tc, self.device = model, tc, device
        self.ema = EMA(model, tc.ema_decay)
        self.opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tc))
        self.step_no = 0
        self.clock_ref: list = [None]

    def loss(self, clock: PhaseClock):  # -> (loss tensor, tensor whose gradient splits backward)
        raise NotImplementedError

    def run(self, clock: PhaseClock | None = None) -> float:
        clock = clock or PhaseClock(self.device)
        self.clock_ref[0] = clock
        try:
            clock.mark("start")
            self.opt.zero_grad(set_to_none=True)
            loss, split_at, split_name = self.loss(clock)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{self.kind} benchmark step: loss not finite")
            split_at.register_hook(lambda g: clock.mark(split_name) or g)
            loss.backward()
            clock.mark(self.backward_rest)
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
            if not bool(torch.isfinite(torch.as_tensor(gnorm))):
                raise RuntimeError(f"{self.kind} benchmark step: gradient not finite")
            self.opt.step()
            self.sched.step()
            self.step_no += 1
            self.ema.update(self.model, self.step_no)
            clock.mark("optimizer")
        finally:
            self.clock_ref[0] = None
        return float(loss.detach())


class TeacherStep(_Step):
    kind = "teacher"
    backward_rest = "backward: network"

    def __init__(self, cfg, batch: int, segment: int, device, seed: int = 0):
        torch.manual_seed(cfg.train.seed)
        model = _build(Teacher, cfg.teacher, cfg.features).to(device)
        super().__init__(model, cfg.train, device)
        self.context = model.cond.frame_context
        self.audio, self.mel = synthetic_batch(cfg.features, batch, segment, model.hop, self.context, seed, device)
        self.samples = self.audio.numel()

    def loss(self, clock):
        with _module_marks(self.clock_ref, self.model, "zero_grad", "forward: network"):
            x = quantize(self.audio.float())
            params = self.model(x, self.mel, None, self.context)
            loss = -self.model.dist.log_prob_discrete(params, x).mean() / LN2
            loss.item()  # the loop reads it for the log
        clock.mark("forward: loss")
        return loss, params, "backward: loss"


class DistillStep(_Step):
    kind = "distill"
    backward_rest = "backward: student"

    def __init__(self, cfg, teacher, batch: int, segment: int, device, seed: int = 0):
        torch.manual_seed(cfg.train.seed)
        student = _build(Student, cfg.student, cfg.features).to(device)
        super().__init__(student, cfg.train, device)
        self.teacher = teacher
        self.context = max(student.cond.frame_context, teacher.cond.frame_context)
        self.audio, self.mel = synthetic_batch(cfg.features, batch, segment, student.hop, self.context, seed, device)
        self.samples = self.audio.numel()
        self.loss_fn = DistillationLoss(cfg.distill, teacher, student)
        self.seed = cfg.train.seed

    def loss(self, clock):
        B, T = self.audio.shape
        g = torch.Generator().manual_seed((self.seed * 7_919 + self.step_no) * 131 + 17)  # as the loop's per-step generator
        u = torch.rand((B, T), generator=g, dtype=torch.float64)
        z = self.model.noise_from_uniform(u).float().to(self.device)
        clock.mark("noise")
        with _module_marks(self.clock_ref, self.model, "noise", "student pass"), \
                _module_marks(self.clock_ref, self.teacher, "losses", "teacher pass"):
            total, _, x = self.loss_fn(z, self.audio, self.mel, self.context, g, (0, B))
        clock.mark("losses")
        return total, x, "backward: losses+teacher"


def load_frozen_teacher(path, device):
    teacher, _, _ = load_model(path, kind="teacher", device=device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def flops_per_sample(step: _Step, mode: str = "reference") -> float:
    """Counted FLOPs of one forward+backward (and the unflopped optimizer) divided by the batch's samples.

    ``mode="reference"`` (the figure GFLOP/s and the fraction of peak use): the plain PyTorch layers with the
    conditioning upsampled before its projections — the work of the maths as written, the same for every
    implementation, so rates compare.  ``mode="auto"``: what the default path executes (on a CPU the fused
    stack projects the conditioning per frame, a quarter fewer FLOPs; Triton kernels are not ATen ops the
    counter sees).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from wavedistill import kernels

    with kernels.use_mode(mode), FlopCounterMode(display=False) as counter:
        step.run()
    return counter.get_total_flops() / step.samples


def bench_step(step: _Step, repeats: int, warmup: int, peak: float, threads: int) -> dict:
    """Median step time over ``repeats`` (after ``warmup`` steps), phases as medians of their own."""
    torch.set_num_threads(threads)
    for _ in range(warmup):
        step.run()
    times, cpu_times, phases = [], [], []
    for _ in range(repeats):
        clock = PhaseClock(step.device)
        cpu0 = time.process_time()
        step.run(clock)
        cpu_times.append(time.process_time() - cpu0)
        times.append(clock.marks[-1][1] - clock.marks[0][1])
        phases.append(clock.phases())
    med = statistics.median(times)
    cpu = statistics.median(cpu_times)
    flops = flops_per_sample(step)
    names = list(phases[0])
    return {
        "step": step.kind,
        "threads": threads,
        "batch": list(step.audio.shape),
        "seconds_per_step": med,
        "seconds_all": times,
        "samples_per_second": step.samples / med,
        "cpu_seconds_per_step": cpu,
        "samples_per_cpu_second": step.samples / cpu,
        "flops_per_sample": flops,
        "flops_per_sample_executed": flops_per_sample(step, "auto"),
        "gflops_per_second": flops * step.samples / med / 1e9,
        "fraction_of_peak": flops * step.samples / med / 1e9 / peak,
        "phases_seconds": {n: statistics.median(p.get(n, 0.0) for p in phases) for n in names},
    }


def build_step(kind: str, config, teacher_path, batch: int | None, segment: int | None, device, overrides=None):
    cfg = load_config(config, overrides or [])
    batch = batch or cfg.train.batch_size
    segment = segment or cfg.train.segment_samples
    if kind == "teacher":
        return TeacherStep(cfg, batch, segment, device)
    if kind == "distill":
        if teacher_path is not None:
            teacher = load_frozen_teacher(teacher_path, device)
        else:  # a fresh teacher of the default demo architecture (speed does not depend on its weights)
            teacher = Teacher(load_config(None).teacher, cfg.features.n_mels).to(device).eval().requires_grad_(False)
        return DistillStep(cfg, teacher, batch, segment, device)
    raise ValueError(f"unknown training step {kind!r}; choose from {STEPS}")


def run_train_bench(steps=STEPS, teacher_config="recipes/demo/conf/teacher.yaml",
                    student_config="recipes/demo/conf/student.yaml", teacher_path="checkpoints/demo/teacher-v1",
                    threads=(1, 2), repeats: int = 5, warmup: int = 2, batch: int | None = None,
                    segment: int | None = None, device: str = "cpu", overrides=None) -> dict:
    """Benchmark the given steps on each thread count; returns the report (no printing, no files)."""
    dev = torch.device(device)
    results = []
    peaks = {}
    for n in threads:
        torch.set_num_threads(n)
        peaks[n] = peak_gflops(dev)
        for kind in steps:
            step = build_step(kind, teacher_config if kind == "teacher" else student_config,
                              teacher_path, batch, segment, dev, overrides)
            r = bench_step(step, repeats, warmup, peaks[n], n)
            r["peak_gflops"] = peaks[n]
            results.append(r)
    return {
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "torch": torch.__version__,
        "wavedistill": getattr(wavedistill, "__file__", "?"),
        "repeats": repeats,
        "warmup": warmup,
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [f"{'step':8} {'thr':>3} {'batch':>10} {'samples/s':>10} {'MFLOP/smp':>9} {'GFLOP/s':>8} {'% peak':>6}  phases (ms)"]
    for r in report["results"]:
        ph = ", ".join(f"{k} {1e3 * v:.0f}" for k, v in r["phases_seconds"].items())
        lines.append(f"{r['step']:8} {r['threads']:>3} {'x'.join(map(str, r['batch'])):>10} {r['samples_per_second']:>10.0f} "
                     f"{r['flops_per_sample'] / 1e6:>9.2f} {r['gflops_per_second']:>8.1f} {100 * r['fraction_of_peak']:>6.1f}  {ph}")
    return "\n".join(lines)


def plot_png(report: dict) -> bytes:
    """Stacked bars of milliseconds per step by phase, one bar per (step, threads), samples/s on top."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(res) + 2.5), 4.5), dpi=100)
    names: list[str] = []
    for r in res:
        names += [n for n in r["phases_seconds"] if n not in names]
    cmap = plt.get_cmap("tab20")
    bottoms = [0.0] * len(res)
    for j, n in enumerate(names):
        vals = [1e3 * r["phases_seconds"].get(n, 0.0) for r in res]
        ax.bar(range(len(res)), vals, bottom=bottoms, color=cmap(j % 20), label=n)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    for i, r in enumerate(res):
        ax.text(i, bottoms[i], f"{r['samples_per_second']:.0f}/s\n{100 * r['fraction_of_peak']:.0f}% pk",
                ha="center", va="bottom", fontsize=7)
    labels = [f"{r.get('label', '')}\n{r['step']}, {r['threads']} thr".strip() for r in res]
    ax.set_xticks(range(len(res)), labels, fontsize=7)
    ax.set_ylabel("ms per step (phase medians)")
    ax.set_ylim(0, max(bottoms) * 1.2)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"training step by phase on {report['device']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
