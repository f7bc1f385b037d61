"""The fused CPU training stack (:class:`wavedistill.nn.fused_stack.FusedStack`) and frame-rate conditioning
compute the same maths as the plain PyTorch layers: values and every gradient, piece by piece.

Reference: the same modules under ``kernels.use_mode("reference")`` (plain time-major layers, conditioning
upsampled to sample rate).  Float32 both ways, so tolerances are float32 rounding through a few layers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wavedistill import kernels
from wavedistill.config import load_config
from wavedistill.kernels import cpu_fused
from wavedistill.models.student import Student
from wavedistill.models.teacher import Teacher
from wavedistill.nn.distributions import quantize
from wavedistill.nn.wavenet import BandedConditioning, ConditionNet, WaveNet

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason=f"fused CPU library not built: {cpu_fused.build_error()}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(module_fn, tensors, mode):
    """Output and the gradients of a fixed linear functional of it w.r.t. ``tensors``, under kernel ``mode``."""
    with kernels.use_mode(mode):
        for t in tensors:
            t.grad = None
        out = module_fn()
        out = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.linspace(-1.0, 1.0, o.numel()).view_as(o)).sum() for o in out)
        loss.backward()
        return [o.detach().clone() for o in out], [None if t.grad is None else t.grad.clone() for t in tensors]


def _compare(fn, tensors, tol=2e-5):
    assert kernels.get_mode() == "auto"
    out_f, g_f = _run(fn, tensors, "auto")
    out_r, g_r = _run(fn, tensors, "reference")
    for a, b in zip(out_f, out_r):
        assert _rel(a, b) < tol
    assert sum(g is not None for g in g_r) == len(tensors)
    for i, (a, b) in enumerate(zip(g_f, g_r)):
        assert a is not None and _rel(a, b) < tol, (i, tensors[i].shape, _rel(a, b))


@pytest.mark.parametrize("skip,kernel,cond_grad", [(16, 2, True), (0, 3, True), (16, 3, False), (0, 2, False)])
def test_wavenet_fused_matches_layers(skip, kernel, cond_grad):
    torch.manual_seed(0)
    net = WaveNet(1, 7, 6, 2, kernel, 8, 12, skip, 5)
    x = torch.randn(2, 1, 90, requires_grad=True)  # shorter than some dilation × (kernel − 1): all-zero taps
    c = torch.randn(2, 5, 90, requires_grad=cond_grad)
    if not cond_grad:  # frozen network (the distillation's teacher): only the input gradient
        net.requires_grad_(False)
    assert net._wants_fused(x.transpose(1, 2), c.transpose(1, 2))
    tensors = [x] + ([c] + list(net.parameters()) if cond_grad else [])
    _compare(lambda: net(x, c), tensors)


def test_wavenet_fused_broadcast_conditioning():
    torch.manual_seed(1)
    net = WaveNet(1, 3, 4, 1, 2, 8, 12, 6, 5)
    x = torch.randn(3, 1, 40, requires_grad=True)
    c = torch.randn(1, 5, 40, requires_grad=True)
    _compare(lambda: net(x, c), [x, c] + list(net.parameters()))


@pytest.mark.parametrize("scales,frames,length,offset", [([4, 4, 5], 9, 400, 80), ([4, 4, 5], 6, 480, 0), ([2, 3], 12, 30, 11)])
def test_upsample_band_equals_upsampling(scales, frames, length, offset):
    torch.manual_seed(2)
    cond = ConditionNet(10, 6, scales).double()  # float64: random filters compound over the stages
    with torch.no_grad():
        for conv in cond.smooth:
            conv.weight.normal_()
    h = torch.randn(2, 6, frames, dtype=torch.float64)
    i0, w = cond.upsample_band(frames, length, offset)
    assert i0.shape == (length,) and w.shape[0] == length and w.shape[1] <= 4
    dense = BandedConditioning(h, i0, w).dense()
    torch.testing.assert_close(dense, cond.upsample(h)[:, :, offset : offset + length], rtol=1e-10, atol=1e-10)
    # differentiable in the smoothing filters like the upsampling itself
    (g_band,) = torch.autograd.grad(dense.square().sum(), [cond.smooth[0].weight])
    (g_ref,) = torch.autograd.grad(cond.upsample(h)[:, :, offset : offset + length].square().sum(), [cond.smooth[0].weight])
    torch.testing.assert_close(g_band, g_ref, rtol=1e-10, atol=1e-10)


def test_upsample_band_rejects_samples_past_the_frames():
    cond = ConditionNet(10, 6, [4, 5])
    with pytest.raises(ValueError, match="exceed"):
        cond.upsample_band(3, 61, 0)


def _small_teacher(lp=False, layers=4):
    """A demo-feature teacher of ``layers`` layers with weights moved off their initialisation."""
    cfg = load_config(None)
    tc = dataclasses.replace(cfg.teacher, layers=layers, stacks=2, lpc_order=8 if lp else 0,
                             preemphasis=0.85 if lp else 0.0)
    teacher = Teacher(tc, cfg.features.n_mels, cfg.features)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, cfg


@pytest.mark.parametrize("lp", [False, True])
def test_teacher_fused_frame_rate_matches(lp):
    torch.manual_seed(3)
    teacher, cfg = _small_teacher(lp, layers=6)
    ctx = teacher.cond.frame_context
    audio = quantize((0.3 * torch.randn(2, 640)).clamp(-1, 1))
    mel = torch.randn(2, cfg.features.n_mels, 8 + 2 * ctx) - 4.0
    x_in = torch.nn.functional.pad(audio[:, :-1], (1, 0))[:, None]
    assert teacher.net.trains_fused(x_in)
    _compare(lambda: teacher(audio, mel, None, ctx), list(teacher.parameters()), tol=5e-5)
    # frozen (distillation's teacher pass): gradient to the scored waveform only
    teacher.requires_grad_(False)
    a = audio.clone().requires_grad_(True)
    _compare(lambda: teacher(a, mel, None, ctx), [a])


@pytest.mark.parametrize("lp", [False, True])
def test_student_fused_frame_rate_matches(lp):
    torch.manual_seed(4)
    cfg = load_config(None)
    sc = dataclasses.replace(cfg.student, flow_layers=[3, 4], stacks_per_flow=[1, 2], residual_channels=8,
                             gate_channels=12, cond_channels=6, lpc_order=8 if lp else 0, preemphasis=0.85 if lp else 0.0)
    student = Student(sc, cfg.features.n_mels, cfg.features)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx = student.cond.frame_context
    z = torch.randn(2, 560)
    mel = torch.randn(2, cfg.features.n_mels, 7 + 2 * ctx) - 4.0
    _compare(lambda: student(z, mel, ctx), list(student.parameters()), tol=5e-5)


def test_gate_kernel_saturates_without_nan():
    h = torch.tensor([[-200.0, -20.0, 0.0, 1e-4, 20.0, 200.0] * 2])
    z = torch.empty(1, 6)
    ref = torch.tanh(h[:, :6]) * torch.sigmoid(h[:, 6:])
    cpu_fused.gate(h, None, z, 1)
    assert torch.isfinite(z).all() and torch.isfinite(h).all()
    torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-7)


def test_reference_mode_and_inference_keep_the_plain_layers():
    net = WaveNet(1, 3, 2, 1, 2, 4, 8, 4, 3)
    x = torch.randn(1, 4, 10)
    with kernels.use_mode("reference"):
        assert not kernels.use_cpu_fused(x)
    with torch.no_grad():
        assert not net._wants_fused(x.transpose(1, 2), None)
    assert not kernels.use_cpu_fused(x.double())


def test_frame_rate_path_broadcasts_one_mel_over_the_batch():
    torch.manual_seed(5)
    teacher, cfg = _small_teacher()
    ctx = teacher.cond.frame_context
    audio = quantize((0.3 * torch.randn(3, 320)).clamp(-1, 1))
    mel = torch.randn(1, cfg.features.n_mels, 4 + 2 * ctx) - 4.0
    _compare(lambda: teacher(audio, mel, None, ctx), list(teacher.parameters()), tol=5e-5)
    sc = dataclasses.replace(cfg.student, flow_layers=[2, 2], stacks_per_flow=[1, 1], residual_channels=8,
                             gate_channels=12, cond_channels=6)
    student = Student(sc, cfg.features.n_mels, cfg.features)
    _compare(lambda: student(torch.randn(3, 320, generator=torch.Generator().manual_seed(1)), mel,
                             student.cond.frame_context), list(student.parameters()), tol=5e-5)


def test_batch_of_one_and_segments_shorter_than_the_dilations():
    torch.manual_seed(6)
    net = WaveNet(1, 3, 8, 1, 2, 8, 12, 6, 5)  # dilations up to 128
    for B, T in ((1, 300), (2, 3)):
        x = torch.randn(B, 1, T, requires_grad=True)
        c = torch.randn(B, 5, T, requires_grad=True)
        _compare(lambda: net(x, c), [x, c] + list(net.parameters()))


def test_threaded_passes_equal_one_thread():
    torch.manual_seed(7)
    net = WaveNet(1, 3, 4, 1, 3, 16, 32, 8, 6)
    teacher, cfg = _small_teacher()
    ctx = teacher.cond.frame_context
    audio = quantize((0.3 * torch.randn(2, 4000)).clamp(-1, 1))
    mel = torch.randn(2, cfg.features.n_mels, 50 + 2 * ctx) - 4.0
    x = torch.randn(2, 1, 4000)
    c = torch.randn(2, 6, 4000)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            net.zero_grad()
            teacher.zero_grad()
            out = net(x, c)
            params = teacher(audio, mel, None, ctx)
            (out.square().sum() + params.square().sum()).backward()
            results.append([out.detach(), params.detach()] + [p.grad.clone() for p in list(net.parameters()) + list(teacher.parameters())])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert _rel(a, b) < 1e-5


def test_wrong_conditioning_length_is_refused():
    net = WaveNet(1, 3, 2, 1, 2, 8, 12, 6, 5)
    x = torch.randn(2, 1, 50)
    with pytest.raises((ValueError, RuntimeError)):
        net(x, torch.randn(2, 5, 60))  # trainable weights: the fused path would pair the wrong rows
    teacher, cfg = _small_teacher()
    c = teacher.cond.banded(torch.randn(2, cfg.features.n_mels, 10), 0, 320)
    with pytest.raises(ValueError, match="band"):
        teacher.net.forward_banded(torch.randn(2, 1, 300), c.frames, c.i0, c.w)


def test_second_backward_is_a_clear_error():
    net = WaveNet(1, 3, 2, 1, 2, 8, 12, 6, 5)
    x = torch.randn(2, 1, 40, requires_grad=True)
    out = net(x, torch.randn(2, 5, 40)).square().sum()
    (g,) = torch.autograd.grad(out, [x], create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_long_utterances_with_gradients_take_the_plain_layers():
    from wavedistill.nn.wavenet import BAND_MAX_FRAMES

    teacher, _ = _small_teacher()
    x = torch.zeros(1, 1, 80)
    assert teacher.net.trains_fused(x, 58) and not teacher.net.trains_fused(x, BAND_MAX_FRAMES + 1)
