"""Output distributions over 16-bit audio: normalisation, edges, gradients, densities, sampling."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.stats
import torch
from torch.distributions import AffineTransform, Normal, SigmoidTransform, TransformedDistribution, Uniform

from wavedistill.nn.distributions import (
    HALF_BIN,
    N_CODES,
    DiscretizedGaussian,
    DiscretizedMixtureOfLogistics,
    log1mexp,
    quantize,
)

F64 = torch.float64


def all_codes(dtype=F64) -> torch.Tensor:
    """The 65536 codes ``-1 + 2i/65535``."""
    return -1.0 + 2.0 * torch.arange(N_CODES, dtype=F64) / (N_CODES - 1)


def mol_params(logits, means, log_scales, length: int = 1) -> torch.Tensor:
    """Params ``[B, 3K, length]`` from per-batch lists of K logits, means and log-scales."""
    p = torch.cat([torch.tensor(logits, dtype=F64), torch.tensor(means, dtype=F64), torch.tensor(log_scales, dtype=F64)], dim=1)
    return p[:, :, None].expand(-1, -1, length).contiguous()


def gauss_params(means, log_scales, length: int = 1) -> torch.Tensor:
    p = torch.stack([torch.tensor(means, dtype=F64), torch.tensor(log_scales, dtype=F64)], dim=1)
    return p[:, :, None].expand(-1, -1, length).contiguous()


# Each row: one mixture (K = 3) covering a hard case.
MOL_CASES = {
    "moderate": ([0.1, -0.3, 0.5], [-0.2, 0.0, 0.4], [-3.0, -4.0, -2.5]),
    "near_edges": ([0.0, 0.0, 0.0], [-0.9999, 0.9999, 1.0], [-8.0, -9.0, -6.0]),
    "beyond_edges": ([1.0, -1.0, 0.0], [-1.5, 1.5, 3.0], [-3.0, -1.0, -16.0]),
    "tiny_scales": ([0.2, 0.0, -0.2], [-0.5, 0.123456, 0.7], [-16.0, -16.0, -20.0]),
    "tiny_on_edges": ([0.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-16.0, -16.0, -16.0]),
    "huge_scales": ([0.0, 0.5, -0.5], [0.0, 0.9, -1.5], [3.0, 3.0, 2.0]),
    "mixed": ([5.0, -5.0, 0.0], [0.3, -0.9999, 1.5], [3.0, -16.0, -7.0]),
}


def test_mol_sums_to_one_over_all_codes():
    names = list(MOL_CASES)
    rows = [MOL_CASES[n] for n in names]
    params = mol_params([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], N_CODES)
    x = all_codes()[None].expand(len(rows), -1)
    dist = DiscretizedMixtureOfLogistics(3, log_scale_min=-16.0)
    lp = dist.log_prob_discrete(params, x)
    assert lp.dtype == F64 and lp.shape == (len(rows), N_CODES)
    assert torch.isfinite(lp).all()
    assert (lp <= 1e-12).all()
    total = lp.exp().sum(dim=1)
    for name, t in zip(names, total.tolist()):
        assert abs(t - 1.0) < 1e-4, f"{name}: total mass {t}"


def test_mol_sums_to_one_random_params():
    g = torch.Generator().manual_seed(0)
    B, K = 6, 4
    logits = torch.randn(B, K, generator=g, dtype=F64) * 2
    means = torch.rand(B, K, generator=g, dtype=F64) * 3.2 - 1.6
    log_scales = torch.rand(B, K, generator=g, dtype=F64) * 19 - 16  # [-16, 3]
    params = torch.cat([logits, means, log_scales], dim=1)[:, :, None].expand(-1, -1, N_CODES)
    x = all_codes()[None].expand(B, -1)
    lp = DiscretizedMixtureOfLogistics(K, -16.0).log_prob_discrete(params, x)
    torch.testing.assert_close(lp.exp().sum(dim=1), torch.ones(B, dtype=F64), atol=1e-4, rtol=0)


GAUSS_CASES = {
    "moderate": (0.1, -3.0),
    "near_low": (-0.9999, -8.0),
    "near_high": (0.9999, -12.0),
    "beyond_low": (-1.5, -3.0),
    "beyond_high": (1.5, -16.0),
    "tiny_mid": (0.123456, -16.0),
    "tiny_on_edge": (1.0, -16.0),
    "huge": (0.0, 3.0),
    "huge_off": (-1.5, 3.0),
}


@pytest.mark.parametrize("floor", [-9.0, -16.0])
def test_gaussian_sums_to_one_over_all_codes(floor):
    names = list(GAUSS_CASES)
    params = gauss_params([GAUSS_CASES[n][0] for n in names], [GAUSS_CASES[n][1] for n in names], N_CODES)
    x = all_codes()[None].expand(len(names), -1)
    lp = DiscretizedGaussian(log_scale_min=floor).log_prob_discrete(params, x)
    assert lp.shape == (len(names), N_CODES)
    assert torch.isfinite(lp).all()
    total = lp.exp().sum(dim=1)
    for name, t in zip(names, total.tolist()):
        assert abs(t - 1.0) < 1e-4, f"{name} (floor {floor}): total mass {t}"


def test_edge_codes_take_the_tails():
    """A component centred far beyond +1 puts (almost) all its mass on the top code, and vice versa."""
    x = torch.tensor([[-1.0, 1.0]], dtype=F64)
    mol = DiscretizedMixtureOfLogistics(1, -16.0)
    lp_hi = mol.log_prob_discrete(mol_params([[0.0]], [[1.5]], [[-3.0]], 2), x)
    lp_lo = mol.log_prob_discrete(mol_params([[0.0]], [[-1.5]], [[-3.0]], 2), x)
    # P(top) = 1 - sigmoid((1 - half - 1.5) / s) with s = e^-3
    expect_hi = math.log1p(-1.0 / (1.0 + math.exp(-(1.0 - HALF_BIN - 1.5) / math.exp(-3.0))))
    assert lp_hi[0, 1].item() == pytest.approx(expect_hi, abs=1e-12)
    assert lp_lo[0, 0].item() == pytest.approx(expect_hi, abs=1e-12)
    gauss = DiscretizedGaussian(-16.0)
    lg = gauss.log_prob_discrete(gauss_params([1.5], [-3.0], 2), x)
    assert lg[0, 1].item() == pytest.approx(scipy.stats.norm.logsf(1.0 - HALF_BIN, loc=1.5, scale=math.exp(-3.0)), abs=1e-10)


def exact_log_mass(kind: str, x: float, mu: float, s: float) -> float:
    """log P(bin of x) with 60-digit arithmetic (interior bins)."""
    with mpmath.workdps(60):
        a = (mpmath.mpf(x) - mu + mpmath.mpf(1) / 65535) / s
        b = (mpmath.mpf(x) - mu - mpmath.mpf(1) / 65535) / s
        if kind == "mol":
            cdf = lambda v: 1 / (1 + mpmath.exp(-v))  # noqa: E731
        else:
            cdf = lambda v: mpmath.ncdf(v)  # noqa: E731
        if a + b > 0:  # right of the mean: use the upper tail, where the difference is representable
            a, b = -b, -a
        return float(mpmath.log(cdf(a) - cdf(b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_bin_mass_is_exact(dtype):
    """Far in the tail (where σ(a) − σ(b) underflows in float32) the log mass stays exact, and ≈ log pdf + log width."""
    mu, log_s = 0.0, -3.0
    s = math.exp(log_s)
    xs = [0.6, 0.9, -0.7, 0.05, 0.0]  # up to 18 scales from the mean
    x = torch.tensor([xs], dtype=dtype)
    xd = x.double()[0].tolist()
    mol = DiscretizedMixtureOfLogistics(1, -16.0)
    lp = mol.log_prob_discrete(mol_params([[0.0]], [[mu]], [[log_s]], len(xs)).to(dtype), x)
    gauss = DiscretizedGaussian(-16.0)
    lg = gauss.log_prob_discrete(gauss_params([mu], [log_s], len(xs)).to(dtype), x)
    assert torch.isfinite(lp).all() and torch.isfinite(lg).all()
    ref_l = torch.tensor([[exact_log_mass("mol", v, mu, s) for v in xd]], dtype=F64)
    ref_g = torch.tensor([[exact_log_mass("gaussian", v, mu, s) for v in xd]], dtype=F64)
    if dtype == F64:
        torch.testing.assert_close(lp, ref_l, atol=1e-9, rtol=0)
        torch.testing.assert_close(lg, ref_g, atol=1e-9, rtol=0)
    else:
        torch.testing.assert_close(lp.double(), ref_l, atol=1e-4, rtol=0)
        torch.testing.assert_close(lg.double(), ref_g, atol=3e-3, rtol=0)  # float32: cancellation between log Φ values
    # sanity of the reference: ≈ log pdf + log bin width
    u = (x.double() - mu) / s
    approx = u - log_s - 2 * torch.nn.functional.softplus(u) + math.log(2 * HALF_BIN)
    torch.testing.assert_close(ref_l, approx, atol=1e-4, rtol=0)


EDGE_AND_MIDDLE = [-1.0, -1.0 + 2.0 / 65535, 0.0, 0.5, 1.0 - 2.0 / 65535, 1.0]
MEANS = [-1.5, -1.0, -0.9999, 0.0, 0.5, 0.9999, 1.0, 1.5]
LOG_SCALES = [-20.0, -16.0, -9.0, -3.0, 0.0, 3.0]


def make_params(kind: str, mean: float, log_scale: float, T: int, dtype=F64) -> tuple:
    if kind == "mol":
        dist = DiscretizedMixtureOfLogistics(2, -16.0)
        params = mol_params([[0.3, -0.2]], [[mean, -mean * 0.5]], [[log_scale, -5.0]], T)
    else:
        dist = DiscretizedGaussian(-16.0)
        params = gauss_params([mean], [log_scale], T)
    return dist, params.to(dtype).requires_grad_(True)


@pytest.mark.parametrize("kind", ["mol", "gaussian"])
@pytest.mark.parametrize("log_scale", LOG_SCALES)
@pytest.mark.parametrize("mean", MEANS)
def test_gradients_finite_float64(kind, mean, log_scale):
    x = quantize(torch.tensor([EDGE_AND_MIDDLE], dtype=F64))
    T = x.shape[1]
    dist, params = make_params(kind, mean, log_scale, T)
    lp = dist.log_prob_discrete(params, x)
    assert torch.isfinite(lp).all()
    for t in range(T):
        (g,) = torch.autograd.grad(lp[0, t], params, retain_graph=True)
        assert torch.isfinite(g).all(), f"non-finite gradient at x={x[0, t].item()}"


@pytest.mark.parametrize("kind", ["mol", "gaussian"])
@pytest.mark.parametrize("log_scale", [-16.0, -9.0])
@pytest.mark.parametrize("mean", [-1.5, 0.0, 1.5])
def test_gradients_finite_float32(kind, mean, log_scale):
    """Training runs the density maths in float32; -16 is TeacherConfig's default log-scale floor."""
    x = quantize(torch.tensor([EDGE_AND_MIDDLE], dtype=torch.float32))
    dist, params = make_params(kind, mean, log_scale, x.shape[1], torch.float32)
    lp = dist.log_prob_discrete(params, x)
    lp.sum().backward()
    assert torch.isfinite(lp).all()
    assert torch.isfinite(params.grad).all(), params.grad


