"""Quality on unseen speakers against CPU-hours: ``wavedistill eval --wav-dir`` on checkpoint snapshots (PNG + JSON).

A long run keeps only its last few checkpoints, so copy ``exp/RUN/checkpoints/latest`` aside now and then
(``cp -r``; the CPU time spent so far is in each checkpoint's ``state/trainer.json``), then:

    python benchmarks/unseen_curves.py --run "LP student=exp/snapshots/long-student-lpkl" \\
        --wav-dir exp/unseen12 --eval-root exp/eval-snapshots --out docs/unseen-curves-student

Each snapshot is scored once (``EVAL_ROOT/LABEL/STEP/metrics.json`` is reused when present); the figure shows
PESQ-NB, STOI, log-mel L1 and, for teachers, the exact bits/sample of the real audio, against CPU-hours.
``--reference NAME=VALUE,...`` draws horizontal reference lines (e.g. the shipped checkpoint's figures).

``--merge`` keeps the points of an earlier ``OUT.json`` whose snapshots are no longer on disk (a run resumed on
another machine: its curve goes on from where the committed JSON left it). ``--target pesq=3.0,stoi=0.93 --fit-last
K`` fits each metric against log2(CPU-hours) over the last K points of each run and extrapolates the CPU-hours at
which the target would be reached (``fits`` in the JSON): a rough trend, not a promise, recorded so that the
compute limit is a measured slope rather than a guess.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from wavedistill.eval.report import HIGHER_IS_BETTER
from wavedistill.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("pesq", "stoi", "log_mel_l1", "bits_per_sample")
LABELS = {"pesq": "PESQ-NB ↑", "stoi": "STOI ↑", "log_mel_l1": "log-mel L1 ↓", "bits_per_sample": "bits/sample ↓",
          "f0_rmse_cents": "F0 RMSE (cents) ↓", "vuv_error": "V/UV error ↓"}


def cpu_hours(step_dir: Path) -> float:
    state = json.loads((step_dir / "state" / "trainer.json").read_text())
    return float(state.get("cpu_seconds", 0.0)) / 3600.0


def score(step_dir: Path, wav_dir: Path, out: Path) -> dict:
    """The checkpoint's row of ``wavedistill eval --wav-dir`` (run once, then read back)."""
    if not (out / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "wavedistill", "eval", "--wav-dir", str(wav_dir), "--checkpoint", str(step_dir),
               "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    m = json.loads((out / "metrics.json").read_text())
    name = next(k for k in m["systems"] if k != "griffin_lim")
    row = {k: m["systems"][name]["mean"].get(k) for k in METRICS[:3]}
    row["bits_per_sample"] = m.get("likelihood", {}).get("bits_per_sample", {}).get(name)
    row["f0_rmse_cents"] = m["systems"][name]["mean"].get("f0_rmse_cents")
    row["vuv_error"] = m["systems"][name]["mean"].get("vuv_error")
    row["griffin_lim"] = {k: m["systems"]["griffin_lim"]["mean"].get(k) for k in METRICS[:3]}
    return row


def merge_points(previous: list[dict], current: list[dict]) -> list[dict]:
    """Current points plus the earlier ones at steps not scored now, sorted by CPU-hours."""
    steps = {r["step"] for r in current}
    return sorted([r for r in previous if r["step"] not in steps] + list(current), key=lambda r: r["cpu_hours"])


def log_fit(points: list[dict], metric: str, target: float | None = None, last: int = 0) -> dict | None:
    """Least squares ``metric ≈ a + b·log2(cpu_hours)`` over the last ``last`` points (all when 0).

    Returns a, b (the change per doubling of CPU time), the points used and, when ``target`` is given, the
    CPU-hours at which the fitted line reaches it (None when the trend does not head towards it, or only past
    2**1023 CPU-hours, which a float cannot hold)."""
    pts = [(r["cpu_hours"], r[metric]) for r in points if r.get(metric) is not None and r["cpu_hours"] > 0]
    if last:
        pts = pts[-last:]
    if len(pts) < 2:
        return None
    xs = np.log2([h for h, _ in pts])
    if np.ptp(xs) == 0:
        return None
    b, a = (float(c) for c in np.polyfit(xs, [v for _, v in pts], 1))
    out = {"a": a, "per_doubling": b, "points": len(pts), "from_cpu_hours": pts[0][0], "to_cpu_hours": pts[-1][0]}
    if target is not None:
        heading = b > 0 if HIGHER_IS_BETTER.get(metric, False) else b < 0  # bits/sample: lower is better
        out["target"] = target
        doublings = (target - a) / b if heading else math.inf
        out["cpu_hours_to_target"] = 2.0 ** doublings if doublings < 1024 else None
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=SNAPDIR",
                    help="a folder of step-* checkpoint snapshots (repeatable)")
    ap.add_argument("--wav-dir", required=True, type=Path, help="unseen-speaker audio")
    ap.add_argument("--eval-root", required=True, type=Path, help="where each snapshot's eval report goes")
    ap.add_argument("--out", required=True, type=Path, help="output path without suffix (.png and .json)")
    ap.add_argument("--reference", action="append", default=[], metavar="NAME=pesq,stoi,l1",
                    help="horizontal reference lines, e.g. 'shipped student=1.48,0.732,0.738'")
    ap.add_argument("--merge", action="store_true",
                    help="keep OUT.json's earlier points at steps whose snapshots are gone")
    ap.add_argument("--target", default="", metavar="METRIC=VALUE,...",
                    help="extrapolate the CPU-hours to reach these, e.g. 'pesq=3.0,stoi=0.93'")
    ap.add_argument("--fit-last", type=int, default=0, metavar="K", help="fit over each run's last K points (0: all)")
    ap.add_argument("--table", action="store_true", help="also print each run's points as a markdown table")
    args = ap.parse_args(argv)

    def fail(msg: str):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    if args.fit_last < 0 or args.fit_last == 1:
        fail(f"--fit-last must be 0 (all points) or at least 2, got {args.fit_last}")
    targets = {}
    for spec in filter(None, args.target.split(",")):
        metric, _, value = spec.partition("=")
        if metric not in METRICS:
            fail(f"--target {spec!r}: metric {metric!r} is not one of {', '.join(METRICS)}")
        try:
            targets[metric] = float(value)
        except ValueError:
            fail(f"--target {spec!r}: {value!r} is not a number (write e.g. pesq=3.0,stoi=0.93)")
    previous = {}
    if args.merge and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text()).get("runs", {})

    runs = {}
    for spec in args.run:
        label, _, snap = spec.partition("=")
        points = []
        for step_dir in sorted(Path(snap).glob("step-*")):
            row = score(step_dir, args.wav_dir, args.eval_root / label.replace(" ", "_") / step_dir.name)
            row.update(step=int(step_dir.name.split("-")[1]), cpu_hours=round(cpu_hours(step_dir), 4))
            points.append(row)
            print(f"{label} {step_dir.name}: {row['cpu_hours']:.2f} CPU-h  PESQ {row['pesq']:.3f}  STOI {row['stoi']:.3f}  "
                  f"L1 {row['log_mel_l1']:.3f}  bits {row['bits_per_sample']}", flush=True)
        runs[label] = merge_points(previous.get(label, []), points)
    fits = {label: {m: log_fit(pts, m, t, args.fit_last) for m, t in targets.items()} for label, pts in runs.items()}
    for label, per in fits.items():
        for m, f in per.items():
            if f:
                reach = f["cpu_hours_to_target"]
                print(f"{label} {m}: {f['per_doubling']:+.4f} per doubling of CPU time over {f['points']} points "
                      f"({f['from_cpu_hours']:.2f}–{f['to_cpu_hours']:.2f} h); {m} = {f['target']} at "
                      + (f"~{reach:.3g} CPU-hours" if reach is not None else "never on this trend"))
    refs = {}
    for spec in args.reference:
        name, _, vals = spec.partition("=")
        refs[name] = dict(zip(METRICS[:3], (float(v) for v in vals.split(","))))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"wav_dir": str(args.wav_dir), "runs": runs, "references": refs}
    if targets:
        payload["fits"] = fits
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(payload, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in METRICS if any(r.get(m) is not None for pts in runs.values() for r in pts)]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, m in zip(axes[0], shown):
        for label, pts in runs.items():
            xy = [(r["cpu_hours"], r[m]) for r in pts if r.get(m) is not None]
            if xy:
                line, = ax.plot(*zip(*xy), marker="o", label=label)
                fit = fits.get(label, {}).get(m)
                if fit:  # the fitted trend over its points and two more doublings, dotted
                    hs = np.geomspace(fit["from_cpu_hours"], 4 * fit["to_cpu_hours"], 21)
                    ax.plot(hs, fit["a"] + fit["per_doubling"] * np.log2(hs), ls=":", color=line.get_color())
        for name, vals in refs.items():
            if m in vals:
                ax.axhline(vals[m], ls="--", lw=1, color="gray")
                ax.annotate(name, (ax.get_xlim()[0], vals[m]), fontsize=7, color="gray", va="bottom")
        ax.set_xlabel("CPU-hours (this run)")
        ax.set_title(LABELS[m], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"unseen speakers ({args.wav_dir.name}), copy synthesis", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}")
    if args.table:
        for label, pts in runs.items():
            print(f"\n{label}\n\n{markdown_table(pts)}")


def markdown_table(points: list[dict]) -> str:
    """One row per point: step, CPU-hours and the metrics any point has (bits/sample for teachers)."""
    cols = [m for m in (*METRICS, "f0_rmse_cents", "vuv_error") if any(r.get(m) is not None for r in points)]
    digits = {"pesq": 3, "stoi": 3, "log_mel_l1": 3, "bits_per_sample": 2, "f0_rmse_cents": 0, "vuv_error": 3}
    lines = ["| step | CPU-hours | " + " | ".join(LABELS[c] for c in cols) + " |", "|---:|---:|" + "---:|" * len(cols)]
    for r in points:
        cells = ["–" if r.get(c) is None else f"{r[c]:.{digits[c]}f}" for c in cols]
        lines.append(f"| {r['step']} | {r['cpu_hours']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
