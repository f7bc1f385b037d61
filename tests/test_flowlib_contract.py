"""The flow contract for every family of the flow library (float64): inverse, exact log-det, gradients, save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from wavedistill.flows import (
    CNF, IAF, MAF, ActNorm, ChannelCoupling, FlowSequence, HouseholderSylvester, InvertibleConv1x1, MaskedCoupling,
    OrthogonalSylvester, Permutation, PlanarFlow, RadialFlow, Scaling, Squeeze1d, Squeeze2d, TriangularSylvester,
    alternating_mask, checkerboard_mask, unsqueeze1d, unsqueeze2d,
)

from conftest import randomize  # noqa: E402,F401  (shared with test_flowlib_properties)

D = torch.float64




def _actnorm(spatial, shape):
    f = ActNorm(shape[1], spatial).double()
    f(torch.randn(*shape, dtype=D) * 2 + 1)  # data-dependent init, then move away from it
    return f


# name -> builder(seed) -> (flow, x, context, inverse tolerance)
CASES = {
    "planar": lambda s: (PlanarFlow(3), (4, 3), None, 1e-10),
    "radial": lambda s: (RadialFlow(3), (4, 3), None, 1e-12),
    "sylvester_orthogonal": lambda s: (OrthogonalSylvester(4, 3), (4, 4), None, 1e-9),
    "sylvester_householder": lambda s: (HouseholderSylvester(4, 3), (4, 4), None, 1e-9),
    "sylvester_triangular": lambda s: (TriangularSylvester(4, reverse=True), (4, 4), None, 1e-9),
    "nice_additive": lambda s: (MaskedCoupling(alternating_mask(4), affine=False, hidden=8), (4, 4), None, 1e-12),
    "nice_scaling": lambda s: (Scaling(4), (4, 4), None, 1e-12),
    "realnvp_vector_context": lambda s: (MaskedCoupling(alternating_mask(5, 1), hidden=8, context_dim=2), (3, 5), (3, 2), 1e-12),
    "realnvp_checkerboard_2d": lambda s: (MaskedCoupling(checkerboard_mask(4, 4, channels=2), hidden=4), (2, 2, 4, 4), None, 1e-12),
    "coupling_1d_context": lambda s: (ChannelCoupling(3, 1, context_channels=2, hidden=6, swap=True), (2, 3, 5), (2, 2, 5), 1e-12),
    "coupling_1d_additive": lambda s: (ChannelCoupling(4, 1, affine=False, hidden=6), (2, 4, 5), None, 1e-12),
    "coupling_2d": lambda s: (ChannelCoupling(3, 2, hidden=4), (2, 3, 4, 4), None, 1e-12),
    "permutation": lambda s: (Permutation(4), (3, 4), None, 0.0),
    "actnorm_vector": lambda s: (_actnorm(0, (16, 3)), (4, 3), None, 1e-12),
    "actnorm_1d": lambda s: (_actnorm(1, (4, 3, 5)), (2, 3, 5), None, 1e-12),
    "actnorm_2d": lambda s: (_actnorm(2, (4, 2, 3, 3)), (2, 2, 3, 3), None, 1e-12),
    "invconv_vector": lambda s: (InvertibleConv1x1(4, 0, seed=s), (4, 4), None, 1e-12),
    "invconv_1d": lambda s: (InvertibleConv1x1(3, 1, seed=s), (2, 3, 5), None, 1e-12),
    "invconv_2d": lambda s: (InvertibleConv1x1(3, 2, seed=s), (2, 3, 3, 3), None, 1e-12),
    "squeeze_1d": lambda s: (Squeeze1d(3), (2, 2, 6), None, 0.0),
    "unsqueeze_1d": lambda s: (unsqueeze1d(2), (2, 4, 3), None, 0.0),
    "squeeze_2d": lambda s: (Squeeze2d(), (2, 1, 4, 4), None, 0.0),
    "unsqueeze_2d": lambda s: (unsqueeze2d(), (2, 4, 2, 2), None, 0.0),
    "maf_context": lambda s: (MAF(4, hidden=(12, 12), context_dim=2), (3, 4), (3, 2), 1e-12),
    "iaf_reversed": lambda s: (IAF(4, hidden=(12,), order=torch.tensor([3, 1, 0, 2])), (3, 4), None, 1e-12),
    "glow_1d_sequence": lambda s: (FlowSequence([_actnorm(1, (4, 4, 6)), InvertibleConv1x1(4, 1, seed=s),
                                                 ChannelCoupling(4, 1, hidden=6)]), (2, 4, 6), None, 1e-12),
    "cnf_exact": lambda s: (CNF(2, trace="exact", atol=1e-10, rtol=1e-10), (3, 2), None, 1e-7),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    flow, xshape, cshape, tol = CASES[name](seed)
    flow = randomize(flow.double(), seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(*xshape, generator=g, dtype=D)
    c = None if cshape is None else torch.randn(*cshape, generator=g, dtype=D)
    return flow, x, c, tol


NAMES = list(CASES)
WITH_PARAMS = [n for n in NAMES if not n.startswith(("permutation", "squeeze", "unsqueeze"))]


@pytest.mark.parametrize("name", NAMES)
def test_inverse_of_forward_is_identity(name):
    flow, x, c, tol = build(name)
    y, ladj = flow(x, c)
    assert y.shape == x.shape or name.startswith(("squeeze", "unsqueeze"))
    assert ladj.shape == (x.shape[0],)
    x_back, ladj_inv = flow.inverse(y, c)
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=max(tol, 1e-12) * 10, rtol=0)
    # .inv swaps directions
    y2, ladj2 = flow.inv(y, c)
    torch.testing.assert_close(y2, x, atol=tol, rtol=0)
    torch.testing.assert_close(ladj2, ladj_inv, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_autograd_jacobian(name):
    flow, x, c, _ = build(name)
    _, ladj = flow(x, c)
    for b in range(min(2, x.shape[0])):
        def fn(xb, b=b):
            xx = x.clone()
            xx[b] = xb.reshape(x.shape[1:])
            return flow(xx, c)[0][b].reshape(-1)

        J = torch.autograd.functional.jacobian(fn, x[b].reshape(-1))
        sign, logabs = torch.linalg.slogdet(J)
        assert sign.item() != 0
        torch.testing.assert_close(ladj[b], logabs, atol=1e-7 if name.startswith("cnf") else 1e-10, rtol=0)


@pytest.mark.parametrize("name", WITH_PARAMS)
def test_gradients_reach_every_parameter(name):
    flow, x, c, _ = build(name)
    y, ladj = flow(x, c)
    (y.pow(2).sum() + ladj.sum()).backward()
    for n, p in flow.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n


@pytest.mark.parametrize("name", WITH_PARAMS)
def test_save_load_gives_identical_outputs(name):
    flow, x, c, _ = build(name, seed=0)
    blob = st_save({k: v.contiguous() for k, v in flow.state_dict().items()})
    fresh, _, _, _ = build(name, seed=1)
    y_fresh, _ = fresh(x, c)
    y, ladj = flow(x, c)
    assert not torch.allclose(y_fresh, y)  # a different seed really is a different flow
    fresh.load_state_dict(st_load(blob))
    y2, ladj2 = fresh(x, c)
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    torch.testing.assert_close(ladj2, ladj, atol=0, rtol=0)
