"""Smoke test of ``wavedistill flows-demo --quick`` (the real command, in a subprocess, writing into tmp_path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "wavedistill", "flows-demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_flows_demo_quick_writes_png_and_tables(tmp_path):
    out = tmp_path / "demo"
    r = _run("--out", str(out), "--quick", "--steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    png = (out / "flows_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000
    report = json.loads((out / "flows_demo.json").read_text())
    assert len(report["density"]) == 4 * 5 and len(report["variational"]) == 4 * 3 * 3
    for row in report["density"]:
        assert row["test_nll"] == row["test_nll"] and abs(row["test_nll"]) < 1e3  # finite
    for row in report["variational"]:
        assert row["kl"] > -0.5  # a KL, up to Monte-Carlo and grid error
    md = (out / "flows_demo.md").read_text()
    assert "| two_moons |" in md and "| U4 |" in md


def test_flows_demo_bad_input_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = _run("--out", str(f), "--quick", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a directory" in r.stderr
    r = _run("--out", str(tmp_path / "d"), "--steps", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--steps" in r.stderr
    assert not (tmp_path / "d").exists()  # nothing written before the check
