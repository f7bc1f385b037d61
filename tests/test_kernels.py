"""Fused residual-layer kernel (wavedistill.kernels) against the reference PyTorch layers.

On a CPU-only machine the Triton kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set per test
with monkeypatch; the kernel is built for the interpreter at its first CPU launch, whatever the variable
was when triton was imported).  Errors are normwise: ``max|fused - ref| / max|ref|``.

Tolerances: float32 1e-4 (forward and every gradient); bfloat16 forward 2e-2 against the float32
reference, and no worse than 2.5x the bfloat16 reference's own error (the interpreter truncates when it
rounds to bfloat16); bfloat16 (autocast) gradients 5e-2.
Tests marked ``gpu`` compile the kernel for a real CUDA device and are skipped without one.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from wavedistill import kernels
from wavedistill.config import FeatureConfig, StudentConfig, TeacherConfig, config_from_dict
from wavedistill.errors import UserError
from wavedistill.nn.wavenet import ResidualLayer, WaveNet
from wavedistill.models.student import Student
from wavedistill.models.teacher import Teacher

pytest.importorskip("triton")

FP32_TOL = 1e-4
BF16_TOL = 2e-2
BF16_GRAD_TOL = 5e-2
FC = FeatureConfig()

# (residual, gate, skip, cond, kernel, dilation, T, residual_out)
SHAPES = [
    pytest.param(48, 96, 64, 48, 3, 64, 50, True, id="r48-k3-d64-T<d"),
    pytest.param(48, 96, 0, 48, 2, 64, 301, True, id="r48-noskip-d64-T>d-oddT"),
    pytest.param(64, 128, 128, 64, 2, 1, 257, True, id="r64-k2-d1"),
    pytest.param(64, 128, 64, 0, 3, 4, 130, True, id="r64-nocond-k3"),
    pytest.param(64, 128, 64, 64, 2, 128, 199, False, id="r64-lastlayer-nores"),
    pytest.param(48, 96, 128, 48, 3, 2, 77, False, id="r48-lastlayer-k3"),
    pytest.param(5, 10, 3, 7, 2, 3, 41, True, id="tiny-odd-channels"),
]


@pytest.fixture(autouse=True)
def clean_mode(monkeypatch):
    """Each test starts from mode 'auto' with no environment overrides, and leaves no mode behind."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels.set_mode(None)
    yield
    kernels.set_mode(None)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.restoring():  # whatever a test sets ends with it
        yield


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make_layer(R, G, S, C, K, d, res, seed=0) -> ResidualLayer:
    torch.manual_seed(seed)
    layer = ResidualLayer(R, G, S, C, K, d, residual_out=res)
    with torch.no_grad():  # non-trivial biases (Conv1d's default init makes them small)
        for p in layer.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return layer


def inputs(B, R, C, T, seed=1, c_batch=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, R, T, generator=g)
    c = torch.randn(c_batch or B, C, T, generator=g) if C else None
    return x, c


def run(mode, module, *args):
    with kernels.use_mode(mode):
        return module(*args)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("R,G,S,C,K,d,T,res", SHAPES)
def test_forward_fp32_matches_reference(interpret, R, G, S, C, K, d, T, res):
    layer = make_layer(R, G, S, C, K, d, res)
    x, c = inputs(2, R, C, T)
    with torch.no_grad():
        out_ref, skip_ref = run("reference", layer, x, c)
        out, skip = run("triton", layer, x, c)
    assert out.shape == out_ref.shape and out.dtype == torch.float32
    if res:
        assert rel_err(out, out_ref) <= FP32_TOL
    else:
        assert out is x  # a skip stack's last layer passes the residual stream through
    assert (skip is None) == (skip_ref is None) == (S == 0)
    if S:
        assert skip.shape == skip_ref.shape and rel_err(skip, skip_ref) <= FP32_TOL


@pytest.mark.parametrize("R,G,S,C,K,d,T,res", [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[4]])
def test_forward_bf16_close_to_fp32_reference(interpret, R, G, S, C, K, d, T, res):
    layer = make_layer(R, G, S, C, K, d, res).bfloat16()
    exact = copy.deepcopy(layer).float()  # the same bf16-rounded weights: only the arithmetic differs
    x, c = inputs(2, R, C, T)
    x, c = x.bfloat16(), (c.bfloat16() if c is not None else None)
    with torch.no_grad():
        ref32 = run("reference", exact, x.float(), c.float() if c is not None else None)
        ref16 = run("reference", layer, x, c)
        fused = run("triton", layer, x, c)
    for f, r16, r32 in zip(fused, ref16, ref32, strict=True):
        if r32 is None:
            continue
        assert f.dtype == torch.bfloat16
        err, own = rel_err(f, r32), rel_err(r16, r32)
        # Triton's interpreter rounds float32 -> bfloat16 toward zero (GPUs round to nearest even), which
        # about doubles the error here; the gpu tests hold the compiled kernel to BF16_TOL as well
        assert err <= BF16_TOL and err <= 2.5 * own + 1e-3, (err, own)


