"""Crash safety: SIGKILL at random moments, full or read-only disks, NaN losses and gradients, NaN in the cache.

The kill tests run the real CLI in subprocesses, kill it with SIGKILL at seeded
random moments (some while a checkpoint directory is being written), check
that ``checkpoints/`` never holds a partial step directory and that ``latest``
always loads, resume until ``max_steps`` and finally compare the parameters
bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers_train as h
from wavedistill import checkpoint as ckpt_mod
from wavedistill.nn import distributions
from wavedistill.checkpoint import load_model, resolve_checkpoint, save_checkpoint
from wavedistill.cli import main as cli_main
from wavedistill.data.cache import FeatureCache
from wavedistill.errors import NonFiniteError, UserError
from wavedistill.fileio import load_tensors, save_tensors


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return h.make_cache(tmp_path_factory.mktemp("faults-data"))[1]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, cache) -> Path:
    """A tiny teacher trained for 3 steps in-process."""
    from wavedistill.train.teacher import train_teacher

    root = tmp_path_factory.mktemp("faults-teacher")
    cfg = h.write_config(root / "teacher.yaml")
    train_teacher(cfg, cache, root / "exp", max_steps=3)
    return resolve_checkpoint(root / "exp" / "checkpoints" / "latest")


# --------------------------------------------------------------------------- SIGKILL and resume


def _has_tmp(ckdir: Path) -> bool:
    return ckdir.is_dir() and any(n.startswith(".step-") and n.endswith(".tmp") for n in os.listdir(ckdir))


def _steps(ckdir: Path) -> set[str]:
    return {n for n in os.listdir(ckdir) if ckpt_mod.STEP_RE.match(n)} if ckdir.is_dir() else set()


def _run_until_killed(args: list[str], exp: Path, mode: str, rng: random.Random, deadline: float, log: Path) -> tuple[bool, bool]:
    """Start the CLI, SIGKILL it at a moment chosen by ``mode``; returns ``(killed, killed_while_writing)``.

    ``write``: as soon as a temporary ``.step-*.tmp`` directory is seen (a checkpoint is being written),
    or 0.3 s after the first new checkpoint if the poll never catches one;
    ``new``: 0-20 ms after a step directory that was not there at start appears;
    ``random``: 0-400 ms after the first new step directory appears.
    """
    ckdir = exp / "checkpoints"
    before = _steps(ckdir)
    proc = h.popen(*args, log=log)
    trigger_at = None
    delay = {"write": lambda: 0.3, "new": lambda: rng.uniform(0, 0.02), "random": lambda: rng.uniform(0, 0.4)}[mode]
    while proc.poll() is None:
        now = time.monotonic()
        if now > deadline:
            break
        if mode == "write" and _has_tmp(ckdir):
            break
        if trigger_at is None and _steps(ckdir) - before:
            trigger_at = now + delay()
        if trigger_at is not None and now >= trigger_at:
            break
        time.sleep(0.0005)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    writing = _has_tmp(ckdir)
    assert killed or proc.returncode == 0, log.read_text()[-3000:]
    return killed, writing


def _kill_resume_loop(base_args: list[str], exp: Path, kind: str, kills: int, max_steps: int, seed: int) -> dict:
    rng = random.Random(seed)
    modes = ["write", "new", "random"]
    stats = {"kills": 0, "during_write": 0, "runs": 0}
    t_end = time.monotonic() + 75
    while stats["kills"] < kills:
        latest = h.check_run_dir(exp, kind)
        if latest == max_steps:
            break
        args = base_args + (["--resume"] if latest is not None else [])
        mode = modes[stats["kills"] % len(modes)]
        log = exp.parent / f"{exp.name}-run{stats['runs']}.log"
        killed, writing = _run_until_killed(args, exp, mode, rng, min(t_end, time.monotonic() + 40), log)
        stats["runs"] += 1
        stats["kills"] += killed
        stats["during_write"] += killed and writing
        # the invariant after every kill: only complete step directories; latest resolves and loads
        h.check_run_dir(exp, kind)
        if not killed:
            break
    if h.check_run_dir(exp, kind) != max_steps:
        proc = h.cli(*base_args, "--resume")
        stats["runs"] += 1
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert h.check_run_dir(exp, kind) == max_steps
    return stats


def _assert_same_run(a: Path, b: Path) -> None:
    for load in (h.final_params, h.final_ema):
        pa, pb = load(a), load(b)
        assert set(pa) == set(pb)
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k


@pytest.mark.slow
def test_train_teacher_survives_sigkill_and_resumes_exactly(tmp_path, cache):
    from wavedistill.train.teacher import train_teacher

    max_steps = 40
    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": max_steps, "save_every": 1, "valid_every": 10,
                                                      "log_every": 5, "keep_checkpoints": 2})
    ref = tmp_path / "ref"
    train_teacher(cfg, cache, ref)  # uninterrupted reference, in-process (train.num_threads=1 in both)

    exp = tmp_path / "killed"
    args = ["train-teacher", "--config", str(cfg), "--data", str(cache), "--out", str(exp)]
    stats = _kill_resume_loop(args, exp, "teacher", kills=6, max_steps=max_steps, seed=20240611)
    print(f"teacher kill/resume: {stats}")
    assert stats["kills"] >= 5, stats
    assert stats["during_write"] >= 1, stats
    _assert_same_run(exp, ref)


@pytest.mark.slow
def test_distill_survives_sigkill_and_resumes_exactly(tmp_path, cache, teacher_ckpt):
    from wavedistill.train.distill import distill

    max_steps = 24
    cfg = h.write_config(tmp_path / "s.yaml", train={"max_steps": max_steps, "save_every": 1, "valid_every": 8,
                                                      "log_every": 4, "keep_checkpoints": 2})
    ref = tmp_path / "ref"
    distill(cfg, teacher_ckpt, cache, ref)  # uninterrupted reference, in-process

    exp = tmp_path / "killed"
    args = ["distill", "--config", str(cfg), "--teacher", str(teacher_ckpt), "--data", str(cache), "--out", str(exp)]
    stats = _kill_resume_loop(args, exp, "student", kills=3, max_steps=max_steps, seed=99)
    print(f"distill kill/resume: {stats}")
    assert stats["kills"] >= 3, stats
    assert stats["during_write"] >= 1, stats
    _assert_same_run(exp, ref)


def test_interrupted_pruning_leaves_no_partial_step_directory(tmp_path, monkeypatch):
    """Dying while an old checkpoint is being deleted must not leave a half-deleted step-* directory."""
    weights = {"w": torch.zeros(3)}
    conf = {"kind": "teacher", "model": {}, "features": {}}
    state = {"params": weights, "optimizer": {"state": {}, "param_groups": []}, "trainer": {}}
    for step in (1, 2):
        save_checkpoint(tmp_path, step, weights, conf, state, keep=2)

    real_rmtree = shutil.rmtree

    def dies_halfway(path, *args, **kwargs):
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if files:  # the process is killed after the first file is gone
            files[0].unlink()
            raise KeyboardInterrupt("killed while pruning")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, weights, conf, state, keep=2)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", real_rmtree)

    for d in h.step_dirs(tmp_path):
        names = {p.name for p in d.iterdir()}
        assert {"model.safetensors", "config.yaml", "state"} <= names, (d.name, names)
        assert {p.name for p in (d / "state").iterdir()} >= {"params.safetensors", "trainer.json"}, d.name


def _feats_ok(cache: Path) -> dict:
    summary = json.loads((cache / "summary.json").read_text())
    fc = FeatureCache(cache)
    c = summary["counts"]
    ids = {s: fc.ids(s) for s in ("train", "valid", "test")}
    assert c["used"] == len(summary["utterances"]) == sum(len(v) for v in ids.values())
    assert c["found"] == c["used"] + c["skipped"]
    assert {s: c[s] for s in ids} == {s: len(v) for s, v in ids.items()}
    for split, us in ids.items():
        for u in us:
            audio, mel = fc.load(u)
            assert audio.shape[0] == summary["utterances"][u]["samples"]
            assert mel.shape[1] == summary["utterances"][u]["frames"]
    for p in (cache / "feats").iterdir():
        if not p.name.startswith("."):
            load_tensors(p)  # every visible feats file is complete
    return summary


def _kill_when(proc: subprocess.Popen, ready, deadline: float) -> bool:
    """Poll ``ready()`` every 0.5 ms and SIGKILL ``proc`` once it holds; returns whether it was killed."""
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.0005)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return killed


def _visible(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if d.is_dir() else []


@pytest.mark.slow
def test_prepare_killed_then_rerun_completes(tmp_path, capsys):
    n = 16
    wavs = h.write_corpus(tmp_path / "wavs", n=n)
    cfg = h.write_config(tmp_path / "p.yaml")
    out = tmp_path / "cache"
    feats = out / "feats"
    rng = random.Random(5)
    args = ["prepare", "--wav-dir", str(wavs), "--out", str(out), "--config", str(cfg)]
    kills = 0
    for mode in ("count", "write"):
        target = rng.randint(2, n // 2)
        ready = {
            "count": lambda: len(_visible(feats)) >= target,
            "write": lambda: feats.is_dir() and any(x.endswith(".tmp") for x in os.listdir(feats)),
        }[mode]
        kills += _kill_when(h.popen(*args, log=tmp_path / "prepare.log"), ready, time.monotonic() + 40)
        assert not (out / "summary.json").exists()
        for name in _visible(feats):
            load_tensors(feats / name)  # no half-written feats file under its real name
    assert kills == 2
    from wavedistill.data.prepare import run_prepare

    run_prepare(wavs, out, h.tiny_config())  # the re-run (in-process: the CLI start-up was paid twice above)
    assert "reused from a previous run" in capsys.readouterr().out
    summary = _feats_ok(out)
    assert summary["counts"]["used"] == n

    clean = tmp_path / "clean"
    assert run_prepare(wavs, clean, h.tiny_config()) == summary
    assert _visible(feats) == _visible(clean / "feats")
    for name in _visible(feats):
        a, b = load_tensors(feats / name), load_tensors(clean / "feats" / name)
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["mel"], b["mel"])


@pytest.mark.slow
def test_synthesize_killed_then_rerun_completes(tmp_path, cache, teacher_ckpt):
    if not h.has_command("synthesize"):
        pytest.skip("'wavedistill synthesize' is not registered (wavedistill/inference/cli.py)")
    import soundfile as sf

    from wavedistill.inference.synthesis import run_synthesize

    # short .npy log-mels (12 frames = 0.12 s each): autoregressive teacher synthesis takes ~0.5 s per input
    fc = FeatureCache(cache)
    inputs = []
    for i, u in enumerate(fc.ids("train")[:4] * 2):
        path = tmp_path / "mels" / f"m{i}.npy"
        path.parent.mkdir(exist_ok=True)
        np.save(path, fc.load(u)[1][:, 10 + i : 22 + i].numpy())
        inputs.append(str(path))
    out = tmp_path / "out"
    args = ["synthesize", "--checkpoint", str(teacher_ckpt), "--out-dir", str(out), "--batch-size", "1", "--seed", "3", *inputs]
    delay = random.Random(17).uniform(0, 0.3)
    first = {}

    def ready():
        if _visible(out) and "t" not in first:
            first["t"] = time.monotonic()
        return "t" in first and time.monotonic() >= first["t"] + delay

    # the Python generator keeps each input slow enough to kill between outputs (the compiled one is ~30x faster)
    env = {**h.child_env(), "WAVEDISTILL_NO_FASTGEN": "1"}
    assert _kill_when(h.popen(*args, log=tmp_path / "synth.log", env=env), ready, time.monotonic() + 60)
    partial = _visible(out)
    assert 1 <= len(partial) < len(inputs), partial
    for name in partial:
        sf.read(str(out / name))  # every visible output is a complete wav
    done = h.cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]

    clean = tmp_path / "clean"
    run_synthesize(teacher_ckpt, inputs, clean, seed=3, batch_size=1)
    assert _visible(out) == _visible(clean) == sorted(Path(p).stem + ".wav" for p in inputs)
    for name in _visible(out):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


# --------------------------------------------------------------------------- full or read-only disk


@pytest.mark.parametrize(
    "err, words",
    [(errno.ENOSPC, "no space left"), (errno.EROFS, "writable")],
    ids=["ENOSPC", "EROFS"],
)
def test_checkpoint_write_fails_cleanly_on_full_or_readonly_disk(tmp_path, cache, monkeypatch, err, words):
    from wavedistill import fileio
    from wavedistill.train.teacher import train_teacher

    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": 8, "save_every": 4, "valid_every": 4})
    exp = tmp_path / "exp"
    real_replace = os.replace

    def failing_replace(src, dst, *a, **kw):
        if Path(dst).name == "step-00000008":
            raise OSError(err, os.strerror(err), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(UserError) as info:
        train_teacher(cfg, cache, exp)
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    msg = str(info.value)
    assert "\n" not in msg
    assert words in msg.lower()
    assert "previous checkpoint is intact" in msg
    assert [d.name for d in h.step_dirs(exp)] == ["step-00000004"]
    assert h.check_run_dir(exp, "teacher") == 4
    assert not [n for n in os.listdir(exp / "checkpoints") if n.endswith(".tmp")]


def test_checkpoint_half_written_file_on_full_disk(tmp_path, cache, monkeypatch):
    """The disk fills up in the middle of writing the optimizer state: nothing partial is left behind."""
    from wavedistill.train.teacher import train_teacher

    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": 8, "save_every": 4, "valid_every": 4})
    exp = tmp_path / "exp"
    real_write = Path.write_bytes

    def fills_up(self, data):
        if self.name == "optimizer.safetensors" and ".step-00000008." in str(self):
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    with pytest.raises(UserError, match="no space left"):
        train_teacher(cfg, cache, exp)
    monkeypatch.setattr(Path, "write_bytes", real_write)
    assert h.check_run_dir(exp, "teacher") == 4
    assert [d.name for d in h.step_dirs(exp)] == ["step-00000004"]
    assert not [n for n in os.listdir(exp / "checkpoints") if n.startswith(".step-")]


# --------------------------------------------------------------------------- numerical faults


def _nan_on(monkeypatch, bad_calls) -> dict:
    """Make the teacher's training loss NaN on the given (0-based) grad-enabled calls of log_prob_discrete."""
    real = distributions.DiscretizedMixtureOfLogistics.log_prob_discrete
    seen = {"calls": 0}

    def wrapped(self, params, x):
        out = real(self, params, x)
        if torch.is_grad_enabled():
            i = seen["calls"]
            seen["calls"] += 1
            if bad_calls(i):
                return out * float("nan")
        return out

    monkeypatch.setattr(distributions.DiscretizedMixtureOfLogistics, "log_prob_discrete", wrapped)
    return seen


