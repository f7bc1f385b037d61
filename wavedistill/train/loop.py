"""The one training loop: teacher training and distillation differ only in their :class:`Objective`.

The loop owns the plumbing both share — accelerate, threads, kernels, EMA, Adam with the warm-up/cosine
schedule, deterministic segment batches, gradient accumulation, non-finite-step handling, TensorBoard,
tqdm, validation on EMA weights, sample logging and atomic checkpoints with exact resume.  An objective
owns what is its own: the model it trains, its loss on a batch, its validation, its log lines and its
sample logging (:mod:`wavedistill.train.teacher`, :mod:`wavedistill.train.distill`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import kernels
from ..config import Config
from ..data.cache import FeatureCache
from ..errors import UserError
from .experiment import Session
from .state import (
    EMA,
    RunState,
    SegmentSampler,
    Throughput,
    apply_init_from,
    lr_lambda,
    make_accelerator,
    note_bad_step,
    restore,
    save,
    set_threads,
)


class Objective:
    """What one kind of training adds to the loop.  Subclasses set ``kind`` and ``desc`` and implement the hooks."""

    kind = ""  # checkpoint kind: "teacher" | "student"
    desc = ""  # progress-bar label

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # set-up ---------------------------------------------------------------
    def model_config(self):
        """The model section this run trains (checked on resume, stored in checkpoints)."""
        raise NotImplementedError

    def validate_config(self) -> None:
        """Refuse config combinations this objective cannot train (before anything is built)."""

    def setup_frozen(self, acc) -> None:
        """Load what is fixed during training (e.g. the teacher) before the seeded model construction."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def attach(self, acc, model, raw) -> int:
        """Called once the model is prepared (``model`` possibly wrapped, ``raw`` unwrapped); returns the context frames."""
        raise NotImplementedError

    def attach_eval(self, eval_model) -> None:
        """Called once with the model that holds the EMA weights for validation and samples."""

    def banner(self, raw, n_train: int, n_valid: int, world: int, impl: str, start: int) -> str:
        raise NotImplementedError

    def checkpoint_extra(self) -> dict | None:
        return None

    # per step -------------------------------------------------------------
    def loss(self, model, audio, mel, index: int, rank: int, world: int):
        """``(total, terms)`` for one micro-batch; ``terms`` maps names to floats (averaged over log intervals)."""
        raise NotImplementedError

    def log_line(self, step: int, avg: dict, gnorm: float, rate: float, lr: float) -> str:
        raise NotImplementedError

    def postfix(self, avg: dict) -> dict:
        return {}

    # validation -----------------------------------------------------------
    def validate(self, eval_model, valid) -> dict:
        raise NotImplementedError

    def valid_line(self, step: int, valid: dict) -> str:
        raise NotImplementedError

    def score(self, valid: dict) -> float:
        """Lower is better: decides the ``best`` checkpoint."""
        raise NotImplementedError

    def log_sample(self, eval_model, valid, writer, step: int, exp: Path) -> None:
        pass

    def history(self, kind: str, values: dict) -> dict:
        """A history row from the averaged train terms (``kind="train"``) or the validation dict."""
        return {f"{kind}_{k}": v for k, v in values.items()}

    def summary(self, run: RunState, last_valid: dict | None, history: list) -> dict:
        return {"step": run.step, "valid": last_valid, "history": history}


class BitsObjective(Objective):
    """An objective whose one figure is bits per sample: the teacher's NLL, a flow's dequantized bound."""

    metric = "bits"  # key of the figure in the logged terms and the validation dict
    short = "bits"  # progress-bar label
    bound = ""  # what the figure is, when not an exact NLL (e.g. "dequantized bound")

    def attach(self, acc, model, raw) -> int:
        self.raw, self.device = raw, acc.device
        self.context = raw.cond.frame_context  # the model's own conditioning context
        return self.context

    def batch_bits(self, model, audio, mel) -> torch.Tensor:
        """Mean bits/sample of one batch (``model`` possibly wrapped for data parallelism)."""
        raise NotImplementedError

    def valid_bits(self, eval_model, valid) -> float:
        raise NotImplementedError

    def loss(self, model, audio, mel, index, rank, world):
        loss = self.batch_bits(model, audio, mel)
        return loss, ({self.metric: loss.item()} if torch.isfinite(loss) else {})

    def log_line(self, step, avg, gnorm, rate, lr) -> str:
        note = f" ({self.bound})" if self.bound else ""
        return f"step {step}: train {avg[self.metric]:.4f} bits/sample{note}, lr {lr:.2e}, grad {gnorm:.2f}, {rate:.0f} samples/s"

    def postfix(self, avg) -> dict:
        return {self.short: f"{avg[self.metric]:.3f}"}

    def validate(self, eval_model, valid) -> dict:
        return {self.metric: self.valid_bits(eval_model, valid)}

    def valid_line(self, step, valid) -> str:
        note = f"{self.bound}, " if self.bound else ""
        return f"step {step}: valid {valid[self.metric]:.4f} bits/sample ({note}EMA weights)"

    def score(self, valid) -> float:
        return valid[self.metric]

    def history(self, kind, values) -> dict:
        return {f"{kind}_bits": values[self.metric]}

    def summary(self, run, last_valid, history) -> dict:
        return {"step": run.step, "valid_bits": None if last_valid is None else last_valid[self.metric], "history": history}