def test_causal_in_x_and_conditioning_batch_broadcast(interpret):
    """Changing x[..., 16:] leaves outputs before 16 unchanged; a batch-1 c is shared by the batch."""
    layer = make_layer(48, 96, 64, 48, 3, 8, True)
    x, c = inputs(3, 48, 48, 90, c_batch=1)
    x2 = x.clone()
    x2[..., 16:] = torch.randn_like(x2[..., 16:])
    with torch.no_grad():
        a = run("triton", layer, x, c)
        b = run("triton", layer, x2, c)
        ref = run("reference", layer, x, c)
    for u, v, r in zip(a, b, ref):
        assert torch.equal(u[..., :16], v[..., :16]) and not torch.equal(u, v)
        assert rel_err(u, r) <= FP32_TOL


def test_conditioning_shape_is_checked(interpret):
    layer = make_layer(48, 96, 64, 48, 2, 1, True)
    x, c = inputs(2, 48, 48, 30)
    with pytest.raises(ValueError, match="conditioning must be"):
        run("triton", layer, x, c[:, :, :20])


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("R,G,S,C,K,d,T,res,c_batch", [
    pytest.param(48, 96, 64, 48, 3, 64, 150, True, 2, id="all-k3-d64"),
    pytest.param(64, 128, 0, 64, 2, 2, 97, True, 1, id="noskip-cbatch1"),
    pytest.param(64, 128, 128, 0, 2, 16, 70, True, None, id="nocond"),
    pytest.param(48, 96, 64, 48, 2, 32, 81, False, 2, id="lastlayer"),
])
def test_gradients_match_reference(interpret, R, G, S, C, K, d, T, res, c_batch):
    layer = make_layer(R, G, S, C, K, d, res)
    x, c = inputs(2, R, C, T, c_batch=c_batch)
    g = torch.Generator().manual_seed(7)
    w_out, w_skip = torch.randn(2, R, T, generator=g), torch.randn(2, S, T, generator=g) if S else None

    def grads(mode):
        xi = x.clone().requires_grad_()
        ci = c.clone().requires_grad_() if c is not None else None
        out, skip = run(mode, layer, xi, ci)
        loss = (out * w_out).sum() + ((skip * w_skip).sum() if skip is not None else 0.0)
        wrt = [xi] + ([ci] if ci is not None else []) + list(layer.parameters())
        return torch.autograd.grad(loss, wrt)

    names = ["x"] + (["c"] if c is not None else []) + [n for n, _ in layer.named_parameters()]
    for name, gf, gr in zip(names, grads("triton"), grads("reference"), strict=True):
        assert gf.shape == gr.shape, name
        assert rel_err(gf, gr) <= FP32_TOL, (name, rel_err(gf, gr))


def test_only_needed_gradients_flow(interpret):
    """A frozen layer (the teacher in distillation) still passes gradients to its input."""
    layer = make_layer(48, 96, 64, 48, 2, 4, True).requires_grad_(False)
    x, c = inputs(2, 48, 48, 40)
    xi = x.clone().requires_grad_()
    out, skip = run("triton", layer, xi, c)
    (out.sum() + skip.sum()).backward()
    xr = x.clone().requires_grad_()
    out, skip = run("reference", layer, xr, c)
    (out.sum() + skip.sum()).backward()
    assert all(p.grad is None for p in layer.parameters())
    assert rel_err(xi.grad, xr.grad) <= FP32_TOL


def test_autocast_bf16_forward_and_gradients(interpret):
    """Under bf16 autocast every operand is cast like nn.Conv1d would; float32 parameters get float32 grads."""
    layer = make_layer(64, 128, 64, 64, 2, 8, True)
    x, c = inputs(2, 64, 64, 120)

    def step(mode):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), kernels.use_mode(mode):
            out, skip = layer(xi, c)
        (out.float().square().mean() + skip.float().square().mean()).backward()
        return [out, skip, xi.grad] + [p.grad.clone() for p in layer.parameters()]

    fused, ref = step("triton"), step("reference")
    assert fused[0].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in fused[2:])
    for a, b in zip(fused, ref, strict=True):
        assert rel_err(a, b) <= BF16_GRAD_TOL


# --------------------------------------------------------------------------- whole models