def _trainer_json(exp: Path) -> dict:
    return json.loads((resolve_checkpoint(exp / "checkpoints" / "latest") / "state" / "trainer.json").read_text())


def test_nan_loss_steps_are_skipped_and_counted(tmp_path, cache, monkeypatch):
    from wavedistill.train.teacher import train_teacher

    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": 10, "save_every": 5, "valid_every": 5})
    seen = _nan_on(monkeypatch, lambda i: i in (2, 3, 4))
    result = train_teacher(cfg, cache, tmp_path / "exp")
    assert result["step"] == 10
    assert seen["calls"] == 10
    trainer = _trainer_json(tmp_path / "exp")
    assert trainer["bad_steps_total"] == 3
    assert trainer["bad_steps_in_row"] == 0
    model, _, _ = load_model(tmp_path / "exp", kind="teacher")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_long_nan_run_stops_with_nonfinite_error_naming_last_good_checkpoint(tmp_path, cache, monkeypatch):
    from wavedistill.train.teacher import train_teacher

    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": 30, "save_every": 4, "valid_every": 4, "max_bad_steps": 5})
    _nan_on(monkeypatch, lambda i: i >= 6)
    with pytest.raises(NonFiniteError) as info:
        train_teacher(cfg, cache, tmp_path / "exp")
    msg = str(info.value)
    good = tmp_path / "exp" / "checkpoints" / "step-00000004"
    assert "non-finite" in msg and "5" in msg
    assert str(good) in msg
    assert "\n" not in msg
    assert h.check_checkpoint(good, "teacher") == 4
    assert h.check_run_dir(tmp_path / "exp", "teacher") == 4
    assert resolve_checkpoint(tmp_path / "exp") == good.resolve()


