"""``wavedistill train-flow``: maximum-likelihood training of the coupling-flow vocoder (an objective of the one loop).

The 16-bit samples are dequantized uniformly (:func:`~wavedistill.flows.audio_dequantizer`): each sample is
snapped to its code ``i`` and replaced by ``x = x_i + (u − ½)·w``, ``u ~ U[0, 1)``, ``w = 2/65535`` (the bin
width).  The loss is the dequantized bound in bits per sample,

    bits = (−log p(x) − T·log w) / (T·ln 2),

an upper bound (in expectation over ``u``) on the exact discrete NLL ``−log₂ P(codes)`` of the same 16-bit
codes.  The ``−log w`` term (≈ +15 bits/sample for ``w = 2/65535``) turns the continuous density into the
probability of a bin; without it a continuous density would report ~15 bits/sample too few — not a better
model but a different unit.  So valid bits/sample here compare directly with the teacher's exact discrete
NLL (the teacher scores the same codes, its edge codes also taking the tails).

With ``--teacher`` (:class:`CouplingDistillObjective`) the flow is distilled instead: KL(flow‖teacher) with the
entropy from the flow's log-determinant and the cross-entropy from one teacher pass over the flow's own
reparametrised sample (:func:`~wavedistill.train.losses.flow_kl_terms`), plus the multi-resolution STFT loss
against the real audio (``distill.kl_weight``, ``distill.stft_weight`` and the STFT sizes apply).  Unlike the IAF
student, the coupling flow has no per-timestep conditional, so the cross-entropy is the single-sample estimate.
"""

from __future__ import annotations

from pathlib import Path

import torch

import dataclasses

from ..config import load_config
from ..errors import UserError
from ..flows import audio_dequantizer
from ..models.coupling import CouplingVocoder
from .experiment import explicit_max_steps
from .loop import BitsObjective, run_training
from .distill import load_frozen_teacher
from .losses import flow_kl_terms, stft_loss
from .state import add_spectrogram, valid_segments

DEQUANTIZER = audio_dequantizer()


