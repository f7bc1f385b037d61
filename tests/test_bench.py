"""Benchmark: analytic FLOP counts against torch's counter, and the bench command's JSON and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers_train import cli
from wavedistill.eval.bench import (naive_teacher_flops_per_sample, student_flops_per_sample, teacher_flops_per_sample,
                               teacher_scoring_flops_per_sample)
from wavedistill.checkpoint import model_config, save_checkpoint
from wavedistill.config import FeatureConfig, StudentConfig, TeacherConfig
from wavedistill.models.student import Student
from wavedistill.models.teacher import Teacher

FC = FeatureConfig()
RESULT_FIELDS = ("generator", "checkpoint", "samples_per_second", "real_time_factor", "x_real_time", "flops_per_sample",
                 "achieved_gflops", "fraction_of_peak")


pytestmark = pytest.mark.usefixtures("single_thread")


def teacher_model() -> Teacher:
    # receptive field 1024 with 32 residual channels: recomputing the window every step clearly costs more than caching
    cfg = TeacherConfig(layers=10, stacks=1, kernel_size=2, residual_channels=32, gate_channels=64, skip_channels=32,
                        cond_channels=8, mixtures=2)
    cfg.validate(FC)
    return Teacher(cfg, FC.n_mels)


def student_model() -> Student:
    cfg = StudentConfig(flow_layers=[2, 2], stacks_per_flow=[1, 1], residual_channels=8, gate_channels=16, cond_channels=8)
    cfg.validate(FC)
    return Student(cfg, FC.n_mels)


def save(model, exp: Path) -> Path:
    save_checkpoint(exp, 1, model.state_dict(), model_config(model.kind, model.cfg, FC), None, keep=1)
    return exp


def test_flops_per_sample_match_torch_flop_counter():
    """The analytic count equals what torch counts for a parallel pass (per sample), conditioning net included."""
    torch.manual_seed(0)
    teacher, student = teacher_model(), student_model()
    mel = torch.randn(1, FC.n_mels, 10)
    T = 10 * FC.hop_length
    # scoring and synthesis run without gradients (with them, CPU training projects the conditioning per frame)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        teacher(torch.zeros(1, T), mel)
    assert teacher_scoring_flops_per_sample(teacher) == counter.get_total_flops() / T
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        student(torch.zeros(1, T), mel)
    assert student_flops_per_sample(student) == counter.get_total_flops() / T


def test_cached_flops_count_conditioning_at_frame_rate():
    """The AR count equals what torch counts for the Python cached generator (one projection block), except the
    1→R input, an elementwise product there; conditioning at frame rate is several times cheaper per sample."""
    torch.manual_seed(0)
    teacher = teacher_model()
    mel = torch.randn(1, FC.n_mels, 10)
    T = 10 * FC.hop_length
    with FlopCounterMode(display=False) as counter:
        teacher.generate(mel, seed=0, fast=False)
    R = teacher.cfg.residual_channels
    # the counter also sees the one-off derivation of the upsampling kernels (upsampling an identity): ~2% here
    assert teacher_flops_per_sample(teacher) - 2 * R == pytest.approx(counter.get_total_flops() / T, rel=0.03)
    assert teacher_flops_per_sample(teacher) < teacher_scoring_flops_per_sample(teacher)


def test_naive_flops_count_the_recomputed_window():
    torch.manual_seed(0)
    teacher = teacher_model()
    mel = torch.randn(1, FC.n_mels, 1)
    T = FC.hop_length
    with FlopCounterMode(display=False) as counter:
        teacher.generate_naive(mel, seed=0)
    assert naive_teacher_flops_per_sample(teacher, T) == pytest.approx(counter.get_total_flops() / T, rel=1e-9)
    assert naive_teacher_flops_per_sample(teacher, T) > 30 * teacher_flops_per_sample(teacher)  # mean window 40.5


def test_bench_command_json_and_plot(tmp_path):
    torch.manual_seed(0)
    t = save(teacher_model(), tmp_path / "teacher")
    s = save(student_model(), tmp_path / "student")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "plots" / "bench.png"

    proc = cli("bench", "--checkpoint", t, "--checkpoint", s, "--seconds", "0.05", "--repeats", "1", "--json", out_json,
               "--plot", out_png, timeout=300)

    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    for key in ("device", "threads", "sample_rate", "torch", "peak_gflops", "results"):
        assert key in report, key
    assert report["device"] == "cpu" and report["sample_rate"] == 8000 and report["torch"] == torch.__version__
    assert report["threads"] >= 1 and report["peak_gflops"] > 0
    by_name = {r["generator"]: r for r in report["results"]}
    assert {"teacher-naive", "teacher-cached", "student", "griffin-lim"} <= set(by_name)
    assert set(by_name) <= {"teacher-naive", "teacher-cached", "teacher-cached-fused", "student", "griffin-lim"}
    for r in report["results"]:
        for key in RESULT_FIELDS:
            assert key in r, (r["generator"], key)
        for key in RESULT_FIELDS[2:]:
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["generator"], key, r[key])
        assert r["real_time_factor"] * r["x_real_time"] == pytest.approx(1.0)
        assert r["samples_per_second"] == pytest.approx(r["samples"] / r["median_seconds"])
    assert by_name["teacher-cached"]["checkpoint"] == str(t.resolve() / "checkpoints" / "step-00000001")
    from wavedistill.eval.bench import NAIVE_MAX_SECONDS

    naive_frames = max(1, round(min(0.05, NAIVE_MAX_SECONDS) * 8000 / 80))  # the naive reference runs a shorter window
    assert by_name["teacher-naive"]["samples"] == naive_frames * 80 and by_name["student"]["samples"] == 400
    assert by_name["teacher-cached"]["samples_per_second"] > by_name["teacher-naive"]["samples_per_second"]
    assert by_name["teacher-naive"]["flops_per_sample"] > by_name["teacher-cached"]["flops_per_sample"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "teacher-cached" in proc.stdout and "samples/s" in proc.stdout
