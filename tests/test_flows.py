"""Flow contract tests: invertibility, exact log-determinants, causality, gradients."""

import math

import pytest
import torch

from wavedistill.config import StudentConfig
from wavedistill.flows import AffineFlow, FlowSequence, IAFLayer, soft_bound
from wavedistill.models.student import Student

torch.set_default_dtype(torch.float32)


def small_iaf(seed=0, kernel=3, cond=4):
    torch.manual_seed(seed)
    f = IAFLayer(layers=3, stacks=1, kernel_size=kernel, residual_channels=6, gate_channels=8, cond_channels=cond,
                 log_scale_bound=5.0, init_log_scale=-0.5).double()
    # Zero-initialised output heads make the flow affine-constant; randomise them so the test sees real dependence.
    with torch.no_grad():
        f.net.head2.weight.normal_(0, 0.3)
    return f


def flows_under_test():
    T = 12
    c = torch.randn(2, 4, T, dtype=torch.float64)
    iaf = small_iaf()
    seq = FlowSequence([small_iaf(1), small_iaf(2, kernel=2)])
    aff = AffineFlow(torch.randn(2, T, dtype=torch.float64), torch.randn(2, T, dtype=torch.float64) * 0.3)
    return [("iaf", iaf, c), ("sequence", seq, c), ("affine", aff, None)]


@pytest.mark.parametrize("name", ["iaf", "sequence", "affine"])
def test_inverse_of_forward_is_identity(name):
    _, flow, c = next(f for f in flows_under_test() if f[0] == name)
    z = torch.randn(2, 12, dtype=torch.float64)
    x, ladj = flow(z, c)
    z_back, ladj_inv = flow.inverse(x, c)
    torch.testing.assert_close(z_back, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-10, rtol=0)
    assert ladj.shape == (2,)


@pytest.mark.parametrize("name", ["iaf", "sequence", "affine"])
def test_log_det_matches_autograd_jacobian(name):
    _, flow, c = next(f for f in flows_under_test() if f[0] == name)
    z = torch.randn(2, 12, dtype=torch.float64)
    for b in range(2):
        def fn(zb, b=b):
            zz = z.clone()
            zz[b] = zb
            return flow(zz, c)[0][b]

        J = torch.autograd.functional.jacobian(fn, z[b])
        _, log_det = flow(z, c)
        sign, logabs = torch.linalg.slogdet(J)
        assert sign.item() != 0
        torch.testing.assert_close(log_det[b], logabs, atol=1e-9, rtol=0)
        # autoregressive: y_t depends on z_<=t only -> lower-triangular Jacobian
        assert torch.count_nonzero(torch.triu(J, diagonal=1)) == 0
        if name != "affine":
            assert torch.count_nonzero(torch.tril(J, diagonal=-1)) > 0  # and it really is autoregressive
        log_s = flow.affine(z, c)[2].expand_as(z)  # the per-element log-scales the contract also reports
        torch.testing.assert_close(torch.diagonal(J).abs().log(), log_s[b], atol=1e-9, rtol=0)


def test_gradients_reach_every_parameter():
    _, flow, c = flows_under_test()[1]
    z = torch.randn(2, 12, dtype=torch.float64)
    x, log_det = flow(z, c)
    (x.pow(2).sum() + log_det.sum()).backward()
    for n, p in flow.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n


def test_soft_bound_is_smooth_and_bounded():
    a = torch.linspace(-100, 100, 1001, dtype=torch.float64, requires_grad=True)
    y = soft_bound(a, 7.0)
    assert y.abs().max() < 7.0
    y.sum().backward()
    assert (a.grad > 0).all()  # never a flat (zero-gradient) region like a hard clamp
    torch.testing.assert_close(soft_bound(torch.tensor(0.01, dtype=torch.float64), 7.0), torch.tensor(0.01, dtype=torch.float64), atol=1e-6, rtol=0)


def tiny_student(distribution="logistic"):
    torch.manual_seed(0)
    cfg = StudentConfig(flow_layers=[2, 3, 2], stacks_per_flow=[1, 1, 1], kernel_size=3, residual_channels=6,
                        gate_channels=8, cond_channels=4, upsample_scales=[2, 2], distribution=distribution)
    s = Student(cfg, n_mels=5).double()
    with torch.no_grad():
        for f in s.flow.flows:
            f.net.head2.weight.normal_(0, 0.2)
    return s


@pytest.mark.parametrize("distribution", ["logistic", "gaussian"])
def test_composition_equals_running_flows_one_by_one(distribution):
    s = tiny_student(distribution)
    mel = torch.randn(2, 5, 5, dtype=torch.float64)
    z = s.make_noise(2, 20, seed=1, dtype=torch.float64)
    x, mu_tot, log_s_tot = s(z, mel)
    c = s.condition(mel)
    x_seq, log_det = s.flow(z, c)
    torch.testing.assert_close(x, x_seq, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_s_tot.sum(-1), log_det, atol=1e-12, rtol=0)
    # x_t = z_t * s_tot,t + mu_tot,t: the composition is affine per timestep
    torch.testing.assert_close(x, z * torch.exp(log_s_tot) + mu_tot, atol=1e-12, rtol=0)
    # mu_tot, log_s_tot depend on z_<t only: perturbing z_t leaves them unchanged at t
    z2 = z.clone()
    z2[:, 7] += 3.0
    _, mu2, ls2 = s(z2, mel)
    torch.testing.assert_close(mu2[:, :8], mu_tot[:, :8], atol=1e-12, rtol=0)
    torch.testing.assert_close(ls2[:, :8], log_s_tot[:, :8], atol=1e-12, rtol=0)
    assert not torch.allclose(mu2[:, 8:], mu_tot[:, 8:])


