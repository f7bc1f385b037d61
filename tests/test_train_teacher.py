"""Teacher training end to end on tiny prepared caches: exact resume, refusals, CLI errors, learning on real audio."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from wavedistill.checkpoint import load_model
from wavedistill.config import load_config
from wavedistill.data.cache import FeatureCache
from wavedistill.errors import UserError
from wavedistill.fileio import load_tensors
from wavedistill.data.prepare import run_prepare
from wavedistill.models.teacher import Teacher
from wavedistill.train.teacher import train_teacher, validate

REPO = Path(__file__).resolve().parents[1]

FEATURES = {"sample_rate": 8000, "n_fft": 256, "win_length": 200, "hop_length": 80, "n_mels": 16, "fmin": 40.0, "fmax": 4000.0}
TEACHER = {"layers": 4, "stacks": 2, "kernel_size": 2, "residual_channels": 8, "gate_channels": 16, "skip_channels": 8,
           "cond_channels": 8, "upsample_scales": [4, 4, 5], "output": "mol", "mixtures": 2}
TRAIN = {"batch_size": 2, "segment_samples": 800, "lr": 2e-3, "warmup_steps": 2, "decay_steps": 20, "ema_decay": 0.9,
         "max_steps": 6, "seed": 5, "log_every": 1, "valid_every": 3, "save_every": 3, "keep_checkpoints": 5,
         "sample_every": 100000, "valid_utterances": 1, "valid_segment_samples": 800, "num_threads": 1}


@pytest.fixture(autouse=True)
def restore_threads():
    """train.num_threads=1 (tiny models on a shared machine run fastest single-threaded); give the setting back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def harmonic(seconds: float, f0: float, seed: int, sample_rate: int = 8000) -> np.ndarray:
    """A voiced-speech stand-in: a few decaying harmonics with vibrato, syllable envelope and soft noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f = f0 * (1 + 0.04 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f) / sample_rate
    x = sum(np.sin(k * phase + rng.uniform(0, 6)) / k**1.2 for k in range(1, 12) if k * f0 < 3800)
    env = np.sin(np.pi * t / seconds) ** 2 * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t) ** 2)
    x = x * env + 0.003 * rng.standard_normal(n)
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


def write_config(path: Path, features=None, teacher=None, train=None, prepare=None) -> Path:
    data = {
        "features": {**FEATURES, **(features or {})},
        "prepare": {"trim_top_db": 40.0, "min_seconds": 0.3, "valid_fraction": 0.2, "test_fraction": 0.0, "seed": 3,
                    **(prepare or {})},
        "teacher": {**TEACHER, **(teacher or {})},
        "train": {**TRAIN, **(train or {})},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six synthetic 1-second utterances, prepared into a feature cache; returns (config path, cache dir)."""
    root = tmp_path_factory.mktemp("teacher-corpus")
    wavs = root / "wavs"
    wavs.mkdir()
    for i in range(6):
        sf.write(str(wavs / f"utt{i}.wav"), harmonic(1.0, 110 + 23 * i, seed=i), 8000, subtype="PCM_16")
    conf = write_config(root / "conf.yaml")
    data = root / "data"
    run_prepare(wavs, data, load_config(conf))
    return conf, data


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 3-step run (checkpoints at step 3)."""
    conf, data = corpus
    exp = tmp_path_factory.mktemp("teacher-exp3")
    result = train_teacher(conf, data, exp, max_steps=3)
    assert result["step"] == 3
    return exp


def final_tensors(exp: Path, step: int):
    d = exp / "checkpoints" / f"step-{step:08d}"
    return load_tensors(d / "state" / "params.safetensors"), load_tensors(d / "model.safetensors")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_writes_checkpoints_and_history(corpus, trained):
    root = trained / "checkpoints"
    assert os.readlink(root / "latest") == "step-00000003"
    model, features, cfg = load_model(trained, kind="teacher")
    assert isinstance(model, Teacher) and features.hop_length == 80 and cfg["model"]["layers"] == 4
    params, ema = final_tensors(trained, 3)
    assert all(torch.isfinite(v).all() for v in params.values())
    # the EMA weights differ from the raw ones after training
    assert any(not torch.equal(params[k], ema[k]) for k in params if k.startswith("net."))


def test_resume_is_bitwise_identical(corpus, trained, tmp_path):
    conf, data = corpus
    straight = tmp_path / "straight"
    r = train_teacher(conf, data, straight, max_steps=6)
    assert r["step"] == 6
    assert [h["step"] for h in r["history"] if "valid_bits" in h] == [3, 6]

    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed, symlinks=True)  # the 3-step run
    r2 = train_teacher(conf, data, resumed, max_steps=6, resume=True)
    assert r2["step"] == 6
    p1, e1 = final_tensors(straight, 6)
    p2, e2 = final_tensors(resumed, 6)
    assert_same_tensors(p1, p2)
    assert_same_tensors(e1, e2)
    # and the validation score of the last step agrees exactly
    assert r["valid_bits"] == r2["valid_bits"]
    # the interrupted run's step-3 checkpoint equals the straight run's
    assert_same_tensors(final_tensors(straight, 3)[0], final_tensors(trained, 3)[0])


def test_resume_with_changed_architecture_refused(corpus, trained, tmp_path):
    _, data = corpus
    before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    conf = write_config(tmp_path / "other.yaml", teacher={"layers": 6})
    with pytest.raises(UserError, match="layers"):
        train_teacher(conf, data, trained, max_steps=6, resume=True)
    with pytest.raises(UserError, match="layers"):
        train_teacher(corpus[0], data, trained, max_steps=6, resume=True, overrides=["teacher.layers=6"])
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == before


def test_new_run_into_existing_experiment_refused(corpus, trained):
    conf, data = corpus
    with pytest.raises(UserError, match="--resume"):
        train_teacher(conf, data, trained, max_steps=6)
    assert os.readlink(trained / "checkpoints" / "latest") == "step-00000003"


def test_resume_without_checkpoint_refused(corpus, tmp_path):
    conf, data = corpus
    with pytest.raises(UserError, match="resume"):
        train_teacher(conf, data, tmp_path / "fresh", max_steps=2, resume=True)


@pytest.mark.parametrize(
    "overrides",
    [
        ["features.hop_length=100", "teacher.upsample_scales=[4,5,5]"],
        ["features.n_mels=20"],
        ["features.sample_rate=16000", "features.fmax=8000"],
    ],
)
def test_data_prepared_with_other_features_refused(corpus, tmp_path, overrides):
    conf, data = corpus
    with pytest.raises(UserError, match="prepared with"):
        train_teacher(conf, data, tmp_path / "exp", max_steps=2, overrides=overrides)
    assert not (tmp_path / "exp" / "checkpoints").exists()


def test_unprepared_data_dir_refused(corpus, tmp_path):
    conf, _ = corpus
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="prepare"):
        train_teacher(conf, tmp_path / "empty", tmp_path / "exp", max_steps=2)


def test_bad_max_steps(corpus, tmp_path):
    conf, data = corpus
    with pytest.raises(UserError):
        train_teacher(conf, data, tmp_path / "exp", max_steps=0)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "wavedistill", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("override", ["teacher.layers=abc", "train.bogus=1", "teacher.output=foo"])
def test_cli_bad_override_is_one_line(corpus, tmp_path, override):
    conf, data = corpus
    out = tmp_path / "exp"
    p = run_cli("train-teacher", "--config", str(conf), "--data", str(data), "--out", str(out), override, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert "error" in lines[0] and override.split("=")[0] in lines[0]
    assert not (out / "checkpoints").exists()


def test_cli_refuses_existing_run_with_one_line(corpus, trained, tmp_path):
    conf, data = corpus
    p = run_cli("train-teacher", "--config", str(conf), "--data", str(data), "--out", str(trained), "--max-steps", "6",
                cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr


# --------------------------------------------------------------------------- learning on real speech


@pytest.mark.slow
def test_teacher_learns_on_demo_speech(demo_wav_dir, tmp_path):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    picked = 0
    for f in sorted(demo_wav_dir.glob("*.wav")):
        if 0.8 <= sf.info(str(f)).duration <= 4.0:
            shutil.copy(f, wavs / f.name)
            picked += 1
        if picked == 30:
            break
    assert picked == 30
    conf = write_config(
        tmp_path / "conf.yaml",
        features={"n_mels": 40, "n_fft": 512, "win_length": 320},
        prepare={"valid_fraction": 0.1},
        teacher={"layers": 6, "stacks": 2, "residual_channels": 16, "gate_channels": 32, "skip_channels": 16,
                 "cond_channels": 16, "mixtures": 3},
        train={"segment_samples": 2000, "batch_size": 4, "lr": 2e-3, "warmup_steps": 10, "decay_steps": 1000,
               "ema_decay": 0.9, "max_steps": 60, "log_every": 10, "valid_every": 60, "save_every": 60,
               "valid_utterances": 3, "valid_segment_samples": 4000, "num_threads": 1},
    )
    data = tmp_path / "data"
    cfg = load_config(conf)
    run_prepare(wavs, data, cfg)

    # the score of the untrained model: same seed, same construction as train_teacher
    cache = FeatureCache(data, cfg.features)
    valid = cache.load_split("valid")
    assert len(valid) == 3
    torch.manual_seed(cfg.train.seed)
    fresh = Teacher(cfg.teacher, cfg.features.n_mels)
    fresh.cond.set_stats(*cache.mel_stats())
    before = validate(fresh, valid, cfg.train, fresh.cond.frame_context, "cpu")

    result = train_teacher(conf, data, tmp_path / "exp")
    after = [h["valid_bits"] for h in result["history"] if "valid_bits" in h]
    assert result["step"] == 60 and len(after) == 1
    assert np.isfinite(before) and np.isfinite(after[-1])
    assert after[-1] < before - 0.5, (before, after)
    # the saved EMA model scores what training reported
    model, _, _ = load_model(tmp_path / "exp", kind="teacher")
    assert validate(model, valid, cfg.train, model.cond.frame_context, "cpu") == pytest.approx(after[-1], abs=1e-4)


# ---------------------------------------------------------------------------- warm start (train.init_from)


def test_warm_start_gaussian_teacher_from_mol_trunk(corpus, trained, tmp_path):
    """A Gaussian teacher started from a mixture-of-logistics run takes its trunk; only the head's last layer differs."""
    from wavedistill.train.state import warm_start

    conf, data = corpus
    source, _, _ = load_model(trained)
    cfg = load_config(conf, ["teacher.output=gaussian"])
    fresh = Teacher(cfg.teacher, cfg.features.n_mels)
    copied, total = warm_start(fresh, str(trained), "teacher", cfg.features)
    src, own = source.state_dict(), fresh.state_dict()
    skipped = sorted(k for k in own if not (k in src and src[k].shape == own[k].shape))
    assert skipped == ["net.head2.bias", "net.head2.weight"]
    assert (copied, total) == (len(own) - 2, len(own))
    for k in own:
        if k not in skipped:
            assert torch.equal(own[k], src[k]), k


