"""Distillation estimators on cases with known answers."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from wavedistill.config import DistillConfig, StudentConfig, TeacherConfig
from wavedistill.nn.distributions import DiscretizedMixtureOfLogistics
from wavedistill.train.losses import (
    DistillationLoss,
    cross_entropy_mc,
    gaussian_entropy,
    gaussian_kl,
    logistic_entropy,
    stft_loss,
)
from wavedistill.models.student import Student
from wavedistill.models.teacher import Teacher


def test_logistic_entropy_matches_scipy():
    for loc, scale in [(0.0, 1.0), (0.3, 0.05), (-0.2, 3e-4)]:
        want = scipy.stats.logistic(loc=loc, scale=scale).entropy()
        got = logistic_entropy(torch.tensor(math.log(scale), dtype=torch.float64)).item()
        assert abs(got - want) < 1e-9


def test_gaussian_entropy_and_kl_match_torch_distributions():
    torch.manual_seed(0)
    mu_q, mu_p = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    ls_q, ls_p = torch.randn(50, dtype=torch.float64) - 2, torch.randn(50, dtype=torch.float64) - 2
    q = torch.distributions.Normal(mu_q, ls_q.exp())
    p = torch.distributions.Normal(mu_p, ls_p.exp())
    torch.testing.assert_close(gaussian_kl(mu_q, ls_q, mu_p, ls_p), torch.distributions.kl_divergence(q, p))
    torch.testing.assert_close(gaussian_entropy(ls_q), q.entropy())


def mol_params(logits, means, log_scales):
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in (*logits, *means, *log_scales)], dim=0)[None, :, None]


def test_cross_entropy_estimator_gives_zero_kl_when_teacher_equals_student():
    """A one-component teacher identical to the student's conditional logistic: KL = CE − H = 0 in expectation."""
    torch.manual_seed(1)
    T = 4000
    mu = torch.randn(1, T, dtype=torch.float64) * 0.1
    log_s = torch.rand(1, T, dtype=torch.float64) * 4 - 7  # scales from 1e-3 to 5e-2
    dist = DiscretizedMixtureOfLogistics(mixtures=1, log_scale_min=-30.0)
    params = torch.stack([torch.zeros_like(mu), mu, log_s], dim=1)
    g = torch.Generator().manual_seed(0)
    ce = cross_entropy_mc(dist, params, mu, log_s, samples=16, generator=g)
    kl = ce - logistic_entropy(log_s)
    # per-timestep estimates scatter around 0; their mean is 0 within its standard error
    se = kl.std().item() / math.sqrt(T)
    assert abs(kl.mean().item()) < 4 * se + 1e-12
    assert kl.std().item() > 0  # it is a real Monte-Carlo estimate, not a constant


def test_cross_entropy_estimator_is_unbiased_against_quadrature():
    dist = DiscretizedMixtureOfLogistics(mixtures=2, log_scale_min=-30.0)
    teacher = mol_params([0.3, -0.2], [0.05, -0.1], [math.log(0.03), math.log(0.08)])
    mu_s, s_s = 0.02, 0.04
    grid = torch.linspace(-1.5, 1.5, 400001, dtype=torch.float64)
    p_s = torch.from_numpy(scipy.stats.logistic(loc=mu_s, scale=s_s).pdf(grid.numpy()))
    log_pt = dist.log_density(teacher.expand(1, 6, grid.numel()), grid[None])[0]
    true_ce = -torch.trapezoid(p_s * log_pt, grid).item()
    T = 20000
    mu = torch.full((1, T), mu_s, dtype=torch.float64)
    ls = torch.full((1, T), math.log(s_s), dtype=torch.float64)
    est = cross_entropy_mc(dist, teacher.expand(1, 6, T), mu, ls, samples=8, generator=torch.Generator().manual_seed(2))
    se = est.std().item() / math.sqrt(T)
    assert abs(est.mean().item() - true_ce) < 4 * se
    # and a wrong estimator (entropy counted twice) would be far off
    assert abs((est.mean().item() - 2 * logistic_entropy(ls[0, 0]).item()) - (true_ce - logistic_entropy(ls[0, 0]).item())) > 10 * se


