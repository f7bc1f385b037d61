"""The persistent Triton AR generator (wavedistill.generation.triton) against the reference generators.

On a CPU-only machine the kernel runs in Triton's interpreter: ``TRITON_INTERPRET=1`` is set per test
with monkeypatch (the kernel is built for the interpreter at its first CPU launch, whatever the variable
was when triton was imported).  Every check uses explicit uniforms, so the kernel and the reference draw
from the same noise:

* samples: equal to :class:`CachedGenerator`'s, within 1e-4 (float reassociation; in practice ~1e-7).
  The generators return the continuous clamped sample (nothing is quantized), so there is no bin edge
  to flip.  A mixture can flip its Gumbel-max argmax where two components are within rounding of each
  other; the free-running comparison stops at a row's first such near-tie (top-2 margin < 1e-4) and
  must cover at least half of every row (with these seeds no near-tie occurs);
* distribution parameters of every step: equal, within 1e-5 relative, to ``teacher.params_from_cond``
  run teacher-forced (one parallel pass) on the kernel's own samples;
* the kernel's draw from its own parameters equals ``dist.sample`` on them.

``test_compiles_for_sm90`` builds the real GPU kernel ahead of time (Triton's bundled ptxas, no GPU
needed).  Tests marked ``gpu`` run it on a CUDA device and are skipped without one.
"""

from __future__ import annotations

import inspect
import math
import time

import pytest
import torch

from conftest import extreme_uniforms, flatten_mixture_logits, lively_teacher
from wavedistill import kernels
from wavedistill.generation import cpp as fastgen
from wavedistill.errors import UserError
from wavedistill.config import TeacherConfig
from wavedistill.generation.cached import CachedGenerator
from wavedistill.generation.select import make_generator
from wavedistill.models.teacher import Teacher

pytest.importorskip("triton")

from wavedistill.generation import triton as ar_triton  # noqa: E402  (needs triton)

TOL = 1e-4  # samples
PARAM_TOL = 1e-5  # parameters, relative to max(1, |value|)
TIE = 1e-4
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def interpret(monkeypatch):
    """Let the kernel run on CPU tensors in Triton's interpreter; the kernel mode follows the environment."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    with kernels.restoring():  # whatever a test sets ends with it
        kernels.set_mode(None)
        yield


def small_teacher(output: str = "mol", mixtures: int = 3, kernel_size: int = 2, residual: int = 16, gate: int = 32,
                  skip: int = 16, layers: int = 6, stacks: int = 2, seed: int = 0) -> Teacher:
    """A random float32 teacher with lively gates and narrow output distributions (samples rarely clamp)."""
    return lively_teacher(output, mixtures, kernel_size, residual, gate, skip, layers, stacks, seed)


def inputs(t: Teacher, batch: int, length: int, seed: int = 3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(batch, t.cfg.cond_channels, length, generator=g).to(device)
    return c, t.make_noise(batch, length, seed=seed + 1, device=device)


def gumbel_margin(dist, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` top-2 gap of ``logits + gumbel`` (inf without a mixture): how close the argmax is to a tie."""
    if not hasattr(dist, "k") or dist.k < 2:
        return torch.full((params.shape[0], params.shape[2]), math.inf)
    u = noise[:, : dist.k, : params.shape[2]].float().clamp(1e-10, 1.0 - 1e-7)
    top2 = (params[:, : dist.k].float() - torch.log(-torch.log(u))).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).cpu()