def test_init_from_run_starts_from_the_source_weights(corpus, trained, tmp_path):
    """train.init_from through train_teacher: the step-0 EMA and the run's first steps start from the source."""
    conf, data = corpus
    exp = tmp_path / "warm"
    result = train_teacher(conf, data, exp, overrides=[f"train.init_from={trained}", "train.lr=1e-12"], max_steps=3)
    assert result["step"] == 3
    source, _, _ = load_model(trained)
    warm, _, _ = load_model(exp)
    # lr 1e-12 keeps the weights where the warm start put them
    for k, v in source.state_dict().items():
        assert torch.allclose(warm.state_dict()[k], v, atol=1e-6), k


@pytest.mark.parametrize("override, message", [
    ("features.n_mels=20", "other feature parameters"),
])
def test_init_from_refusals(corpus, trained, tmp_path, override, message):
    conf, data = corpus
    from wavedistill.train.state import warm_start

    cfg = load_config(conf, [override])
    with pytest.raises(UserError, match=message):
        warm_start(Teacher(cfg.teacher, cfg.features.n_mels), str(trained), "teacher", cfg.features)


def test_init_from_wrong_kind_refused(corpus, trained, tmp_path):
    from wavedistill.models.student import Student
    from wavedistill.train.state import warm_start

    conf, _ = corpus
    cfg = load_config(conf)
    with pytest.raises(UserError, match="is a teacher checkpoint"):
        warm_start(Student(cfg.student, cfg.features.n_mels), str(trained), "student", cfg.features)