def test_long_nan_run_exits_with_code_3(tmp_path, cache, monkeypatch, capsys):
    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": 30, "save_every": 2, "valid_every": 2, "max_bad_steps": 4})
    _nan_on(monkeypatch, lambda i: i >= 3)
    code = cli_main(["train-teacher", "--config", str(cfg), "--data", str(cache), "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("wavedistill")]
    assert code == 3
    assert len(lines) == 1 and lines[0].startswith("wavedistill train-teacher: error:")
    assert "non-finite" in lines[0] and "step-00000002" in lines[0]


def test_nan_gradient_steps_are_skipped_and_counted(tmp_path, cache, monkeypatch):
    from wavedistill.train import teacher as tt

    seen = {"backward": 0}
    bad = {1, 4}

    class HookedTeacher(tt.Teacher):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            p = self.net.head2.weight

            def poison(g):
                i = seen["backward"]
                seen["backward"] += 1
                return g * float("nan") if i in bad else g

            p.register_hook(poison)

    monkeypatch.setattr(tt, "Teacher", HookedTeacher)
    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": 8, "save_every": 4, "valid_every": 4})
    tt.train_teacher(cfg, cache, tmp_path / "exp")
    assert seen["backward"] == 8
    trainer = _trainer_json(tmp_path / "exp")
    assert trainer["step"] == 8 and trainer["bad_steps_total"] == 2
    model, _, _ = load_model(tmp_path / "exp", kind="teacher")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("tensor", ["audio", "mel"])
def test_nan_in_feature_cache_is_refused(tmp_path, cache, tensor):
    """A cache whose audio or mel holds NaN must be refused with a clear UserError, not trained on."""
    from wavedistill.train.teacher import train_teacher

    bad_cache = tmp_path / "cache"
    shutil.copytree(cache, bad_cache)
    uttid = FeatureCache(bad_cache).ids("train")[0]
    path = bad_cache / "feats" / f"{uttid}.safetensors"
    t = load_tensors(path)
    t[tensor] = t[tensor].clone()
    t[tensor].view(-1)[t[tensor].numel() // 2] = float("nan")
    save_tensors(path, t)
    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": 6, "save_every": 3, "valid_every": 3})
    with pytest.raises(UserError, match=r"(?i)nan|non-finite|not finite"):
        train_teacher(cfg, bad_cache, tmp_path / "exp")
    assert not (tmp_path / "exp" / "checkpoints").exists()


def test_nan_on_the_last_step_still_leaves_a_final_checkpoint(tmp_path, cache, monkeypatch):
    """A run that reaches max_steps must end with a checkpoint at max_steps, even if that step was skipped."""
    from wavedistill.train.teacher import train_teacher

    cfg = h.write_config(tmp_path / "t.yaml", train={"max_steps": 6, "save_every": 4, "valid_every": 4})
    _nan_on(monkeypatch, lambda i: i == 5)
    result = train_teacher(cfg, cache, tmp_path / "exp")
    assert result["step"] == 6
    assert h.check_run_dir(tmp_path / "exp", "teacher") == 6
    assert _trainer_json(tmp_path / "exp")["bad_steps_total"] == 1
