"""The compiled CPU generator (wavedistill.generation.cpp) against the Python CachedGenerator.

Equality is checked two ways, both in float32 with the same uniform noise:

* free running: ``FastCachedGenerator.run`` and ``CachedGenerator.run`` give the
  same waveform sample for sample (max abs diff <= 1e-4; in practice ~2e-7);
* step by step: the Python ``CachedGenerator.step`` is driven with the fast
  path's own samples as history, and every step's distribution parameters and
  every drawn sample must match.

The two paths sum the matrix products in different orders, so they differ by
float32 rounding (~1e-7).  With a mixture of logistics that can, in principle,
flip the Gumbel-max argmax where two components are within rounding of each
other, after which the free-running waveforms legitimately diverge.  The
stepwise check tells such a genuine near-tie (top-2 margin < 1e-4 in the
Python parameters) from a bug, so the free-running comparison is cut at the
first near-tie of a row and is otherwise strict; single-component and Gaussian
teachers (no argmax) must match over the whole run.  With the seeds below no
near-tie occurs, so every comparison runs over the full length.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import extreme_uniforms, flatten_mixture_logits, lively_teacher
from wavedistill.generation import cpp as fastgen
from wavedistill.config import TeacherConfig
from wavedistill.generation.cached import CachedGenerator
from wavedistill.generation.select import make_generator
from wavedistill.models.teacher import Teacher

TOL = 1e-4  # samples
PARAM_TOL = 1e-5  # distribution parameters, relative to max(1, |value|); observed differences are ~1e-7
TIE = 1e-4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not fastgen.available():
        pytest.skip(f"fast CPU generator unavailable here: {fastgen.build_error()}")


pytestmark = pytest.mark.usefixtures("single_thread")


def small_teacher(output: str = "mol", mixtures: int = 3, kernel_size: int = 2, residual: int = 12, gate: int = 20,
                  skip: int = 10, layers: int = 6, stacks: int = 2, seed: int = 0) -> Teacher:
    """A random float32 teacher.  Channel counts that are not multiples of 16 exercise the padding."""
    return lively_teacher(output, mixtures, kernel_size, residual, gate, skip, layers, stacks, seed)


def inputs(t: Teacher, batch: int, length: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(batch, t.cfg.cond_channels, length, generator=g)
    return c, t.make_noise(batch, length, seed=seed + 1)


def gumbel_margin(dist, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Top-2 gap of ``logits + gumbel`` per row (inf without a mixture): how close the argmax is to a tie."""
    if not hasattr(dist, "k") or dist.k < 2:
        return torch.full((params.shape[0],), math.inf)
    logits = params[:, : dist.k].float()
    u = noise[:, : dist.k].float().clamp(1e-10, 1.0 - 1e-7)
    top2 = (logits - torch.log(-torch.log(u))).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def check_stepwise(t: Teacher, c, noise, fast, params, temperature: float = 1.0) -> list[int]:
    """Teacher-force the Python step with the fast samples; return, per row, the first near-tie step (or T)."""
    B, _, T = c.shape
    gen = CachedGenerator(t)
    cache = gen.new_cache(B)
    x_prev = torch.zeros(B)
    first_tie = [T] * B
    worst = 0.0
    for start in range(0, T, gen.block):
        stop = min(T, start + gen.block)
        cb = gen.cond_block(c, start, stop)
        for s in range(start, stop):
            p_ref = gen.step(x_prev, cb[s - start], cache)
            worst = max(worst, ((p_ref - params[:, :, s]).abs() / p_ref.abs().clamp_min(1.0)).max().item())
            x_ref = t.dist.sample(p_ref[:, :, None], noise[:, :, s : s + 1], temperature)[:, 0]
            bad = (x_ref - fast[:, s]).abs() > TOL
            if bad.any():
                margin = gumbel_margin(t.dist, p_ref, noise[:, :, s])
                for b in bad.nonzero()[:, 0].tolist():
                    # An exact tie (margin 0) is no excuse: torch.argmax takes the first maximum.
                    assert 0 < margin[b] < TIE, f"step {s} row {b}: sample {fast[b, s].item()} != {x_ref[b].item()} (margin {margin[b]})"
                    first_tie[b] = min(first_tie[b], s)
            x_prev = fast[:, s]
    print(f"max relative parameter difference {worst:.2e}")
    assert worst <= PARAM_TOL, f"distribution parameters differ by {worst}"
    return first_tie