def test_init_from_missing_checkpoint_is_one_line(corpus, tmp_path):
    conf, data = corpus
    with pytest.raises(UserError, match="does not exist"):
        train_teacher(conf, data, tmp_path / "x", overrides=[f"train.init_from={tmp_path / 'nope'}"], max_steps=1)
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_cpu_budget_stops_on_a_validated_checkpoint_and_counts_across_resume(corpus, tmp_path):
    """train.max_cpu_seconds: the run stops once its CPU time (summed over resumes) reaches the budget."""
    conf, data = corpus
    exp = tmp_path / "budget"
    r = train_teacher(conf, data, exp, max_steps=50, overrides=["train.max_cpu_seconds=0.000001"])
    assert r["step"] == 1  # the first step already spends more than a microsecond
    assert os.readlink(exp / "checkpoints" / "latest") == "step-00000001"
    valid = [h for h in r["history"] if "valid_bits" in h]
    assert [h["step"] for h in valid] == [1] and valid[0]["cpu_hours"] > 0
    # resuming with the same budget: the spent time was saved, so one more step and stop again
    r2 = train_teacher(conf, data, exp, max_steps=50, overrides=["train.max_cpu_seconds=0.000001"], resume=True)
    assert r2["step"] == 2
    # without the budget the run goes on to max_steps
    r3 = train_teacher(conf, data, exp, max_steps=4, resume=True)
    assert r3["step"] == 4
    with pytest.raises(UserError, match="max_cpu_seconds"):
        train_teacher(conf, data, tmp_path / "bad", max_steps=2, overrides=["train.max_cpu_seconds=-1"])
