"""Helpers for the fault, bad-input, multi-process and docker tests: tiny corpora, caches, configs and CLI runs.

Everything is written under a directory the caller passes (a pytest ``tmp_path``).
The models are tiny (a 4-layer teacher, a 2-flow student) so that a training
step takes milliseconds and the cost of a run is mostly process start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch
import yaml

from conftest import speech_like
from wavedistill.checkpoint import STEP_RE, load_model, load_training_state, resolve_checkpoint
from wavedistill.config import config_from_dict
from wavedistill.fileio import load_tensors

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# features: the defaults (8 kHz, hop 80) with fewer mels, so that prepare and the conditioning nets stay cheap
TINY = {
    "features": {"sample_rate": 8000, "n_fft": 256, "win_length": 200, "hop_length": 80, "n_mels": 16,
                 "fmin": 40.0, "fmax": 4000.0},
    "prepare": {"trim_top_db": 40.0, "min_seconds": 0.3, "valid_fraction": 0.2, "test_fraction": 0.0, "seed": 7},
    "teacher": {"layers": 4, "stacks": 2, "kernel_size": 2, "residual_channels": 8, "gate_channels": 16,
                "skip_channels": 8, "cond_channels": 8, "upsample_scales": [4, 4, 5], "output": "mol", "mixtures": 2},
    "student": {"flow_layers": [2, 2], "stacks_per_flow": [1, 1], "kernel_size": 3, "residual_channels": 8,
                "gate_channels": 16, "cond_channels": 8, "upsample_scales": [4, 4, 5]},
    "train": {"batch_size": 2, "segment_samples": 800, "lr": 2e-3, "warmup_steps": 2, "decay_steps": 50,
              "ema_decay": 0.9, "max_steps": 12, "seed": 11, "log_every": 2, "valid_every": 4, "save_every": 4,
              "keep_checkpoints": 2, "sample_every": 100000, "valid_utterances": 2, "valid_segment_samples": 1600,
              "max_bad_steps": 5, "num_threads": 1},
    "distill": {"loss": "parallel_wavenet", "ce_samples": 2, "stft_fft_sizes": [128, 64], "stft_hop_sizes": [32, 16],
                "stft_win_sizes": [128, 64]},
}


def tiny_config_dict(**sections) -> dict:
    """The tiny config as a plain mapping; ``sections`` are merged into it (``train={"max_steps": 4}``)."""
    data = {k: dict(v) for k, v in TINY.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def tiny_config(**sections):
    return config_from_dict(tiny_config_dict(**sections)).validate()


def write_config(path: Path, **sections) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_config_dict(**sections), sort_keys=False), encoding="utf-8")
    return path


def write_corpus(root: Path, n: int = 6, sample_rate: int = 8000, seconds: float = 1.0) -> Path:
    """``n`` speech-like 16-bit wavs of ``seconds`` seconds with different pitches."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        audio = speech_like(sample_rate, seconds=seconds, silence=0.1, f0=110.0 + 25 * (i % 7), peak=0.25 + 0.07 * (i % 8), seed=i)
        sf.write(str(root / f"utt{i:02d}.wav"), audio, sample_rate, subtype="PCM_16")
    return root


def make_cache(tmp: Path, n: int = 6) -> tuple[Path, Path]:
    """A corpus and its prepared feature cache under ``tmp``; returns ``(wav_dir, cache_dir)``."""
    from wavedistill.data.prepare import run_prepare

    wav_dir = write_corpus(tmp / "wavs", n)
    cache = tmp / "cache"
    run_prepare(wav_dir, cache, tiny_config())
    return wav_dir, cache


def child_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: one thread, the repository importable, no colour or progress noise."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        TQDM_DISABLE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    env.update(extra)
    return env