def _finish_bad_step(acc, opt, run, tc, bar, what, save_now) -> None:
    opt.zero_grad(set_to_none=True)
    note_bad_step(run, tc, what)
    run.step += 1
    bar.update(1)
    if run.step == tc.max_steps:  # a finished run always ends with a checkpoint at max_steps
        acc.wait_for_everyone()
        save_now(False)


def run_training(objective: Objective, data, out, resume: bool | str = False, max_steps: int | None = None,
                 force: bool = False, explicit_max_steps: bool = False) -> dict:
    """Train ``objective``'s model on the feature cache ``data`` into the experiment directory ``out``.

    ``resume``: False, True (the latest checkpoint) or a checkpoint path; ``force`` accepts changed settings
    on resume; ``explicit_max_steps``: the command line set the step target (else a resume keeps the run's).
    The :class:`~wavedistill.train.experiment.Session` holds the lock on ``out``, writes config.yaml and
    train.log, and turns SIGINT/SIGTERM into a checkpoint at the end of the current step.
    """
    with kernels.restoring(), Session(out, objective.kind, resume, force, explicit_max_steps) as session:
        return _run(objective, data, out, max_steps, session)  # train.kernels applies to this run only


def _build(obj: Objective, acc, cache: FeatureCache, ckpt):
    """The seeded model (warm-started or restored), its EMA, Adam, the schedule and the run counters."""
    tc = obj.cfg.train
    torch.manual_seed(tc.seed)
    model = obj.build_model()
    apply_init_from(acc, model, tc, ckpt, obj.kind, obj.cfg.features)
    model.cond.set_stats(*cache.mel_stats())
    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    run = RunState()
    if ckpt is not None:
        restore(ckpt, model, ema, opt, sched, run)
        run.last_good = ckpt
    return model, ema, opt, sched, run


def _accumulate(obj: Objective, acc, model, sampler, run: RunState, rank: int, world: int):
    """Forward and backward over ``grad_accum`` micro-batches: ``(ok, terms, last audio batch)``."""
    tc = obj.cfg.train
    step_terms: dict[str, float] = {}
    for micro in range(tc.grad_accum):
        index = run.step * tc.grad_accum + micro
        audio, mel = sampler.batch(index, tc.batch_size, rank, world)
        audio, mel = audio.to(acc.device), mel.to(acc.device)
        with (acc.no_sync(model) if micro < tc.grad_accum - 1 else contextlib.nullcontext()), acc.autocast():
            total, terms = obj.loss(model, audio, mel, index, rank, world)
        if not torch.isfinite(total):
            return False, step_terms, audio
        acc.backward(total / tc.grad_accum)
        for key, v in terms.items():
            step_terms[key] = step_terms.get(key, 0.0) + v / tc.grad_accum
    return True, step_terms, audio