def check_against_reference(t: Teacher, c, noise, out, params, ref, temperature: float = 1.0) -> list[int]:
    """All the equalities of the module docstring; returns each row's first near-tie step (or T)."""
    B, T = out.shape
    assert out.shape == ref.shape and params.shape == (B, t.dist.n_params, T)
    assert torch.isfinite(out).all() and torch.isfinite(params).all()
    forced = t.params_from_cond(out, c)  # one parallel pass, teacher-forced on the kernel's samples
    worst = ((forced - params).abs() / forced.abs().clamp_min(1.0)).max().item()
    assert worst <= PARAM_TOL, f"step parameters differ from the teacher-forced pass by {worst:.3g}"
    margin = gumbel_margin(t.dist, params, noise)
    own = t.dist.sample(params, noise[:, :, :T], temperature)
    safe = margin > 1e-6
    assert ((own - out).abs().cpu()[safe] <= 1e-5).all(), "the kernel's draw differs from dist.sample on its parameters"
    first_tie = []
    for b in range(B):
        ties = (margin[b] < TIE).nonzero()
        stop = int(ties[0, 0]) if len(ties) else T
        first_tie.append(stop)
        diff = (out[b, :stop] - ref[b, :stop]).abs().max().item()
        assert diff <= TOL, f"row {b}: kernel and reference samples differ by {diff:.3g}"
    assert min(first_tie) >= T // 2, f"near-ties at {first_tie}: too early for a meaningful comparison"
    if t.cfg.output == "gaussian":
        assert first_tie == [T] * B
    inside = (out.abs() < 1.0).float().mean().item()
    assert inside > 0.8 and out.std().item() > 0.01, "degenerate samples: the comparison would prove little"
    return first_tie


