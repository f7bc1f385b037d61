"""``wavedistill distill``: probability density distillation of a frozen teacher into an IAF student."""

from __future__ import annotations

import contextlib

import dataclasses
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.audio import MelExtractor
from ..checkpoint import load_model
from .. import kernels
from ..config import load_config
from ..data.cache import FeatureCache
from ..errors import UserError
from .losses import DistillationLoss, log_mel_distance
from ..models.student import Student
from .experiment import Session, explicit_max_steps
from .state import (
    EMA,
    RunState,
    SegmentSampler,
    Throughput,
    lr_lambda,
    make_accelerator,
    note_bad_step,
    restore,
    save,
    set_threads,
    valid_segments,
    add_spectrogram,
    apply_init_from,
)

TERMS = ("total", "kl", "cross_entropy", "entropy", "stft", "log_s_tot", "contrastive")


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + step) * 131 + rank + 17)


def load_frozen_teacher(path, features, device):
    teacher, tfeat, _ = load_model(path, kind="teacher", device=device)
    if dataclasses.asdict(tfeat) != dataclasses.asdict(features):
        diff = next(k for k, v in dataclasses.asdict(features).items() if dataclasses.asdict(tfeat)[k] != v)
        raise UserError(
            f"teacher {path} was trained with features.{diff}={getattr(tfeat, diff)} but the config says {getattr(features, diff)}; "
            "use the teacher's feature parameters"
        )
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def validate(student, loss_fn, valid, tc, context, device, seed: int, mel_fn) -> dict:
    student.eval()
    sums: dict[str, float] = {}
    n = 0
    for i, a, m in valid_segments(valid, tc, student.hop, context, device):
        g = _step_generator(seed, 10_000_000 + i, 0)
        z = student.noise_from_uniform(torch.rand(1, a.shape[1], generator=g, dtype=torch.float64)).float().to(device)
        _, terms, x = loss_fn(z, a, m, context, g)
        terms["log_mel_l1"] = log_mel_distance(mel_fn, x.clamp(-1, 1).float(), a).item()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    student.train()
    return {k: v / max(n, 1) for k, v in sums.items()}


def distill(config_path, teacher_path, data, out, overrides=None, max_steps=None, resume=False, force=False) -> dict:
    with kernels.restoring(), Session(out, "student", resume, force, explicit_max_steps(max_steps, overrides)) as session:
        return _distill(config_path, teacher_path, data, out, overrides, max_steps, resume, session)  # train.kernels: this run only