def _run(obj: Objective, data, out, max_steps, session: Session) -> dict:
    cfg = obj.cfg
    if max_steps is not None:
        if max_steps <= 0:
            raise UserError(f"--max-steps {max_steps} must be positive")
        cfg.train.max_steps = max_steps
    tc = cfg.train
    set_threads(tc)
    cache = FeatureCache(data, cfg.features)
    exp = Path(out)
    ckpt = session.resume(cfg, obj.model_config())  # model, features and changed settings checked
    obj.validate_config()
    acc = make_accelerator(tc, exp)
    rank, world = acc.process_index, acc.num_processes
    impl = kernels.configure(tc.kernels, acc.device)  # residual layers: fused Triton or reference
    obj.setup_frozen(acc)
    train_set = cache.load_split("train")
    valid_set = cache.load_split("valid") or train_set[:2]
    model, ema, opt, sched, run = _build(obj, acc, cache, ckpt)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    context = obj.attach(acc, model, raw)
    sampler = SegmentSampler(train_set, tc.segment_samples, raw.hop, context, tc.seed)
    eval_model = obj.build_model().to(acc.device)
    obj.attach_eval(eval_model)

    def save_now(is_best: bool) -> None:
        save(acc, exp, obj.kind, cfg, obj.model_config(), model, ema, opt, sched, run, is_best, extra=obj.checkpoint_extra())

    def validate_now() -> dict:
        ema.copy_to(eval_model)
        valid = obj.validate(eval_model, valid_set)
        acc.log({f"valid/{key}": v for key, v in valid.items()}, step=run.step)
        if acc.is_main_process:
            tqdm.write(obj.valid_line(run.step, valid))
        history.append({"step": run.step, **obj.history("valid", valid), "cpu_hours": run.cpu_seconds / 3600})
        return valid

    if acc.is_main_process:
        session.start(acc, cfg)  # lock, config.yaml, train.log, hparams; TensorBoard under logs/<kind>; signals
        print(obj.banner(raw, len(train_set), len(valid_set), world, impl, run.step), flush=True)
    writer = acc.get_tracker("tensorboard", unwrap=True) if acc.is_main_process else None
    bar = tqdm(total=tc.max_steps, initial=run.step, disable=not acc.is_main_process, desc=obj.desc, dynamic_ncols=True)
    meter, history, sums, last_valid = Throughput(), [], {}, None
    t_start, samples_seen, cpu_mark = time.perf_counter(), 0, time.process_time()
    while run.step < tc.max_steps:
        opt.zero_grad(set_to_none=True)
        ok, step_terms, audio = _accumulate(obj, acc, model, sampler, run, rank, world)
        if ok:  # the total norm is non-finite exactly when some gradient is: no separate pass over them
            gnorm = acc.clip_grad_norm_(model.parameters(), tc.grad_clip)
            ok = bool(torch.isfinite(torch.as_tensor(gnorm)))
        if not ok:
            _finish_bad_step(acc, opt, run, tc, bar, f"{obj.desc} loss or gradient not finite", save_now)
            continue
        opt.step()
        sched.step()
        now = time.process_time()
        run.cpu_seconds, cpu_mark = run.cpu_seconds + now - cpu_mark, now
        run.step += 1
        run.bad_steps_in_row = 0
        ema.update(raw, run.step)
        n = audio.numel() * world * tc.grad_accum
        meter.add(n)
        samples_seen += n
        for key, v in step_terms.items():
            sums[key] = sums.get(key, 0.0) + v
        bar.update(1)
        if run.step % tc.log_every == 0:
            rate, lr = meter.rate(), sched.get_last_lr()[0]
            avg, sums = {key: v / tc.log_every for key, v in sums.items()}, {}
            acc.log({**{f"train/{key}": v for key, v in avg.items()}, "train/lr": lr, "train/grad_norm": float(gnorm),
                     "train/samples_per_s": rate, "train/bad_steps": run.bad_steps_total,
                     "train/cpu_hours": run.cpu_seconds / 3600}, step=run.step)
            bar.set_postfix(**obj.postfix(avg))
            if acc.is_main_process:
                tqdm.write(obj.log_line(run.step, avg, float(gnorm), rate, lr))
            history.append({"step": run.step, **obj.history("train", avg), "samples_per_s": rate,
                            "cpu_hours": run.cpu_seconds / 3600})
        if run.step % tc.valid_every == 0 or run.step == tc.max_steps:
            last_valid = validate_now()
        if run.step % tc.sample_every == 0 and writer is not None:
            ema.copy_to(eval_model)
            obj.log_sample(eval_model, valid_set, writer, run.step, exp)
        out_of_cpu = tc.max_cpu_seconds > 0 and run.cpu_seconds >= tc.max_cpu_seconds
        if out_of_cpu and run.step % tc.valid_every != 0 and run.step != tc.max_steps:  # end on a validated, saved step
            last_valid = validate_now()
        if run.step % tc.save_every == 0 or run.step == tc.max_steps or out_of_cpu:
            score = None if last_valid is None else obj.score(last_valid)
            is_best = score is not None and score < run.best_valid
            if is_best:
                run.best_valid = score
            acc.wait_for_everyone()
            save_now(is_best)
        session.end_step(run, lambda: save_now(False))  # a SIGINT/SIGTERM stops here, with this step saved
        if out_of_cpu:
            if acc.is_main_process:
                tqdm.write(f"train.max_cpu_seconds={tc.max_cpu_seconds:g} reached at step {run.step}")
            break
    bar.close()
    acc.end_training()
    if acc.is_main_process:
        elapsed = time.perf_counter() - t_start
        print(f"done: step {run.step}, {samples_seen / max(elapsed, 1e-9):.0f} training samples/s; "
              f"checkpoints in {exp / 'checkpoints'}", flush=True)
    return obj.summary(run, last_valid, history)
