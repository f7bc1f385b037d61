"""The recipes run end to end (bounded): LJSpeech's paper-scale configs on a tiny subset."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import soundfile as sf
import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")

TINY = " ".join([
    "train.max_steps=1", "train.batch_size=1", "train.segment_samples=2048", "train.valid_utterances=1",
    "train.valid_segment_samples=2048", "train.sample_every=1000", "train.mixed_precision=no", "distill.ce_samples=2",
])

SUBSET = ("goodbye.wav", "hello-world.wav", "vm-goodbye.wav", "auth-thankyou.wav", "vm-password.wav", "vm-intro.wav",
          "auth-incorrect.wav", "vm-nomore.wav")


def corpus_subset(tmp_path: Path, n: int) -> Path:
    """The first ``n`` of a few demo-corpus prompts copied into ``tmp_path/wavs``."""
    if not CORPUS.is_dir():
        pytest.skip("demo corpus not installed (make corpus)")
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for name in SUBSET[:n]:
        shutil.copy(CORPUS / name, wavs / name)
    return wavs


@pytest.mark.slow
def test_ljspeech_recipe_runs_on_a_tiny_subset(tmp_path):
    wavs = corpus_subset(tmp_path, 5)  # 8 kHz files; prepare resamples them to 22.05 kHz
    data, exp = tmp_path / "data", tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        ["bash", str(REPO / "recipes" / "ljspeech" / "run.sh"), "--wav-dir", str(wavs), "--data", str(data),
         "--exp", str(exp), "--stop-stage", "4", "--utterances", "1", "--overrides", TINY],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((data / "summary.json").read_text())
    assert summary["features"]["sample_rate"] == 22050 and summary["features"]["hop_length"] == 256
    teacher = yaml.safe_load((exp / "teacher" / "checkpoints" / "latest" / "config.yaml").read_text())
    assert teacher["model"]["layers"] == 30 and teacher["model"]["stacks"] == 3 and teacher["model"]["kernel_size"] == 3
    student = yaml.safe_load((exp / "student" / "checkpoints" / "latest" / "config.yaml").read_text())
    assert student["model"]["flow_layers"] == [10, 10, 10, 30] and student["model"]["residual_channels"] == 64
    outs = sorted((exp / "wav" / "student").glob("*.wav"))
    assert len(outs) == 1
    info = sf.info(str(outs[0]))
    assert info.samplerate == 22050 and info.subtype == "PCM_16" and info.frames % 256 == 0


@pytest.mark.slow
def test_demo_recipe_clarinet_variant_runs_end_to_end(tmp_path):
    """`run.sh --variant clarinet`: Gaussian teacher, Gaussian IAF student (closed-form KL), synthesis and eval."""
    wavs = corpus_subset(tmp_path, 8)
    data, exp = tmp_path / "data", tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        ["bash", str(REPO / "recipes" / "demo" / "run.sh"), "--variant", "clarinet", "--wav-dir", str(wavs),
         "--data", str(data), "--exp", str(exp), "--stop-stage", "5", "--utterances", "1", "--overrides", TINY],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = yaml.safe_load((exp / "teacher" / "checkpoints" / "latest" / "config.yaml").read_text())
    assert teacher["model"]["output"] == "gaussian"
    student = yaml.safe_load((exp / "student" / "checkpoints" / "latest" / "config.yaml").read_text())
    assert student["model"]["distribution"] == "gaussian"
    assert len(list((exp / "wav" / "student").glob("*.wav"))) == 1
    metrics = json.loads((exp / "report" / "metrics.json").read_text())
    systems = set(metrics["systems"])
    # the run's own pair, plus the shipped ClariNet pair when it is in the tree (then names carry their step/dir)
    assert "griffin_lim" in systems
    assert sum(n.startswith("teacher") for n in systems) >= 1 and sum(n.startswith("student") for n in systems) >= 1
    shipped = REPO / "checkpoints" / "demo" / "clarinet-student" / "model.safetensors"
    assert len(systems) == 1 + (4 if shipped.exists() else 2)


def test_demo_recipe_rejects_an_unknown_variant(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "recipes" / "demo" / "run.sh"), "--variant", "wavernn", "--exp", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown --variant wavernn" in proc.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_demo_recipe_coupling_variant_runs_end_to_end(tmp_path):
    """`run.sh --variant coupling`: prepare, train-flow, (no distillation), synthesis and eval of the coupling flow."""
    wavs = corpus_subset(tmp_path, 8)
    data, exp = tmp_path / "data", tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    overrides = TINY.replace("distill.ce_samples=2", "coupling.residual_channels=8")
    proc = subprocess.run(
        ["bash", str(REPO / "recipes" / "demo" / "run.sh"), "--variant", "coupling", "--wav-dir", str(wavs),
         "--data", str(data), "--exp", str(exp), "--stop-stage", "5", "--utterances", "1", "--overrides", overrides],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 3: distill: skipped" in proc.stdout
    flow = yaml.safe_load((exp / "coupling" / "checkpoints" / "latest" / "config.yaml").read_text())
    assert flow["kind"] == "coupling" and flow["model"]["group"] == 8 and flow["model"]["residual_channels"] == 8
    assert not (exp / "teacher").exists() and not (exp / "student").exists()
    assert len(list((exp / "wav" / "coupling").glob("*.wav"))) == 1
    systems = set(json.loads((exp / "report" / "metrics.json").read_text())["systems"])
    shipped = REPO / "checkpoints" / "demo" / "student" / "model.safetensors"
    assert "griffin_lim" in systems and any(n.startswith("coupling") for n in systems)
    assert len(systems) == 1 + (2 if shipped.exists() else 1)
