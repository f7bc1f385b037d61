"""Family-specific properties of the flow library: invertibility guarantees, normalisation, estimators, dequantization."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from wavedistill.flows import (
    CNF, MAF, ActNorm, FlowDistribution, FlowSequence, HouseholderSylvester, IAFLayer, InvertibleConv1x1,
    MaskedCoupling, OrthogonalizationError, OrthogonalSylvester, Permutation, PlanarFlow, RadialFlow, Scaling,
    StandardNormal, VariationalDequantizer, alternating_mask, audio_dequantizer, exact_trace, hutchinson_trace, image_dequantizer,
    orthogonalize,
)
from wavedistill.flows import continuous as continuous_mod
from wavedistill.nn.distributions import quantize

from conftest import randomize  # noqa: E402,F401  (shared with test_flowlib_contract)

D = torch.float64




# --- normalisation: exp(log_prob) integrates to 1 ------------------------------------------------------------

def _glow_vector(dim):
    an = ActNorm(dim)
    an(torch.randn(64, dim) * 0.8 + 0.3)
    return FlowSequence([an, InvertibleConv1x1(dim, 0, seed=1), MaskedCoupling(alternating_mask(dim), hidden=8)])


DENSITY_CASES = {
    # name: (transform data -> base, dim, grid half-width, grid step)
    "planar_1d": (lambda: PlanarFlow(1).inv, 1, 12.0, 0.01),
    "radial_1d": (lambda: RadialFlow(1), 1, 12.0, 0.01),
    "sylvester_1d": (lambda: OrthogonalSylvester(1).inv, 1, 12.0, 0.01),
    "maf_1d": (lambda: MAF(1, hidden=(8,)), 1, 12.0, 0.01),
    "cnf_1d": (lambda: CNF(1, atol=1e-9, rtol=1e-9), 1, 12.0, 0.02, 0.05),
    "realnvp_2d": (lambda: FlowSequence([MaskedCoupling(alternating_mask(2, p), hidden=8) for p in (0, 1)]), 2, 9.0, 0.05),
    "nice_2d": (lambda: FlowSequence([MaskedCoupling(alternating_mask(2, 0), affine=False, hidden=8), Scaling(2),
                                       MaskedCoupling(alternating_mask(2, 1), affine=False, hidden=8)]), 2, 9.0, 0.05),
    "glow_2d": (lambda: _glow_vector(2), 2, 9.0, 0.05),
    "maf_2d": (lambda: FlowSequence([MAF(2, hidden=(8,)), Permutation(2), MAF(2, hidden=(8,))]), 2, 9.0, 0.05),
    "planar_2d": (lambda: FlowSequence([PlanarFlow(2), PlanarFlow(2)]).inv, 2, 9.0, 0.05),
    "sylvester_2d": (lambda: HouseholderSylvester(2).inv, 2, 9.0, 0.05),
    "cnf_2d": (lambda: CNF(2, atol=1e-6, rtol=1e-6), 2, 7.5, 0.15, 0.05),
}


@pytest.mark.parametrize("name", list(DENSITY_CASES))
def test_density_integrates_to_one(name):
    make, dim, half, step, *scale = DENSITY_CASES[name]
    torch.manual_seed(0)
    transform = randomize(make().double(), scale[0] if scale else 0.3)
    dist = FlowDistribution(StandardNormal(dim), transform).double()
    axis = torch.arange(-half + step / 2, half, step, dtype=D)  # midpoint rule
    grid = axis.unsqueeze(1) if dim == 1 else torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        mass = dist.log_prob(grid).exp().sum().item() * step ** dim
    assert abs(mass - 1.0) < 1e-3, mass
    # and the samples' own log-density agrees with log_prob at those samples
    x, lq = dist.rsample_and_log_prob(5)
    torch.testing.assert_close(lq, dist.log_prob(x), atol=1e-4 if name.startswith("cnf") else 1e-6, rtol=0)


# --- planar / radial invertibility -----------------------------------------------------------------------------

def test_planar_stays_invertible_for_adversarial_u_w():
    f = PlanarFlow(3).double()
    with torch.no_grad():
        f.w.copy_(torch.tensor([1.0, 0.5, 0.0], dtype=D))
        f.u.copy_(-10.0 * f.w / (f.w @ f.w))  # wᵀu = -10: the raw map would fold over
        f.b.fill_(0.3)
    assert (f.w @ f.u).item() == pytest.approx(-10.0)
    assert (f.w @ f.u_hat()).item() > -1.0
    z = torch.randn(50, 3, dtype=D)
    for b in range(5):
        J = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0))[0][0], z[b])
        sign, logabs = torch.linalg.slogdet(J)
        assert sign.item() == 1.0
        torch.testing.assert_close(f(z[b : b + 1])[1][0], logabs, atol=1e-10, rtol=0)
    # monotone along w: a = wᵀz ↦ wᵀf(z) strictly increasing on a fine line through the kink
    w_unit = f.w / f.w.norm()
    a = torch.linspace(-6, 6, 4001, dtype=D)
    line = z[0] - (z[0] @ w_unit) * w_unit + a.unsqueeze(1) * w_unit
    proj = f(line)[0].detach() @ w_unit
    assert (proj.diff() > 0).all()
    y, _ = f(z)
    z_back, _ = f.inverse(y)
    torch.testing.assert_close(z_back, z, atol=1e-10, rtol=0)


def test_radial_stays_invertible_at_beta_minimum():
    f = RadialFlow(2).double()
    with torch.no_grad():
        f.beta_raw.fill_(-30.0)  # β → -α from above
    z = torch.randn(20, 2, dtype=D)
    y, ladj = f(z)
    assert torch.isfinite(ladj).all()
    torch.testing.assert_close(f.inverse(y)[0], z, atol=1e-8, rtol=0)


# --- Glow: 1×1 convolution with negative determinant, ActNorm ---------------------------------------------------

def test_invconv_handles_negative_determinant():
    f = InvertibleConv1x1(3, 1, seed=0).double()
    with torch.no_grad():
        det_sign = torch.linalg.det(f.perm.double()) * f.sign.double().prod()
        if det_sign > 0:
            f.sign[0] = -f.sign[0]
    w = f.weight(D)
    assert torch.linalg.det(w).item() < 0
    x = torch.randn(2, 3, 3, dtype=D)  # 3 positions: det of the whole map = det(W)^3 < 0
    y, ladj = f(x)
    J = torch.autograd.functional.jacobian(lambda v: f(v.reshape(1, 3, 3))[0][0].reshape(-1), x[0].reshape(-1))
    sign, logabs = torch.linalg.slogdet(J)
    assert sign.item() == -1.0
    torch.testing.assert_close(ladj[0], logabs, atol=1e-10, rtol=0)
    x_back, ladj_inv = f.inverse(y)
    assert torch.isfinite(x_back).all() and torch.isfinite(ladj_inv).all()
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _actnorm_worker(rank, world, port, parts, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        f = ActNorm(parts[rank].shape[1], spatial_dims=1).double()
        f(parts[rank])
        save_file({"bias": f.bias.detach().contiguous(), "log_scale": f.log_scale.detach().contiguous()},
                  f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_actnorm_init_identical_for_one_and_two_processes(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 5, generator=g, dtype=D) * torch.tensor([0.5, 2.0, 3.0], dtype=D).view(1, 3, 1) + 4.0
    parts = [x[:3].clone(), x[3:].clone()]  # unequal shares: the counts must be reduced too
    mp.start_processes(_actnorm_worker, args=(2, _free_port(), parts, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")  # fork: no re-import of torch per process
    single = ActNorm(3, spatial_dims=1).double()
    y, _ = single(x)
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        torch.testing.assert_close(got["bias"], single.bias.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(got["log_scale"], single.log_scale.detach(), atol=1e-12, rtol=0)
    # the single-process init normalises the batch per channel
    torch.testing.assert_close(y.mean(dim=(0, 2)), torch.zeros(3, dtype=D), atol=1e-10, rtol=0)
    # var/(var + eps) with eps = 1e-6
    torch.testing.assert_close(y.var(dim=(0, 2), unbiased=False), torch.ones(3, dtype=D), atol=1e-5, rtol=0)


def test_actnorm_zero_variance_channel_stays_finite():
    x = torch.randn(8, 3, 4)
    x[:, 1] = 0.25  # a silent channel
    f = ActNorm(3, spatial_dims=1)
    y, ladj = f(x)
    assert torch.isfinite(f.log_scale).all() and torch.isfinite(y).all() and torch.isfinite(ladj).all()
    x_back, _ = f.inverse(y)
    assert torch.isfinite(x_back).all()
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    # initialisation happens once: a second batch does not re-initialise
    before = f.bias.detach().clone()
    f(torch.randn(8, 3, 4) + 10)
    torch.testing.assert_close(f.bias.detach(), before, atol=0, rtol=0)


# --- Sylvester orthogonalisation ----------------------------------------------------------------------------------

def test_orthogonalize_converges_and_raises_when_it_cannot():
    q = orthogonalize(torch.randn(5, 3, dtype=D))
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=D), atol=1e-12, rtol=0)
    rank_deficient = torch.randn(5, 3, dtype=D)
    # a zero column: its singular value is exactly 0 and stays 0 in floating point. (Two equal columns are not a
    # portable case: rounding leaves a singular value of ~1e-16 that the iteration grows by ×1.5 a step, so on
    # some CPUs 100 iterations reach an orthonormal basis; that basis is valid for a Sylvester flow.)
    rank_deficient[:, 2] = 0.0
    with pytest.raises(OrthogonalizationError, match="did not converge"):
        orthogonalize(rank_deficient)
    with pytest.raises(OrthogonalizationError):
        orthogonalize(torch.randn(5, 3, dtype=D), max_iter=1)
    f = OrthogonalSylvester(4, 2).double()
    with torch.no_grad():
        f.q_raw[:, 1] = 0.0
    with pytest.raises(OrthogonalizationError):
        f(torch.randn(2, 4, dtype=D))


# --- CNF: Hutchinson estimator ------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_trace_is_unbiased(noise):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    N = 20000
    x = torch.randn(1, 3, dtype=D).expand(N, 3).clone().requires_grad_(True)
    fx = net(x)
    xe = x[:1].detach().clone().requires_grad_(True)
    exact = exact_trace(net(xe), xe, create_graph=False).item()
    eps = continuous_mod.draw_noise(x, noise, torch.Generator().manual_seed(1))
    est = hutchinson_trace(fx, x, eps, create_graph=False)
    se = est.std().item() / math.sqrt(N)
    assert se > 0
    assert abs(est.mean().item() - exact) < 3 * se, (est.mean().item(), exact, se)


def test_cnf_draws_hutchinson_noise_once_per_solve(monkeypatch):
    calls = []
    real = continuous_mod.draw_noise

    def counting(like, kind, generator=None):
        calls.append(kind)
        return real(like, kind, generator)

    monkeypatch.setattr(continuous_mod, "draw_noise", counting)
    torch.manual_seed(0)
    f = CNF(2, trace="hutchinson", noise="gaussian", atol=1e-6, rtol=1e-6).double()
    calls.clear()  # the constructor validates the noise kind
    x = torch.randn(4, 2, dtype=D)
    y, ladj = f(x)
    assert len(calls) == 1 and f.nfe > 2
    eps = torch.randn(4, 2, dtype=D)
    f.atol = f.rtol = 1e-9
    y1, l1 = f(x, noise=eps)
    y2, l2 = f(x, noise=eps)
    torch.testing.assert_close(l1, l2, atol=0, rtol=0)  # fixed noise, deterministic solve
    x_back, _ = f.inverse(y1, noise=eps)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=0)


# --- KL duality for a non-autoregressive flow ---------------------------------------------------------------------

def test_kl_duality_realnvp():
    """Forward KL in data space = reverse KL of the pulled-back data distribution in base space (RealNVP + ActNorm)."""
    torch.manual_seed(5)
    dim, N = 4, 4000
    an = ActNorm(dim).double()
    an(torch.randn(256, dim, dtype=D))
    T = randomize(FlowSequence([an] + [MaskedCoupling(alternating_mask(dim, p % 2), hidden=8) for p in range(3)]).double(), 0.2)
    base = StandardNormal(dim).double()
    cov = torch.tensor([[1.0, 0.5, 0, 0], [0.5, 1.0, 0, 0], [0, 0, 0.3, 0], [0, 0, 0, 2.0]], dtype=D)
    pi = torch.distributions.MultivariateNormal(torch.tensor([0.5, -0.3, 0.0, 1.0], dtype=D), cov)
    x = pi.sample((N,))
    z, ladj = T(x)
    fwd_terms = pi.log_prob(x) - (base.log_prob(z) + ladj)  # log π(x) − log p_θ(x)
    # reverse KL in base space: z ~ p(z|θ) (the push-forward of π), log p(z|θ) = log π(T⁻¹z) + log|det ∂T⁻¹/∂z|
    x_back, ladj_inv = T.inverse(z)
    rev_terms = (pi.log_prob(x_back) + ladj_inv) - base.log_prob(z)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(rev_terms, fwd_terms, atol=1e-9, rtol=0)  # sample by sample
    g_f = torch.autograd.grad(fwd_terms.mean(), list(T.parameters()), retain_graph=True)
    g_r = torch.autograd.grad(rev_terms.mean(), list(T.parameters()))
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6)
    # and with independent draws the two Monte-Carlo estimates agree within their errors
    with torch.no_grad():
        z2, _ = T(pi.sample((N,)))
        x2, li2 = T.inverse(z2)
        rev2 = (pi.log_prob(x2) + li2) - base.log_prob(z2)
    se = math.sqrt(fwd_terms.var().item() / N + rev2.var().item() / N)
    assert abs(fwd_terms.mean().item() - rev2.mean().item()) < 4 * se
    assert fwd_terms.mean().item() > 0  # a KL (the flow is far from fitted)


# --- dequantization -----------------------------------------------------------------------------------------------

def test_dequantized_nll_bounds_the_exact_discrete_nll():
    """A 2-D continuous flow on 3-bit pairs: −E_u log p(x) − 2·log w ≥ −log P(k) bin by bin (Jensen)."""
    torch.manual_seed(0)
    deq = image_dequantizer(bits=3)  # 8 levels, bins of width 1/8 on [0, 1)
    flow = FlowSequence([Scaling(2, init=1.2), MaskedCoupling(alternating_mask(2, 0), hidden=8),
                         MaskedCoupling(alternating_mask(2, 1), hidden=8)])
    model = FlowDistribution(StandardNormal(2), randomize(flow.double(), 0.5)).double()
    with torch.no_grad():
        model.transform.flows[0].log_scale.fill_(1.5)
    q = 40  # midpoint quadrature points per bin and axis
    u = (torch.arange(q, dtype=D) + 0.5) / q
    uu = torch.cartesian_prod(u, u)
    codes = torch.cartesian_prod(torch.arange(8), torch.arange(8))
    with torch.no_grad():
        x = deq.dequantize(codes.repeat_interleave(q * q, 0), uu.repeat(len(codes), 1))
        logp = model.log_prob(x).view(len(codes), q * q)
    log_mass = torch.logsumexp(logp, 1) - math.log(q * q) + 2 * deq.log_bin_width  # log P(k) = log ∫_bin p
    bound = deq.discrete_log_prob_bound(logp.mean(1), 2)  # E_u[log p] + 2 log w
    assert (bound <= log_mass + 1e-12).all()
    assert (log_mass - bound).max() > 1e-3  # the gap is real here, not a vacuous comparison
    # a toy data distribution over the codes: bits/element of the bound ≥ exact discrete bits/element
    pi = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=D), 0)
    exact_bits = -(pi * log_mass).sum() / (2 * math.log(2))
    bound_bits = (pi * deq.bits_per_element(logp.mean(1), 2)).sum()
    assert bound_bits >= exact_bits
    # Monte-Carlo dequantization (what training does) estimates the same bound
    g = torch.Generator().manual_seed(2)
    k = codes[torch.multinomial(pi, 20000, replacement=True, generator=g)]
    with torch.no_grad():
        mc = deq.bits_per_element(model.log_prob(deq.dequantize(k, generator=g)), 2)
    assert abs(mc.mean().item() - bound_bits.item()) < 4 * mc.std().item() / math.sqrt(len(mc))


def test_variational_dequantization_is_normalised_and_still_a_bound():
    torch.manual_seed(0)
    deq = image_dequantizer(bits=3)
    model = FlowDistribution(StandardNormal(2), randomize(FlowSequence([Scaling(2, init=1.5),
                             MaskedCoupling(alternating_mask(2, 0), hidden=8)]).double(), 0.5)).double()
    vd = VariationalDequantizer(deq, randomize(MaskedCoupling(alternating_mask(2, 1), hidden=8, context_dim=2).double(), 0.5))
    code = torch.tensor([[2, 5]])
    # q(u|k) integrates to 1 over the unit square (midpoint rule)
    n = 300
    u = (torch.arange(n, dtype=D) + 0.5) / n
    uu = torch.cartesian_prod(u, u)
    with torch.no_grad():
        lq = vd.log_q(code.expand(len(uu), 2), uu)
        assert abs(lq.exp().mean().item() - 1.0) < 2e-3
        # the sampling path reports the same log q as the inverse path
        x, lq_s = vd.sample(code.expand(64, 2), generator=torch.Generator().manual_seed(3))
        u_s = (x - deq.offset) * deq.scale - code
        torch.testing.assert_close(vd.log_q(code.expand(64, 2), u_s), lq_s, atol=1e-8, rtol=0)
        # E_q[log p − log q] + 2 log w ≤ log P(k) (exact bin mass by quadrature)
        log_mass = (torch.logsumexp(model.log_prob(deq.dequantize(code.expand(len(uu), 2), uu)), 0) - math.log(len(uu))
                    + 2 * deq.log_bin_width)
        x, lq_s = vd.sample(code.expand(20000, 2), generator=torch.Generator().manual_seed(4))
        b = vd.discrete_log_prob_bound(model.log_prob(x), lq_s, 2)
    assert b.mean().item() <= log_mass.item() + 3 * b.std().item() / math.sqrt(len(b))


def test_audio_dequantizer_matches_the_project_grid():
    deq = audio_dequantizer()
    assert deq.levels == 65536 and deq.scale == pytest.approx(65535 / 2)
    x = torch.rand(1000, dtype=D) * 2 - 1
    grid = quantize(x)
    codes = deq.codes(grid)
    torch.testing.assert_close(deq.centres(codes), grid, atol=1e-12, rtol=0)  # each grid point is its bin's centre
    cont = deq.dequantize(codes)
    torch.testing.assert_close(quantize(cont), grid, atol=0, rtol=0)  # dequantized values snap back to the same code
    assert ((cont - grid).abs() <= 1 / 65535 + 1e-15).all()
    assert deq.codes(torch.tensor([-1.0, 1.0], dtype=D)).tolist() == [0, 65535]
    # log(bin width) = log(2/65535): about −15 bits per sample
    assert deq.log_bin_width / math.log(2) == pytest.approx(math.log2(2 / 65535))


# --- a new flow composes with the student's IAF layer without touching the student --------------------------------

def _small_iaf(seed):
    torch.manual_seed(seed)
    f = IAFLayer(layers=3, stacks=1, kernel_size=3, residual_channels=6, gate_channels=8, cond_channels=0,
                 log_scale_bound=5.0, init_log_scale=-0.5).double()
    with torch.no_grad():
        f.net.head2.weight.normal_(0, 0.3)
    return f


def test_iaf_layer_composes_with_an_even_odd_coupling():
    T = 10
    coupling = randomize(MaskedCoupling(alternating_mask(T), hidden=8).double(), 0.3)  # even samples condition odd ones
    seq = FlowSequence([_small_iaf(0), coupling, _small_iaf(1), Scaling(T).double()])
    z = torch.randn(2, T, dtype=D)
    x, ladj = seq(z)
    assert ladj.shape == (2,)
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda v: seq(v.unsqueeze(0))[0][0], z[b])
        sign, logabs = torch.linalg.slogdet(J)
        assert sign.item() != 0
        torch.testing.assert_close(ladj[b], logabs, atol=1e-9, rtol=0)
        assert torch.count_nonzero(torch.triu(J, diagonal=1)) > 0  # the coupling really is non-causal
    z_back, ladj_inv = seq.inverse(x)
    torch.testing.assert_close(z_back, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9, rtol=0)
    with pytest.raises(TypeError, match="not affine autoregressive"):
        seq.affine(z)  # the student's closed-form path refuses a non-autoregressive member


def test_cnf_adjoint_matches_direct_backprop():
    torch.manual_seed(0)
    direct = CNF(2, trace="exact", atol=1e-7, rtol=1e-7).double()
    adjoint = CNF(2, trace="exact", atol=1e-7, rtol=1e-7, adjoint=True).double()
    adjoint.load_state_dict(direct.state_dict())
    x = torch.randn(3, 2, dtype=D)
    grads = []
    for f in (direct, adjoint):
        y, ladj = f(x)
        loss = y.pow(2).sum() + ladj.sum()
        grads.append((y.detach(), ladj.detach(), torch.autograd.grad(loss, list(f.parameters()))))
        assert f.nfe > 0
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=0)
    for a, b in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
