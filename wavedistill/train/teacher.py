"""``wavedistill train-teacher``: maximum-likelihood training of the WaveNet teacher (an objective of the one loop)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import load_config
from ..models.teacher import Teacher
from ..nn.distributions import quantize
from .experiment import explicit_max_steps
from .loop import BitsObjective, run_training
from .state import add_spectrogram, valid_segments

LN2 = math.log(2.0)


MU = 255.0


def mu_law_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """``x`` with Gaussian noise of ``std`` added in the mu-law domain (mu = 255), mapped back and clamped to [-1, 1].

    The noise is about ``std / 46`` near silence and grows with the amplitude (``std / 0.36`` at 0.5), like the
    error of a sample drawn from a model of the signal rather than a fixed floor.
    """
    if std <= 0:
        return x
    log_mu = math.log1p(MU)
    y = torch.sign(x) * torch.log1p(MU * x.abs()) / log_mu
    y = (y + std * torch.randn_like(y)).clamp(-1.0, 1.0)
    return torch.sign(y) * torch.expm1(y.abs() * log_mu) / MU


def teacher_nll_bits(model, audio: torch.Tensor, mel: torch.Tensor, context: int, dist=None,
                     input_noise: float = 0.0) -> torch.Tensor:
    """Mean discretized NLL in bits per sample for a batch of segments (mel with context frames).

    ``model`` may be wrapped for data parallelism (it is called through the wrapper); ``dist`` then comes
    from the unwrapped teacher.  ``input_noise`` > 0 (training only, ``teacher.input_noise``) scores the clean
    samples given a noisy history: the parameters at ``t`` come from the noisy input's ``x_<t`` (network and LP
    prediction alike), the target ``x_t`` is clean.
    """
    x = quantize(audio.float())
    params = model(mu_law_noise(x, input_noise), mel, None, context)
    return -(dist or model.dist).log_prob_discrete(params, x).mean() / LN2


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


class TeacherObjective(BitsObjective):
    """Maximum likelihood: the discretized NLL of 16-bit audio in bits per sample."""

    kind, desc = "teacher", "teacher"
    metric, short = "nll_bits", "nll"

    def model_config(self):
        return self.cfg.teacher

    def build_model(self) -> Teacher:
        return Teacher(self.cfg.teacher, self.cfg.features.n_mels, self.cfg.features)

    def banner(self, raw, n_train, n_valid, world, impl, start) -> str:
        n_params = sum(p.numel() for p in raw.parameters())
        return (f"teacher: {n_params / 1e6:.2f} M parameters, receptive field {raw.receptive_field} samples, "
                f"{n_train} train / {n_valid} valid utterances, {world} process(es), {impl} residual layers, start step {start}")

    def batch_bits(self, model, audio, mel) -> torch.Tensor:
        return teacher_nll_bits(model, audio, mel, self.context, self.raw.dist, self.cfg.teacher.input_noise)

    def valid_bits(self, eval_model, valid) -> float:
        return validate(eval_model, valid, self.cfg.train, self.context, self.device)

    def log_sample(self, eval_model, valid, writer, step, exp) -> None:
        _log_sample(eval_model, valid, self.cfg, writer, step, exp)


def train_teacher(config_path, data, out, overrides=None, max_steps=None, resume=False, force=False) -> dict:
    return run_training(TeacherObjective(load_config(config_path, overrides or [])), data, out, resume, max_steps, force,
                        explicit_max_steps(max_steps, overrides))


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
    add_spectrogram(writer, "sample/spectrogram", y.numpy(), sr, f"teacher sample, step {step}", step)
    write_wav(exp / "samples" / f"teacher-step{step:08d}.wav", y.numpy(), sr)
