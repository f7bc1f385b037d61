"""``wavedistill distill``: probability density distillation of a frozen teacher into an IAF student."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..config import load_config
from ..data.audio import MelExtractor
from ..errors import UserError
from ..models.student import Student
from .experiment import explicit_max_steps
from .loop import Objective, run_training
from .losses import DistillationLoss, log_mel_distance
from .state import add_spectrogram, valid_segments

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


class DistillObjective(Objective):
    """KL(student‖teacher) (Parallel WaveNet's Monte-Carlo estimate or ClariNet's closed form) plus STFT terms."""

    kind, desc = "student", "distill"

    def __init__(self, cfg, teacher_path):
        super().__init__(cfg)
        self.teacher_path = teacher_path

    def model_config(self):
        return self.cfg.student

    def validate_config(self) -> None:
        want = "logistic" if self.cfg.distill.loss == "parallel_wavenet" else "gaussian"
        if self.cfg.student.distribution != want:
            raise UserError(f"distill.loss={self.cfg.distill.loss} needs student.distribution={want}; fix the config")

    def setup_frozen(self, acc) -> None:
        dc, path = self.cfg.distill, self.teacher_path
        self.teacher = teacher = load_frozen_teacher(path, self.cfg.features, acc.device)
        if dc.loss == "clarinet" and teacher.cfg.output != "gaussian":
            raise UserError(f"distill.loss=clarinet needs a Gaussian teacher, but {path} outputs '{teacher.cfg.output}'")
        if dc.loss == "parallel_wavenet" and teacher.cfg.output != "mol":
            raise UserError(f"distill.loss=parallel_wavenet needs a mixture-of-logistics teacher, but {path} outputs '{teacher.cfg.output}'")

    def build_model(self) -> Student:
        return Student(self.cfg.student, self.cfg.features.n_mels, self.cfg.features)

    def attach(self, acc, model, raw) -> int:
        self.raw, self.device = raw, acc.device
        self.context = max(raw.cond.frame_context, self.teacher.cond.frame_context)
        self.loss_fn = DistillationLoss(self.cfg.distill, self.teacher, model)
        self.mel_fn = MelExtractor(self.cfg.features).to(acc.device)
        return self.context

    def attach_eval(self, eval_model) -> None:
        self.eval_loss = DistillationLoss(self.cfg.distill, self.teacher, eval_model)

    def banner(self, raw, n_train, n_valid, world, impl, start) -> str:
        n_params = sum(p.numel() for p in raw.parameters())
        return (f"student: {n_params / 1e6:.2f} M parameters, {len(self.cfg.student.flow_layers)} flows, receptive field "
                f"{raw.receptive_field}; loss {self.cfg.distill.loss}; teacher {self.teacher_path}; {impl} residual layers; "
                f"start step {start}")

    def checkpoint_extra(self) -> dict:
        return {"distill": dataclasses.asdict(self.cfg.distill), "teacher": str(self.teacher_path)}

    def loss(self, model, audio, mel, index, rank, world):
        tc = self.cfg.train
        # noise for the whole global batch from one generator; each rank keeps its rows
        g = _step_generator(tc.seed, index, 0)
        per = tc.batch_size // world
        rows = (rank * per, tc.batch_size)
        u = torch.rand((tc.batch_size, audio.shape[1]), generator=g, dtype=torch.float64)[rows[0] : rows[0] + per]
        z = self.raw.noise_from_uniform(u).float().to(self.device)
        self.loss_fn.kl_off = index // self.cfg.train.grad_accum < self.cfg.distill.kl_start_step  # STFT-only warm-up
        total, terms, _ = self.loss_fn(z, audio, mel, self.context, g, rows)
        return total, terms

    def log_line(self, step, avg, gnorm, rate, lr) -> str:
        return (f"step {step}: kl {avg['kl']:.4f} (ce {avg['cross_entropy']:.4f} − H {avg['entropy']:.4f}) "
                f"stft {avg['stft']:.4f} log_s {avg['log_s_tot']:.3f} grad {gnorm:.2f} {rate:.0f} samples/s")

    def postfix(self, avg) -> dict:
        return {"kl": f"{avg['kl']:.3f}", "stft": f"{avg['stft']:.3f}"}

    def validate(self, eval_model, valid) -> dict:
        return validate(eval_model, self.eval_loss, valid, self.cfg.train, self.context, self.device, self.cfg.train.seed,
                        self.mel_fn)

    def valid_line(self, step, valid) -> str:
        return (f"step {step}: valid kl {valid['kl']:.4f} stft {valid['stft']:.4f} "
                f"log-mel L1 {valid['log_mel_l1']:.4f} (EMA weights)")

    def score(self, valid) -> float:
        return self.cfg.distill.kl_weight * valid["kl"] + self.cfg.distill.stft_weight * valid["stft"]  # what is trained

    def log_sample(self, eval_model, valid, writer, step, exp) -> None:
        _log_sample(eval_model, valid, self.cfg, writer, step, exp)


def distill(config_path, teacher_path, data, out, overrides=None, max_steps=None, resume=False, force=False) -> dict:
    return run_training(DistillObjective(load_config(config_path, overrides or []), teacher_path), data, out, resume,
                        max_steps, force, explicit_max_steps(max_steps, overrides))


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
