"""CPU autoregressive generation speed: Python CachedGenerator vs the compiled FastCachedGenerator.

Builds a random teacher of the demo size (TeacherConfig defaults: 20 layers in
2 stacks, kernel 2, 64 residual / 128 gate / 64 skip channels, 10-mixture MoL),
warms each path up for ~1 s, then times the generation of ``--seconds`` of audio
at ``--sample-rate`` and prints samples/s and achieved GFLOP/s, for every
thread count in ``--threads`` (torch's intra-op threads for the Python path,
``FastCachedGenerator(threads=...)`` for the compiled one).

Both wall-clock and process-CPU-time rates are reported: on a shared machine
the wall-clock rate measures the share of the CPU the benchmark got, and the
CPU-time rate (samples per CPU-second, summed over threads) measures the code.
The load average at the start is recorded too.

    python benchmarks/cpu_generation.py                  # batch 1, threads 1 and 2
    python benchmarks/cpu_generation.py --json out.json --batch 1 --threads 2
    python benchmarks/cpu_generation.py --skip-python --seconds 5

FLOPs per sample (kernel k, residual R, gate G, skip S, K mixtures):
L·(2·k·R·G + 2·(G/2)·(R+S)) + 2·S·S + 2·S·3K; the conditioning projections
(2·C·G per layer and sample, done in blocks) are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from wavedistill.generation import cpp as fastgen  # noqa: E402
from wavedistill.config import TeacherConfig  # noqa: E402
from wavedistill.generation.cached import CachedGenerator  # noqa: E402
from wavedistill.models.teacher import Teacher  # noqa: E402


def demo_teacher(seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    t = Teacher(TeacherConfig(), n_mels=64).eval()
    with torch.no_grad():  # realistic, mostly unclamped samples
        t.net.head2.weight.mul_(0.5)
        t.net.head2.bias[2 * t.cfg.mixtures :] = -2.5
    return t


def timed_run(gen, c, noise, warmup_samples: int) -> tuple[float, float, torch.Tensor]:
    """Warm up on the first samples, then time a full run; returns (wall s, cpu s, output)."""
    gen.run(c[:, :, :warmup_samples], noise[:, :, :warmup_samples])
    t0, p0 = time.perf_counter(), time.process_time()
    out = gen.run(c, noise)
    return time.perf_counter() - t0, time.process_time() - p0, out


def measure(name: str, make, t: Teacher, c: torch.Tensor, noise: torch.Tensor, samples: int, threads: int,
            warmup_s: float, guess: float, flops: int, sample_rate: int) -> tuple[dict, torch.Tensor]:
    torch.set_num_threads(threads)
    batch = c.shape[0]
    c, noise = c[:, :, :samples], noise[:, :, :samples]
    gen = make(threads)
    warm = max(1, min(samples, int(warmup_s * guess)))
    wall, cpu, out = timed_run(gen, c, noise, warm)
    n = batch * samples
    res = {
        "path": name, "threads": threads, "batch": batch, "samples": samples,
        "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
        "samples_per_s": round(n / wall, 1), "samples_per_cpu_s": round(n / cpu, 1),
        "gflops": round(n * flops / wall / 1e9, 3), "gflops_per_cpu_s": round(n * flops / cpu / 1e9, 3),
        "real_time_factor": round(n / wall / sample_rate / batch, 3),
    }
    print(f"{name:7s} threads={threads} batch={batch}: {res['samples_per_s']:9.0f} samples/s "
          f"({res['gflops']:6.2f} GFLOP/s, {res['real_time_factor']:.2f}x real time at {sample_rate} Hz)  "
          f"| per CPU-second: {res['samples_per_cpu_s']:9.0f} samples, {res['gflops_per_cpu_s']:6.2f} GFLOP",
          flush=True)
    return res, out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="audio seconds to time per path (default 2)")
    ap.add_argument("--python-seconds", type=float, default=None,
                    help="audio seconds for the slow Python path (default: --seconds)")
    ap.add_argument("--sample-rate", type=int, default=8000)
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up wall seconds per path (approximate)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-python", action="store_true", help="time only the compiled path")
    ap.add_argument("--split-channels", action="store_true",
                    help="also time FastCachedGenerator(split_channels=True): threads share each step (barrier per layer)")
    ap.add_argument("--fresh-build", action="store_true", help="build the extension in a temporary directory (times a cold build)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    if args.fresh_build:
        os.environ["WAVEDISTILL_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="wavedistill_ext_")
    t0 = time.perf_counter()
    ok = fastgen.available()
    build_s = time.perf_counter() - t0
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"extension: {'ok' if ok else 'UNAVAILABLE: ' + str(fastgen.build_error())} "
          f"({'cold build' if args.fresh_build else 'build or load'} {build_s:.2f} s)  {fastgen.library_path() or ''}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load}")

    t = demo_teacher()
    cfg = t.cfg
    flops = fastgen.flops_per_sample(cfg.layers, cfg.kernel_size, cfg.residual_channels, cfg.gate_channels,
                                     cfg.skip_channels, t.dist.n_params)
    print(f"demo teacher: {cfg.layers} layers, R={cfg.residual_channels} G={cfg.gate_channels} "
          f"S={cfg.skip_channels} K={cfg.mixtures}: {flops / 1e6:.3f} MFLOP per sample")
    fast_n = int(round(args.seconds * args.sample_rate))
    py_n = int(round((args.python_seconds or args.seconds) * args.sample_rate))

    g = torch.Generator().manual_seed(1)
    n_max = max(fast_n, py_n)
    c = torch.randn(args.batch, cfg.cond_channels, n_max, generator=g)
    noise = t.make_noise(args.batch, n_max, seed=2)
    paths = []
    if not args.skip_python:
        paths.append(("python", lambda n: CachedGenerator(t), py_n, 800.0))
    if ok:
        paths.append(("fast", lambda n: fastgen.FastCachedGenerator(t, threads=n), fast_n, 8000.0))
        if args.split_channels:
            paths.append(("fast-split", lambda n: fastgen.FastCachedGenerator(t, threads=n, split_channels=True),
                          fast_n, 2000.0))
    results = []
    outputs = {}
    for th in args.threads:
        for name, make, n, guess in paths:
            r, out = measure(name, make, t, c, noise, n, th, args.warmup, guess, flops, args.sample_rate)
            results.append(r)
            outputs[(name, th)] = out
    # Sanity: both paths produced the same waveform (over the common length).
    checks = {}
    for (name, th), b in outputs.items():
        if name != "python" and ("python", th) in outputs:
            a = outputs[("python", th)]
            n = min(a.shape[1], b.shape[1])
            checks[f"{name}/threads={th}"] = float((a[:, :n] - b[:, :n]).abs().max())
            print(f"{name} threads={th}: max |python - fast| over {n} samples = {checks[f'{name}/threads={th}']:.2e}")
    by = {(r["path"], r["threads"]): r for r in results}
    for th in args.threads:
        if ("python", th) in by and ("fast", th) in by:
            print(f"threads={th}: speed-up {by[('fast', th)]['samples_per_s'] / by[('python', th)]['samples_per_s']:.1f}x")
    if args.json:
        payload = {
            "benchmark": "cpu_generation", "torch": torch.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "load_average": load, "extension_available": ok,
            "extension_build_or_load_s": round(build_s, 3), "cold_build": args.fresh_build,
            "teacher": {"layers": cfg.layers, "stacks": cfg.stacks, "kernel_size": cfg.kernel_size,
                        "residual": cfg.residual_channels, "gate": cfg.gate_channels, "skip": cfg.skip_channels,
                        "mixtures": cfg.mixtures},
            "flops_per_sample": flops, "sample_rate": args.sample_rate, "results": results,
            "max_abs_diff_python_vs_fast": checks,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
