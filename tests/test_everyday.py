"""Everyday use (issue 15): one run per experiment dir, graceful stop, resume rules, safe export, a CLI that explains itself."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import helpers_train as h
from wavedistill.checkpoint import resolve_checkpoint
from wavedistill.cli import main
from wavedistill.config import KEY_DOCS, describe_keys, load_config
from wavedistill.errors import Interrupted, UserError
from wavedistill.fileio import LOCK_NAME, DirectoryLock


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("everyday")
    wavs, cache = h.make_cache(root)
    cfg = h.write_config(root / "tiny.yaml")
    return root, wavs, cache, cfg


def _wait_for(pred, timeout: float, what: str, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- lock, signals, resume


@contextlib.contextmanager
def _killed_at_exit(proc: subprocess.Popen):
    """Kill ``proc`` when the block ends, however it ends (assertions inside still fail the test)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.slow
def test_second_run_refused_then_sigterm_checkpoints_the_current_step(world, tmp_path):
    root, _, cache, cfg = world
    exp = tmp_path / "exp"
    log = tmp_path / "a.log"
    a = h.popen("train-teacher", "--config", cfg, "--data", cache, "--out", exp, "--max-steps", "100000",
                "train.valid_every=1000", "train.save_every=1000", log=log)
    with _killed_at_exit(a):
        _wait_for(lambda: (exp / "train.log").is_file() and "step 4:" in (exp / "train.log").read_text(), 300,
                  "the first run to train", a)
        assert (exp / LOCK_NAME).read_text().strip() == str(a.pid)
        b = h.cli("train-teacher", "--config", cfg, "--data", cache, "--out", exp, "--resume", timeout=300)
        line = h.assert_stderr_one_error(b, "train-teacher")
        assert f"PID {a.pid}" in line and "in use" in line, line
        assert a.poll() is None, "the first run must still be running"
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=300) == 143, log.read_text()[-3000:]
    text = (exp / "train.log").read_text()
    m = re.search(r"stopped by SIGTERM at step (\d+)", text)
    assert m, text[-2000:]
    step = int(m.group(1))
    assert step > 4 and step % 1000 != 0  # a step no periodic save would have written
    assert h.check_run_dir(exp, "teacher") == step
    assert not (exp / LOCK_NAME).exists()
    # the stopped run resumes from exactly that step
    c = h.cli("train-teacher", "--config", cfg, "--data", cache, "--out", exp, "--resume", "--max-steps", str(step + 2),
              timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    assert h.check_run_dir(exp, "teacher") == step + 2
    assert re.search(rf"resume from \S+/step-{step:08d} teacher training", (exp / "train.log").read_text())


def test_lock_of_a_killed_process_does_not_block(world, tmp_path):
    root, _, cache, cfg = world
    exp = tmp_path / "exp"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from wavedistill.fileio import DirectoryLock; "
                               "DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(exp)],
                              env=h.child_env(), stdout=subprocess.PIPE, text=True)
    with _killed_at_exit(holder):
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            DirectoryLock(exp).check()
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            DirectoryLock(exp).acquire()
    assert (exp / LOCK_NAME).read_text().strip() == str(holder.pid)  # the file is left behind by SIGKILL...
    from wavedistill.train.teacher import train_teacher

    out = train_teacher(cfg, cache, exp, max_steps=2)  # ...but the kernel dropped the lock
    assert out["step"] == 2 and h.check_run_dir(exp, "teacher") == 2


def test_failed_start_leaves_no_directory(world, tmp_path):
    root, _, cache, cfg = world
    from wavedistill.data.prepare import run_prepare

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no usable audio"):
        run_prepare(tmp_path / "empty", tmp_path / "cache", h.tiny_config())
    assert not (tmp_path / "cache").exists()


