"""``wavedistill train-teacher``: maximum-likelihood training of the WaveNet teacher."""

from __future__ import annotations

import contextlib

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import kernels
from ..config import load_config
from ..nn.distributions import quantize
from ..data.cache import FeatureCache
from ..errors import UserError
from ..models.teacher import Teacher
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
    spectrogram_png,
    valid_segments,
    apply_init_from,
)

LN2 = math.log(2.0)


def teacher_nll_bits(model: Teacher, audio: torch.Tensor, mel: torch.Tensor, context: int) -> torch.Tensor:
    """Mean discretized NLL in bits per sample for a batch of segments (mel with context frames)."""
    x = quantize(audio.float())
    params = model(x, mel, None, context)
    return -model.dist.log_prob_discrete(params, x).mean() / LN2


@torch.no_grad()
def validate(model: Teacher, valid, train_cfg, context: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for _, a, m in valid_segments(valid, train_cfg, model.hop, context, device):
        bits = teacher_nll_bits(model, a, m, context)
        total += bits.item() * a.shape[1]
        count += a.shape[1]
    model.train()
    return total / max(count, 1)


def train_teacher(config_path, data, out, overrides=None, max_steps=None, resume=False, force=False) -> dict:
    with kernels.restoring(), Session(out, "teacher", resume, force, explicit_max_steps(max_steps, overrides)) as session:
        return _train_teacher(config_path, data, out, overrides, max_steps, resume, session)  # train.kernels: this run only


def _train_teacher(config_path, data, out, overrides=None, max_steps=None, resume=False, session=None) -> dict:
    cfg = load_config(config_path, overrides or [])
    if max_steps is not None:
        if max_steps <= 0:
            raise UserError(f"--max-steps {max_steps} must be positive")
        cfg.train.max_steps = max_steps
    tc = cfg.train
    set_threads(tc)
    cache = FeatureCache(data, cfg.features)
    exp = Path(out)
    ckpt = session.resume(cfg, cfg.teacher)  # checks model, features and changed settings
    train_set = cache.load_split("train")
    valid_set = cache.load_split("valid") or train_set[:2]

    acc = make_accelerator(tc, exp)
    rank, world = acc.process_index, acc.num_processes
    impl = kernels.configure(tc.kernels, acc.device)  # residual layers: fused Triton or reference
    torch.manual_seed(tc.seed)
    model = Teacher(cfg.teacher, cfg.features.n_mels)
    apply_init_from(acc, model, tc, ckpt, "teacher", cfg.features)
    mean, std = cache.mel_stats()
    model.cond.set_stats(mean, std)
    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    run = RunState()
    if ckpt is not None:
        restore(ckpt, model, ema, opt, sched, run)
        run.last_good = ckpt
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    context = raw.cond.frame_context
    sampler = SegmentSampler(train_set, tc.segment_samples, raw.hop, context, tc.seed)
    eval_model = Teacher(cfg.teacher, cfg.features.n_mels).to(acc.device)

    if acc.is_main_process:
        session.start(acc, cfg)  # lock, config.yaml, train.log, hparams, graceful SIGINT/SIGTERM
    writer = acc.get_tracker("tensorboard", unwrap=True) if acc.is_main_process else None
    n_params = sum(p.numel() for p in raw.parameters())
    if acc.is_main_process:
        print(
            f"teacher: {n_params / 1e6:.2f} M parameters, receptive field {raw.receptive_field} samples, "
            f"{len(train_set)} train / {len(valid_set)} valid utterances, {world} process(es), {impl} residual layers, start step {run.step}",
            flush=True,
        )
    bar = tqdm(total=tc.max_steps, initial=run.step, disable=not acc.is_main_process, desc="teacher", dynamic_ncols=True)
    meter = Throughput()
    history = []
    last_valid = None
    loss_acc = 0.0
    t_start = time.perf_counter()
    samples_seen = 0
    while run.step < tc.max_steps:
        opt.zero_grad(set_to_none=True)
        loss_val = 0.0
        ok = True
        for micro in range(tc.grad_accum):
            audio, mel = sampler.batch(run.step * tc.grad_accum + micro, tc.batch_size, rank, world)
            audio, mel = audio.to(acc.device), mel.to(acc.device)
            sync = acc.no_sync(model) if micro < tc.grad_accum - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                x = quantize(audio.float())
                params = model(x, mel, None, context)
                loss = -raw.dist.log_prob_discrete(params, x).mean() / LN2
            if not torch.isfinite(loss):
                ok = False
                break
            acc.backward(loss / tc.grad_accum)
            loss_val += loss.item() / tc.grad_accum
        if ok:  # the total norm is non-finite exactly when some gradient is: no separate pass over them
            gnorm = acc.clip_grad_norm_(model.parameters(), tc.grad_clip)
            ok = bool(torch.isfinite(torch.as_tensor(gnorm)))
        if not ok:
            opt.zero_grad(set_to_none=True)
            note_bad_step(run, tc, "loss or gradient not finite")
            run.step += 1
            bar.update(1)
            if run.step == tc.max_steps:  # a finished run always ends with a checkpoint at max_steps
                acc.wait_for_everyone()
                save(acc, exp, "teacher", cfg, cfg.teacher, model, ema, opt, sched, run, False)
            continue
        opt.step()
        sched.step()
        run.step += 1
        run.bad_steps_in_row = 0
        ema.update(raw, run.step)
        n = audio.numel() * world * tc.grad_accum
        meter.add(n)
        samples_seen += n
        loss_acc += loss_val
        bar.update(1)
        if run.step % tc.log_every == 0:
            rate = meter.rate()
            lr = sched.get_last_lr()[0]
            avg = loss_acc / tc.log_every
            loss_acc = 0.0
            acc.log({"train/nll_bits": avg, "train/lr": lr, "train/grad_norm": float(gnorm), "train/samples_per_s": rate,
                     "train/bad_steps": run.bad_steps_total}, step=run.step)
            bar.set_postfix(nll=f"{avg:.3f}", sps=f"{rate:.0f}")
            if acc.is_main_process:
                tqdm.write(f"step {run.step}: train {avg:.4f} bits/sample, lr {lr:.2e}, grad {float(gnorm):.2f}, {rate:.0f} samples/s")
            history.append({"step": run.step, "train_bits": avg, "samples_per_s": rate})
        if run.step % tc.valid_every == 0 or run.step == tc.max_steps:
            ema.copy_to(eval_model)
            last_valid = validate(eval_model, valid_set, tc, context, acc.device)
            acc.log({"valid/nll_bits": last_valid}, step=run.step)
            if acc.is_main_process:
                tqdm.write(f"step {run.step}: valid {last_valid:.4f} bits/sample (EMA weights)")
            history.append({"step": run.step, "valid_bits": last_valid})
        if run.step % tc.sample_every == 0 and acc.is_main_process and writer is not None:
            ema.copy_to(eval_model)
            _log_sample(eval_model, valid_set, cfg, writer, run.step, exp)
        if run.step % tc.save_every == 0 or run.step == tc.max_steps:
            is_best = last_valid is not None and last_valid < run.best_valid
            if is_best:
                run.best_valid = last_valid
            acc.wait_for_everyone()
            save(acc, exp, "teacher", cfg, cfg.teacher, model, ema, opt, sched, run, is_best)
        session.end_step(run, lambda: save(acc, exp, "teacher", cfg, cfg.teacher, model, ema, opt, sched, run, False))
    bar.close()
    acc.end_training()
    elapsed = time.perf_counter() - t_start
    if acc.is_main_process:
        print(f"done: step {run.step}, last valid {last_valid if last_valid is None else round(last_valid, 4)} bits/sample, "
              f"{samples_seen / max(elapsed, 1e-9):.0f} training samples/s; checkpoints in {exp / 'checkpoints'}", flush=True)
    return {"step": run.step, "valid_bits": last_valid, "history": history}



@torch.no_grad()
def _log_sample(model: Teacher, valid, cfg, writer, step: int, exp: Path) -> None:
    from ..data.audio import write_wav

    _, audio, mel = valid[0]
    frames = min(mel.shape[1], max(1, int(cfg.train.sample_seconds * cfg.features.sample_rate) // model.hop))
    m = mel[None, :, :frames].to(next(model.parameters()).device)
    model.eval()
    y = model.generate(m, seed=step)[0].float().cpu()
    sr = cfg.features.sample_rate
    writer.add_audio("sample/generated", y[None], step, sample_rate=sr)
    writer.add_audio("sample/ground_truth", audio[: y.shape[0]][None], step, sample_rate=sr)
    import io

    from PIL import Image

    png = spectrogram_png(y.numpy(), sr, f"teacher sample, step {step}")
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    writer.add_image("sample/spectrogram", img, step, dataformats="HWC")
    write_wav(exp / "samples" / f"teacher-step{step:08d}.wav", y.numpy(), sr)
