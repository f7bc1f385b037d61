"""The compiled CPU generator with linear prediction + pre-emphasis against the Python CachedGenerator.

A source-filter teacher shifts every step's location by ``x̂_t = Σ_k a_k(t)·x_{t-1-k}`` (MoL: every
component's mean; Gaussian: the mean) computed from its own generated history.  The C++ generator must
do exactly what ``CachedGenerator.run(..., lpc=)`` does: same noise → same samples to float32 rounding,
the same shifted parameters, the history carried in ``cache.lp_history`` across calls (also between
the two generators), and ``make_generator`` must choose it for float32 CPU teachers.

As in ``test_fastgen.py``, a near-tie of the Gumbel-max argmax (top-2 margin < 1e-4) may legitimately
flip a mixture component; the stepwise check tells such a tie from a bug, and with the seeds here none occurs.
"""

from __future__ import annotations

import pytest
import torch

from test_fastgen import PARAM_TOL, TIE, TOL, gumbel_margin
from wavedistill.config import FeatureConfig, TeacherConfig
from wavedistill.generation import cpp as fastgen
from wavedistill.generation.cached import CachedGenerator, FrameConditioning
from wavedistill.generation.select import make_generator
from wavedistill.inference.synthesis import Vocoder
from wavedistill.kernels import ENV_VAR
from wavedistill.models.teacher import Teacher

TINY = FeatureConfig(sample_rate=8000, n_fft=64, win_length=48, hop_length=6, n_mels=5, fmin=0.0, fmax=4000.0)


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not fastgen.available():
        pytest.skip(f"fast CPU generator unavailable here: {fastgen.build_error()}")


pytestmark = pytest.mark.usefixtures("single_thread")


def lp_teacher(output: str = "mol", lpc_order: int = 4, preemphasis: float = 0.8, seed: int = 0) -> Teacher:
    """A random float32 source-filter teacher (hop 6, 5 mels); channel counts not multiples of 16 (padding)."""
    cfg = TeacherConfig(layers=6, stacks=2, kernel_size=2, residual_channels=12, gate_channels=20, skip_channels=10,
                        cond_channels=8, upsample_scales=[2, 3], output=output, mixtures=3, log_scale_min=-9.0,
                        lpc_order=lpc_order, preemphasis=preemphasis)
    cfg.validate(TINY)
    torch.manual_seed(seed)
    t = Teacher(cfg, TINY.n_mels, TINY).eval()
    with torch.no_grad():
        for p in t.net.layers.parameters():
            p.mul_(1.5)
        t.net.head2.weight.mul_(0.5)
        if output == "mol":
            t.net.head2.bias[2 * cfg.mixtures :] = -2.5
        else:
            t.net.head2.bias[1] = -2.5
    assert t.source is not None and t.source.order == lpc_order + (1 if preemphasis else 0)
    return t


def speechy_mel(frames: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, TINY.n_mels, frames, generator=torch.Generator().manual_seed(seed)) - 3.0


@torch.no_grad()
def inputs(t: Teacher, frames: int, batch: int = 2, seed: int = 1):
    mel = speechy_mel(frames, batch, seed)
    c = FrameConditioning.from_mel(t.cond, mel)
    return mel, c, t.source.predictor(mel), t.make_noise(batch, c.shape[2], seed=seed + 1)


@torch.no_grad()
def check_stepwise(t: Teacher, c, noise, lpc, fast: torch.Tensor, params: torch.Tensor) -> list[int]:
    """Drive the Python step with the fast samples as history, shift by the prediction from that history,
    and compare every step's shifted parameters and sample; return, per row, the first near-tie step (or T)."""
    B, _, T = c.shape
    gen = CachedGenerator(t)
    cache = gen.new_cache(B)
    coef = lpc.per_sample(T, B, torch.float32)
    x_prev = torch.zeros(B)
    first_tie = [T] * B
    worst, largest_shift = 0.0, 0.0
    cb = gen.cond_block(c, 0, T)
    for s in range(T):
        past = fast[:, max(0, s - lpc.order) : s].flip(1)  # x_{s-1}, x_{s-2}, ... (zeros before 0)
        pred = (coef[:, s, : past.shape[1]] * past).sum(1, keepdim=True)
        p_ref = t.dist.shift(gen.step(x_prev, cb[s], cache)[:, :, None], pred)
        worst = max(worst, ((p_ref[:, :, 0] - params[:, :, s]).abs() / p_ref[:, :, 0].abs().clamp_min(1.0)).max().item())
        largest_shift = max(largest_shift, pred.abs().max().item())
        x_ref = t.dist.sample(p_ref, noise[:, :, s : s + 1])[:, 0]
        bad = (x_ref - fast[:, s]).abs() > TOL
        if bad.any():
            margin = gumbel_margin(t.dist, p_ref[:, :, 0], noise[:, :, s])
            for b in bad.nonzero()[:, 0].tolist():
                assert 0 < margin[b] < TIE, f"step {s} row {b}: sample {fast[b, s].item()} != {x_ref[b].item()} (margin {margin[b]})"
                first_tie[b] = min(first_tie[b], s)
        x_prev = fast[:, s]
    assert worst <= PARAM_TOL, f"shifted distribution parameters differ by {worst}"
    assert largest_shift > 0.05, "the prediction hardly moves the locations: the test would not see a missing shift"
    return first_tie