def test_teacher_and_student_through_fused_path(interpret):
    torch.manual_seed(0)
    tcfg = TeacherConfig(layers=4, stacks=2, kernel_size=2, residual_channels=48, gate_channels=96, skip_channels=64,
                         cond_channels=48, mixtures=2)
    tcfg.validate(FC)
    teacher = Teacher(tcfg, FC.n_mels)
    scfg = StudentConfig(flow_layers=[2, 3], stacks_per_flow=[1, 1], kernel_size=3, residual_channels=64,
                         gate_channels=128, cond_channels=64)
    scfg.validate(FC)
    student = Student(scfg, FC.n_mels)
    g = torch.Generator().manual_seed(3)
    mel = torch.randn(2, FC.n_mels, 3, generator=g) - 4.0
    audio = (0.3 * torch.randn(2, 3 * FC.hop_length, generator=g)).clamp(-1, 1)

    def teacher_pass(mode):
        teacher.zero_grad()
        params = run(mode, teacher, audio, mel)
        params.square().mean().backward()
        return [params] + [p.grad.clone() for p in teacher.parameters() if p.grad is not None]

    fused, ref = teacher_pass("triton"), teacher_pass("reference")
    assert len(fused) == len(ref) == 1 + sum(p.requires_grad for p in teacher.parameters())
    for a, b in zip(fused, ref, strict=True):
        assert rel_err(a, b) <= FP32_TOL
    z = student.make_noise(2, audio.shape[1], seed=0)
    with torch.no_grad():
        for a, b in zip(run("triton", student, z, mel), run("reference", student, z, mel), strict=True):
            assert rel_err(a, b) <= FP32_TOL


# --------------------------------------------------------------------------- dispatch


def test_auto_uses_reference_on_cpu_and_env_forces_reference(interpret, monkeypatch):
    calls = []
    real = kernels.residual_layer
    monkeypatch.setattr(kernels, "residual_layer", lambda *a: calls.append(1) or real(*a))
    layer = make_layer(48, 96, 64, 48, 2, 1, True)
    x, c = inputs(1, 48, 48, 20)
    layer(x, c)  # auto on CPU: reference, even with the interpreter available
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.get_mode() == "reference" and not kernels.use_fused(x)
    layer(x, c)
    assert calls == []
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    layer(x, c)
    assert calls == [1]
    with kernels.use_mode("reference"):  # the Python switch beats the environment
        layer(x, c)
    assert calls == [1] and kernels.get_mode() == "triton"


def test_forcing_triton_without_cuda_or_interpreter_is_a_one_line_error():
    layer = make_layer(48, 96, 64, 48, 2, 1, True)
    x, c = inputs(1, 48, 48, 20)
    with kernels.use_mode("triton"), pytest.raises(UserError, match="TRITON_INTERPRET=1") as e:
        layer(x, c)
    assert "\n" not in str(e.value) and "CUDA" in str(e.value)
    with pytest.raises(UserError, match="kernels=triton needs CUDA"):
        kernels.configure("triton", "cpu")


def test_bad_modes_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="not a kernel mode"):
        kernels.set_mode("cuda")
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(UserError, match="WAVEDISTILL_KERNELS='fast'"):
        kernels.get_mode()
    with pytest.raises(UserError, match="train.kernels="):
        config_from_dict({"train": {"kernels": "fast"}})


def test_configure_applies_the_train_config_key(monkeypatch, interpret):
    assert config_from_dict({}).train.kernels == "auto"
    cfg = config_from_dict({"train": {"kernels": "reference"}})
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with kernels.restoring():
        assert kernels.configure(cfg.train.kernels, "cpu") == "reference"  # an explicit key beats the environment
        assert kernels.get_mode() == "reference"
        assert kernels.configure("auto", "cpu") == "reference"  # auto leaves an override in force alone
    assert kernels.get_mode() == "triton"  # restoring() gave the run's setting back
    assert kernels.configure("auto", "cpu") == "triton"  # auto defers to WAVEDISTILL_KERNELS
    monkeypatch.delenv(kernels.ENV_VAR)
    from wavedistill.kernels import cpu_fused

    # auto on a CPU: the fused CPU training stack where its library builds, else the reference layers
    assert kernels.configure("auto", "cpu") == ("cpu-fused" if cpu_fused.available() else "reference")
    with kernels.use_mode("reference"):
        assert kernels.configure("auto", "cpu") == "reference"  # a caller's use_mode survives auto
    assert kernels.configure("triton", "cpu") == "triton"  # possible here: TRITON_INTERPRET=1


