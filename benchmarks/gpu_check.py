"""The Python half of ``benchmarks/gpu_check.sh``: kernels against the reference, generation and training speed.

Sections (each recorded in one JSON; a failing section is recorded with its error and the run goes on):

* ``kernels``    — the fused residual-layer kernel (:func:`wavedistill.kernels.residual_layer`) against the
  PyTorch layer, forward and backward (input, conditioning and every weight), float32 and bfloat16, with
  the relative max error and whether it is within tolerance;
* ``generation`` — the student's parallel pass through the reference layers and the fused kernels at the
  demo size (``checkpoints/demo/student-v1``, the non-LP demo student) and at the Parallel WaveNet paper's
  size (the default :class:`~wavedistill.config.StudentConfig`: 4 flows of 10, 10, 10, 30 layers, 64 channels,
  random weights), and the teacher's autoregressive generation in the persistent Triton kernel
  (``checkpoints/demo/teacher-v1``), 1 and 16 streams; median wall time with device synchronisation;
* ``training``   — the teacher step and the distillation step (:mod:`wavedistill.eval.train_bench`) for about
  ``--train-seconds`` each, in the default kernel mode (fused layers on CUDA).

``--tiny``: CPU under ``TRITON_INTERPRET=1`` at toy sizes, so that CI proves the script runs; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wavedistill import kernels  # noqa: E402

TOL = {"float32": 1e-4, "bfloat16": 3e-2}  # relative to the largest reference value of each tensor


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def check_kernels(device: torch.device, tiny: bool) -> list[dict]:
    from wavedistill.nn.wavenet import ResidualLayer

    R, G, S, C, T = (8, 16, 8, 8, 48) if tiny else (64, 128, 64, 64, 4096)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for K, d in ((2, 4), (3, 2)):
            torch.manual_seed(0)
            layer = ResidualLayer(R, G, S, C, K, d).to(device)
            x = torch.randn(2, R, T, device=device)
            c = torch.randn(2, C, T, device=device)
            g_out, g_skip = torch.randn(2, R, T, device=device), torch.randn(2, S, T, device=device)
            results = {}
            for mode in ("reference", "triton"):
                xs, cs = x.clone().to(dtype).requires_grad_(), c.clone().to(dtype).requires_grad_()
                lay = layer.to(dtype)
                lay.zero_grad()
                with kernels.use_mode(mode):
                    o, s = lay(xs, cs)
                ((o.float() * g_out).sum() + (s.float() * g_skip).sum()).backward()
                results[mode] = {"out": o, "skip": s, "grad_x": xs.grad, "grad_c": cs.grad,
                                 **{f"grad_{n}": p.grad for n, p in lay.named_parameters()}}
            errs = {k: _rel(results["triton"][k], results["reference"][k]) for k in results["reference"]}
            name = str(dtype).replace("torch.", "")
            out.append({"dtype": name, "kernel_size": K, "dilation": d, "shape": [2, R, T], "relative_errors": errs,
                        "max_relative_error": max(errs.values()), "tolerance": TOL[name],
                        "ok": max(errs.values()) <= TOL[name]})
    return out


def _time(fn, device, repeats, tiny=False):
    from wavedistill.eval.bench import time_call

    if tiny:  # one untimed-warm-up-free call: the interpreter is slow and the number meaningless
        with torch.inference_mode():
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return statistics.median(time_call(fn, device, repeats))


def bench_generation(device: torch.device, tiny: bool, repeats: int) -> list[dict]:
    from wavedistill.checkpoint import load_model
    from wavedistill.config import StudentConfig, TeacherConfig, load_config
    from wavedistill.eval.bench import bench_mel
    from wavedistill.generation.cached import FrameConditioning
    from wavedistill.models.student import Student
    from wavedistill.models.teacher import Teacher

    feats = load_config(ROOT / "recipes/demo/conf/student.yaml").features
    seconds = 0.01 if tiny else 1.0  # tiny: one frame
    mel = bench_mel(feats, seconds, device)
    samples = mel.shape[2] * feats.hop_length
    if tiny:  # toy models of the same structure (the interpreter runs Python per tile)
        students = {"demo-size (toy)": Student(StudentConfig([2, 2], [1, 1], 3, 8, 16, 8, [4, 4, 5]), feats.n_mels),
                    "paper-size (toy)": Student(StudentConfig([2, 3], [1, 1], 2, 8, 16, 8, [4, 4, 5]), feats.n_mels)}
        teacher = Teacher(TeacherConfig(layers=4, stacks=2, kernel_size=2, residual_channels=8, gate_channels=16,
                                        skip_channels=8, cond_channels=8, upsample_scales=[4, 4, 5]), feats.n_mels)
    else:
        students = {"demo (checkpoints/demo/student-v1)": load_model(ROOT / "checkpoints/demo/student-v1",
                                                                     kind="student")[0],
                    "paper size (4 flows 10/10/10/30, 64 ch, random weights)":
                        Student(StudentConfig(upsample_scales=[4, 4, 5]), feats.n_mels)}
        teacher = load_model(ROOT / "checkpoints/demo/teacher-v1", kind="teacher")[0]
    rows = []
    with torch.inference_mode():
        for label, st in students.items():
            st = st.to(device).eval()
            for mode, name in (("reference", "student"), ("triton", "student-fused")):
                with kernels.use_mode(mode):
                    sec = _time(lambda: st.synthesize(mel, seed=0), device, repeats, tiny)
                rows.append({"entry": name, "model": label, "samples": samples, "seconds": sec,
                             "samples_per_second": samples / sec})
        from wavedistill.generation import triton as ar_triton

        teacher = teacher.to(device).eval()
        reason = ar_triton.unsupported_reason(teacher)
        if reason is not None:
            rows.append({"entry": "teacher-persistent", "skipped": reason})
            return rows
        gen = ar_triton.TritonARGenerator(teacher)
        for streams in (1,) if tiny else (1, 16):
            m = mel.expand(streams, -1, -1)

            def run(m=m, n=streams):
                c = FrameConditioning.from_mel(teacher.cond, m)
                return gen.run(c, teacher.make_noise(n, c.shape[2], 0, device))

            sec = _time(run, device, repeats, tiny)
            rows.append({"entry": f"teacher-persistent-x{streams}", "model": "toy" if tiny else "demo",
                         "samples": samples * streams, "seconds": sec, "samples_per_second": samples * streams / sec})
    return rows


def bench_training(device: torch.device, tiny: bool, seconds: float) -> list[dict]:
    from wavedistill.eval import train_bench as tb

    rows = []
    for kind in tb.STEPS:
        cfg = ROOT / "recipes/demo/conf" / ("teacher.yaml" if kind == "teacher" else "student.yaml")
        kw = dict(batch=1, segment=400) if tiny else {}
        step = tb.build_step(kind, cfg, ROOT / "checkpoints/demo/teacher-v1", device=device, **kw)
        t = time.perf_counter()
        step.run()  # warm-up, and a first estimate of the step time (Triton compiles here)
        first = time.perf_counter() - t
        t = time.perf_counter()
        step.run()
        per = max(time.perf_counter() - t, 1e-6)
        repeats = 1 if tiny else int(min(500, max(3, seconds / per)))
        peak = tb.peak_gflops(device)
        r = tb.bench_step(step, repeats, 0, peak, torch.get_num_threads())
        r.update(peak_gflops=peak, first_step_seconds=first, kernel_mode=kernels.get_mode())
        rows.append(r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("GPU_CHECK_TINY") == "1")
    p.add_argument("--pytest-log", default=None)
    p.add_argument("--pytest-rc", type=int, default=None)
    p.add_argument("--train-seconds", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use GPU_CHECK_TINY=1 for the CPU smoke run", file=sys.stderr)
        return 2
    if args.tiny and not kernels.interpreting():
        print("gpu_check: the tiny run needs TRITON_INTERPRET=1 (set by gpu_check.sh)", file=sys.stderr)
        return 2
    report = {"mode": "tiny (CPU, Triton interpreter; numbers meaningless)" if args.tiny else "full",
              "device": "cpu" if args.tiny else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "triton": kernels.triton_available(), "sections": {}, "failures": []}
    if args.pytest_rc is not None:
        log = Path(args.pytest_log).read_text(errors="replace") if args.pytest_log else ""
        tail = [ln for ln in log.strip().splitlines() if ln.strip()][-1:] or [""]
        report["sections"]["pytest_gpu"] = {"returncode": args.pytest_rc, "summary": tail[0]}
        if args.pytest_rc not in (0, 5):  # 5: nothing collected
            report["failures"].append("pytest_gpu")
    sections = {
        "kernels": lambda: check_kernels(device, args.tiny),
        "generation": lambda: bench_generation(device, args.tiny, 1 if args.tiny else args.repeats),
        "training": lambda: bench_training(device, args.tiny, args.train_seconds),
    }
    for name, fn in sections.items():
        t = time.perf_counter()
        try:
            report["sections"][name] = fn()
            if name == "kernels" and not all(r["ok"] for r in report["sections"][name]):
                report["failures"].append(name)
        except Exception as e:  # recorded, and the check fails at the end
            report["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            report["failures"].append(name)
        print(f"gpu_check: {name} done in {time.perf_counter() - t:.1f} s", flush=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu_check: wrote {args.json}; failures: {report['failures'] or 'none'}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