def test_kl_is_positive_for_a_mismatched_teacher():
    dist = DiscretizedMixtureOfLogistics(mixtures=1, log_scale_min=-30.0)
    T = 5000
    mu = torch.zeros(1, T, dtype=torch.float64)
    ls = torch.full((1, T), math.log(0.05), dtype=torch.float64)
    teacher = torch.stack([torch.zeros_like(mu), mu + 0.1, ls + 0.5], dim=1)
    ce = cross_entropy_mc(dist, teacher, mu, ls, 16, torch.Generator().manual_seed(3))
    assert (ce - logistic_entropy(ls)).mean() > 0.1


def test_stft_loss_zero_for_identical_and_grows_with_noise():
    torch.manual_seed(0)
    y = torch.sin(torch.arange(4000) / 8000 * 2 * math.pi * 220)[None] * 0.5
    sizes = ([256, 128], [64, 32], [256, 128])
    assert stft_loss(y, y, *sizes).item() < 1e-5
    small = stft_loss(y + 0.01 * torch.randn_like(y), y, *sizes).item()
    big = stft_loss(y + 0.1 * torch.randn_like(y), y, *sizes).item()
    assert 0 < small < big


def _tiny(output, distribution):
    torch.manual_seed(0)
    t = Teacher(TeacherConfig(layers=2, stacks=1, residual_channels=4, gate_channels=8, skip_channels=4, cond_channels=4,
                              upsample_scales=[2, 2], output=output, mixtures=2, log_scale_min=-9.0), n_mels=3)
    s = Student(StudentConfig(flow_layers=[2, 2], stacks_per_flow=[1, 1], residual_channels=4, gate_channels=8,
                              cond_channels=4, upsample_scales=[2, 2], distribution=distribution), n_mels=3)
    t.requires_grad_(False)
    return t, s


@pytest.mark.parametrize("loss,output,distribution", [("parallel_wavenet", "mol", "logistic"), ("clarinet", "gaussian", "gaussian")])
def test_distillation_loss_terms_and_gradients(loss, output, distribution):
    t, s = _tiny(output, distribution)
    cfg = DistillConfig(loss=loss, ce_samples=4, stft_fft_sizes=[64], stft_hop_sizes=[16], stft_win_sizes=[64],
                        contrastive_weight=0.3)
    fn = DistillationLoss(cfg, t, s)
    mel = torch.randn(2, 3, 40)
    audio = torch.randn(2, 160) * 0.1
    z = s.make_noise(2, 160, seed=0)
    total, terms, x = fn(z, audio, mel, context=0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 160)
    assert abs(terms["kl"] - (terms["cross_entropy"] - terms["entropy"])) < 1e-4
    assert "contrastive" in terms
    total.backward()
    assert all(p.grad is not None for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())  # the teacher is frozen


def test_clarinet_kl_zero_when_teacher_matches():
    mu = torch.randn(3, 10, dtype=torch.float64)
    ls = torch.randn(3, 10, dtype=torch.float64) - 3
    assert gaussian_kl(mu, ls, mu, ls).abs().max() < 1e-12


def test_parallel_wavenet_loss_rejects_gaussian_student():
    t, s = _tiny("mol", "gaussian")
    with pytest.raises(ValueError):
        DistillationLoss(DistillConfig(loss="parallel_wavenet"), t, s)


def test_logistic_entropy_closed_form_matches_sample_average():
    rng = np.random.default_rng(0)
    x = scipy.stats.logistic(loc=0.1, scale=0.02).rvs(size=200000, random_state=rng)
    mc = -scipy.stats.logistic(loc=0.1, scale=0.02).logpdf(x).mean()
    assert abs(mc - logistic_entropy(torch.tensor(math.log(0.02))).item()) < 0.01