@pytest.mark.parametrize("output", ["mol", "gaussian"])
@pytest.mark.parametrize("block", [None, 45])
def test_matches_cached_generator(output, block):
    t = lp_teacher(output)
    mel, c, lpc, noise = inputs(t, 70)
    ref_cache = CachedGenerator(t).new_cache(2)
    ref = CachedGenerator(t).run(c, noise, lpc=lpc, cache=ref_cache)
    gen = fastgen.FastCachedGenerator(t)
    if block is not None:
        gen.block = block  # several C++ calls, each with its block of per-sample predictors
    cache = gen.new_cache(2)
    fast, params = gen.run(c, noise, lpc=lpc, cache=cache, return_params=True)
    assert fast.shape == ref.shape == (2, 420) and params.shape == (2, t.dist.n_params, 420)
    first_tie = check_stepwise(t, c, noise, lpc, fast, params)
    if output == "gaussian":
        assert first_tie == [420, 420]
    assert sum(420 - f for f in first_tie) < 420, "too many near-ties for a meaningful comparison"
    for b, stop in enumerate(first_tie):
        diff = (fast[b, :stop] - ref[b, :stop]).abs().max().item()
        assert diff <= TOL, f"row {b}: fast and Python generators differ by {diff}"
    if first_tie == [420, 420]:
        torch.testing.assert_close(cache.lp_history, ref_cache.lp_history, atol=TOL, rtol=0)
    assert cache.lp_history.shape == (2, t.source.order) and cache.lp_history.dtype == torch.float32
    torch.testing.assert_close(cache.lp_history, fast[:, -t.source.order :].flip(1), atol=0, rtol=0)
    inside = (fast.abs() < 1.0).float().mean().item()
    assert inside > 0.8 and fast.std().item() > 0.01
    # without the prediction the same teacher generates something else
    plain = gen.run(c, noise)
    assert (plain - fast).abs().max().item() > 0.05


@pytest.mark.parametrize("output", ["mol", "gaussian"])
def test_chunked_generation_equals_one_call(output):
    """Two run calls sharing a cache (split inside a frame and inside a C++ block) equal one call; a cache
    started by the Python generator continues in the C++ one and vice versa (lp_history included)."""
    t = lp_teacher(output, seed=1)
    mel, c, lpc, noise = inputs(t, 50, seed=4)
    T, cut = c.shape[2], 137
    fast = fastgen.FastCachedGenerator(t)
    fast.block = 64
    py = CachedGenerator(t)
    whole = fast.run(c, noise, lpc=lpc)
    for first, second in [(fast, fast), (py, fast), (fast, py)]:
        cache = first.new_cache(2)
        a = first.run(c.window(0, cut), noise[:, :, :cut], cache=cache, lpc=lpc)
        assert cache.lp_history is not None and cache.t == cut
        b = second.run(c.window(cut, T), noise[:, :, cut:], cache=cache, lpc=lpc.shifted(cut))
        torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=TOL, rtol=0)
    # the seam really depends on the carried history: dropping it changes the second chunk
    cache = fast.new_cache(2)
    fast.run(c.window(0, cut), noise[:, :, :cut], cache=cache, lpc=lpc)
    cache.lp_history = None
    b = fast.run(c.window(cut, T), noise[:, :, cut:], cache=cache, lpc=lpc.shifted(cut))
    assert (b[:, :20] - whole[:, cut : cut + 20]).abs().max().item() > 1e-3


def test_vocoder_chunks_through_the_compiled_generator():
    t = lp_teacher("gaussian", seed=2)
    voc = Vocoder(t, TINY, {})
    mels = [speechy_mel(9, 1, seed=5)[0], speechy_mel(5, 1, seed=6)[0]]
    whole = voc.synthesize_items(mels, seed=2, rows=[0, 1])
    parts = voc.synthesize_items(mels, seed=2, rows=[0, 1], chunk_frames=2)
    for w, p in zip(whole, parts):
        torch.testing.assert_close(p, w, atol=TOL, rtol=0)
    mel = torch.stack([m[:, :5] for m in mels])
    noise = t.make_noise(2, 5 * t.hop, seed=3)
    torch.testing.assert_close(t.generate(mel, noise=noise), t.generate(mel, noise=noise, fast=False), atol=TOL, rtol=0)


def test_make_generator_picks_cpp_for_lp_teachers(monkeypatch):
    t = lp_teacher()
    assert isinstance(make_generator(t), fastgen.FastCachedGenerator)
    assert isinstance(make_generator(t, fast=True), fastgen.FastCachedGenerator)
    assert isinstance(make_generator(t, fast=False), CachedGenerator)
    monkeypatch.setenv(ENV_VAR, "triton")  # the Triton generator never takes an LP teacher: no error, C++ instead
    assert isinstance(make_generator(t), fastgen.FastCachedGenerator)
    monkeypatch.delenv(ENV_VAR)
    t64 = lp_teacher().double()
    assert isinstance(make_generator(t64), CachedGenerator)
    with pytest.raises(ValueError, match="linear prediction.*float64"):
        make_generator(t64, fast=True)


def test_rejects_mismatched_lp_inputs():
    t = lp_teacher()
    gen = fastgen.FastCachedGenerator(t)
    mel, c, lpc, noise = inputs(t, 10)
    cache = gen.new_cache(2)
    cache.lp_history = torch.zeros(2, lpc.order + 1)
    with pytest.raises(ValueError, match="lp_history"):
        gen.run(c, noise, cache=cache, lpc=lpc)
    with pytest.raises(ValueError, match="LP coefficients"):
        gen.run(c, noise, lpc=t.source.predictor(speechy_mel(10, 3)))
