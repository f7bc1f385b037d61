"""Peak memory of ``wavedistill synthesize`` on a long input (a benchmark, not a test).

Writes a speech-like input of --minutes minutes (generated: harmonic tones with a moving pitch and pauses) into a
temporary directory, runs ``python -m wavedistill synthesize`` on it with the shipped student in a child process,
and reports the child's peak resident set size (``ru_maxrss`` of the waited-for child) next to the audio length.

    .venv/bin/python benchmarks/synth_memory.py --minutes 30 [--checkpoint checkpoints/demo/student-v1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def long_input(path: Path, minutes: float, rate: int = 8000) -> None:
    """Write the input block by block (the generator itself stays small)."""
    rng = np.random.default_rng(0)
    block = 10 * rate
    total = int(minutes * 60 * rate)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        t0 = 0
        while t0 < total:
            n = min(block, total - t0)
            t = (t0 + np.arange(n)) / rate
            f0 = 140 + 30 * np.sin(2 * np.pi * 0.3 * t)
            phase = 2 * np.pi * np.cumsum(f0) / rate
            x = sum(np.sin(k * phase) / k for k in range(1, 8))
            gate = (np.sin(2 * np.pi * 0.7 * t) > -0.3).astype(np.float64)  # pauses
            x = 0.2 * x * gate + 0.003 * rng.standard_normal(n)
            f.write(np.clip(x, -1, 1).astype(np.float32))
            t0 += n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--minutes", type=float, default=30.0, help="input length in minutes (default 30)")
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "demo" / "student-v1"),
                    help="checkpoint to run (default: the non-LP demo student of synth-memory-30min.json)")
    ap.add_argument("--chunk-seconds", type=float, default=None, help="pass --chunk-seconds (default: synthesize's)")
    ap.add_argument("--json", default=None, help="also write the result as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "long.wav"
        long_input(wav, args.minutes)
        cmd = [sys.executable, "-m", "wavedistill", "synthesize", "--checkpoint", args.checkpoint,
               "--out-dir", str(Path(tmp) / "out"), str(wav)]
        if args.chunk_seconds:
            cmd[4:4] = ["--chunk-seconds", str(args.chunk_seconds)]
        env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        out_frames = sf.info(str(Path(tmp) / "out" / "long.wav")).frames if proc.returncode == 0 else None
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    result = {"minutes": args.minutes, "checkpoint": args.checkpoint, "chunk_seconds": args.chunk_seconds,
              "peak_rss_mib": round(peak_mib, 1), "wall_seconds": round(wall, 1), "output_samples": out_frames,
              "threads": os.environ.get("OMP_NUM_THREADS", "default"), "summary": proc.stdout.strip().splitlines()[-1]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