def test_training_run_gives_the_kernel_mode_back(tmp_path, monkeypatch):
    """train.kernels=reference holds for the run only: afterwards the process is back on its own setting."""
    from helpers_train import make_cache, write_config
    from wavedistill.train.teacher import train_teacher

    _, cache = make_cache(tmp_path, n=4)
    conf = write_config(tmp_path / "c.yaml", train={"max_steps": 1, "kernels": "reference"})
    with kernels.restoring():
        kernels.set_mode("auto")
        train_teacher(conf, cache, tmp_path / "exp")
        assert kernels.get_mode() == "auto"


def test_too_wide_layers_stay_on_pytorch(monkeypatch, interpret):
    """Weight tiles wider than MAX_FUSED_WIDTH would not fit an SM: auto keeps PyTorch, forced triton says why."""
    wide = ResidualLayer(256, 512, 256, 80, 2, 1)
    narrow = ResidualLayer(64, 128, 64, 64, 2, 1)
    assert "residual=256" in kernels.fusable(wide) and kernels.fusable(narrow) is None
    x = torch.zeros(1, 256, 8)
    with kernels.use_mode("triton"):
        with pytest.raises(UserError, match="exceeds the fused kernel"):
            kernels.use_fused(x, wide)
        assert kernels.use_fused(torch.zeros(1, 64, 8), narrow)
    with kernels.use_mode("auto"):
        assert not kernels.use_fused(x, wide)  # a CPU tensor anyway, and too wide


# --------------------------------------------------------------------------- real GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("R,G,S,C,K,d,T,res", SHAPES)
def test_gpu_forward_and_gradients_match_reference(R, G, S, C, K, d, T, res, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # ieee float32 on both sides
    layer = make_layer(R, G, S, C, K, d, res).cuda()
    x, c = inputs(2, R, C, T)
    x, c = x.cuda(), (c.cuda() if c is not None else None)

    def grads(mode):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out, skip = run(mode, layer, xi, c)
        (out.square().sum() + (skip.square().sum() if skip is not None else 0)).backward()
        return [out, xi.grad] + ([skip] if skip is not None else []) + [p.grad.clone() for p in layer.parameters()]

    for a, b in zip(grads("triton"), grads("reference"), strict=True):
        assert rel_err(a, b) <= FP32_TOL
    lb = copy.deepcopy(layer).bfloat16()
    with torch.no_grad():
        fused = run("triton", lb, x.bfloat16(), c.bfloat16() if c is not None else None)
        ref = run("reference", layer, x, c)
    for a, b in zip(fused, ref, strict=True):
        if b is not None:
            assert a.dtype == torch.bfloat16 and rel_err(a, b) <= BF16_TOL


@pytest.mark.gpu
@gpu
def test_gpu_fused_student_pass_is_faster_than_reference():
    """One parallel pass of a default-size IAF flow stack (bf16, 1 s of 24 kHz audio, batch 4)."""
    torch.manual_seed(0)
    net = WaveNet(1, 2, 30, 3, 3, 64, 128, 0, 64).cuda().bfloat16()
    x = torch.randn(4, 1, 24000, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(4, 64, 24000, device="cuda", dtype=torch.bfloat16)

    def timed(mode):
        with torch.inference_mode(), kernels.use_mode(mode):
            net(x, c)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                y = net(x, c)
            torch.cuda.synchronize()
            return (time.perf_counter() - t) / 5, y

    t_fused, y_fused = timed("triton")
    t_ref, y_ref = timed("reference")
    assert rel_err(y_fused, y_ref) <= 5e-2
    assert t_fused < t_ref, f"fused {t_fused * 1e3:.2f} ms vs reference {t_ref * 1e3:.2f} ms"


# --------------------------------------------------------------------------- bench


def test_bench_lists_fused_entries_as_skipped_without_cuda():
    """On CPU the fused entries are not timed; the report lists them under 'skipped' with the reason."""
    from types import SimpleNamespace

    from wavedistill.eval.bench import _bench_fused, format_table

    skipped = []
    for kind in ("student", "teacher"):
        voc = SimpleNamespace(kind=kind, model=None, features=FC, device=torch.device("cpu"), path=f"/exp/{kind}")
        assert _bench_fused(voc, 0.1, 1, 1.0, 1.0, skipped) == []
    names = [s["generator"] for s in skipped]
    assert names[0] == "student-fused" and {"teacher-scoring", "teacher-scoring-fused"} <= set(names[1:])
    assert all("CUDA" in s["reason"] and s["device"] == "cpu" for s in skipped)
    report = {"results": [], "skipped": skipped, "device": "cpu", "threads": 1, "peak_gflops": 1.0}
    assert "skipped student-fused (student): needs a CUDA device" in format_table(report)
