"""Distillation end to end: against the shipped demo teacher, on real demo audio."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wavedistill.checkpoint import load_model, load_training_state, resolve_checkpoint
from wavedistill.config import load_config
from wavedistill.train.distill import distill, load_frozen_teacher
from wavedistill.errors import UserError
from wavedistill.data.prepare import run_prepare

REPO = Path(__file__).resolve().parents[1]
DEMO_TEACHER = REPO / "checkpoints" / "demo" / "teacher-v1"  # the non-LP teacher of recipes/demo/conf/student.yaml
CORPUS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    if not CORPUS.is_dir():
        pytest.skip("demo corpus not installed (make corpus)")
    wavs = tmp_path_factory.mktemp("wavs")
    for p in sorted(CORPUS.glob("*.wav"))[40:64]:
        shutil.copy(p, wavs / p.name)
    out = tmp_path_factory.mktemp("data") / "cache"
    cfg = load_config(REPO / "recipes" / "demo" / "conf" / "student.yaml", ["prepare.valid_fraction=0.1"])
    run_prepare(wavs, out, cfg)
    return out


STUDENT_OVERRIDES = [
    "student.flow_layers=[3, 3]", "student.stacks_per_flow=[1, 1]", "student.residual_channels=16",
    "student.gate_channels=32", "student.cond_channels=16", "distill.ce_samples=4", "train.batch_size=2",
    "train.segment_samples=1600", "train.lr=0.003", "train.warmup_steps=2", "train.log_every=5",
    "train.valid_every=5", "train.save_every=10", "train.sample_every=1000", "train.valid_utterances=2",
    "train.valid_segment_samples=1600", "train.ema_decay=0.5",
]


@pytest.mark.slow
def test_short_distillation_against_demo_teacher_lowers_kl_and_stft(demo_cache, tmp_path):
    assert (DEMO_TEACHER / "model.safetensors").is_file(), "the shipped demo teacher is missing"
    result = distill(REPO / "recipes" / "demo" / "conf" / "student.yaml", DEMO_TEACHER, demo_cache, tmp_path / "exp",
                     overrides=STUDENT_OVERRIDES, max_steps=30)
    valid = [h for h in result["history"] if "valid_kl" in h]
    assert len(valid) >= 3
    first, last = valid[0], valid[-1]
    assert last["valid_kl"] < first["valid_kl"], valid
    assert last["valid_stft"] < first["valid_stft"], valid
    train = [h for h in result["history"] if "train_kl" in h]
    assert all(abs(h["train_kl"] - (h["train_cross_entropy"] - h["train_entropy"])) < 1e-3 for h in train)
    ckpt = resolve_checkpoint(tmp_path / "exp")
    model, _, cfg = load_model(ckpt, kind="student")
    assert cfg["kind"] == "student" and cfg["teacher"] == str(DEMO_TEACHER)
    # the teacher is not part of the student's training state
    state = load_training_state(ckpt)
    assert not any(k.startswith("teacher") for k in state["params"])
    assert set(state["params"]) == set(model.state_dict())


def test_kl_start_step_trains_on_the_stft_loss_alone_first(demo_cache, tmp_path):
    """distill.kl_start_step=4: steps 0-3 have no KL term (no teacher pass: NaN in the log), later steps do."""
    overrides = [o for o in STUDENT_OVERRIDES if not o.startswith("train.log_every")]
    result = distill(REPO / "recipes" / "demo" / "conf" / "student.yaml", DEMO_TEACHER, demo_cache, tmp_path / "exp",
                     overrides=overrides + ["train.log_every=1", "distill.kl_start_step=4"], max_steps=7)
    train = [h for h in result["history"] if "train_kl" in h]
    before = [h for h in train if h["step"] <= 4]  # a record at step s logs the update of step s - 1
    after = [h for h in train if h["step"] > 4]
    assert before and after
    assert all(h["train_kl"] != h["train_kl"] for h in before), before  # NaN: never computed
    assert all(abs(h["train_kl"]) < 1e6 and h["train_kl"] == h["train_kl"] for h in after), after
    with pytest.raises(UserError, match="kl_start_step"):
        load_config(REPO / "recipes" / "demo" / "conf" / "student.yaml", ["distill.kl_start_step=-1"])


def test_frozen_teacher_gets_no_gradients_and_wrong_kind_is_refused(tmp_path):
    assert (DEMO_TEACHER / "model.safetensors").is_file()
    cfg = load_config(REPO / "recipes" / "demo" / "conf" / "student.yaml")
    teacher = load_frozen_teacher(DEMO_TEACHER, cfg.features, "cpu")
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    other = load_config(REPO / "recipes" / "demo" / "conf" / "student.yaml", ["features.n_mels=40"])
    with pytest.raises(UserError, match="n_mels"):
        load_frozen_teacher(DEMO_TEACHER, other.features, "cpu")


def test_distill_cli_refuses_a_student_checkpoint_as_teacher(demo_cache, tmp_path):
    student = REPO / "checkpoints" / "demo" / "student-v1"
    assert (student / "model.safetensors").is_file(), "the shipped demo student is missing"
    proc = subprocess.run(
        [sys.executable, "-m", "wavedistill", "distill", "--config", str(REPO / "recipes/demo/conf/student.yaml"),
         "--teacher", str(student), "--data", str(demo_cache), "--out", str(tmp_path / "exp")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "student checkpoint" in lines[0] and "teacher" in lines[0]
    assert not (tmp_path / "exp" / "checkpoints").exists()


def test_shipped_student_generates_in_parallel_from_mel():
    student = REPO / "checkpoints" / "demo" / "student-v1"
    model, features, cfg = load_model(student, kind="student")
    mel = torch.randn(1, features.n_mels, 10)
    y = model.synthesize(mel, seed=0)
    assert y.shape == (1, 10 * features.hop_length) and torch.isfinite(y).all()
    card = (student / "README.md").read_text()
    assert "steps" in card
    json.dumps(cfg)
