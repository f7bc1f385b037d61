"""benchmarks/unseen_curves.py: the log-linear trend and its extrapolation, and curves merged across machines."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "unseen_curves.py"
spec = importlib.util.spec_from_file_location("unseen_curves", SCRIPT)
uc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(uc)


def pts(metric, pairs, start_step=100):
    return [{"step": start_step + i, "cpu_hours": h, metric: v} for i, (h, v) in enumerate(pairs)]


def test_log_fit_recovers_a_known_line_and_the_hours_to_target():
    # pesq = 1.5 + 0.1·log2(h): 3.0 is reached at h = 2**15
    points = pts("pesq", [(h, 1.5 + 0.1 * math.log2(h)) for h in (0.5, 1.0, 2.0, 4.0)])
    f = uc.log_fit(points, "pesq", target=3.0)
    assert f["a"] == pytest.approx(1.5) and f["per_doubling"] == pytest.approx(0.1)
    assert f["cpu_hours_to_target"] == pytest.approx(2.0 ** 15, rel=1e-9)
    assert f["points"] == 4 and f["from_cpu_hours"] == 0.5 and f["to_cpu_hours"] == 4.0


def test_log_fit_uses_only_the_last_points_and_knows_which_way_is_better():
    # a flat start, then log-mel L1 falling 0.05 per doubling: the last 3 points see only the fall
    pairs = [(0.25, 9.0), (0.5, 9.0)] + [(h, 0.8 - 0.05 * math.log2(h)) for h in (1.0, 2.0, 4.0)]
    f = uc.log_fit(pts("log_mel_l1", pairs), "log_mel_l1", target=0.5, last=3)
    assert f["per_doubling"] == pytest.approx(-0.05)
    assert f["cpu_hours_to_target"] == pytest.approx(2.0 ** 6)
    # rising L1 never reaches a lower target; falling PESQ never reaches a higher one
    assert uc.log_fit(pts("log_mel_l1", [(1, 0.5), (2, 0.6)]), "log_mel_l1", target=0.1)["cpu_hours_to_target"] is None
    assert uc.log_fit(pts("pesq", [(1, 2.0), (2, 1.9)]), "pesq", target=3.0)["cpu_hours_to_target"] is None
    assert uc.log_fit(pts("pesq", [(1, 2.0)]), "pesq", target=3.0) is None


def test_log_fit_a_nearly_flat_trend_is_never_not_an_overflow():
    # +0.0005 PESQ per doubling: 3.0 lies ~2800 doublings away, past what a float holds (2.0 ** 2800 overflows)
    f = uc.log_fit(pts("pesq", [(h, 1.6 + 0.0005 * math.log2(h)) for h in (1.0, 2.0, 4.0)]), "pesq", target=3.0)
    assert f["per_doubling"] == pytest.approx(0.0005) and f["cpu_hours_to_target"] is None


@pytest.mark.parametrize("k", ["-1", "1"])
def test_cli_refuses_a_fit_over_fewer_than_two_points(tmp_path, k):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", f"x={tmp_path}", "--wav-dir", str(tmp_path),
                           "--eval-root", str(tmp_path), "--out", str(tmp_path / "c"), "--fit-last", k],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--fit-last must be" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c.json").exists()


def test_merge_keeps_earlier_points_whose_snapshots_are_gone():
    prev = [{"step": 10, "cpu_hours": 0.1, "pesq": 1.0}, {"step": 20, "cpu_hours": 0.2, "pesq": 1.1}]
    cur = [{"step": 20, "cpu_hours": 0.2, "pesq": 1.2}, {"step": 30, "cpu_hours": 0.3, "pesq": 1.3}]
    merged = uc.merge_points(prev, cur)
    assert [(r["step"], r["pesq"]) for r in merged] == [(10, 1.0), (20, 1.2), (30, 1.3)]


def fake_snapshot(snap: Path, eval_root: Path, label: str, step: int, hours: float, pesq: float) -> None:
    d = snap / f"step-{step:08d}" / "state"
    d.mkdir(parents=True)
    (d / "trainer.json").write_text(json.dumps({"cpu_seconds": hours * 3600}))
    m = eval_root / label.replace(" ", "_") / f"step-{step:08d}"
    m.mkdir(parents=True)
    row = {"pesq": pesq, "stoi": 0.7, "log_mel_l1": 0.6}
    (m / "metrics.json").write_text(json.dumps({"systems": {"model": {"mean": row}, "griffin_lim": {"mean": row}}}))


def test_cli_merges_across_sessions_and_writes_the_fit(tmp_path):
    label = "LP student"
    snap, evals, out = tmp_path / "snap", tmp_path / "evals", tmp_path / "curves"
    fake_snapshot(snap, evals, label, 100, 1.0, 1.5)
    fake_snapshot(snap, evals, label, 200, 2.0, 1.6)
    run = [sys.executable, str(SCRIPT), "--run", f"{label}={snap}", "--wav-dir", str(tmp_path), "--eval-root", str(evals),
           "--out", str(out), "--merge", "--target", "pesq=3.0"]
    subprocess.run(run, check=True, capture_output=True, text=True)
    # next session, another machine: only a newer snapshot is on disk
    snap2 = tmp_path / "snap2"
    fake_snapshot(snap2, tmp_path / "evals2", label, 300, 4.0, 1.7)
    run2 = [a.replace(str(snap), str(snap2)).replace(str(evals), str(tmp_path / "evals2")) for a in run]
    proc = subprocess.run(run2, check=True, capture_output=True, text=True)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["step"] for r in data["runs"][label]] == [100, 200, 300]
    fit = data["fits"][label]["pesq"]
    assert fit["per_doubling"] == pytest.approx(0.1) and fit["cpu_hours_to_target"] == pytest.approx(2.0 ** 15)
    assert "per doubling" in proc.stdout and out.with_suffix(".png").is_file()
    bad = subprocess.run(run2[:-1] + ["nonsense=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not one of" in bad.stderr and "Traceback" not in bad.stderr


def test_markdown_table_has_a_row_per_point_and_only_the_metrics_present():
    points = [{"step": 100, "cpu_hours": 1.234, "pesq": 1.5, "stoi": 0.7, "log_mel_l1": 0.6, "bits_per_sample": None,
               "vuv_error": 0.25, "f0_rmse_cents": None},
              {"step": 200, "cpu_hours": 2.0, "pesq": 1.6, "stoi": 0.71, "log_mel_l1": 0.59, "bits_per_sample": None,
               "vuv_error": None, "f0_rmse_cents": 150.4}]
    table = uc.markdown_table(points).splitlines()
    assert len(table) == 4 and "bits/sample" not in table[0] and "V/UV" in table[0] and "F0" in table[0]
    assert table[2].startswith("| 100 | 1.23 | 1.500 | 0.700 | 0.600 | – | 0.250 |")
    assert table[3] == "| 200 | 2.00 | 1.600 | 0.710 | 0.590 | 150 | – |"