def test_resume_rules_changed_lr_force_and_step_target(world, tmp_path):
    from wavedistill.train.teacher import train_teacher

    root, _, cache, cfg = world
    exp = tmp_path / "exp"
    assert train_teacher(cfg, cache, exp, max_steps=4)["step"] == 4
    saved = yaml.safe_load((exp / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["teacher"]["residual_channels"] == 8
    # the step target survives: the config says 12, the run said 4, nothing more to do
    assert train_teacher(cfg, cache, exp, resume=True)["step"] == 4
    # allowed change: bookkeeping
    assert train_teacher(cfg, cache, exp, overrides=["train.log_every=1"], resume=True)["step"] == 4
    with pytest.raises(UserError, match=r"train.lr 0.002 -> 0.001.*--force"):
        train_teacher(cfg, cache, exp, overrides=["train.lr=1e-3"], resume=True, max_steps=6)
    assert h.check_run_dir(exp, "teacher") == 4
    out = train_teacher(cfg, cache, exp, overrides=["train.lr=1e-3"], resume=True, max_steps=6, force=True)
    assert out["step"] == 6
    from wavedistill.checkpoint import load_training_state

    st = load_training_state(resolve_checkpoint(exp))
    assert st["trainer"]["config"]["train"]["lr"] == 1e-3
    assert st["optimizer"]["param_groups"][0]["initial_lr"] == 1e-3  # the new lr is really used
    # resume from a chosen step
    step4 = exp / "checkpoints" / "step-00000004"
    assert step4.is_dir()
    out = train_teacher(cfg, cache, exp, overrides=["train.lr=1e-3"], resume=str(step4), force=True, max_steps=5)
    assert out["step"] == 5
    assert "resume from" in (exp / "train.log").read_text() and "finished at step 5" in (exp / "train.log").read_text()


def test_second_signal_stops_at_once():
    from wavedistill.train.experiment import Session

    s = Session("/nonexistent-never-written", "teacher")
    s._on_signal(signal.SIGTERM, None)  # first: remembered
    with pytest.raises(Interrupted) as e:
        s._on_signal(signal.SIGTERM, None)
    assert e.value.code == 143


# --------------------------------------------------------------------------- export, CLI, config


def test_export_refuses_existing_and_keeps_the_card(world, tmp_path, capsys):
    src = h.REPO / "checkpoints" / "demo" / "student-v1"
    dst = tmp_path / "shipped"
    card = tmp_path / "card.md"
    card.write_text("# my card\n")
    assert main(["export", "--checkpoint", str(src), "--out", str(dst), "--card", str(card)]) == 0
    (dst / "notes.txt").write_text("keep me")
    assert main(["export", "--checkpoint", str(src), "--out", str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "README.md").read_text() == "# my card\n"
    assert main(["export", "--checkpoint", str(src), "--out", str(dst), "--force"]) == 0
    assert (dst / "README.md").read_text() == "# my card\n" and (dst / "notes.txt").read_text() == "keep me"
    assert (dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


@pytest.mark.parametrize("argv", [
    ["train-teacher", "--config", "c", "--data", "d", "--out", "o", "--max-step", "3"],
    ["train-teacher", "--config", "c", "--data", "d", "--out", "o", "--resum"],
    ["synthesize", "--checkpoint", "c", "--out", "o", "x.wav"],
])
def test_abbreviated_options_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "required" in err, err


def test_every_option_has_help():
    from wavedistill.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sp in sub.choices.items():
        assert sp.allow_abbrev is False, name
        for action in sp._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_duplicate_yaml_keys_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  batch_size: 4\n  lr: 2e-3\n")
    with pytest.raises(UserError, match=r"key 'lr' appears twice \(lines 2 and 4\)"):
        load_config(p)
    p.write_text("train:\n  lr: 1e-3\ntrain:\n  batch_size: 4\n")
    with pytest.raises(UserError, match="appears twice"):
        load_config(p)


def test_typo_suggests_the_closest_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher:\n  residual_channel: 8\n")
    with pytest.raises(UserError, match=r"did you mean 'teacher.residual_channels'"):
        load_config(p)
    with pytest.raises(UserError, match=r"did you mean 'train.batch_size'"):
        load_config(None, ["train.batchsize=3"])
    with pytest.raises(UserError, match=r"did you mean 'distill'"):
        load_config(None, ["distil.ce_samples=3"])


def test_config_show_lists_every_key_with_a_meaning(tmp_path, capsys):
    rows = describe_keys()
    assert {r[0] for r in rows} == set(KEY_DOCS)
    assert all(r[3] for r in rows)
    assert main(["config", "--show"]) == 0
    out = capsys.readouterr().out
    for key, _, _, meaning in rows:
        assert re.search(rf"^\s+{re.escape(key)}\s.*{re.escape(meaning)}$", out, re.MULTILINE), key
    cfg = h.write_config(tmp_path / "c.yaml")
    assert main(["config", "--show", "--config", str(cfg)]) == 0
    assert re.search(r"^\s+teacher.residual_channels\s+8\s", capsys.readouterr().out, re.MULTILINE)


def test_info_on_a_checkpoint_and_a_directory(world, tmp_path, capsys):
    from wavedistill.train.teacher import train_teacher

    root, _, cache, cfg = world
    exp = tmp_path / "exp"
    train_teacher(cfg, cache, exp, max_steps=4)
    assert main(["info", str(exp / "checkpoints" / "latest")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^kind\s+teacher \(mol\)", out, re.MULTILINE)
    assert re.search(r"^step\s+4 of 4", out, re.MULTILINE) and "best" in out and "16 mels" in out
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 checkpoint(s)" in out and re.search(r"step-00000004\s+teacher\s+4\s.*latest,best", out)
    assert main(["info", str(h.REPO / "checkpoints" / "demo")]) == 0
    shipped = sorted(d.name for d in (h.REPO / "checkpoints" / "demo").iterdir() if (d / "model.safetensors").is_file())
    out = capsys.readouterr().out
    assert len(shipped) >= 4 and f"{len(shipped)} checkpoint(s)" in out
    assert all(re.search(rf"^{re.escape(name)}\s", out, re.MULTILINE) for name in shipped)


# --------------------------------------------------------------------------- synthesize and eval front ends

STUDENT = h.REPO / "checkpoints" / "demo" / "student-v1"


def _speech(path: Path, seconds: float, f0: float, rate: int = 8000) -> Path:
    import soundfile as sf
    from conftest import speech_like

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), speech_like(rate, seconds=seconds, silence=0.05, f0=f0), rate, subtype="PCM_16")
    return path


def test_synthesize_directory_skip_existing_renames_and_exit_status(tmp_path, capsys):
    import soundfile as sf

    d = tmp_path / "in"
    _speech(d / "a.wav", 0.4, 120.0)
    _speech(d / "sub" / "a.wav", 0.3, 180.0)
    (d / "notes.md").write_text("not an input")  # ignored inside a directory
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    out = tmp_path / "out"
    rc = main(["synthesize", "--checkpoint", str(STUDENT), "--out-dir", str(out), str(d)])
    cap = capsys.readouterr()
    assert rc == 1, cap.err  # one input unusable -> exit 1, the others written
    assert "skipped" in cap.err and "broken.wav" in cap.err
    assert f"renamed: {d / 'sub' / 'a.wav'} -> {out / 'a-2.wav'}" in cap.out
    assert "1 input(s) skipped (exit status 1)" in cap.out.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["a-2.wav", "a.wav"]
    first = (out / "a.wav").read_bytes()
    assert sf.info(str(out / "a.wav")).frames == 40 * 80
    # --skip-existing keeps what is there; the good inputs alone exit 0
    (out / "a.wav").write_bytes(b"keep")
    assert main(["synthesize", "--checkpoint", str(STUDENT), "--out-dir", str(out), "--skip-existing",
                 str(d / "a.wav"), str(d / "sub" / "a.wav")]) == 0
    assert (out / "a.wav").read_bytes() == b"keep"
    assert "2 existing output(s) kept" in capsys.readouterr().out  # a.wav and a-2.wav
    # output rate and sample format; the streamed PCM_16 file equals the Vocoder's samples written by write_wav
    assert main(["synthesize", "--checkpoint", str(STUDENT), "--out-dir", str(tmp_path / "o2"), "--sample-rate", "16000",
                 "--subtype", "FLOAT", str(d / "a.wav")]) == 0
    info = sf.info(str(tmp_path / "o2" / "a.wav"))
    assert (info.samplerate, info.subtype, info.frames) == (16000, "FLOAT", 2 * 40 * 80)
    import wavedistill
    from wavedistill.data.audio import write_wav

    voc = wavedistill.load(STUDENT)
    write_wav(tmp_path / "ref.wav", voc.synthesize(voc.mel_from_audio(d / "a.wav"), seed=0), voc.sample_rate)
    assert first == (tmp_path / "ref.wav").read_bytes()


def test_synthesize_refuses_bad_subtype(tmp_path, capsys):
    _speech(tmp_path / "a.wav", 0.3, 120.0)
    assert main(["synthesize", "--checkpoint", str(STUDENT), "--out-dir", str(tmp_path / "o"), "--subtype", "MP3",
                 str(tmp_path / "a.wav")]) == 2
    assert "--subtype MP3 is not a WAV sample format" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_long_mel_in_blocks_equals_one_pass():
    import numpy as np
    import wavedistill
    from wavedistill.inference import synthesis

    voc = wavedistill.load(STUDENT)
    x = np.random.default_rng(0).standard_normal(8000 * 3).astype(np.float32) * 0.1
    old = synthesis.MEL_BLOCK_SECONDS
    try:
        synthesis.MEL_BLOCK_SECONDS = 0.37  # many blocks, none aligned to anything
        blocks = synthesis.long_mel(voc, x)
    finally:
        synthesis.MEL_BLOCK_SECONDS = old
    whole = voc.mel_from_audio(x)
    assert blocks.shape == whole.shape
    assert (blocks - whole).abs().max() < 1e-4


def test_eval_wav_dir_and_out_manifest(tmp_path, capsys):
    import json

    wavs = tmp_path / "wavs"
    _speech(wavs / "x.wav", 0.5, 130.0)
    _speech(wavs / "y.wav", 0.4, 170.0, rate=16000)
    _speech(wavs / "z.wav", 0.4, 150.0)
    out = tmp_path / "report"
    args = ["eval", "--checkpoint", str(STUDENT), "--wav-dir", str(wavs), "--out", str(out), "--max-utterances", "2"]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["systems"]["student"]["per_utterance"]) == 2 and metrics["config"]["utterances"] == ["x", "y"]
    assert sorted(p.name for p in (out / "wav" / "student").iterdir()) == ["x.wav", "y.wav"]
    stale = out / "wav" / "student" / "y.wav"
    mine = out / "my-notes.txt"
    mine.write_text("mine")
    (wavs / "y.wav").unlink()
    assert main(args) == 0  # re-run: what the first run wrote is replaced, nothing stale remains, my file is kept
    assert sorted(p.name for p in (out / "wav" / "student").iterdir()) == ["x.wav", "z.wav"] and not stale.exists()
    assert mine.read_text() == "mine"
    # a non-empty --out eval did not write is refused; a plain wav dir as --data gets a --wav-dir hint
    assert main(["eval", "--checkpoint", str(STUDENT), "--wav-dir", str(wavs), "--out", str(wavs)]) == 2
    assert "not written by 'wavedistill eval'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(STUDENT), "--data", str(wavs), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert f"--wav-dir {wavs}" in err and f"--out wavs-features" in err and not (tmp_path / "r2").exists()


def test_resume_treats_settings_added_after_the_checkpoint_as_their_defaults():
    """A checkpoint written before a setting existed was trained with its default: only other values are changes."""
    from wavedistill.config import Config
    from wavedistill.train.experiment import changed_settings

    now = Config().to_dict()
    saved = Config().to_dict()
    del saved["distill"]["kl_start_step"]  # as a checkpoint of an older version stores it
    assert changed_settings(saved, now) == []
    now["distill"]["kl_start_step"] = 100
    assert changed_settings(saved, now) == [("distill.kl_start_step", 0, 100)]
