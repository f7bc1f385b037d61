"""Plumbing shared by teacher training and distillation.

The loops themselves live in :mod:`wavedistill.train_teacher` and
:mod:`wavedistill.distill`; this module holds what both need: the EMA,
the learning-rate schedule, deterministic segment batches, accelerate set-up,
checkpoint save/resume and logging.

Determinism: the batch of step ``n`` is drawn from a generator seeded with
``(seed, n)``, and the global batch is split over processes by rank.  A resumed
run therefore sees exactly the batches an uninterrupted run would, and an
N-process run sees the same global batch as a single process.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import (
    load_training_state,
    model_config,
    read_checkpoint_config,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from ..config import Config, TrainConfig
from ..errors import NonFiniteError, UserError


class EMA:
    """Exponential moving average of parameters (and copies of buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self.param_names = {k for k, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if k in self.param_names:
                s.mul_(d).add_(v.detach().float(), alpha=1.0 - d)
            else:
                s.copy_(v.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(tensors[k])

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over ``decay_steps``."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay_steps <= 0:
            return 1.0
        p = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


class SegmentSampler:
    """Random aligned (audio, mel) segments, deterministic per step.

    ``mel`` comes with ``context`` extra frames on each side (edge-replicated at
    utterance borders) so that the conditioning network sees the same context
    in training as in whole-utterance synthesis.
    """

    def __init__(self, utterances, segment_samples: int, hop: int, context: int, seed: int):
        self.hop = hop
        self.frames = max(1, segment_samples // hop)
        self.segment = self.frames * hop
        self.context = context
        self.seed = seed
        self.utts = [(a, m) for _, a, m in utterances]
        if not self.utts:
            raise UserError("the training split is empty; prepare more audio or lower prepare.valid_fraction/test_fraction")
        long_enough = [i for i, (a, _) in enumerate(self.utts) if a.shape[0] >= self.segment]
        self.pool = long_enough if long_enough else list(range(len(self.utts)))

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise UserError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.randint(len(self.pool), (batch_size,), generator=g).tolist()
        offsets = torch.rand(batch_size, generator=g, dtype=torch.float64).tolist()
        per = batch_size // world
        audios, mels = [], []
        for i in range(rank * per, (rank + 1) * per):
            a, m = self.utts[self.pool[picks[i]]]
            audios_i, mels_i = self.cut(a, m, offsets[i])
            audios.append(audios_i)
            mels.append(mels_i)
        return torch.stack(audios), torch.stack(mels)

    def cut(self, audio: torch.Tensor, mel: torch.Tensor, offset: float):
        n_frames = mel.shape[1]
        max_start = max(0, n_frames - self.frames)
        f0 = min(max_start, int(offset * (max_start + 1)))
        seg = audio[f0 * self.hop : (f0 + self.frames) * self.hop]
        if seg.shape[0] < self.segment:
            seg = torch.nn.functional.pad(seg, (0, self.segment - seg.shape[0]))
        idx = torch.arange(f0 - self.context, f0 + self.frames + self.context).clamp(0, n_frames - 1)
        return seg, mel[:, idx]


def valid_segments(valid, train: TrainConfig, hop: int, context: int, device):
    """The fixed validation segments: the first ``valid_segment_samples`` of the first ``valid_utterances``,
    each with ``context`` mel frames per side (edge-replicated).  Yields ``(index, audio [1, T], mel [1, n_mels, F])``."""
    for i, (_, audio, mel) in enumerate(valid[: train.valid_utterances]):
        frames = min(mel.shape[1], max(1, train.valid_segment_samples // hop))
        idx = torch.arange(-context, frames + context).clamp(0, mel.shape[1] - 1)
        yield i, audio[: frames * hop][None].to(device), mel[:, idx][None].to(device)


def crop_condition(c: torch.Tensor, context: int, hop: int, length: int) -> torch.Tensor:
    start = context * hop
    return c[:, :, start : start + length]


class RunState:
    """Counters saved with every checkpoint."""

    def __init__(self):
        self.step = 0
        self.bad_steps_total = 0
        self.bad_steps_in_row = 0
        self.best_valid = float("inf")
        self.last_good = None
        self.cpu_seconds = 0.0  # process CPU time spent training, summed over resumes

    def to_dict(self) -> dict:
        return {
            "bad_steps_total": self.bad_steps_total,
            "bad_steps_in_row": self.bad_steps_in_row,
            "best_valid": self.best_valid if math.isfinite(self.best_valid) else None,
            "cpu_seconds": self.cpu_seconds,
        }

    def load(self, d: dict) -> None:
        self.step = int(d["step"])
        self.bad_steps_total = int(d.get("bad_steps_total", 0))
        self.bad_steps_in_row = int(d.get("bad_steps_in_row", 0))
        bv = d.get("best_valid")
        self.best_valid = float(bv) if bv is not None else float("inf")
        self.cpu_seconds = float(d.get("cpu_seconds", 0.0))


def make_accelerator(train: TrainConfig, exp_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    acc = Accelerator(
        mixed_precision=train.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(exp_dir), logging_dir=str(exp_dir / "logs")),
    )
    return acc


def set_threads(train: TrainConfig) -> None:
    if train.num_threads > 0:
        torch.set_num_threads(train.num_threads)


def check_resume(exp_dir: Path, resume: bool | str | Path, kind: str, model_cfg, features) -> Path | None:
    """Return the checkpoint to resume from, or None for a fresh run; refuse unsafe combinations.

    ``resume`` is False (fresh run), True (``EXP/checkpoints/latest``) or a checkpoint path (a chosen step).
    """
    latest = exp_dir / "checkpoints" / "latest"
    if not resume:
        if latest.exists():
            raise UserError(f"{exp_dir} already holds a run; pass --resume to continue it or choose a new --out")
        return None
    if resume is True:
        if not latest.exists():
            raise UserError(f"nothing to resume in {exp_dir} (no checkpoints/latest); drop --resume to start a new run")
        ckpt = resolve_checkpoint(latest)
        where = exp_dir
    else:
        ckpt = resolve_checkpoint(resume)
        where = resume
        if not (ckpt / "state").is_dir():
            raise UserError(f"--resume {resume} has no training state (an exported checkpoint?); "
                            f"pass a step directory under an experiment's checkpoints/")
    cfg = read_checkpoint_config(ckpt)
    if cfg["kind"] != kind:
        raise UserError(f"{where} holds a {cfg['kind']} run; it cannot be resumed as {kind} training")
    now = dataclasses.asdict(model_cfg)
    for key, old in cfg["model"].items():
        if now.get(key) != old:
            raise UserError(
                f"cannot resume: {kind}.{key} was {old} in the checkpoint but is {now.get(key)} now; "
                f"restore the setting or start a new --out"
            )
    if cfg["features"] != dataclasses.asdict(features):
        raise UserError("cannot resume: the feature parameters differ from the checkpoint's; use the data and config it was trained with")
    return ckpt


def warm_start(model: nn.Module, source: str, kind: str, features) -> tuple[int, int]:
    """Copy the weights of checkpoint ``source`` whose names and shapes match ``model``'s.

    Used to start a run from a trained model of another layout, e.g. a Gaussian
    teacher from a mixture-of-logistics teacher: the dilated-conv trunk and the
    conditioning network carry over, the output head (other shape) starts fresh.
    Returns ``(copied, total)`` tensor counts.
    """
    from ..fileio import load_tensors

    ckpt = resolve_checkpoint(source)
    cfg = read_checkpoint_config(ckpt)
    if cfg["kind"] != kind:
        raise UserError(f"train.init_from={source} is a {cfg['kind']} checkpoint; a {kind} run can only start from a {kind}")
    if cfg["features"] != dataclasses.asdict(features):
        raise UserError(f"train.init_from={source} was trained on other feature parameters; use a checkpoint with the same features")
    tensors = load_tensors(ckpt / "model.safetensors")
    own = model.state_dict()
    take = {k: v for k, v in tensors.items() if k in own and v.shape == own[k].shape}
    for k, v in take.items():
        if not torch.isfinite(v).all():
            raise UserError(f"train.init_from={source}: tensor {k} holds NaN or inf values; the checkpoint is corrupt")
    if not take:
        raise UserError(f"train.init_from={source} shares no weights with this {kind} (no name and shape in common); check the config")
    model.load_state_dict(take, strict=False)
    return len(take), len(own)


def apply_init_from(acc, model: nn.Module, tc: TrainConfig, resume_from: Path | None, kind: str, features) -> None:
    """``train.init_from`` for a fresh run (a resumed run takes everything from its checkpoint)."""
    if not tc.init_from:
        return
    if resume_from is not None:
        if acc.is_main_process:
            print(f"train.init_from={tc.init_from} ignored: resuming from {resume_from}", flush=True)
        return
    copied, total = warm_start(model, tc.init_from, kind, features)
    if acc.is_main_process:
        print(f"warm start: {copied} of {total} tensors copied from {tc.init_from}", flush=True)


def restore(ckpt: Path, model: nn.Module, ema: EMA, optimizer, scheduler, run: RunState) -> None:
    from ..fileio import load_tensors

    st = load_training_state(ckpt)
    model.load_state_dict(st["params"])
    optimizer.load_state_dict(st["optimizer"])
    ema.load(load_tensors(ckpt / "model.safetensors"))
    trainer = st["trainer"]
    run.load(trainer)
    scheduler.load_state_dict(trainer["scheduler"])
    # the optimizer was built from the current config: a resume allowed to change train.lr or weight_decay (--force)
    # uses the new values; unchanged, this recomputes exactly the learning rate the scheduler saved
    base = [optimizer.defaults["lr"]] * len(optimizer.param_groups)
    scheduler.base_lrs = base
    for g, b, lam in zip(optimizer.param_groups, base, scheduler.lr_lambdas):
        g["initial_lr"], g["weight_decay"] = b, optimizer.defaults["weight_decay"]
        g["lr"] = b * lam(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    set_rng_state(*st["rng"])


def save(acc, exp_dir: Path, kind: str, cfg: Config, model_cfg, model: nn.Module, ema: EMA, optimizer, scheduler,
         run: RunState, is_best: bool, extra: dict | None = None) -> Path | None:
    if not acc.is_main_process:
        return None
    unwrapped = acc.unwrap_model(model)
    state = {
        "params": {k: v.detach().cpu() for k, v in unwrapped.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "trainer": {**run.to_dict(), "scheduler": scheduler.state_dict(), "config": cfg.to_dict()},
    }
    conf = model_config(kind, model_cfg, cfg.features, extra)
    path = save_checkpoint(exp_dir, run.step, ema.state_dict(), conf, state, cfg.train.keep_checkpoints, is_best)
    run.last_good = path
    return path


def note_bad_step(run: RunState, train: TrainConfig, what: str) -> None:
    run.bad_steps_total += 1
    run.bad_steps_in_row += 1
    if run.bad_steps_in_row >= train.max_bad_steps:
        where = f"; the last good checkpoint is {run.last_good}" if run.last_good else ""
        raise NonFiniteError(
            f"{run.bad_steps_in_row} non-finite steps in a row at step {run.step} ({what}); stopped{where}. "
            "Lower train.lr or raise train.grad_clip, then resume"
        )


class Throughput:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        r = self.samples / dt if dt > 0 else 0.0
        self.t0 = time.perf_counter()
        self.samples = 0
        return r


def spectrogram_png(audio, sample_rate: int, title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = np.asarray(audio, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(6, 2.5), dpi=100)
    ax.specgram(a + 1e-9, NFFT=256, Fs=sample_rate, noverlap=192, cmap="magma")
    ax.set_title(title)
    ax.set_xlabel("s")
    ax.set_ylabel("Hz")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()



def add_spectrogram(writer, tag: str, audio, sample_rate: int, title: str, step: int) -> None:
    """A spectrogram image of ``audio`` in TensorBoard (the picture :func:`spectrogram_png` draws)."""
    import numpy as np
    from PIL import Image

    png = spectrogram_png(audio, sample_rate, title)
    writer.add_image(tag, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), step, dataformats="HWC")
