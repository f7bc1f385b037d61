"""Distillation losses: KL(student‖teacher) estimators and the STFT loss.

Everything here is per timestep and in float32 (float64 if given float64).

* Parallel WaveNet (logistic student, mixture-of-logistics teacher):
  ``KL = H(P_S, P_T) − H(P_S)``.  The entropy is closed form,
  ``H_t = log s_tot,t + 2``.  The cross-entropy runs the teacher once on the
  student's sample ``x`` (so ``x_<t`` is the student's own history) and scores
  ``S`` fresh draws ``x'_t ~ Logistic(μ_tot,t, s_tot,t)`` under the teacher's
  *continuous* density.  Nothing is quantised.
* ClariNet (Gaussian student, Gaussian teacher): closed-form Gaussian KL per
  timestep plus ``λ·(log σ_p − log σ_q)²``.
"""

from __future__ import annotations

import math

import torch

from ..flows.base import upcast

LOGISTIC_ENTROPY_CONST = 2.0
GAUSSIAN_ENTROPY_CONST = 0.5 * math.log(2 * math.pi * math.e)


def logistic_entropy(log_s: torch.Tensor) -> torch.Tensor:
    """Differential entropy of Logistic(μ, s) per element: ``log s + 2``."""
    return upcast(log_s) + LOGISTIC_ENTROPY_CONST


def gaussian_entropy(log_s: torch.Tensor) -> torch.Tensor:
    return upcast(log_s) + GAUSSIAN_ENTROPY_CONST


def logistic_draws(mu: torch.Tensor, log_s: torch.Tensor, samples: int, generator: torch.Generator | None = None,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``[B, S, T]`` reparameterised draws ``μ + s·ε``, ``ε ~ Logistic(0, 1)``.

    ``rows=(first, total)``: these ``B`` rows are rows ``first..first+B`` of a global batch of ``total``
    (data-parallel ranks draw the global noise and keep their slice, so N processes match one).
    """
    mu, log_s = upcast(mu), upcast(log_s)
    B, T = mu.shape
    first, total = rows if rows is not None else (0, B)
    u = torch.rand(total, samples, T, generator=generator, dtype=mu.dtype)[first : first + B]
    u = u.to(mu.device).clamp(1e-6, 1 - 1e-6)
    eps = torch.log(u) - torch.log1p(-u)
    return mu[:, None] + torch.exp(log_s)[:, None] * eps


def cross_entropy_mc(dist, teacher_params: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor, samples: int,
                     generator: torch.Generator | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Monte-Carlo estimate of ``−E_{x_t ~ P_S}[log p_T(x_t | x_<t)]`` per timestep ``[B, T]``."""
    draws = logistic_draws(mu, log_s, samples, generator, rows)
    return -dist.log_density(teacher_params, draws).mean(dim=1)


def gaussian_kl(mu_q: torch.Tensor, log_s_q: torch.Tensor, mu_p: torch.Tensor, log_s_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ_q, σ_q) ‖ N(μ_p, σ_p))`` per element."""
    mu_q, log_s_q, mu_p, log_s_p = map(upcast, (mu_q, log_s_q, mu_p, log_s_p))
    return log_s_p - log_s_q + (torch.exp(2 * log_s_q) + (mu_p - mu_q) ** 2) / (2 * torch.exp(2 * log_s_p)) - 0.5


def flow_kl_terms(ladj_inv: torch.Tensor, teacher_log_density: torch.Tensor, elements: int):
    """KL(q‖p) for a flow sample ``x = f(z)``, ``z ~ N(0, I)``, per element: ``(kl, cross_entropy, entropy)``, each ``[B]``.

    Entropy from the log-determinant, ``H(q) = n/2·log(2πe) + log|det ∂x/∂z|`` (exact in expectation, no density of
    ``x`` needed); cross-entropy ``−log p(x)`` from one teacher pass over the reparametrised sample (its continuous
    density, ``x`` never quantised); ``kl = cross_entropy − entropy`` — the entropy counted once.
    ``ladj_inv`` and ``teacher_log_density`` are summed over the ``elements`` values of each item.
    """
    entropy = GAUSSIAN_ENTROPY_CONST + upcast(ladj_inv) / elements
    cross_entropy = -upcast(teacher_log_density) / elements
    return cross_entropy - entropy, cross_entropy, entropy


def stft_magnitude(x: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    window = torch.hann_window(win, device=x.device, dtype=torch.float32)
    spec = torch.stft(upcast(x).float(), n_fft, hop, win, window=window, center=True, return_complex=True)
    return torch.sqrt(torch.clamp(spec.real ** 2 + spec.imag ** 2, min=1e-7))


def stft_loss(x: torch.Tensor, y: torch.Tensor, fft_sizes, hop_sizes, win_sizes) -> torch.Tensor:
    """Multi-resolution windowed STFT-magnitude loss: spectral convergence + log-magnitude L1, averaged."""
    total = x.new_zeros((), dtype=torch.float32)
    for n, h, w in zip(fft_sizes, hop_sizes, win_sizes):
        X = stft_magnitude(x, n, h, w)
        Y = stft_magnitude(y, n, h, w)
        # Spectral convergence over the whole (local) batch: a per-utterance ratio explodes on silent
        # segments (||Y|| ≈ 0). Under data parallelism this is a ratio of each process's local sums.
        sc = torch.linalg.norm(Y - X) / torch.linalg.norm(Y).clamp_min(1e-7)
        mag = (torch.log(X) - torch.log(Y)).abs().mean()
        total = total + sc + mag
    return total / len(fft_sizes)


def log_mel_distance(mel_extractor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of log-mels (nats) — an objective distance for reports."""
    return (mel_extractor(x) - mel_extractor(y)).abs().mean()