def _distill(config_path, teacher_path, data, out, overrides=None, max_steps=None, resume=False, session=None) -> dict:
    cfg = load_config(config_path, overrides or [])
    if max_steps is not None:
        if max_steps <= 0:
            raise UserError(f"--max-steps {max_steps} must be positive")
        cfg.train.max_steps = max_steps
    tc, dc = cfg.train, cfg.distill
    set_threads(tc)
    cache = FeatureCache(data, cfg.features)
    exp = Path(out)
    ckpt = session.resume(cfg, cfg.student)  # checks model, features and changed settings
    want = "logistic" if dc.loss == "parallel_wavenet" else "gaussian"
    if cfg.student.distribution != want:
        raise UserError(f"distill.loss={dc.loss} needs student.distribution={want}; fix the config")

    acc = make_accelerator(tc, exp)
    rank, world = acc.process_index, acc.num_processes
    impl = kernels.configure(tc.kernels, acc.device)  # residual layers: fused Triton or reference
    teacher = load_frozen_teacher(teacher_path, cfg.features, acc.device)
    if dc.loss == "clarinet" and teacher.cfg.output != "gaussian":
        raise UserError(f"distill.loss=clarinet needs a Gaussian teacher, but {teacher_path} outputs '{teacher.cfg.output}'")
    if dc.loss == "parallel_wavenet" and teacher.cfg.output != "mol":
        raise UserError(f"distill.loss=parallel_wavenet needs a mixture-of-logistics teacher, but {teacher_path} outputs '{teacher.cfg.output}'")

    train_set = cache.load_split("train")
    valid_set = cache.load_split("valid") or train_set[:2]
    torch.manual_seed(tc.seed)
    student = Student(cfg.student, cfg.features.n_mels)
    apply_init_from(acc, student, tc, ckpt, "student", cfg.features)
    student.cond.set_stats(*cache.mel_stats())
    ema = EMA(student, tc.ema_decay)
    opt = torch.optim.Adam(student.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    run = RunState()
    if ckpt is not None:
        restore(ckpt, student, ema, opt, sched, run)
        run.last_good = ckpt
    student, opt = acc.prepare(student, opt)
    raw = acc.unwrap_model(student)
    context = max(raw.cond.frame_context, teacher.cond.frame_context)
    sampler = SegmentSampler(train_set, tc.segment_samples, raw.hop, context, tc.seed)
    loss_fn = DistillationLoss(dc, teacher, student)
    eval_student = Student(cfg.student, cfg.features.n_mels).to(acc.device)
    eval_loss = DistillationLoss(dc, teacher, eval_student)
    mel_fn = MelExtractor(cfg.features).to(acc.device)

    if acc.is_main_process:
        session.start(acc, cfg)  # lock, config.yaml, train.log, hparams, graceful SIGINT/SIGTERM
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"student: {n_params / 1e6:.2f} M parameters, {len(cfg.student.flow_layers)} flows, receptive field "
              f"{raw.receptive_field}; loss {dc.loss}; teacher {teacher_path}; {impl} residual layers; start step {run.step}", flush=True)
    writer = acc.get_tracker("tensorboard", unwrap=True) if acc.is_main_process else None
    bar = tqdm(total=tc.max_steps, initial=run.step, disable=not acc.is_main_process, desc="distill", dynamic_ncols=True)
    meter = Throughput()
    history = []
    sums: dict[str, float] = {}
    last_valid = None
    while run.step < tc.max_steps:
        opt.zero_grad(set_to_none=True)
        ok = True
        step_terms: dict[str, float] = {}
        for micro in range(tc.grad_accum):
            k = run.step * tc.grad_accum + micro
            audio, mel = sampler.batch(k, tc.batch_size, rank, world)
            audio, mel = audio.to(acc.device), mel.to(acc.device)
            # noise for the whole global batch from one generator; each rank keeps its rows
            g = _step_generator(tc.seed, k, 0)
            per = tc.batch_size // world
            rows = (rank * per, tc.batch_size)
            u = torch.rand((tc.batch_size, audio.shape[1]), generator=g, dtype=torch.float64)[rows[0] : rows[0] + per]
            z = raw.noise_from_uniform(u).float().to(acc.device)
            with (acc.no_sync(student) if micro < tc.grad_accum - 1 else contextlib.nullcontext()), acc.autocast():
                total, terms, _ = loss_fn(z, audio, mel, context, g, rows)
            if not torch.isfinite(total):
                ok = False
                break
            acc.backward(total / tc.grad_accum)
            for key, v in terms.items():
                step_terms[key] = step_terms.get(key, 0.0) + v / tc.grad_accum
        if ok:  # the total norm is non-finite exactly when some gradient is: no separate pass over them
            gnorm = acc.clip_grad_norm_(student.parameters(), tc.grad_clip)
            ok = bool(torch.isfinite(torch.as_tensor(gnorm)))
        if not ok:
            opt.zero_grad(set_to_none=True)
            note_bad_step(run, tc, "distillation loss or gradient not finite")
            run.step += 1
            bar.update(1)
            if run.step == tc.max_steps:  # a finished run always ends with a checkpoint at max_steps
                acc.wait_for_everyone()
                save(acc, exp, "student", cfg, cfg.student, student, ema, opt, sched, run, False,
                     extra={"distill": dataclasses.asdict(dc), "teacher": str(teacher_path)})
            continue
        opt.step()
        sched.step()
        run.step += 1
        run.bad_steps_in_row = 0
        ema.update(raw, run.step)
        meter.add(audio.numel() * world * tc.grad_accum)
        for key, v in step_terms.items():
            sums[key] = sums.get(key, 0.0) + v
        bar.update(1)
        if run.step % tc.log_every == 0:
            rate = meter.rate()
            avg = {key: v / tc.log_every for key, v in sums.items()}
            sums = {}
            acc.log({**{f"train/{key}": v for key, v in avg.items()}, "train/lr": sched.get_last_lr()[0],
                     "train/grad_norm": float(gnorm), "train/samples_per_s": rate, "train/bad_steps": run.bad_steps_total},
                    step=run.step)
            bar.set_postfix(kl=f"{avg['kl']:.3f}", stft=f"{avg['stft']:.3f}")
            if acc.is_main_process:
                tqdm.write(
                    f"step {run.step}: kl {avg['kl']:.4f} (ce {avg['cross_entropy']:.4f} − H {avg['entropy']:.4f}) "
                    f"stft {avg['stft']:.4f} log_s {avg['log_s_tot']:.3f} grad {float(gnorm):.2f} {rate:.0f} samples/s"
                )
            history.append({"step": run.step, **{f"train_{k}": v for k, v in avg.items()}, "samples_per_s": rate})
        if run.step % tc.valid_every == 0 or run.step == tc.max_steps:
            ema.copy_to(eval_student)
            last_valid = validate(eval_student, eval_loss, valid_set, tc, context, acc.device, tc.seed, mel_fn)
            acc.log({f"valid/{key}": v for key, v in last_valid.items()}, step=run.step)
            if acc.is_main_process:
                tqdm.write(f"step {run.step}: valid kl {last_valid['kl']:.4f} stft {last_valid['stft']:.4f} "
                           f"log-mel L1 {last_valid['log_mel_l1']:.4f} (EMA weights)")
            history.append({"step": run.step, **{f"valid_{k}": v for k, v in last_valid.items()}})
        if run.step % tc.sample_every == 0 and writer is not None:
            ema.copy_to(eval_student)
            _log_sample(eval_student, valid_set, cfg, writer, run.step, exp)
        if run.step % tc.save_every == 0 or run.step == tc.max_steps:
            score = None if last_valid is None else last_valid["kl"] + dc.stft_weight * last_valid["stft"]
            is_best = score is not None and score < run.best_valid
            if is_best:
                run.best_valid = score
            acc.wait_for_everyone()
            save(acc, exp, "student", cfg, cfg.student, student, ema, opt, sched, run, is_best,
                 extra={"distill": dataclasses.asdict(dc), "teacher": str(teacher_path)})
        session.end_step(run, lambda: save(acc, exp, "student", cfg, cfg.student, student, ema, opt, sched, run, False,
                                           extra={"distill": dataclasses.asdict(dc), "teacher": str(teacher_path)}))
    bar.close()
    acc.end_training()
    return {"step": run.step, "valid": last_valid, "history": history}



@torch.no_grad()
def _log_sample(student: Student, valid, cfg, writer, step: int, exp: Path) -> None:
    from ..data.audio import write_wav

    _, audio, mel = valid[0]
    y = student.synthesize(mel[None].to(next(student.parameters()).device), seed=step)[0].float().cpu()
    sr = cfg.features.sample_rate
    writer.add_audio("sample/student", y[None], step, sample_rate=sr)
    writer.add_audio("sample/ground_truth", audio[None], step, sample_rate=sr)
    add_spectrogram(writer, "sample/spectrogram", y.numpy(), sr, f"student sample, step {step}", step)
    write_wav(exp / "samples" / f"student-step{step:08d}.wav", y.numpy(), sr)