def test_student_log_prob_of_own_sample_is_exact():
    s = tiny_student()
    mel = torch.randn(1, 5, 4, dtype=torch.float64)
    z = s.make_noise(1, 16, seed=2, dtype=torch.float64)
    x, _, log_s = s(z, mel)
    fast = s.log_prob_of_sample(z, log_s)
    slow = s.log_prob(x, mel)  # sequential inverse
    torch.testing.assert_close(fast, slow, atol=1e-9, rtol=0)


def test_student_noise_is_positional():
    s = tiny_student()
    whole = s.make_noise(2, 10000, seed=5, dtype=torch.float64)
    part = s.make_noise(2, 3000, seed=5, dtype=torch.float64, offset=4000)
    torch.testing.assert_close(part, whole[:, 4000:7000], atol=0, rtol=0)


def test_kl_duality_forward_kl_equals_reverse_kl_of_induced_base():
    """argmin KL(pi(x)||p(x|theta)) = argmin KL(p(z|theta)||p(z)): the two objectives agree value and gradient."""
    torch.manual_seed(3)
    flow = small_iaf(4, cond=0)
    T, N = 6, 64
    sigma = 0.5
    pi = torch.distributions.Normal(torch.zeros(T, dtype=torch.float64), torch.full((T,), sigma, dtype=torch.float64))
    x = pi.sample((N,))

    def base_logp(z):
        return -z - 2 * torch.nn.functional.softplus(-z)

    # forward KL to data: E_pi[log pi(x) - log p_theta(x)], p_theta via the inverse
    z, _ = flow.inverse(x, None)
    _, log_det = flow(z, None)
    fwd = (pi.log_prob(x).sum(1) - (base_logp(z).sum(1) - log_det)).mean()
    # reverse KL of the induced base distribution: E_{z~p(z|theta)}[log p(z|theta) - log p(z)],
    # with p(z|theta) = pi(f(z)) |det df/dz| evaluated by the forward pass
    x_again, log_det_fwd = flow(z, None)
    torch.testing.assert_close(x_again, x, atol=1e-10, rtol=0)
    rev = ((pi.log_prob(x_again).sum(1) + log_det_fwd) - base_logp(z).sum(1)).mean()
    torch.testing.assert_close(fwd, rev, atol=1e-9, rtol=0)
    g_fwd = torch.autograd.grad(fwd, list(flow.parameters()), retain_graph=True, allow_unused=True)
    g_rev = torch.autograd.grad(rev, list(flow.parameters()), allow_unused=True)
    for a, b in zip(g_fwd, g_rev):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6)
    assert math.isfinite(fwd.item()) and fwd.item() > -1e-6  # a KL is non-negative (up to MC error of the entropy term)


def _doc_example_flow():
    """The 'adding a flow' example of docs/architecture.md, executed as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(# wavedistill/flows/gain.py.*?)```", text, re.S).group(1)
    code = code.replace("from .base import", "from wavedistill.flows.base import")
    namespace: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), namespace)
    return namespace["EvenOddGain"]


def test_a_new_flow_composes_with_the_audio_iaf_through_the_contract():
    """One new file's flow appended to the IAF: total log-det against autograd, inverse, and the affine report."""
    gain = _doc_example_flow()().double()
    with torch.no_grad():
        gain.log_g.copy_(torch.tensor([0.3, -0.7], dtype=torch.float64))
    seq = FlowSequence([small_iaf(5), gain, small_iaf(6, kernel=2)])
    T = 10
    c = torch.randn(2, 4, T, dtype=torch.float64)
    z = torch.randn(2, T, dtype=torch.float64)
    x, ladj = seq(z, c)
    for b in range(2):
        def fn(zb, b=b):
            zz = z.clone()
            zz[b] = zb
            return seq(zz, c)[0][b]

        sign, logabs = torch.linalg.slogdet(torch.autograd.functional.jacobian(fn, z[b]))
        assert sign.item() > 0
        torch.testing.assert_close(ladj[b], logabs, atol=1e-9, rtol=0)
    z_back, ladj_inv = seq.inverse(x, c)
    torch.testing.assert_close(z_back, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9, rtol=0)
    # the composition stays affine per time step: what the student's losses read
    y, mu_tot, log_s_tot = seq.affine(z, c)
    torch.testing.assert_close(y, z * torch.exp(log_s_tot) + mu_tot, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_s_tot.sum(-1), ladj, atol=1e-10, rtol=0)
    # the gain really acts: without it the log-determinant differs by its sum
    base = FlowSequence([seq.flows[0], seq.flows[2]])
    assert not torch.allclose(base(z, c)[1], ladj)