def assert_same_run(t: Teacher, batch: int, length: int, threads: int = 1, temperature: float = 1.0,
                    block: int | None = None, split_channels: bool = False) -> torch.Tensor:
    c, noise = inputs(t, batch, length)
    ref = CachedGenerator(t).run(c, noise, temperature=temperature)
    gen = fastgen.FastCachedGenerator(t, threads=threads, split_channels=split_channels)
    if block is not None:
        gen.block = block
    fast, params = gen.run(c, noise, temperature=temperature, return_params=True)
    assert fast.shape == ref.shape == (batch, length) and fast.dtype == torch.float32
    assert params.shape == (batch, t.dist.n_params, length)
    assert torch.isfinite(fast).all() and torch.isfinite(params).all()
    first_tie = check_stepwise(t, c, noise, fast, params, temperature)
    if t.cfg.output == "gaussian" or t.cfg.mixtures == 1:
        assert first_tie == [length] * batch
    assert sum(length - f for f in first_tie) < length * batch // 2, "too many near-ties for a meaningful comparison"
    for b, stop in enumerate(first_tie):
        diff = (fast[b, :stop] - ref[b, :stop]).abs().max().item()
        assert diff <= TOL, f"row {b}: fast and Python generators differ by {diff}"
    # The samples are not trivially clamped: most lie strictly inside (-1, 1) and they vary.
    inside = (fast.abs() < 1.0).float().mean().item()
    assert inside > 0.8 and fast.std().item() > 0.01
    return fast


CASES = {
    "mol3-k2-padded": dict(output="mol", mixtures=3),
    "mol10-k3": dict(output="mol", mixtures=10, kernel_size=3, residual=16, gate=32, skip=16),
    "mol1": dict(output="mol", mixtures=1),
    "gaussian": dict(output="gaussian", residual=20, gate=36, skip=24, layers=4, stacks=1),
}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_cached_generator(case, batch):
    assert_same_run(small_teacher(**CASES[case]), batch, 600)


def test_temperature():
    assert_same_run(small_teacher(mixtures=4, seed=1), 2, 300, temperature=0.6)


@pytest.mark.parametrize("output", ["mol", "gaussian"])
def test_extreme_noise(output):
    """Uniforms at and beyond the clamps of dist.sample (0, 1, 1e-12, 1 - 1e-9, ...): same clamps, same ties.

    With constant mixture logits, components whose uniforms are all clamped to 1 - 1e-7 tie exactly:
    the first one must win, as with torch.argmax.
    """
    t = small_teacher(output=output, mixtures=4, seed=3)
    if output == "mol":
        flatten_mixture_logits(t)
    B, T = 2, 300
    noise = extreme_uniforms(B, t.dist.n_noise, T, zeros=slice(None, None, 7), ones=slice(3, None, 11))
    assert (noise < 1e-5).float().mean() > 0.2 and (noise > 1.0 - 1e-5).float().mean() > 0.2
    c, _ = inputs(t, B, T)
    ref = CachedGenerator(t).run(c, noise)
    fast, params = fastgen.FastCachedGenerator(t).run(c, noise, return_params=True)
    first_tie = check_stepwise(t, c, noise, fast, params)
    for b, stop in enumerate(first_tie):
        assert stop > T // 2 and (fast[b, :stop] - ref[b, :stop]).abs().max().item() <= TOL


@pytest.mark.parametrize("output", ["mol", "gaussian"])
def test_log_scale_floor(output):
    """A floor above most predicted log-scales: the clamp before exp() is active."""
    t = small_teacher(output=output, mixtures=3, seed=2)
    t.dist.log_scale_min = -2.3  # the biases put most log-scales near -2.5
    assert_same_run(t, 2, 300)


@pytest.mark.parametrize("batch,threads,split", [(1, 2, True), (3, 2, False), (2, 4, True), (1, 2, False)])
def test_threads_and_blocks(batch, threads, split):
    """Batch rows and (optionally) gated channels split across threads; the run cut into short C++ calls."""
    t = small_teacher(mixtures=3, residual=16, gate=64, skip=16)  # 32 gated channels: two vectors to split
    one = assert_same_run(t, batch, 400, threads=1)
    many = assert_same_run(t, batch, 400, threads=threads, block=45, split_channels=split)
    assert (one - many).abs().max().item() <= TOL


def test_demo_size_teacher():
    """The TeacherConfig defaults (20 layers, R=64, G=128, S=64, 10-mixture MoL): full vector tiles, no padding."""
    torch.manual_seed(0)
    t = Teacher(TeacherConfig(), n_mels=8).eval()
    with torch.no_grad():
        t.net.head2.weight.mul_(0.5)
        t.net.head2.bias[20:] = -2.5
    assert_same_run(t, 1, 300)