class DistillationLoss:
    """Computes every distillation term for one batch; returns ``(total, terms)``.

    ``terms`` holds detached floats: ``kl`` (the estimate CE − H), ``kl_clipped`` (the
    per-timestep-clipped KL that is optimised), ``cross_entropy``, ``entropy``,
    ``stft``, ``log_s_tot`` (mean), and ``contrastive`` when enabled.
    """

    def __init__(self, cfg, teacher, student):
        self.cfg = cfg
        self.kl_off = False  # set per step by the objective before distill.kl_start_step
        self.teacher = teacher
        self.student = student  # may be wrapped (DistributedDataParallel); called through the wrapper
        student = getattr(student, "module", student)
        if cfg.loss == "parallel_wavenet" and student.distribution != "logistic":
            raise ValueError("the Parallel WaveNet loss needs a logistic student (student.distribution: logistic)")
        if cfg.loss == "clarinet" and (student.distribution != "gaussian" or teacher.cfg.output != "gaussian"):
            raise ValueError("the ClariNet loss needs a Gaussian student and a Gaussian teacher")

    def kl_terms(self, x, mu, log_s, mel, context, generator, rows=None):
        cfg = self.cfg
        tparams = self.teacher(x, mel, None, context)
        if cfg.loss == "parallel_wavenet":
            ent = logistic_entropy(log_s)
            ce = cross_entropy_mc(self.teacher.dist, tparams, mu, log_s, cfg.ce_samples, generator, rows)
            kl_t = ce - ent
        else:
            mu_p, log_s_p = self.teacher.dist.split(tparams)
            log_s_q = torch.clamp(upcast(log_s), min=cfg.student_log_scale_min)
            ent = gaussian_entropy(log_s_q)
            kl_t = gaussian_kl(mu, log_s_q, mu_p, log_s_p) + cfg.clarinet_reg * (log_s_p - log_s_q) ** 2
            ce = kl_t + ent
        kl_raw = kl_t.mean()
        return kl_t.clamp(cfg.kl_clip_min, cfg.kl_clip_max).mean(), kl_raw, ce.mean(), ent.mean()

    def __call__(self, z, audio, mel, context: int, generator: torch.Generator | None = None,
                 rows: tuple[int, int] | None = None):
        cfg = self.cfg
        kl_weight = 0.0 if self.kl_off else cfg.kl_weight
        x, mu, log_s = self.student(z, mel, context)
        if kl_weight == 0 and torch.is_grad_enabled():
            # STFT-only training: the teacher pass would only feed a zero-weighted term (validation,
            # under no_grad, still reports the KL)
            kl = kl_raw = ce = ent = torch.full((), float("nan"), device=x.device)
        else:
            kl, kl_raw, ce, ent = self.kl_terms(x, mu, log_s, mel, context, generator, rows)
        stft = stft_loss(x, audio, cfg.stft_fft_sizes, cfg.stft_hop_sizes, cfg.stft_win_sizes)
        total = cfg.stft_weight * stft if kl_weight == 0 else kl_weight * kl + cfg.stft_weight * stft
        terms = {"kl": kl_raw.item(), "kl_clipped": kl.item(), "cross_entropy": ce.item(), "entropy": ent.item(), "stft": stft.item(),
                 "log_s_tot": upcast(log_s).mean().item()}
        if cfg.contrastive_weight > 0 and mel.shape[0] > 1:
            kl_wrong, _, _, _ = self.kl_terms(x, mu, log_s, mel.roll(1, dims=0), context, generator, rows)
            total = total - cfg.contrastive_weight * kl_wrong
            terms["contrastive"] = kl_wrong.item()
        terms["total"] = total.item()
        return total, terms, x