def dequantize_audio(audio: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, T]`` audio in [−1, 1] → its 16-bit codes dequantized with fresh uniform noise (float32).

    The noise is drawn on the CPU (``generator`` a CPU generator, or the global RNG) and moved to the audio's device.
    """
    codes = DEQUANTIZER.codes(audio)
    u = torch.rand(codes.shape, generator=generator, dtype=torch.float64)
    return DEQUANTIZER.dequantize(codes, u.to(codes.device), dtype=torch.float64).float()


def bits_per_sample(log_density: torch.Tensor, samples: int) -> torch.Tensor:
    """The dequantized bound ``(−log p(x) − T·log w)/(T·ln 2)`` per item ``[B]`` (see the module docstring)."""
    return DEQUANTIZER.bits_per_element(log_density, samples)


def crop_to_group(audio: torch.Tensor, group: int) -> torch.Tensor:
    return audio[..., : audio.shape[-1] - audio.shape[-1] % group]


@torch.no_grad()
def validate(model: CouplingVocoder, valid, train_cfg, context: int, device) -> float:
    """Dequantized bound in bits/sample over the fixed validation segments (noise seeded per segment)."""
    model.eval()
    total, count = 0.0, 0
    for i, a, m in valid_segments(valid, train_cfg, model.hop, context, device):
        x = dequantize_audio(crop_to_group(a, model.group), torch.Generator().manual_seed(i))
        bits = bits_per_sample(model(x, m, context), x.shape[1])
        total += bits.sum().item() * x.shape[1]
        count += x.shape[1]
    model.train()
    return total / max(count, 1)


class CouplingObjective(BitsObjective):
    """Maximum likelihood of uniformly dequantized 16-bit audio (bits/sample, an upper bound on the discrete NLL)."""

    kind, desc = "coupling", "flow"
    metric = short = "bits"
    bound = "dequantized bound"

    def __init__(self, cfg):
        super().__init__(cfg)
        cfg.coupling.validate(cfg.features)  # checks against the features; derives upsample_scales

    def model_config(self):
        return self.cfg.coupling

    def build_model(self) -> CouplingVocoder:
        return CouplingVocoder(self.cfg.coupling, self.cfg.features.n_mels, self.cfg.features)

    def banner(self, raw, n_train, n_valid, world, impl, start) -> str:
        n_params = sum(p.numel() for p in raw.parameters())
        return (f"coupling flow: {n_params / 1e6:.2f} M parameters, {len(raw.steps)} steps on groups of {raw.group}, "
                f"receptive field {raw.receptive_field} samples, {n_train} train / {n_valid} valid utterances, "
                f"{world} process(es), start step {start}")

    def batch_bits(self, model, audio, mel) -> torch.Tensor:
        x = dequantize_audio(crop_to_group(audio, self.raw.group))
        return bits_per_sample(model(x, mel, self.context), x.shape[1]).mean()

    def valid_bits(self, eval_model, valid) -> float:
        return validate(eval_model, valid, self.cfg.train, self.context, self.device)

    def log_sample(self, eval_model, valid, writer, step, exp) -> None:
        _log_sample(eval_model, valid, self.cfg, writer, step, exp)


class CouplingDistillObjective(CouplingObjective):
    """KL(flow‖teacher) + STFT: distillation of a frozen teacher into the coupling flow (one process)."""

    desc = "flow-distill"

    def __init__(self, cfg, teacher_path):
        super().__init__(cfg)
        self.teacher_path = teacher_path

    def setup_frozen(self, acc) -> None:
        if acc.num_processes > 1:
            raise UserError("distillation into the coupling flow runs in one process (its sampling pass bypasses the "
                            "data-parallel wrapper); run it without accelerate launch")
        self.teacher = load_frozen_teacher(self.teacher_path, self.cfg.features, acc.device)
        if self.teacher.cfg.n_speakers:
            raise UserError(f"teacher {self.teacher_path} is multi-speaker; the coupling flow has no speaker input")

    def attach(self, acc, model, raw) -> int:
        self.raw, self.device = raw, acc.device
        self.context = max(raw.cond.frame_context, self.teacher.cond.frame_context)
        return self.context

    def banner(self, raw, n_train, n_valid, world, impl, start) -> str:
        return super().banner(raw, n_train, n_valid, world, impl, start) + f"; distilling teacher {self.teacher_path}"

    def checkpoint_extra(self) -> dict:
        return {"distill": dataclasses.asdict(self.cfg.distill), "teacher": str(self.teacher_path)}

    def terms(self, model: CouplingVocoder, audio, mel, z):
        """``(total, terms)`` for noise ``z`` (the flow's own sample of the segment ``audio``'s mel)."""
        T, dc = audio.shape[1], self.cfg.distill
        x, ladj_inv = model.inverse_and_log_det(z, model.condition(mel, self.context, T))
        log_p = self.teacher.dist.log_density(self.teacher(x, mel, None, self.context), x).sum(-1)
        kl, ce, h = flow_kl_terms(ladj_inv, log_p, T)
        stft = stft_loss(x, audio, dc.stft_fft_sizes, dc.stft_hop_sizes, dc.stft_win_sizes)
        total = dc.kl_weight * kl.mean() + dc.stft_weight * stft
        return total, {"total": total, "kl": kl.mean(), "cross_entropy": ce.mean(), "entropy": h.mean(), "stft": stft}

    def loss(self, model, audio, mel, index, rank, world):
        audio = crop_to_group(audio, self.raw.group)
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7_919 + index)
        z = torch.randn(audio.shape, generator=g).to(self.device)
        total, terms = self.terms(self.raw, audio, mel, z)
        return total, ({k: v.item() for k, v in terms.items()} if torch.isfinite(total) else {})

    def log_line(self, step, avg, gnorm, rate, lr) -> str:
        return (f"step {step}: kl {avg['kl']:.4f} (ce {avg['cross_entropy']:.4f} − H {avg['entropy']:.4f}) "
                f"stft {avg['stft']:.4f} grad {gnorm:.2f} {rate:.0f} samples/s")

    def postfix(self, avg) -> dict:
        return {"kl": f"{avg['kl']:.3f}", "stft": f"{avg['stft']:.3f}"}

    @torch.no_grad()
    def validate(self, eval_model, valid) -> dict:
        eval_model.eval()
        sums, n = {}, 0
        for i, a, m in valid_segments(valid, self.cfg.train, eval_model.hop, self.context, self.device):
            a = crop_to_group(a, eval_model.group)
            z = torch.randn(a.shape, generator=torch.Generator().manual_seed(10_000_000 + i)).to(self.device)
            _, terms = self.terms(eval_model, a, m, z)
            x = dequantize_audio(a, torch.Generator().manual_seed(i))
            terms["bits"] = bits_per_sample(eval_model(x, m, self.context), x.shape[1]).mean()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
        eval_model.train()
        return {k: v / max(n, 1) for k, v in sums.items()}

    def valid_line(self, step, valid) -> str:
        return (f"step {step}: valid kl {valid['kl']:.4f} stft {valid['stft']:.4f}, real audio {valid['bits']:.4f} "
                f"bits/sample (dequantized bound, EMA weights)")

    def score(self, valid) -> float:
        return valid["kl"] + self.cfg.distill.stft_weight * valid["stft"]

    def history(self, kind, values) -> dict:
        return {f"{kind}_{k}": v for k, v in values.items()}


def train_flow(config_path, data, out, overrides=None, max_steps=None, resume=False, force=False, teacher=None) -> dict:
    """Maximum likelihood (``teacher=None``) or distillation of ``teacher`` into the coupling flow."""
    cfg = load_config(config_path, overrides or [])
    objective = CouplingObjective(cfg) if teacher is None else CouplingDistillObjective(cfg, teacher)
    return run_training(objective, data, out, resume, max_steps, force, explicit_max_steps(max_steps, overrides))


@torch.no_grad()
def _log_sample(model: CouplingVocoder, valid, cfg, writer, step: int, exp: Path) -> None:
    from ..data.audio import write_wav

    _, audio, mel = valid[0]
    frames = min(mel.shape[1], max(1, int(cfg.train.sample_seconds * cfg.features.sample_rate) // model.hop))
    m = mel[None, :, :frames].to(next(model.parameters()).device)
    model.eval()
    y = model.synthesize(m, seed=step)[0].float().cpu()
    model.train()
    sr = cfg.features.sample_rate
    writer.add_audio("sample/generated", y[None], step, sample_rate=sr)
    writer.add_audio("sample/ground_truth", audio[: y.shape[0]][None], step, sample_rate=sr)
    add_spectrogram(writer, "sample/spectrogram", y.numpy(), sr, f"coupling-flow sample, step {step}", step)
    write_wav(exp / "samples" / f"coupling-step{step:08d}.wav", y.numpy(), sr)
