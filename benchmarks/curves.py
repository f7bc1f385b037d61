"""Learning curves against CPU-hours from training runs' TensorBoard logs (PNG + JSON).

    python benchmarks/curves.py --run "MoL=exp/ablation/teacher-mol" --run "MoL+LP=exp/ablation/teacher-mol-lp" \\
        --metric valid/nll_bits --ylabel "valid bits/sample" --out docs/curves-teacher

Every run logs ``train/cpu_hours`` (process CPU time, summed over resumes) at its log steps; a validation
point at step ``s`` is placed at the CPU time of the nearest logged step (linear interpolation).  Several
event files in one run (resumed runs) are merged by step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def scalars(exp: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for ev in sorted(exp.glob("logs/*/events.out.tfevents.*")):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                out.setdefault(tag, {})[e.step] = e.value
    return {k: sorted(v.items()) for k, v in out.items()}


def curve(exp: Path, metric: str) -> list[tuple[float, int, float]]:
    """``(cpu_hours, step, value)`` for every logged value of ``metric``."""
    s = scalars(exp)
    if metric not in s or "train/cpu_hours" not in s:
        return []
    cs, ch = np.array([a for a, _ in s["train/cpu_hours"]], float), np.array([b for _, b in s["train/cpu_hours"]], float)
    return [(float(np.interp(step, cs, ch)), int(step), float(v)) for step, v in s[metric]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=EXPDIR", help="a run to plot (repeatable)")
    ap.add_argument("--metric", required=True, help="TensorBoard scalar, e.g. valid/nll_bits or valid/log_mel_l1")
    ap.add_argument("--ylabel", default=None, help="y-axis label (default: the metric)")
    ap.add_argument("--out", required=True, type=Path, help="output path without suffix (.png and .json are written)")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=110)
    for spec in a.run:
        label, _, path = spec.partition("=")
        pts = curve(Path(path), a.metric)
        data[label] = [{"cpu_hours": round(h, 4), "step": s, "value": round(v, 5)} for h, s, v in pts]
        if pts:
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=label)
    ax.set_xlabel("CPU-hours (one thread)")
    ax.set_ylabel(a.ylabel or a.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out.with_suffix(".png"))
    a.out.with_suffix(".json").write_text(json.dumps({"metric": a.metric, "runs": data}, indent=1) + "\n")
    print(f"wrote {a.out.with_suffix('.png')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
