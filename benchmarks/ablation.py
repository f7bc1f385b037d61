"""Ablations at equal CPU time, scored on unseen speakers.

    python benchmarks/ablation.py run   --out exp/ablation --arms teacher-mol teacher-mol-lp ... [--cpu-minutes 12]
    python benchmarks/ablation.py score --out exp/ablation --unseen DIR [DIR ...] [--utterances 12]

``run`` trains each arm in turn (one thread, same seed, same data, same warm start) until it has
used ``--cpu-minutes`` of process CPU time (``train.max_cpu_seconds``: fair under a busy machine) and
exports it.  ``score`` evaluates every exported arm on unseen-speaker audio: teachers by their
held-out NLL in bits/sample (exact, discrete; comparable with and without linear prediction, whose
log-determinant is 0), students by copy synthesis from the mel (PESQ-NB, STOI, log-mel L1).
Results go to ``<out>/ablation.json`` and ``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "recipes" / "demo" / "conf"
SHIPPED = ROOT / "checkpoints" / "demo"
COMMON = ["train.num_threads=1", "train.max_steps=1000000", "train.decay_steps=20000", "train.warmup_steps=50",
          "train.valid_every=100", "train.save_every=100", "train.sample_every=1000000", "train.log_every=25"]
LP = ["teacher.lpc_order=16", "teacher.preemphasis=0.85"]
SLP = ["student.lpc_order=16", "student.preemphasis=0.85"]

# name -> (command, config, overrides); teachers warm-start from the shipped teachers (the MoL arms from the
# original non-LP demo teacher, checkpoints/demo/teacher-v1), students from scratch
ARMS: dict[str, tuple[str, str, list[str]]] = {
    "teacher-mol": ("train-teacher", "teacher.yaml", [f"train.init_from={SHIPPED / 'teacher-v1'}"]),
    "teacher-mol-pre": ("train-teacher", "teacher.yaml", [f"train.init_from={SHIPPED / 'teacher-v1'}", "teacher.preemphasis=0.85"]),
    "teacher-mol-lp": ("train-teacher", "teacher.yaml", [f"train.init_from={SHIPPED / 'teacher-v1'}", *LP]),
    "teacher-gauss": ("train-teacher", "clarinet_teacher.yaml", [f"train.init_from={SHIPPED / 'clarinet-teacher'}"]),
    "teacher-gauss-lp": ("train-teacher", "clarinet_teacher.yaml", [f"train.init_from={SHIPPED / 'clarinet-teacher'}", *LP]),
    # noise injection (teacher.input_noise, LPCNet), session 5: both continue checkpoints/demo/teacher
    # (the LP teacher; teacher-lp until session 5) at lr 3e-4
    "teacher-lp-cont": ("train-teacher", "teacher_lp.yaml", [f"train.init_from={SHIPPED / 'teacher'}", "train.lr=3e-4"]),
    "teacher-lp-noise": ("train-teacher", "teacher_lp.yaml", [f"train.init_from={SHIPPED / 'teacher'}", "train.lr=3e-4",
                                                              "teacher.input_noise=0.008"]),
    "student-kl-stft": ("distill", "student.yaml", []),
    "student-stft": ("distill", "student.yaml", ["distill.kl_weight=0"]),
    "student-kl": ("distill", "student.yaml", ["distill.stft_weight=0"]),
    "student-kl-stft-lp": ("distill", "student.yaml", SLP),
    "student-stft-lp": ("distill", "student.yaml", ["distill.kl_weight=0", *SLP]),
    "student-kl-lp": ("distill", "student.yaml", ["distill.stft_weight=0", *SLP]),
}


def wavedistill() -> list[str]:
    return [sys.executable, "-m", "wavedistill"]


def run_arm(name: str, out: Path, data: Path, cpu_minutes: float, batch: int, teacher: Path) -> None:
    cmd, conf, extra = ARMS[name]
    exp = out / name
    if (out / "export" / name / "model.safetensors").exists():
        print(f"{name}: already exported, skipped", flush=True)
        return
    args = [*wavedistill(), cmd, "--config", str(CONF / conf), "--data", str(data), "--out", str(exp)]
    if cmd == "distill":
        args += ["--teacher", str(teacher)]
    if (exp / "checkpoints" / "latest").exists():
        args.append("--resume")
    args += [*COMMON, f"train.batch_size={batch}", f"train.max_cpu_seconds={cpu_minutes * 60:g}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / f"{name}.log", "a") as log:
        log.write(" ".join(args) + "\n")
        log.flush()
        subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    subprocess.run([*wavedistill(), "export", "--checkpoint", str(exp / "checkpoints" / "latest"),
                    "--out", str(out / "export" / name)], check=True, env=env)


def unseen_files(dirs: list[Path], n: int) -> list[Path]:
    """``n`` prompts spread evenly over each directory's sorted .wav files (0.8 to 4 s long)."""
    import soundfile as sf

    chosen = []
    for d in dirs:
        files = [f for f in sorted(d.rglob("*.wav")) if 0.8 <= sf.info(str(f)).duration <= 4.0]
        step = max(1, len(files) // n)
        chosen += files[::step][:n]
    return chosen


@torch.no_grad()
def score(out: Path, files: list[Path]) -> dict:
    from wavedistill.data.audio import MelExtractor, load_audio
    from wavedistill.eval.report import MetricUndefined, log_mel_l1, pesq_score, stoi_score
    from wavedistill.inference.synthesis import Vocoder

    results = {}
    for exp in sorted((out / "export").iterdir()):
        voc = Vocoder.load(exp)
        mel_fn = MelExtractor(voc.features)
        sr, hop = voc.sample_rate, voc.hop
        row: dict[str, list[float]] = {"bits": [], "pesq": [], "stoi": [], "log_mel_l1": []}
        for i, f in enumerate(files):
            x = load_audio(f, sr)
            x = x[: len(x) // hop * hop]
            mel = voc.mel_from_audio(torch.from_numpy(x))
            audio = torch.from_numpy(x)[None].float()
            if voc.kind == "teacher":
                lp = voc.model.log_prob(audio, mel[None])
                row["bits"].append(float(-lp.mean() / math.log(2)))
                continue
            y = voc.synthesize(mel, seed=i).float().cpu()
            for key, fn in (("pesq", lambda: pesq_score(x, y.numpy(), sr)), ("stoi", lambda: stoi_score(x, y.numpy(), sr))):
                try:
                    row[key].append(fn())
                except MetricUndefined:
                    pass
            row["log_mel_l1"].append(log_mel_l1(mel_fn(torch.from_numpy(x)).numpy(), mel_fn(y).numpy()))
        state = json.loads((out / exp.name / "checkpoints" / "latest" / "state" / "trainer.json").read_text()) \
            if (out / exp.name / "checkpoints" / "latest" / "state" / "trainer.json").exists() else {}
        results[exp.name] = {k: (float(np.mean(v)) if v else None) for k, v in row.items()}
        results[exp.name]["n"] = len(files)
        results[exp.name]["cpu_minutes"] = round(state.get("cpu_seconds", float("nan")) / 60, 1) if state else None
        results[exp.name]["step"] = state.get("step")
        print(exp.name, results[exp.name], flush=True)
    return results


def table(results: dict) -> str:
    lines = ["| arm | CPU min | steps | unseen bits/sample | PESQ-NB | STOI | log-mel L1 |", "|---|---:|---:|---:|---:|---:|---:|"]

    def f(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"

    for name, r in results.items():
        lines.append(f"| {name} | {f(r.get('cpu_minutes'), 1)} | {r.get('step') or '–'} | {f(r['bits'])} | {f(r['pesq'], 2)} | "
                     f"{f(r['stoi'])} | {f(r['log_mel_l1'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the arms in turn at equal CPU time", allow_abbrev=False)
    r.add_argument("--out", type=Path, required=True, help="ablation directory (one experiment per arm)")
    r.add_argument("--data", type=Path, default=ROOT / "data" / "demo", help="feature cache of the training corpus")
    r.add_argument("--arms", nargs="+", choices=sorted(ARMS), required=True, help="arms to train, in order")
    r.add_argument("--cpu-minutes", type=float, default=12.0, help="CPU budget of each arm")
    r.add_argument("--batch-size", type=int, default=3, help="train.batch_size of every arm")
    r.add_argument("--teacher", type=Path, default=SHIPPED / "teacher-v1",
                   help="teacher the student arms distill from (default: the original non-LP demo teacher)")
    s = sub.add_parser("score", help="score the exported arms on unseen speakers", allow_abbrev=False)
    s.add_argument("--out", type=Path, required=True, help="ablation directory written by 'run'")
    s.add_argument("--unseen", type=Path, nargs="+", required=True, help="directories of unseen-speaker audio")
    s.add_argument("--utterances", type=int, default=8, help="prompts per directory")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "run":
        a.out.mkdir(parents=True, exist_ok=True)
        for name in a.arms:
            run_arm(name, a.out, a.data, a.cpu_minutes, a.batch_size, a.teacher)
        return 0
    files = unseen_files(a.unseen, a.utterances)
    results = score(a.out, files)
    (a.out / "ablation.json").write_text(json.dumps({"files": [str(f) for f in files], "results": results}, indent=1))
    (a.out / "ablation.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