CASES = {
    "mol3-k2-6layers": dict(output="mol", mixtures=3),
    "mol3-k3-r32": dict(output="mol", mixtures=3, kernel_size=3, residual=32, gate=64, skip=32, layers=4),
    "mol5-k3-padded-temp": dict(output="mol", mixtures=5, kernel_size=3, residual=12, gate=20, skip=10, layers=4, seed=1),
    "gaussian-k2": dict(output="gaussian", layers=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_generator(case, interpret):
    t = small_teacher(**CASES[case])
    temperature = 0.7 if case.endswith("temp") else 1.0
    c, noise = inputs(t, 2, 40)
    ref = CachedGenerator(t).run(c, noise, temperature=temperature)
    gen = ar_triton.TritonARGenerator(t)
    out, params = gen.run(c, noise, temperature=temperature, return_params=True)
    check_against_reference(t, c, noise, out, params, ref, temperature)


def test_continues_a_cache_across_generators_and_launches(interpret, monkeypatch):
    """A GenerationCache filled by the Python generator continues in the kernel, split into short launches,
    and the kernel leaves the cache exactly as the Python generator would.  Small weight tiles make the
    gated channels and the head's hidden channels run in two chunks each."""
    t = small_teacher(output="mol", mixtures=2, kernel_size=3, residual=16, gate=64, skip=32, layers=4, seed=2)
    c, noise = inputs(t, 2, 40)
    py = CachedGenerator(t)
    full_cache = py.new_cache(2)
    full = py.run(c, noise, cache=full_cache)
    monkeypatch.setattr(ar_triton, "TILE", 256)
    gen = ar_triton.TritonARGenerator(t)
    consts = gen.consts
    assert consts["HP"] == 2 * consts["BH"] and consts["SP"] == 2 * consts["BS"]
    gen.block = 7  # 22 steps: four launches, the ring positions carried by cache.t
    cache = py.new_cache(2)
    first = py.run(c[:, :, :18], noise[:, :, :18], cache=cache)
    seen = []
    second, params = gen.run(c[:, :, 18:], noise[:, :, 18:], cache=cache, progress=seen.append, return_params=True)
    assert seen == [7, 7, 7, 1] and cache.t == 40
    out = torch.cat([first, second], dim=1)
    assert (out - full).abs().max().item() <= TOL
    assert (cache.x_prev - full_cache.x_prev).abs().max().item() <= TOL
    for mine, theirs in zip(cache.buffers, full_cache.buffers):
        assert (mine - theirs).abs().max().item() <= 1e-5
    forced = t.params_from_cond(out, c)[:, :, 18:]
    assert ((forced - params).abs() / forced.abs().clamp_min(1.0)).max().item() <= PARAM_TOL


@pytest.mark.parametrize("output", ["mol", "gaussian"])
def test_extreme_uniforms(output, interpret):
    """Uniforms at and beyond the sampler's clamps (0, 1, 1e-12, 1 - 1e-9): same clamps; with constant
    mixture logits the components whose uniforms clamp to 1 - 1e-7 tie exactly and the first must win."""
    t = small_teacher(output=output, mixtures=4, layers=2, stacks=1, seed=3)
    if output == "mol":
        flatten_mixture_logits(t)
    B, T = 2, 32
    noise = extreme_uniforms(B, t.dist.n_noise, T, zeros=slice(None, None, 5), ones=slice(2, None, 7))
    c, _ = inputs(t, B, T)
    ref = CachedGenerator(t).run(c, noise)
    out, params = ar_triton.TritonARGenerator(t).run(c, noise, return_params=True)
    assert torch.isfinite(out).all()
    margin = gumbel_margin(t.dist, params, noise)
    exact_ties = (margin == 0).sum().item()
    if output == "mol":
        assert exact_ties > 0, "the noise should produce exact ties"
    ok = (margin == 0) | (margin > TIE)  # exact ties are decided by position, in both generators
    assert ok[:, : T // 2].all()
    for b in range(B):
        bad = (~ok[b]).nonzero()
        stop = int(bad[0, 0]) if len(bad) else T
        assert (out[b, :stop] - ref[b, :stop]).abs().max().item() <= TOL


def test_generator_selection(interpret, monkeypatch):
    """WAVEDISTILL_KERNELS picks the generator: triton (here: interpreted) or the existing path."""
    t = small_teacher(output="gaussian", layers=2, stacks=1)
    mel = torch.randn(1, 5, 4)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert isinstance(make_generator(t), ar_triton.TritonARGenerator)
    noise = t.make_noise(1, 4 * t.hop, seed=5)
    y = t.generate(mel, noise=noise)  # through the kernel
    y_ref = t.generate(mel, noise=noise, fast=False)
    assert (y - y_ref).abs().max().item() <= TOL
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert not isinstance(make_generator(t), ar_triton.TritonARGenerator)
    assert "reference" in ar_triton.unsupported_reason(t)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="needs a CUDA teacher"):  # the user's switch: one line, exit 2
        make_generator(t)
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    if not torch.cuda.is_available():  # auto never picks the interpreter for a CPU teacher
        assert not isinstance(make_generator(t), ar_triton.TritonARGenerator)
    assert "float32" in ar_triton.unsupported_reason(small_teacher(layers=2, stacks=1).double())


def test_rejects_bad_inputs(interpret):
    t = small_teacher(layers=2, stacks=1)
    gen = ar_triton.TritonARGenerator(t)
    c, noise = inputs(t, 2, 10)
    with pytest.raises(ValueError, match="channels"):
        gen.run(c[:, :4], noise)
    with pytest.raises(ValueError, match="noise"):
        gen.run(c, noise[:, :, :5])
    with pytest.raises(ValueError, match="cache"):
        gen.run(c, noise, cache=gen.new_cache(1))


def test_bench_lists_the_persistent_entries_as_skipped_without_cuda():
    from types import SimpleNamespace

    from wavedistill.eval import bench
    from wavedistill.config import FeatureConfig

    voc = SimpleNamespace(model=small_teacher(layers=2, stacks=1), features=FeatureConfig(), device=torch.device("cpu"),
                          path="teacher", kind="teacher", hop=6, dtype=torch.float32)
    skipped = []
    assert bench._bench_fused(voc, 0.01, 1, 1.0, 1.0, skipped) == []
    reasons = {r["generator"]: r["reason"] for r in skipped}
    assert {"teacher-persistent", f"teacher-persistent-x{bench.PERSISTENT_STREAMS}"} <= set(reasons)
    assert "CUDA" in reasons["teacher-persistent"]


def _ptxas_available() -> bool:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(90) is not None
    except Exception:  # no bundled ptxas and none on PATH
        return False


@pytest.mark.parametrize("mol,ks,dims", [
    pytest.param(True, 3, (12, 10, 10, 5), id="mol-k3-padded"),
    pytest.param(False, 2, (64, 64, 64, 1), id="gaussian-k2-demo-width"),
    pytest.param(True, 3, (512, 256, 256, 10), id="mol-k3-paper-width"),
])
def test_compiles_for_sm90(mol, ks, dims):
    """The GPU build (not the interpreter) compiles to a cubin for an H100, and keeps both barriers per layer."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(tl.standard._sum_combine, triton.runtime.JITFunction):
        pytest.skip("triton was imported under TRITON_INTERPRET=1: its helpers cannot be compiled")
    if not _ptxas_available():
        pytest.skip("no ptxas for an ahead-of-time CUDA build")
    consts = dict(ar_triton.kernel_constants(*dims, ks, mol), STORE_PARAMS=True)
    sig = {}
    for name in inspect.signature(ar_triton._ar_steps).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name == "meta_ptr" else "*fp32"
        else:
            sig[name] = "fp32" if name in ("temperature", "log_scale_min", "skip_scale") else "i32"
    src = ASTSource(fn=ar_triton._kernel(False), signature=sig, constexprs=consts)
    options = dict(num_warps=ar_triton.NUM_WARPS, num_stages=1)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert len(compiled.asm["cubin"]) > 0
    assert compiled.asm["ptx"].count("bar.sync") >= 2


# --------------------------------------------------------------------------- on a CUDA device


@gpu
@needs_cuda
@pytest.mark.parametrize("case", ["mol10-demo", "gaussian-k3"])
def test_gpu_matches_reference_long(case):
    """Demo-size teacher (20 layers, R=64, G=128, S=64), 4 streams, 2000 steps, on the device."""
    torch.manual_seed(0)
    if case == "mol10-demo":
        t = Teacher(TeacherConfig(), n_mels=8).eval()
        with torch.no_grad():
            t.net.head2.weight.mul_(0.5)
            t.net.head2.bias[20:] = -2.5
    else:
        t = small_teacher(output="gaussian", kernel_size=3, residual=32, gate=64, skip=32, layers=10, stacks=2)
    t = t.cuda()
    c, noise = inputs(t, 4, 2000, device="cuda")
    ref = CachedGenerator(t).run(c, noise)
    gen = ar_triton.TritonARGenerator(t)
    out, params = gen.run(c, noise, return_params=True)
    check_against_reference(t, c, noise, out, params, ref)


@gpu
@needs_cuda
def test_gpu_teacher_generate_dispatch(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    t = small_teacher(output="gaussian", layers=4).cuda()  # no argmax: the runs must agree throughout
    assert isinstance(make_generator(t), ar_triton.TritonARGenerator)
    mel = torch.randn(2, 5, 20, device="cuda")
    noise = t.make_noise(2, 20 * t.hop, seed=1, device="cuda")
    y = t.generate(mel, noise=noise)
    y_ref = t.generate(mel, noise=noise, fast=False)
    assert (y - y_ref).abs().max().item() <= TOL
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert isinstance(make_generator(t), CachedGenerator)


@gpu
@needs_cuda
def test_gpu_speed_beats_python_generator():
    t = Teacher(TeacherConfig(), n_mels=8).eval().cuda()
    c, noise = inputs(t, 1, 4000, device="cuda")
    gen = ar_triton.TritonARGenerator(t)
    gen.run(c[:, :, :100], noise[:, :, :100])
    torch.cuda.synchronize()
    start = time.perf_counter()
    gen.run(c, noise)
    torch.cuda.synchronize()
    kernel_s = time.perf_counter() - start
    ref = CachedGenerator(t)
    ref.run(c[:, :, :100], noise[:, :, :100])  # both warmed up, both timed on the same 4000 steps
    torch.cuda.synchronize()
    start = time.perf_counter()
    ref.run(c, noise)
    torch.cuda.synchronize()
    python_s = time.perf_counter() - start
    print(f"persistent kernel {4000 / kernel_s:,.0f} samples/s, Python cached {4000 / python_s:,.0f} samples/s")
    assert kernel_s < python_s