def test_shipped_demo_teacher():
    path = REPO / "checkpoints" / "demo" / "teacher-v1"
    assert (path / "model.safetensors").is_file(), "the shipped demo teacher is missing"
    from wavedistill.checkpoint import load_model

    t = load_model(path, kind="teacher")[0].float().eval()
    c, noise = inputs(t, 1, 400)
    ref = CachedGenerator(t).run(c, noise)
    fast, params = fastgen.FastCachedGenerator(t).run(c, noise, return_params=True)
    first_tie = check_stepwise(t, c, noise, fast, params)
    assert (fast[0, : first_tie[0]] - ref[0, : first_tie[0]]).abs().max().item() <= TOL


def test_cache_is_shared_with_the_python_generator():
    """A cache filled by one generator continues correctly in the other (same GenerationCache object)."""
    t = small_teacher(mixtures=1)
    c, noise = inputs(t, 2, 300)
    py = CachedGenerator(t)
    fast = fastgen.FastCachedGenerator(t)
    cache = py.new_cache(2)
    a = py.run(c[:, :, :150], noise[:, :, :150], cache=cache)
    b = py.run(c[:, :, 150:], noise[:, :, 150:], cache=cache)
    for first, second in [(fast, py), (py, fast), (fast, fast)]:
        cache = fast.new_cache(2)
        x = first.run(c[:, :, :150], noise[:, :, :150], cache=cache)
        y = second.run(c[:, :, 150:], noise[:, :, 150:], cache=cache)
        assert cache.t == 300
        assert (x - a).abs().max().item() <= TOL and (y - b).abs().max().item() <= TOL


def test_progress_and_noise_dtype():
    t = small_teacher()
    c, noise = inputs(t, 1, 250)
    gen = fastgen.FastCachedGenerator(t)
    gen.block = 100
    seen = []
    out = gen.run(c, noise.double(), progress=seen.append)  # float64 noise is cast exactly as dist.sample does
    assert seen == [100, 100, 50]
    assert (out - gen.run(c, noise)).abs().max().item() == 0.0


def test_rejects_what_it_cannot_run():
    t = small_teacher()
    with pytest.raises(ValueError, match="float32"):
        fastgen.FastCachedGenerator(small_teacher().double())
    gen = fastgen.FastCachedGenerator(t)
    c, noise = inputs(t, 2, 50)
    with pytest.raises(ValueError, match="cache"):
        gen.run(c, noise, cache=gen.new_cache(1))
    with pytest.raises(ValueError, match="channels"):
        gen.run(c[:, :4], noise)
    with pytest.raises(ValueError, match="noise"):
        gen.run(c, noise[:, :, :10])


def test_unavailable_is_reported_not_raised():
    """Without the extension: available() is False with a reason, and the constructor raises a clear error."""
    code = (
        "import sys, wavedistill.generation.cpp as f\n"
        "assert not f.available(), 'should be disabled'\n"
        "assert 'WAVEDISTILL_NO_FASTGEN' in f.build_error(), f.build_error()\n"
        "try:\n"
        "    f.FastCachedGenerator(None)\n"
        "except f.FastGenUnavailable as e:\n"
        "    print('unavailable:', e)\n"
        "else:\n"
        "    sys.exit('no error raised')\n"
    )
    env = dict(os.environ, WAVEDISTILL_NO_FASTGEN="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "unavailable: fast CPU generation is unavailable" in proc.stdout


def test_normal_quantile_matches_torch():
    """The Gaussian sampler's inverse CDF (the extension's own) against torch.special.ndtri in float64."""
    p = torch.cat([torch.logspace(-6, -1, 200, dtype=torch.float64), torch.linspace(0.02, 0.98, 301, dtype=torch.float64)])
    p = torch.cat([p, 1.0 - p])
    ours = torch.tensor([fastgen.ndtri(v) for v in p.tolist()], dtype=torch.float64)
    ref = torch.special.ndtri(p)
    assert ((ours - ref).abs() / ref.abs().clamp_min(1.0)).max().item() < 1e-12
    assert fastgen.ndtri(0.5) == 0.0 and fastgen.ndtri(0.0) == -math.inf and fastgen.ndtri(1.0) == math.inf


def test_make_generator_picks_the_path():
    t = small_teacher()
    assert fastgen.supports(t)
    assert isinstance(make_generator(t), fastgen.FastCachedGenerator)
    assert isinstance(make_generator(t, fast=False), CachedGenerator)
    t64 = small_teacher().double()
    assert not fastgen.supports(t64)
    assert isinstance(make_generator(t64), CachedGenerator)  # auto: falls back
    with pytest.raises(ValueError, match="float32"):
        make_generator(t64, fast=True)
