"""The faster training formulation computes the same maths; the training benchmark and the GPU check run.

* time-major GEMM residual layers (:meth:`WaveNet.forward`) against the channel-major 1-D convolutions
  (:meth:`WaveNet.forward_channels`), values and gradients, in float64;
* the teacher and distillation checks below run the default path — on this CPU the fused training stack with
  frame-rate conditioning (tests/test_cpu_fused.py checks it piece by piece) — against that reference;
* the polyphase upsampling against the literal stretch-and-convolve, values and gradients;
* the teacher NLL and every distillation loss term (and their gradients) on a fixed batch with the shipped
  demo checkpoints, reference formulation against the new one;
* the shipped student gives the same audio, the shipped teacher the same likelihood;
* ``benchmarks/train_speed.py`` / :mod:`wavedistill.eval.train_bench` at tiny sizes; ``gpu_check.sh`` tiny.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from wavedistill import kernels
from wavedistill.checkpoint import load_model
from wavedistill.config import load_config
from wavedistill.models.teacher import Teacher
from wavedistill.nn.distributions import quantize
from wavedistill.nn.wavenet import ConditionNet, StackTaps, WaveNet
from wavedistill.train.losses import DistillationLoss

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo"


@pytest.fixture
def reference_formulation(monkeypatch):
    """Switch the networks and the upsampling back to the channel-major convolutions (and off the fused
    CPU training path, whose frame-rate conditioning bypasses ``WaveNet.forward``)."""
    def use():
        monkeypatch.setattr(kernels, "_mode", "reference")
        monkeypatch.setattr(WaveNet, "forward", WaveNet.forward_channels)
        monkeypatch.setattr(ConditionNet, "upsample", ConditionNet.upsample_reference)
    return use


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, allow_unused=True)


@pytest.mark.parametrize("args", [
    (1, 30, 6, 2, 2, 16, 32, 12, 10),   # teacher-like: skip stack, kernel 2
    (1, 2, 5, 1, 3, 12, 24, 0, 8),      # IAF conditioner: no skip stack, kernel 3
    (1, 2, 4, 1, 2, 8, 16, 8, 0),       # no conditioning
])
def test_time_major_layers_match_channel_major(args):
    torch.manual_seed(0)
    net = WaveNet(*args).double()
    cond = args[-1]
    T = 70  # shorter than the largest dilation × (kernel − 1) in some layers: all-zero taps
    x = torch.randn(3, 1, T, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, cond, T, dtype=torch.float64, requires_grad=True) if cond else None
    w = torch.randn(3, args[1], T, dtype=torch.float64)
    inputs = [x] + ([c] if c is not None else []) + list(net.parameters())
    new = net(x, c)
    ref = net.forward_channels(x, c)
    assert new.shape == ref.shape and new.is_contiguous()
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    for g_new, g_ref in zip(_grads((new * w).sum(), inputs), _grads((ref * w).sum(), inputs)):
        torch.testing.assert_close(g_new, g_ref, rtol=1e-10, atol=1e-12)


def test_time_major_broadcasts_conditioning_and_frozen_weights():
    torch.manual_seed(1)
    net = WaveNet(1, 30, 4, 2, 2, 8, 16, 8, 8).double()
    x = torch.randn(3, 1, 40, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 8, 40, dtype=torch.float64)  # batch-1 conditioning, no gradient
    torch.testing.assert_close(net(x, c), net.forward_channels(x, c), rtol=1e-12, atol=1e-12)
    net.requires_grad_(False)  # a frozen teacher: the conditioning projection leaves the stacked GEMM
    (g_new,) = _grads(net(x, c).square().sum(), [x])
    (g_ref,) = _grads(net.forward_channels(x, c).square().sum(), [x])
    torch.testing.assert_close(g_new, g_ref, rtol=1e-10, atol=1e-12)


def test_stack_taps_gradients():
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 9, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, c: StackTaps.apply(x, c, 3, 2), (x, c))
    assert gradcheck(lambda x: StackTaps.apply(x, None, 2, 16), (x,))  # dilation beyond the length
    out = StackTaps.apply(x, c, 3, 2)
    torch.testing.assert_close(out[:, 4:, 0:3], x[:, :5])  # the oldest tap is x[t - 4]
    assert out[:, :4, 0:3].abs().sum() == 0


@pytest.mark.parametrize("scales", [[4, 4, 5], [2, 3], [1, 5]])
def test_polyphase_upsampling_matches_stretch_and_convolve(scales):
    torch.manual_seed(2)
    net = ConditionNet(6, 5, scales).double()
    for conv in net.smooth:
        torch.nn.init.normal_(conv.weight)  # not the symmetric box filter it starts as
    for frames in (1, 2, 7):
        h = torch.randn(2, 5, frames, dtype=torch.float64, requires_grad=True)
        inputs = [h] + [conv.weight for conv in net.smooth]
        new, ref = net.upsample(h), net.upsample_reference(h)
        assert new.shape == ref.shape == (2, 5, frames * math.prod(scales))
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
        w = torch.randn_like(ref)
        for a, b in zip(_grads((new * w).sum(), inputs), _grads((ref * w).sum(), inputs)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _demo_batch(teacher, context, T=800):
    g = torch.Generator().manual_seed(3)
    frames = T // teacher.hop
    t = torch.arange(frames * teacher.hop) / 8000.0
    audio = quantize((0.3 * torch.sin(2 * math.pi * 180 * t) + 0.02 * torch.randn(2, t.numel(), generator=g)).clamp(-1, 1))
    mel = torch.randn(2, teacher.n_mels, frames + 2 * context, generator=g) - 4.0
    return audio, mel


def _teacher_nll_and_grads(teacher, audio, mel, context):
    teacher.zero_grad()
    params = teacher(audio, mel, None, context)
    loss = -teacher.dist.log_prob_discrete(params, audio).mean() / math.log(2.0)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in teacher.named_parameters()}


def test_teacher_nll_and_gradients_unchanged(reference_formulation):
    teacher, _, _ = load_model(DEMO / "teacher-v1", kind="teacher")
    teacher.train()
    context = teacher.cond.frame_context
    audio, mel = _demo_batch(teacher, context)
    new_loss, new_grads = _teacher_nll_and_grads(teacher, audio, mel, context)
    reference_formulation()
    ref_loss, ref_grads = _teacher_nll_and_grads(teacher, audio, mel, context)
    assert math.isfinite(ref_loss) and abs(new_loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, g in ref_grads.items():
        assert _rel_err(new_grads[name], g) < 1e-4, (name, _rel_err(new_grads[name], g))


def _distill_terms(loss_fn, student, z, audio, mel, context):
    student.zero_grad()
    g = torch.Generator().manual_seed(11)
    total, terms, x = loss_fn(z, audio, mel, context, g, (0, z.shape[0]))
    total.backward()
    return terms, x.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def test_distillation_terms_and_gradients_unchanged(reference_formulation):
    teacher, features, _ = load_model(DEMO / "teacher-v1", kind="teacher")
    teacher.eval().requires_grad_(False)
    student, _, _ = load_model(DEMO / "student-v1", kind="student")
    student.train()
    cfg = load_config(ROOT / "recipes" / "demo" / "conf" / "student.yaml")
    loss_fn = DistillationLoss(cfg.distill, teacher, student)
    context = max(student.cond.frame_context, teacher.cond.frame_context)
    audio, mel = _demo_batch(teacher, context)
    z = student.noise_from_uniform(torch.rand(audio.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).float()
    new_terms, new_x, new_grads = _distill_terms(loss_fn, student, z, audio, mel, context)
    reference_formulation()
    ref_terms, ref_x, ref_grads = _distill_terms(loss_fn, student, z, audio, mel, context)
    assert set(new_terms) == set(ref_terms)
    for k, v in ref_terms.items():
        assert abs(new_terms[k] - v) <= 1e-4 * max(1.0, abs(v)), (k, new_terms[k], v)
    torch.testing.assert_close(new_x, ref_x, rtol=1e-4, atol=1e-5)
    # float32 through 54 layers and 16 draws: compare whole tensors.  The summation order of the GEMMs depends on
    # the thread count: on 2 threads the plain time-major layers already differ from the convolutions by 1.5e-3 on
    # flow 3's second layer (1 thread: < 1e-3), the fused stack by 1.4e-3; tight checks: tests/test_cpu_fused.py.
    for name, g in ref_grads.items():
        assert _rel_err(new_grads[name], g) < 3e-3, (name, _rel_err(new_grads[name], g))


def test_shipped_checkpoints_same_audio_and_likelihood(reference_formulation):
    student, _, _ = load_model(DEMO / "student-v1", kind="student")
    teacher, _, _ = load_model(DEMO / "teacher-v1", kind="teacher")
    audio, mel = _demo_batch(teacher, 0, T=1600)
    with torch.no_grad():
        y_new = student.synthesize(mel, seed=7)
        lp_new = teacher.log_prob(audio, mel)
        reference_formulation()
        y_ref = student.synthesize(mel, seed=7)
        lp_ref = teacher.log_prob(audio, mel)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp_new, lp_ref, rtol=1e-4, atol=1e-3)


def test_train_bench_tiny(tmp_path):
    from wavedistill.eval import bench, train_bench

    report = train_bench.run_train_bench(threads=(1,), repeats=2, warmup=1, batch=1, segment=400,
                                         teacher_config=str(ROOT / "recipes/demo/conf/teacher.yaml"),
                                         student_config=str(ROOT / "recipes/demo/conf/student.yaml"),
                                         teacher_path=str(DEMO / "teacher-v1"))
    by = {r["step"]: r for r in report["results"]}
    assert set(by) == {"teacher", "distill"}
    for r in by.values():
        assert r["batch"] == [1, 400] and r["samples_per_second"] > 0 and 0 < r["fraction_of_peak"] < 5
        assert sum(r["phases_seconds"].values()) == pytest.approx(r["seconds_per_step"], rel=0.5)
    assert {"forward: network", "backward: network", "optimizer"} <= set(by["teacher"]["phases_seconds"])
    assert {"student pass", "teacher pass", "losses", "backward: student"} <= set(by["distill"]["phases_seconds"])
    # counted FLOPs: forward + backward of the teacher's network is about 3x its analytic forward count
    t = Teacher(load_config(ROOT / "recipes/demo/conf/teacher.yaml").teacher, 64)
    fwd = bench.teacher_scoring_flops_per_sample(t)
    assert 2.5 * fwd < by["teacher"]["flops_per_sample"] < 3.5 * fwd
    # the frame-rate conditioning of the fused CPU path executes fewer FLOPs than the maths as written
    assert by["teacher"]["flops_per_sample_executed"] < 0.9 * by["teacher"]["flops_per_sample"]
    png = train_bench.plot_png(report)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "teacher" in train_bench.format_table(report)


def test_train_bench_source_filter_configs():
    """The LP recipes (MoL + LP teacher, LP student distilled from it) benchmark too."""
    from wavedistill.eval import train_bench

    report = train_bench.run_train_bench(threads=(1,), repeats=1, warmup=0, batch=1, segment=400,
                                         teacher_config=str(ROOT / "recipes/demo/conf/teacher_lp_quick.yaml"),
                                         student_config=str(ROOT / "recipes/demo/conf/student_lp_quick.yaml"),
                                         teacher_path=str(DEMO / "teacher"), overrides=["distill.kl_weight=1.0"])
    assert [r["step"] for r in report["results"]] == ["teacher", "distill"]
    assert all(r["samples_per_second"] > 0 for r in report["results"])


def test_train_speed_script_compares_two_checkouts(tmp_path):
    """``--compare`` with this checkout on both sides: alternating subprocesses, a summary, a JSON."""
    out = tmp_path / "ab.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_speed.py"), "--compare", str(ROOT), "--threads", "1",
                           "--rounds", "1", "--repeats", "1", "--warmup", "0", "--batch", "1", "--segment", "240",
                           "--steps", "teacher", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (s,) = report["summary"]
    assert s["step"] == "teacher" and s["speedup"] > 0 and set(s["samples_per_second"]) == {"old", "new"}


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = dict(os.environ, GPU_CHECK_TINY="1", GPU_CHECK_OUT=str(out), PY=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert set(report["sections"]) == {"pytest_gpu", "kernels", "generation", "training"}
    assert {(r["dtype"], r["kernel_size"]) for r in report["sections"]["kernels"]} == {
        ("float32", 2), ("float32", 3), ("bfloat16", 2), ("bfloat16", 3)}
    entries = {r["entry"] for r in report["sections"]["generation"]}
    assert {"student", "student-fused", "teacher-persistent-x1"} <= entries
    assert {r["step"] for r in report["sections"]["training"]} == {"teacher", "distill"}
