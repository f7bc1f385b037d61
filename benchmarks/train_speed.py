"""Training throughput of the teacher step and the distillation step (see wavedistill/eval/train_bench.py).

Report (JSON + plot, 1 and 2 threads, phase breakdown, counted FLOPs, fraction of the in-run matmul peak):

    .venv/bin/python benchmarks/train_speed.py --json benchmarks/cpu-train-speed.json --plot benchmarks/cpu-train-speed.png

Side by side with another checkout of the package (e.g. an older commit, ``git archive <rev> wavedistill |
tar -x -C /tmp/old``): alternating subprocesses, old then new, ``--rounds`` times; each subprocess reports
the median of ``--repeats`` steps after ``--warmup``; the summary gives the median over rounds and the ratio.
The harness (this file's ``wavedistill/eval/train_bench.py``) is the same for both; only the package differs.

    .venv/bin/python benchmarks/train_speed.py --compare /tmp/old --threads 2 --rounds 4 --json ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "wavedistill" / "eval" / "train_bench.py"


def load_harness():
    """This checkout's harness module, importing whichever ``wavedistill`` is first on ``sys.path``."""
    spec = importlib.util.spec_from_file_location("wavedistill_train_bench", HARNESS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one(args) -> None:
    """Child process: one (package, step, threads) measurement as one JSON line on stdout."""
    import torch

    tb = load_harness()
    torch.set_num_threads(args.threads[0])
    peak = tb.peak_gflops(torch.device("cpu"))
    out = []
    for kind in args.steps:
        step = tb.build_step(kind, args.teacher_config if kind == "teacher" else args.student_config,
                             args.teacher, args.batch, args.segment, torch.device(args.device))
        r = tb.bench_step(step, args.repeats, args.warmup, peak, args.threads[0])
        r["peak_gflops"] = peak
        if args.check_loss:
            r["loss_first_step"] = step.run()  # a further step: the same for two packages only if the maths is
        out.append(r)
    print("RESULT " + json.dumps(out), flush=True)


def compare(args) -> dict:
    rows: dict[str, list] = {"old": [], "new": []}
    paths = {"old": str(Path(args.compare).resolve()), "new": str(ROOT)}
    base = [sys.executable, str(Path(__file__).resolve()), "--_child", "--threads", str(args.threads[0]),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--steps", *args.steps,
            "--teacher-config", args.teacher_config, "--student-config", args.student_config, "--teacher", args.teacher]
    if args.batch:
        base += ["--batch", str(args.batch)]
    if args.segment:
        base += ["--segment", str(args.segment)]
    for rnd in range(args.rounds):
        for label in ("old", "new") if rnd % 2 == 0 else ("new", "old"):
            env = dict(os.environ, PYTHONPATH=paths[label], OMP_NUM_THREADS=str(args.threads[0]))
            proc = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{label} run failed:\n{proc.stderr[-3000:]}")
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
            res = json.loads(line[len("RESULT "):])
            rows[label].append(res)
            print(f"round {rnd} {label}: " + ", ".join(f"{r['step']} {r['samples_per_second']:.0f}/s "
                                                         f"({r['samples_per_cpu_second']:.0f}/CPU s)" for r in res), flush=True)
    summary = []
    for i, kind in enumerate(args.steps):
        med = {lab: statistics.median(r[i]["samples_per_second"] for r in rows[lab]) for lab in rows}
        cpu = {lab: statistics.median(r[i]["samples_per_cpu_second"] for r in rows[lab]) for lab in rows}
        pk = {lab: statistics.median(r[i]["fraction_of_peak"] for r in rows[lab]) for lab in rows}
        phases = {lab: {n: statistics.median(r[i]["phases_seconds"].get(n, 0.0) for r in rows[lab])
                        for n in rows[lab][0][i]["phases_seconds"]} for lab in rows}
        summary.append({"step": kind, "threads": args.threads[0], "samples_per_second": med, "fraction_of_peak": pk,
                        "speedup": med["new"] / med["old"],
                        "samples_per_cpu_second": cpu, "speedup_cpu_time": cpu["new"] / cpu["old"], "phases_seconds": phases,
                        "flops_per_sample": {lab: rows[lab][0][i]["flops_per_sample"] for lab in rows}})
        print(f"{kind}, {args.threads[0]} thread(s): old {med['old']:.0f}, new {med['new']:.0f} samples/s "
              f"(median of {args.rounds} rounds), speedup {med['new'] / med['old']:.2f}x; "
              f"per CPU second old {cpu['old']:.0f}, new {cpu['new']:.0f} ({cpu['new'] / cpu['old']:.2f}x); "
              f"fraction of peak old {100 * pk['old']:.0f}%, new {100 * pk['new']:.0f}%")
        for lab in rows:
            print(f"  {lab} phases (ms): " + ", ".join(f"{n} {1e3 * v:.0f}" for n, v in phases[lab].items()))
    return {"old": paths["old"], "new": paths["new"], "rounds": args.rounds, "repeats": args.repeats,
            "warmup": args.warmup, "summary": summary, "runs": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", nargs="+", default=["teacher", "distill"], choices=["teacher", "distill"])
    p.add_argument("--teacher-config", default="recipes/demo/conf/teacher.yaml")
    p.add_argument("--student-config", default="recipes/demo/conf/student.yaml")
    p.add_argument("--teacher", default="checkpoints/demo/teacher-v1",
                   help="frozen teacher for the distillation step (default: the non-LP demo teacher of --student-config)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default: train.batch_size of the config")
    p.add_argument("--segment", type=int, default=None, help="default: train.segment_samples of the config")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--compare", default=None, metavar="DIR", help="root of another checkout holding wavedistill/")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--check-loss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return _one(args)
    if args.compare:
        report = compare(args)
    else:
        sys.path.insert(0, str(ROOT))
        tb = load_harness()
        report = tb.run_train_bench(args.steps, args.teacher_config, args.student_config, args.teacher, args.threads,
                                    args.repeats, args.warmup, args.batch, args.segment, args.device)
        print(tb.format_table(report))
        if args.plot:
            Path(args.plot).write_bytes(tb.plot_png(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