@pytest.mark.parametrize("kind", ["mol", "gaussian"])
def test_gradcheck_float64(kind):
    g = torch.Generator().manual_seed(4)
    x = quantize(torch.tensor([[-1.0, -0.5, 0.0, 0.02, 0.7, 1.0]], dtype=F64))
    if kind == "mol":
        dist = DiscretizedMixtureOfLogistics(2, -16.0)
        params = torch.cat([torch.randn(1, 2, 6, generator=g, dtype=F64), torch.rand(1, 2, 6, generator=g, dtype=F64) * 2 - 1,
                            torch.rand(1, 2, 6, generator=g, dtype=F64) - 4.0], dim=1)
    else:
        dist = DiscretizedGaussian(-16.0)
        params = torch.cat([torch.rand(1, 1, 6, generator=g, dtype=F64) * 2 - 1, torch.rand(1, 1, 6, generator=g, dtype=F64) - 4.0], 1)
    params.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: dist.log_prob_discrete(p, x), (params,))
    assert torch.autograd.gradcheck(lambda p: dist.log_density(p, x), (params,))


def test_log_scale_floor_is_applied():
    """Log-scales below the floor behave exactly like the floor (and get no gradient)."""
    x = torch.tensor([[0.0, 0.25]], dtype=F64)
    mol = DiscretizedMixtureOfLogistics(1, log_scale_min=-7.0)
    a = mol.log_prob_discrete(mol_params([[0.0]], [[0.01]], [[-30.0]], 2), x)
    b = mol.log_prob_discrete(mol_params([[0.0]], [[0.01]], [[-7.0]], 2), x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    gauss = DiscretizedGaussian(log_scale_min=-9.0)
    a = gauss.log_prob_discrete(gauss_params([0.01], [-30.0], 2), x)
    b = gauss.log_prob_discrete(gauss_params([0.01], [-9.0], 2), x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------- continuous density


def torch_logistic(loc: torch.Tensor, scale: torch.Tensor) -> TransformedDistribution:
    base = Uniform(torch.zeros_like(loc), torch.ones_like(loc))
    return TransformedDistribution(base, [SigmoidTransform().inv, AffineTransform(loc=loc, scale=scale)])


def test_mol_log_density_single_component_matches_logistic():
    x = torch.linspace(-1.2, 1.2, 97, dtype=F64)[None]
    mu, log_s = 0.13, -2.2
    params = mol_params([[0.7]], [[mu]], [[log_s]], x.shape[1])
    ld = DiscretizedMixtureOfLogistics(1, -16.0).log_density(params, x)
    ref = torch_logistic(torch.tensor(mu, dtype=F64), torch.tensor(math.exp(log_s), dtype=F64)).log_prob(x)
    torch.testing.assert_close(ld, ref, atol=1e-10, rtol=1e-10)
    ref_scipy = torch.from_numpy(scipy.stats.logistic.logpdf(x.numpy(), loc=mu, scale=math.exp(log_s)))
    torch.testing.assert_close(ld, ref_scipy, atol=1e-10, rtol=1e-10)


def test_mol_log_density_mixture_matches_scipy():
    x = torch.linspace(-1.0, 1.0, 41, dtype=F64)[None]
    logits, means, log_scales = [0.5, -1.0, 0.2], [-0.4, 0.1, 0.6], [-2.0, -3.0, -1.5]
    params = mol_params([logits], [means], [log_scales], x.shape[1])
    ld = DiscretizedMixtureOfLogistics(3, -16.0).log_density(params, x)
    w = np.exp(logits) / np.exp(logits).sum()
    pdf = sum(wk * scipy.stats.logistic.pdf(x.numpy(), loc=m, scale=math.exp(ls)) for wk, m, ls in zip(w, means, log_scales))
    torch.testing.assert_close(ld, torch.from_numpy(np.log(pdf)), atol=1e-10, rtol=1e-10)


def test_gaussian_log_density_matches_normal():
    x = torch.linspace(-1.2, 1.2, 97, dtype=F64)[None]
    mu, log_s = -0.3, -1.7
    params = gauss_params([mu], [log_s], x.shape[1])
    ld = DiscretizedGaussian(-9.0).log_density(params, x)
    ref = Normal(torch.tensor(mu, dtype=F64), torch.tensor(math.exp(log_s), dtype=F64)).log_prob(x)
    torch.testing.assert_close(ld, ref, atol=1e-12, rtol=1e-12)


def test_mol_log_density_integrates_to_one():
    grid = torch.linspace(-6.0, 6.0, 240_001, dtype=F64)
    g = torch.Generator().manual_seed(3)
    K = 5
    logits = torch.randn(1, K, generator=g, dtype=F64)
    means = torch.rand(1, K, generator=g, dtype=F64) - 0.5
    log_scales = torch.rand(1, K, generator=g, dtype=F64) * 2.5 - 4.5  # s in [0.011, 0.14]
    params = torch.cat([logits, means, log_scales], dim=1)[:, :, None].expand(-1, -1, grid.numel())
    dens = DiscretizedMixtureOfLogistics(K, -16.0).log_density(params, grid[None]).exp()[0]
    assert torch.trapezoid(dens, grid).item() == pytest.approx(1.0, abs=1e-6)
    gparams = gauss_params([0.2], [-2.0], grid.numel())
    gd = DiscretizedGaussian(-9.0).log_density(gparams, grid[None]).exp()[0]
    assert torch.trapezoid(gd, grid).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["mol", "gaussian"])
def test_log_density_3d_equals_per_sample(kind):
    g = torch.Generator().manual_seed(5)
    B, S, T, K = 2, 4, 7, 3
    if kind == "mol":
        dist = DiscretizedMixtureOfLogistics(K, -16.0)
        params = torch.randn(B, 3 * K, T, generator=g, dtype=F64)
    else:
        dist = DiscretizedGaussian(-9.0)
        params = torch.randn(B, 2, T, generator=g, dtype=F64)
    params[:, -K if kind == "mol" else 1] -= 2.0
    x = torch.rand(B, S, T, generator=g, dtype=F64) * 2 - 1
    out = dist.log_density(params, x)
    assert out.shape == (B, S, T)
    for s in range(S):
        torch.testing.assert_close(out[:, s], dist.log_density(params, x[:, s]), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- sampling


def test_mol_sample_deterministic_and_in_range():
    g = torch.Generator().manual_seed(7)
    B, K, T = 3, 4, 500
    logits = torch.randn(B, K, T, generator=g, dtype=F64)
    means = torch.rand(B, K, T, generator=g, dtype=F64) * 4 - 2  # many beyond ±1
    log_s = torch.rand(B, K, T, generator=g, dtype=F64) * 6 - 5
    params = torch.cat([logits, means, log_s], dim=1)
    dist = DiscretizedMixtureOfLogistics(K, -16.0)
    noise = torch.rand(B, dist.n_noise, T, generator=g, dtype=F64)
    a = dist.sample(params, noise)
    b = dist.sample(params.clone(), noise.clone())
    assert a.shape == (B, T)
    assert torch.equal(a, b)
    assert (a >= -1).all() and (a <= 1).all()
    assert (a == 1).any() and (a == -1).any()  # clamping happened, not wrapping
    other = dist.sample(params, torch.rand(B, dist.n_noise, T, generator=g, dtype=F64))
    assert not torch.equal(a, other)
    # extreme noise values stay finite and in range
    for fill in (0.0, 1.0):
        e = dist.sample(params, torch.full_like(noise, fill))
        assert torch.isfinite(e).all() and (e.abs() <= 1).all()


def test_gaussian_sample_deterministic_and_in_range():
    g = torch.Generator().manual_seed(8)
    T = 400
    params = torch.stack([torch.rand(2, T, generator=g, dtype=F64) * 4 - 2, torch.rand(2, T, generator=g, dtype=F64) * 4 - 4], 1)
    dist = DiscretizedGaussian(-9.0)
    noise = torch.rand(2, dist.n_noise, T, generator=g, dtype=F64)
    a = dist.sample(params, noise)
    assert torch.equal(a, dist.sample(params, noise.clone()))
    assert (a.abs() <= 1).all()
    for fill in (0.0, 1.0):
        e = dist.sample(params, torch.full_like(noise, fill))
        assert torch.isfinite(e).all() and (e.abs() <= 1).all()


def test_logistic_samples_follow_the_logistic():
    n = 20_000
    dist = DiscretizedMixtureOfLogistics(1, -16.0)
    params = mol_params([[0.0]], [[0.0]], [[math.log(0.05)]], n)
    noise = torch.rand(1, dist.n_noise, n, generator=torch.Generator().manual_seed(11), dtype=F64)
    x = dist.sample(params, noise)[0].numpy()
    ks = scipy.stats.kstest(x, scipy.stats.logistic(loc=0.0, scale=0.05).cdf)
    assert ks.pvalue > 1e-3, ks
    # and it is not just any symmetric distribution: a wrong scale is rejected
    assert scipy.stats.kstest(x, scipy.stats.logistic(loc=0.0, scale=0.06).cdf).pvalue < 1e-6
    assert abs(x.mean()) < 0.005
    assert x.std() == pytest.approx(0.05 * math.pi / math.sqrt(3), rel=0.03)


def test_gaussian_samples_follow_the_normal():
    n = 20_000
    dist = DiscretizedGaussian(-9.0)
    params = gauss_params([0.1], [math.log(0.05)], n)
    noise = torch.rand(1, 1, n, generator=torch.Generator().manual_seed(12), dtype=F64)
    x = dist.sample(params, noise)[0].numpy()
    assert scipy.stats.kstest(x, scipy.stats.norm(loc=0.1, scale=0.05).cdf).pvalue > 1e-3


def test_mixture_component_frequencies_follow_weights():
    n = 30_000
    logits = [1.0, 0.0, -1.0]
    means = [-0.6, 0.0, 0.6]
    dist = DiscretizedMixtureOfLogistics(3, -16.0)
    params = mol_params([logits], [means], [[-6.0, -6.0, -6.0]], n)
    noise = torch.rand(1, dist.n_noise, n, generator=torch.Generator().manual_seed(13), dtype=F64)
    x = dist.sample(params, noise)[0]
    comp = torch.bucketize(x, torch.tensor([-0.3, 0.3], dtype=F64))
    freq = torch.bincount(comp, minlength=3).double() / n
    w = torch.softmax(torch.tensor(logits, dtype=F64), 0)
    sd = (w * (1 - w) / n).sqrt()
    assert ((freq - w).abs() < 5 * sd).all(), (freq, w)


def test_temperature_zero_gives_component_mean():
    dist = DiscretizedMixtureOfLogistics(1, -16.0)
    params = mol_params([[0.0]], [[0.3]], [[-2.0]], 10)
    g = torch.Generator().manual_seed(0)
    a = dist.sample(params, torch.rand(1, 2, 10, generator=g, dtype=F64), temperature=0.0)
    b = dist.sample(params, torch.rand(1, 2, 10, generator=g, dtype=F64), temperature=0.0)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.full_like(a, 0.3), atol=0, rtol=0)


# --------------------------------------------------------------------------- helpers


def test_log1mexp_matches_float64_reference():
    d = np.logspace(-8, math.log10(50.0), 2001)
    ref = np.log(-np.expm1(-d))
    got = log1mexp(torch.from_numpy(d)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    got32 = log1mexp(torch.from_numpy(d).float()).double().numpy()
    np.testing.assert_allclose(got32, ref, rtol=2e-6, atol=1e-7)
    # both branch boundaries (ln 2) agree
    ln2 = math.log(2.0)
    around = torch.tensor([ln2 * (1 - 1e-12), ln2, ln2 * (1 + 1e-12)], dtype=F64)
    np.testing.assert_allclose(log1mexp(around).numpy(), np.log(-np.expm1(-around.numpy())), rtol=1e-12)


def test_log1mexp_gradient_finite():
    d = torch.tensor(np.logspace(-8, math.log10(50.0), 200), dtype=F64, requires_grad=True)
    log1mexp(d).sum().backward()
    assert torch.isfinite(d.grad).all()
    # d/dd log(1 - e^-d) = 1 / (e^d - 1)
    torch.testing.assert_close(d.grad, 1.0 / torch.expm1(d.detach()), rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantize_grid_idempotent_and_edges(dtype):
    g = torch.Generator().manual_seed(21)
    x = (torch.rand(100_000, generator=g, dtype=F64) * 2.4 - 1.2).to(dtype)
    q = quantize(x)
    assert q.dtype == dtype
    assert (q >= -1).all() and (q <= 1).all()
    idx = (q.double() + 1) * (N_CODES - 1) / 2
    tol = 1e-6 if dtype == torch.float64 else 4e-3
    assert (idx - idx.round()).abs().max().item() < tol
    assert torch.equal(quantize(q), q)
    inside = x.double().abs() <= 1
    assert ((q.double() - x.double())[inside].abs() <= HALF_BIN * (1 + 1e-6) + (0 if dtype == F64 else 1e-7)).all()
    edges = torch.tensor([-1.0, 1.0, -1.7, 1.7], dtype=dtype)
    assert quantize(edges).tolist() == [-1.0, 1.0, -1.0, 1.0]


def test_quantize_every_code_is_fixed():
    codes = all_codes()
    q = quantize(codes)
    torch.testing.assert_close(q, codes, atol=1e-15, rtol=0)
    idx = torch.round((q + 1) * (N_CODES - 1) / 2).long()
    assert torch.equal(idx, torch.arange(N_CODES))