def cli(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m wavedistill ARGS`` and capture its output."""
    return subprocess.run(
        [PYTHON, "-m", "wavedistill", *map(str, args)],
        cwd=cwd, env=env or child_env(), capture_output=True, text=True, timeout=timeout,
    )


def popen(*args: str, log: Path, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m wavedistill ARGS`` with stdout and stderr appended to ``log`` (never a pipe that can fill up)."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            [PYTHON, "-m", "wavedistill", *map(str, args)], cwd=cwd, env=env or child_env(), stdout=f, stderr=subprocess.STDOUT,
        )


def has_command(name: str) -> bool:
    """Whether ``wavedistill --help`` lists the subcommand ``name``."""
    import re

    out = subprocess.run([PYTHON, "-m", "wavedistill", "--help"], capture_output=True, text=True, env=child_env(), timeout=120)
    return re.search(rf"^\s+{re.escape(name)}(\s|$)", out.stdout, re.MULTILINE) is not None


def step_dirs(exp: Path) -> list[Path]:
    root = exp / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_RE.match(p.name))


def check_checkpoint(path: Path, kind: str) -> int:
    """Assert ``path`` is a complete checkpoint of ``kind`` (weights load, state loads); return its step."""
    assert path.is_dir(), path
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.yaml", "state"} <= names, (path, names)
    state_names = {p.name for p in (path / "state").iterdir()}
    assert state_names == {"params.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"}, (path, state_names)
    model, _, cfg = load_model(path, kind=kind)
    assert cfg["kind"] == kind
    st = load_training_state(path)
    assert set(st["params"]) == set(model.state_dict())
    step = int(st["trainer"]["step"])
    assert path.name == f"step-{step:08d}", (path, step)
    return step


def check_run_dir(exp: Path, kind: str) -> int | None:
    """Every step directory is complete, no temporary leftovers are visible as steps, ``latest`` loads.

    Returns the step ``latest`` points at (None when no checkpoint exists yet).
    """
    for d in step_dirs(exp):
        check_checkpoint(d, kind)
    latest = exp / "checkpoints" / "latest"
    if not latest.is_symlink():
        assert not latest.exists()
        return None
    return check_checkpoint(resolve_checkpoint(latest), kind)


def final_params(exp: Path) -> dict[str, torch.Tensor]:
    """Raw (non-EMA) parameters of ``latest``."""
    return load_tensors(resolve_checkpoint(exp / "checkpoints" / "latest") / "state" / "params.safetensors")


def final_ema(exp: Path) -> dict[str, torch.Tensor]:
    return load_tensors(resolve_checkpoint(exp / "checkpoints" / "latest") / "model.safetensors")


def assert_stderr_one_error(proc: subprocess.CompletedProcess, command: str) -> str:
    """Exit code 2, exactly one stderr line ``wavedistill <command>: error: ...``, no traceback; returns the line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"wavedistill {command}: error:"), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- many CLI runs for the price of one start-up

_SERVER = r"""
import sys
sys.path.insert(0, {tests!r})
import helpers_train
helpers_train._serve()
"""


def _warm_up() -> None:
    """Import every command's modules and JIT-compile librosa's kernels once, before forking (no threads are started)."""
    import importlib


    for name in ("wavedistill.cli", "wavedistill.data.prepare", "wavedistill.train.teacher", "wavedistill.train.distill",
                 "wavedistill.inference.synthesis", "wavedistill.eval.report", "wavedistill.eval.bench", "accelerate", "tensorboard"):
        try:
            importlib.import_module(name)
        except ImportError:  # a command another worker has not written yet
            pass
    from wavedistill.data.audio import MelExtractor, trim_silence
    from wavedistill.config import FeatureConfig

    x = speech_like(8000, seconds=0.5)
    trim_silence(x, 40.0)
    import librosa

    librosa.resample(x, orig_sr=44100, target_sr=8000, res_type="soxr_hq")
    MelExtractor(FeatureConfig())(torch.from_numpy(x))


def _serve() -> None:
    """Read ``[{"id", "argv", "cwd", "stdout", "stderr"}, ...]`` (JSON) from stdin; run each as ``wavedistill ARGV``
    in a forked child, ``parallel`` at a time; print ``{id: exit code}`` (JSON)."""
    import atexit
    import json
    import traceback

    request = json.load(sys.stdin)
    _warm_up()
    from wavedistill.cli import main

    running: dict[int, str] = {}
    codes: dict[str, int] = {}

    def reap() -> None:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

    for job in request["jobs"]:
        while len(running) >= request["parallel"]:
            reap()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            running[pid] = job["id"]
            continue
        code = 1
        try:  # the child: exactly what `python -m wavedistill ARGV` does, with stdout and stderr sent to files
            os.chdir(job["cwd"])
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            sys.argv = ["wavedistill", *job["argv"]]
            code = main(job["argv"])
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                atexit._run_exitfuncs()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(int(code))
    while running:
        reap()
    print(json.dumps(codes))


def cli_many(jobs: list[tuple[str, list[str], Path]], workdir: Path, parallel: int = 2, timeout: float = 600
             ) -> dict[str, subprocess.CompletedProcess]:
    """Run many ``wavedistill ARGV`` commands, each in its own process, paying Python/torch start-up once.

    A server process imports the package (and warms librosa) once, then forks one child per job that calls
    :func:`wavedistill.cli.main` exactly as ``python -m wavedistill`` does (uncaught exceptions print a
    traceback and exit 1).  ``jobs`` are ``(id, argv, cwd)``; returns ``{id: CompletedProcess}``.
    """
    import json

    workdir.mkdir(parents=True, exist_ok=True)
    spec = []
    for jid, argv, cwd in jobs:
        spec.append({"id": jid, "argv": [str(a) for a in argv], "cwd": str(cwd),
                     "stdout": str(workdir / f"{jid}.out"), "stderr": str(workdir / f"{jid}.err")})
    proc = subprocess.run([PYTHON, "-c", _SERVER.format(tests=str(Path(__file__).parent))],
                          input=json.dumps({"jobs": spec, "parallel": parallel}), capture_output=True, text=True,
                          env=child_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        s["id"]: subprocess.CompletedProcess(["wavedistill", *s["argv"]], codes[s["id"]],
                                             Path(s["stdout"]).read_text(errors="replace"),
                                             Path(s["stderr"]).read_text(errors="replace"))
        for s in spec
    }
