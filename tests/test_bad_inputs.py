"""Bad input through the real CLI (one table, documented in docs/bad_inputs.md) and property tests.

Every row runs ``python -m wavedistill ...`` in a subprocess and requires exit
code 2, exactly one stderr line ``wavedistill <cmd>: error: ...`` that says
what is wrong, no traceback, and no partial output: the row's output path is
either not created or left exactly as it was.

The subprocesses of the selected rows run concurrently (3 at a time) from one
module fixture, so the table costs a few process start-ups of wall time, not
one per row.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers_train as h
from conftest import speech_like
from wavedistill.data.audio import AudioError, MelExtractor, load_audio
from wavedistill.checkpoint import resolve_checkpoint
from wavedistill.config import Config, FeatureConfig, load_config
from wavedistill.errors import UserError
from wavedistill.fileio import load_tensors, save_tensors

DOC = h.REPO / "docs" / "bad_inputs.md"
LATE_COMMANDS = ("synthesize", "eval", "bench")  # written by another worker; rows skip while they are missing


# --------------------------------------------------------------------------- the world the rows break


@dataclass
class World:
    root: Path
    wavs: Path
    cfg: Path
    cache: Path
    teacher_exp: Path
    teacher: Path
    student: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from wavedistill.train.distill import distill
    from wavedistill.train.teacher import train_teacher

    root = tmp_path_factory.mktemp("bad-inputs")
    wavs, cache = h.make_cache(root)
    cfg = h.write_config(root / "tiny.yaml")
    train_teacher(cfg, cache, root / "teacher", max_steps=2)
    distill(cfg, root / "teacher", cache, root / "student", max_steps=2)
    return World(root, wavs, cfg, cache, root / "teacher", resolve_checkpoint(root / "teacher"),
                 resolve_checkpoint(root / "student"))


# --------------------------------------------------------------------------- setup helpers


def _yaml(d: Path, text: str) -> Path:
    p = d / "config.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def _cfg_with(d: Path, **sections) -> Path:
    return h.write_config(d / "config.yaml", **sections)


def _copy_cache(w: World, d: Path) -> Path:
    return Path(shutil.copytree(w.cache, d / "cache"))


def _first_train_feats(cache: Path) -> Path:
    uttid = (cache / "train.txt").read_text().split()[0]
    return cache / "feats" / f"{uttid}.safetensors"


def _copy_ckpt(src: Path, d: Path, name: str) -> Path:
    return Path(shutil.copytree(src, d / name, symlinks=True))


def _edit_ckpt_yaml(ckpt: Path, edit: Callable[[dict], None]) -> None:
    path = ckpt / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _wav(path: Path, data: np.ndarray, rate: int = 8000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def _teacher_args(w: World, d: Path, config: Path | None = None, data: Path | None = None, *extra: str) -> list[str]:
    return ["train-teacher", "--config", str(config or w.cfg), "--data", str(data or w.cache), "--out", str(d / "exp"), *extra]


def _distill_args(w: World, d: Path, teacher: Path | None = None, config: Path | None = None, *extra: str) -> list[str]:
    return ["distill", "--config", str(config or w.cfg), "--teacher", str(teacher or w.teacher), "--data", str(w.cache),
            "--out", str(d / "exp"), *extra]


def _prepare_args(w: World, d: Path, wav_dir: Path | None = None, *extra: str, out: Path | None = None) -> list[str]:
    return ["prepare", "--wav-dir", str(wav_dir or w.wavs), "--out", str(out or d / "cache"), "--config", str(w.cfg), *extra]


def _synth_args(w: World, d: Path, inputs: list[Path], *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["synthesize", "--checkpoint", str(checkpoint or w.student), "--out-dir", str(d / "out"), *extra, *map(str, inputs)]


def _eval_args(w: World, d: Path, *extra: str, checkpoint: Path | None = None, data: Path | None = None) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint or w.student), "--data", str(data or w.cache), "--out", str(d / "report"),
            "--split", "train", "--max-utterances", "2", *extra]


def _bench_args(w: World, d: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["bench", "--checkpoint", str(checkpoint or w.student), "--seconds", "0.05", "--repeats", "1",
            "--json", str(d / "bench.json"), *extra]


def _duplicate_key(w, d):
    text = w.cfg.read_text().replace("train:\n", "train:\n  lr: 0.5\n", 1)
    return _teacher_args(w, d, _yaml(d, text))


def _resume_changed_lr(w, d):
    shutil.copytree(w.teacher_exp, d / "exp", symlinks=True)
    return _teacher_args(w, d, None, None, "--resume", "train.lr=0.1")


def _resume_exported(w, d):
    from wavedistill.checkpoint import export_checkpoint

    shutil.copytree(w.teacher_exp, d / "exp", symlinks=True)
    export_checkpoint(w.teacher, d / "exported")
    return _teacher_args(w, d, None, None, f"--resume={d / 'exported'}")


_HOLDERS: list[subprocess.Popen] = []


def _locked_run(w, d):
    """A live process holds the experiment's lock (killed when the tests end)."""
    import atexit
    import sys

    shutil.copytree(w.teacher_exp, d / "exp", symlinks=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from wavedistill.fileio import DirectoryLock; "
                               "DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)",
                               str(d / "exp")], env=h.child_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    _HOLDERS.append(holder)
    atexit.register(holder.kill)
    return _teacher_args(w, d, None, None, "--resume")


def _export_exists(w, d):
    (d / "out").mkdir()
    (d / "out" / "README.md").write_text("# a model card\n")
    return ["export", "--checkpoint", str(w.teacher), "--out", str(d / "out")]


def _eval_out_not_ours(w, d):
    (d / "report").mkdir()
    (d / "report" / "thesis.tex").write_text("precious")
    return _eval_args(w, d)


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    id: str
    command: str
    what: str  # the bad input, as documented
    expect: str  # regex the error line must match (case-insensitive)
    setup: Callable[[World, Path], list[str]]
    out: str  # the row's output path, relative to its directory

    def __repr__(self) -> str:
        return self.id


def _corrupt_wavs(w, d):
    bad = d / "wavs"
    bad.mkdir()
    (bad / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (bad / "empty.wav").write_bytes(b"")
    (bad / "header_only.wav").write_bytes(_wav_bytes(np.zeros(0, np.int16)))
    (bad / "notes.txt").write_text("recorded on tuesday\n")
    return _prepare_args(w, d, bad)


def _wav_bytes(pcm: np.ndarray, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return buf.getvalue()


def _nan_wavs(w, d):
    x = speech_like(seed=1)
    x[1000:1010] = np.nan
    _wav(d / "wavs" / "nan.wav", x, subtype="FLOAT")
    y = speech_like(seed=2)
    y[500] = np.inf
    _wav(d / "wavs" / "inf.wav", y, subtype="DOUBLE")
    return _prepare_args(w, d, d / "wavs")


def _silent_and_short_wavs(w, d):
    _wav(d / "wavs" / "silent.wav", np.zeros(8000, np.float32))
    _wav(d / "wavs" / "short.wav", speech_like(seconds=0.15, silence=0.0))
    _wav(d / "wavs" / "stereo_short.wav", np.stack([speech_like(seconds=0.1, silence=0.0)] * 2, axis=1), rate=44100)
    return _prepare_args(w, d, d / "wavs")


def _too_long_wav(w, d):
    _wav(d / "wavs" / "long.wav", speech_like(seconds=3.0, silence=0.05))
    return _prepare_args(w, d, d / "wavs", "prepare.max_seconds=0.5")


def _other_features_cache(w, d):
    out = d / "cache"
    shutil.copytree(w.cache, out)
    return _prepare_args(w, d, None, "features.n_mels=20", out=out)


def _out_is_file(w, d):
    (d / "cache").write_text("not a directory\n")
    return _prepare_args(w, d)


def _feats_truncated(w, d):
    cache = _copy_cache(w, d)
    f = _first_train_feats(cache)
    f.write_bytes(f.read_bytes()[:300])
    return _teacher_args(w, d, None, cache)


def _feats_wrong_mel(w, d):
    cache = _copy_cache(w, d)
    f = _first_train_feats(cache)
    t = load_tensors(f)
    save_tensors(f, {"audio": t["audio"], "mel": t["mel"][:-1]})
    return _teacher_args(w, d, None, cache)


def _feats_nan(w, d):
    cache = _copy_cache(w, d)
    f = _first_train_feats(cache)
    t = load_tensors(f)
    t["audio"][100:200] = float("nan")
    save_tensors(f, t)
    return _teacher_args(w, d, None, cache)


def _summary_corrupt(w, d):
    cache = _copy_cache(w, d)
    (cache / "summary.json").write_text('{"features": {"sample_rate": 8000,')
    return _teacher_args(w, d, None, cache)


def _mel_stats_wrong(w, d):
    cache = _copy_cache(w, d)
    save_tensors(cache / "mel_stats.safetensors", {"mean": torch.zeros(3), "std": torch.ones(3)})
    return _teacher_args(w, d, None, cache)


def _train_list_ghost(w, d):
    cache = _copy_cache(w, d)
    (cache / "train.txt").write_text("ghost_utterance\n")
    return _teacher_args(w, d, None, cache)


def _existing_run(w, d):
    shutil.copytree(w.teacher_exp, d / "exp", symlinks=True)
    return _teacher_args(w, d)


def _resume_changed(w, d):
    shutil.copytree(w.teacher_exp, d / "exp", symlinks=True)
    return _teacher_args(w, d, None, None, "--resume", "teacher.residual_channels=12")


def _resume_student_as_teacher(w, d):
    shutil.copytree(w.root / "student", d / "exp", symlinks=True)
    return _teacher_args(w, d, None, None, "--resume")


def _teacher_with_other_features(w, d):
    t = _copy_ckpt(w.teacher, d, "teacher")
    _edit_ckpt_yaml(t, lambda c: c["features"].update(fmin=50.0))
    return _distill_args(w, d, t)


def _teacher_yaml_corrupt(w, d):
    t = _copy_ckpt(w.teacher, d, "teacher")
    (t / "config.yaml").write_text("kind: teacher\nmodel: {layers: [\n")
    return _distill_args(w, d, t)


def _teacher_unknown_kind(w, d):
    t = _copy_ckpt(w.teacher, d, "teacher")
    _edit_ckpt_yaml(t, lambda c: c.update(kind="vocoder"))
    return _distill_args(w, d, t)


def _teacher_nan_weights(w, d):
    t = _copy_ckpt(w.teacher, d, "teacher")
    weights = load_tensors(t / "model.safetensors")
    k = sorted(weights)[0]
    weights[k] = torch.full_like(weights[k], float("nan"))
    save_tensors(t / "model.safetensors", weights)
    return _distill_args(w, d, t)


def _teacher_truncated_weights(w, d):
    t = _copy_ckpt(w.teacher, d, "teacher")
    data = (t / "model.safetensors").read_bytes()
    (t / "model.safetensors").write_bytes(data[: len(data) // 2])
    return _distill_args(w, d, t)


def _teacher_shape_mismatch(w, d):
    t = _copy_ckpt(w.teacher, d, "teacher")
    _edit_ckpt_yaml(t, lambda c: c["model"].update(residual_channels=16))
    return _distill_args(w, d, t)


def _synth_unusable_inputs(w, d):
    (d / "noise.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    np.save(d / "transposed.npy", np.zeros((40, 16), np.float32))  # [frames, n_mels]
    np.save(d / "cube.npy", np.zeros((1, 16, 40), np.float32))
    np.save(d / "nan.npy", np.full((16, 40), np.nan, np.float32))
    np.save(d / "text.npy", np.array(["a", "b"]))
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return _synth_args(w, d, [d / "noise.wav", d / "transposed.npy", d / "cube.npy", d / "nan.npy", d / "text.npy",
                              d / "pickled.npy", d / "missing.wav"])


def _synth_list_missing(w, d):
    (d / "inputs.txt").write_text("nope1.wav\nnope2.npy\n")
    return _synth_args(w, d, [d / "inputs.txt"])


def _one_good_mel(w: World, d: Path) -> Path:
    mel = load_tensors(_first_train_feats(w.cache))["mel"][:, :20].numpy()
    np.save(d / "good.npy", mel)
    return d / "good.npy"


def _synth_out_is_file(w, d):
    (d / "out").write_text("a file\n")
    return _synth_args(w, d, [_one_good_mel(w, d)])


def _binary_yaml(d: Path) -> Path:
    (d / "c.yaml").write_bytes(b"\xff\xfe\x00\x81teacher")
    return d / "c.yaml"


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _eval_corrupt_second(w, d):
    cache = _copy_cache(w, d)
    second = (cache / "train.txt").read_text().split()[1]
    f = cache / "feats" / f"{second}.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    return _eval_args(w, d, data=cache)


def _eval_other_features(w, d):
    t = _copy_ckpt(w.teacher, d, "teacher")
    _edit_ckpt_yaml(t, lambda c: c["features"].update(fmax=3800.0))
    return _eval_args(w, d, checkpoint=t)


ROWS: list[Row] = [
    # ---- config files and overrides (parsed by every training command)
    Row("config-missing", "train-teacher", "--config names a file that does not exist", r"does not exist",
        lambda w, d: _teacher_args(w, d, d / "nope.yaml"), "exp"),
    Row("config-invalid-yaml", "train-teacher", "config file with a YAML syntax error", r"not valid YAML",
        lambda w, d: _teacher_args(w, d, _yaml(d, "teacher: {layers: [4, \n  stacks: 2\n")), "exp"),
    Row("config-binary", "train-teacher", "config file holding binary garbage (not UTF-8)", r"not valid YAML",
        lambda w, d: _teacher_args(w, d, _binary_yaml(d)), "exp"),
    Row("config-not-mapping", "train-teacher", "config file that is a YAML list, not a mapping", r"mapping",
        lambda w, d: _teacher_args(w, d, _yaml(d, "- teacher\n- train\n")), "exp"),
    Row("config-unknown-section", "train-teacher", "unknown top-level section (`model:`)", r"unknown config section 'model'",
        lambda w, d: _teacher_args(w, d, _yaml(d, "model:\n  layers: 4\n")), "exp"),
    Row("config-unknown-key", "train-teacher", "unknown key in a section (`teacher.layerz`)", r"unknown config key 'teacher.layerz'",
        lambda w, d: _teacher_args(w, d, _cfg_with(d, teacher={"layerz": 4})), "exp"),
    Row("config-duplicate-key", "train-teacher", "a key given twice in one section (`lr:` twice under `train:`)",
        r"key 'lr' appears twice", _duplicate_key, "exp"),
    Row("config-wrong-type", "train-teacher", "string where an integer is expected (`teacher.layers: four`)",
        r"teacher.layers='four' must be an integer", lambda w, d: _teacher_args(w, d, _cfg_with(d, teacher={"layers": "four"})), "exp"),
    Row("config-section-not-mapping", "train-teacher", "a section that is a scalar (`train: 5`)", r"section 'train' must be a mapping",
        lambda w, d: _teacher_args(w, d, _yaml(d, "train: 5\n")), "exp"),
    Row("config-negative-size", "train-teacher", "negative batch size (`train.batch_size: -2`)", r"train.batch_size=-2 must be positive",
        lambda w, d: _teacher_args(w, d, _cfg_with(d, train={"batch_size": -2})), "exp"),
    Row("config-hop-mismatch", "train-teacher", "teacher.upsample_scales whose product is not the hop length",
        r"upsample_scales.*hop_length", lambda w, d: _teacher_args(w, d, _cfg_with(d, teacher={"upsample_scales": [4, 4, 4]})), "exp"),
    Row("config-odd-sample-rate", "prepare", "features.sample_rate=6000 with fmax=4000 above Nyquist", r"fmin/fmax",
        lambda w, d: _prepare_args(w, d, None, "features.sample_rate=6000"), "cache"),
    Row("config-win-gt-fft", "prepare", "features.win_length larger than features.n_fft", r"win_length.*exceeds",
        lambda w, d: _prepare_args(w, d, None, "features.win_length=1024"), "cache"),
    Row("override-no-equals", "train-teacher", "override without `=` (`train.lr`)", r"not of the form section.key=value",
        lambda w, d: _teacher_args(w, d, None, None, "train.lr"), "exp"),
    Row("override-no-section", "train-teacher", "override key without a section (`layers=3`)", r"must be section.key",
        lambda w, d: _teacher_args(w, d, None, None, "layers=3"), "exp"),
    Row("override-unknown-section", "train-teacher", "override of an unknown section (`model.layers=3`)",
        r"unknown config section 'model'", lambda w, d: _teacher_args(w, d, None, None, "model.layers=3"), "exp"),
    Row("override-unknown-key", "train-teacher", "override of an unknown key (`teacher.layerz=3`)",
        r"unknown config key 'teacher.layerz'", lambda w, d: _teacher_args(w, d, None, None, "teacher.layerz=3"), "exp"),
    Row("override-wrong-type", "train-teacher", "override with a word for an integer (`train.batch_size=two`)",
        r"must be an integer", lambda w, d: _teacher_args(w, d, None, None, "train.batch_size=two"), "exp"),
    Row("override-bool-for-int", "train-teacher", "override with a boolean for an integer (`teacher.layers=true`)",
        r"must be an integer", lambda w, d: _teacher_args(w, d, None, None, "teacher.layers=true"), "exp"),
    Row("override-nan", "train-teacher", "override with a non-finite number (`train.lr=.nan`)", r"must be finite",
        lambda w, d: _teacher_args(w, d, None, None, "train.lr=.nan"), "exp"),
    Row("override-bad-choice", "train-teacher", "override outside a fixed set (`teacher.output=softmax`)", r"choose one of",
        lambda w, d: _teacher_args(w, d, None, None, "teacher.output=softmax"), "exp"),
    Row("max-steps-zero", "train-teacher", "`--max-steps=0`", r"--max-steps 0 must be positive",
        lambda w, d: _teacher_args(w, d, None, None, "--max-steps=0"), "exp"),
    # ---- prepare
    Row("prepare-wav-dir-missing", "prepare", "--wav-dir that does not exist", r"--wav-dir .* does not exist",
        lambda w, d: _prepare_args(w, d, d / "nowhere"), "cache"),
    Row("prepare-wav-dir-is-file", "prepare", "--wav-dir that is a file", r"is not a directory",
        lambda w, d: _prepare_args(w, d, _wav(d / "one.wav", speech_like())), "cache"),
    Row("prepare-empty-dir", "prepare", "--wav-dir with no files at all", r"no usable audio.*no files found",
        lambda w, d: _prepare_args(w, d, _mkdir(d / "empty")), "cache"),
    Row("prepare-corrupt-only", "prepare", "only corrupt, empty, header-only and non-audio files", r"no usable audio",
        _corrupt_wavs, "cache"),
    Row("prepare-nan-only", "prepare", "only float WAVs holding NaN or inf samples", r"no usable audio.*NaN or inf",
        _nan_wavs, "cache"),
    Row("prepare-silent-or-short", "prepare", "only digital silence and too-short (mono and stereo 44.1 kHz) files",
        r"no usable audio.*(silent|too short)", _silent_and_short_wavs, "cache"),
    Row("prepare-too-long", "prepare", "a file longer than prepare.max_seconds (a huge recording)", r"no usable audio.*too long",
        _too_long_wav, "cache"),
    Row("prepare-out-is-file", "prepare", "--out that is an existing file", r"--out .* not a directory", _out_is_file, "cache"),
    Row("prepare-out-other-features", "prepare", "--out prepared before with other feature parameters",
        r"prepared with other feature parameters.*n_mels", _other_features_cache, "cache"),
    # ---- train-teacher
    Row("train-data-missing", "train-teacher", "--data that is not a prepared cache", r"not a prepared feature cache",
        lambda w, d: _teacher_args(w, d, None, d / "nocache"), "exp"),
    Row("train-data-other-features", "train-teacher", "cache prepared with other features than the config",
        r"prepared with features.n_mels=16 but the config says 20",
        lambda w, d: _teacher_args(w, d, None, None, "features.n_mels=20"), "exp"),
    Row("train-summary-corrupt", "train-teacher", "truncated summary.json in the cache", r"summary.*corrupt",
        _summary_corrupt, "exp"),
    Row("train-feats-truncated", "train-teacher", "truncated feats file", r"not a valid safetensors file", _feats_truncated, "exp"),
    Row("train-feats-wrong-mel-shape", "train-teacher", "feats file whose mel has the wrong number of bands",
        r"do not match n_mels=16", _feats_wrong_mel, "exp"),
    Row("train-feats-nan", "train-teacher", "feats file whose audio holds NaN", r"NaN|non-finite", _feats_nan, "exp"),
    Row("train-mel-stats-wrong", "train-teacher", "mel_stats.safetensors of the wrong size", r"mel_stats.*shape \[16\]",
        _mel_stats_wrong, "exp"),
    Row("train-split-lists-missing-utterance", "train-teacher", "train.txt naming an utterance with no feats file",
        r"ghost_utterance.*does not exist", _train_list_ghost, "exp"),
    Row("train-existing-run", "train-teacher", "--out already holds a run and --resume is not given", r"pass --resume",
        _existing_run, "exp"),
    Row("train-resume-nothing", "train-teacher", "--resume with nothing to resume", r"nothing to resume",
        lambda w, d: _teacher_args(w, d, None, None, "--resume"), "exp"),
    Row("train-resume-changed-model", "train-teacher", "--resume with a changed architecture",
        r"cannot resume: teacher.residual_channels was 8", _resume_changed, "exp"),
    Row("train-resume-changed-lr", "train-teacher", "--resume with a changed optimisation setting (`train.lr`) and no --force",
        r"cannot resume: settings changed.*train.lr.*--force", _resume_changed_lr, "exp"),
    Row("train-resume-exported", "train-teacher", "--resume=CKPT naming an exported checkpoint (no training state)",
        r"has no training state", _resume_exported, "exp"),
    Row("train-locked", "train-teacher", "--out in use by a running training process",
        r"is in use by another wavedistill run \(PID \d+\)", _locked_run, "exp"),
    Row("train-resume-student-run", "train-teacher", "--resume of a distillation run as teacher training",
        r"holds a student run", _resume_student_as_teacher, "exp"),
    Row("train-init-from-missing", "train-teacher", "`train.init_from` naming a checkpoint that does not exist",
        r"checkpoint .*nope does not exist", lambda w, d: _teacher_args(w, d, None, None, f"train.init_from={d / 'nope'}"), "exp"),
    Row("train-init-from-student", "train-teacher", "`train.init_from` naming a student checkpoint (wrong kind)",
        r"is a student checkpoint; a teacher run can only start from a teacher",
        lambda w, d: _teacher_args(w, d, None, None, f"train.init_from={w.student}"), "exp"),
    # ---- distill
    Row("distill-teacher-missing", "distill", "--teacher that does not exist", r"checkpoint .* does not exist",
        lambda w, d: _distill_args(w, d, d / "nothing"), "exp"),
    Row("distill-teacher-is-student", "distill", "--teacher that is a student checkpoint (wrong kind)",
        r"is a student checkpoint, but a teacher checkpoint is needed", lambda w, d: _distill_args(w, d, w.student), "exp"),
    Row("distill-teacher-is-cache", "distill", "--teacher that is a feature cache, not a checkpoint",
        r"not a wavedistill checkpoint", lambda w, d: _distill_args(w, d, w.cache), "exp"),
    Row("distill-teacher-other-features", "distill", "teacher trained with other features (fmin)",
        r"features.fmin=50.0 but the config says 40.0", _teacher_with_other_features, "exp"),
    Row("distill-teacher-config-corrupt", "distill", "teacher config.yaml with a YAML syntax error", r"not valid YAML",
        _teacher_yaml_corrupt, "exp"),
    Row("distill-teacher-unknown-kind", "distill", "teacher config.yaml with an unknown kind", r"missing or unknown 'kind'",
        _teacher_unknown_kind, "exp"),
    Row("distill-teacher-nan-weights", "distill", "teacher weights holding NaN", r"NaN or inf", _teacher_nan_weights, "exp"),
    Row("distill-teacher-truncated", "distill", "truncated teacher model.safetensors", r"not a valid safetensors file",
        _teacher_truncated_weights, "exp"),
    Row("distill-teacher-shape-mismatch", "distill", "teacher weights that do not match its config.yaml",
        r"does not match its config.yaml|has shape", _teacher_shape_mismatch, "exp"),
    Row("distill-loss-vs-student", "distill", "distill.loss=clarinet with a logistic student",
        r"needs student.distribution=gaussian", lambda w, d: _distill_args(w, d, None, None, "distill.loss=clarinet"), "exp"),
    Row("distill-clarinet-with-mol-teacher", "distill", "ClariNet loss with a mixture-of-logistics teacher",
        r"needs a Gaussian teacher",
        lambda w, d: _distill_args(w, d, None, None, "distill.loss=clarinet", "student.distribution=gaussian"), "exp"),
    # ---- export
    Row("export-exists", "export", "--out that already exists (holding a model card), without --force",
        r"already exists.*--force", _export_exists, "out"),
    # ---- synthesize
    Row("synth-checkpoint-missing", "synthesize", "--checkpoint that does not exist", r"does not exist",
        lambda w, d: _synth_args(w, d, [_one_good_mel(w, d)], checkpoint=d / "nothing"), "out"),
    Row("synth-unusable-inputs", "synthesize",
        "only unusable inputs: random bytes, transposed / 3-D / NaN / string / pickled .npy, a missing file",
        r"nothing to synthesize: all 7 input", _synth_unusable_inputs, "out"),
    Row("synth-list-of-missing", "synthesize", "a list file naming files that do not exist", r"nothing to synthesize",
        _synth_list_missing, "out"),
    Row("synth-out-dir-is-file", "synthesize", "--out-dir that is a file", r"not a directory",
        _synth_out_is_file, "out"),
    Row("synth-bad-device", "synthesize", "--device tpu", r"--device tpu",
        lambda w, d: _synth_args(w, d, [_one_good_mel(w, d)], "--device", "tpu"), "out"),
    Row("synth-cuda-without-gpu", "synthesize", "--device cuda on a machine without a visible GPU", r"CUDA is not available",
        lambda w, d: _synth_args(w, d, [_one_good_mel(w, d)], "--device", "cuda"), "out"),
    Row("synth-negative-temperature", "synthesize", "--temperature -1", r"--temperature",
        lambda w, d: _synth_args(w, d, [_one_good_mel(w, d)], "--temperature", "-1"), "out"),
    Row("synth-zero-batch", "synthesize", "--batch-size 0", r"--batch-size",
        lambda w, d: _synth_args(w, d, [_one_good_mel(w, d)], "--batch-size", "0"), "out"),
    Row("synth-speaker-single", "synthesize", "--speaker for a single-speaker checkpoint", r"single-speaker",
        lambda w, d: _synth_args(w, d, [_one_good_mel(w, d)], "--speaker", "1", checkpoint=w.teacher), "out"),
    Row("synth-bad-subtype", "synthesize", "--subtype that is not a WAV sample format (`MP3`)", r"--subtype MP3",
        lambda w, d: _synth_args(w, d, [_one_good_mel(w, d)], "--subtype", "MP3"), "out"),
    Row("synth-bad-sample-rate", "synthesize", "--sample-rate 0", r"--sample-rate",
        lambda w, d: _synth_args(w, d, [_one_good_mel(w, d)], "--sample-rate", "0"), "out"),
    # ---- eval
    Row("eval-checkpoint-wrong", "eval", "--checkpoint that is a feature cache", r"not a wavedistill checkpoint",
        lambda w, d: _eval_args(w, d, checkpoint=w.cache), "report"),
    Row("eval-empty-split", "eval", "--split with no utterances (test split of a cache without one)", r"has no utterances",
        lambda w, d: _eval_args(w, d, "--split", "test"), "report"),
    Row("eval-features-mismatch", "eval", "checkpoint whose features differ from the cache's", r"features.fmax",
        _eval_other_features, "report"),
    Row("eval-corrupt-second-utterance", "eval", "a truncated feats file behind a good one (no partial report)",
        r"not a valid safetensors file", _eval_corrupt_second, "report"),
    Row("eval-out-not-ours", "eval", "a non-empty --out that eval did not write", r"not written by 'wavedistill eval'",
        _eval_out_not_ours, "report"),
    Row("eval-negative-temperature", "eval", "--temperature -1", r"--temperature must be a finite number >= 0",
        lambda w, d: _eval_args(w, d, "--temperature", "-1"), "report"),
    Row("eval-data-is-wav-dir", "eval", "--data that is a directory of wavs, not a feature cache",
        r"holds audio files, not a feature cache.*--wav-dir", lambda w, d: _eval_args(w, d, data=w.wavs), "report"),
    # ---- bench
    Row("bench-checkpoint-missing", "bench", "--checkpoint that does not exist", r"does not exist",
        lambda w, d: _bench_args(w, d, checkpoint=d / "nothing"), "bench.json"),
    Row("bench-negative-seconds", "bench", "--seconds -1", r"--seconds", lambda w, d: _bench_args(w, d, "--seconds", "-1"),
        "bench.json"),
    Row("bench-zero-repeats", "bench", "--repeats 0", r"--repeats", lambda w, d: _bench_args(w, d, "--repeats", "0"), "bench.json"),
    Row("bench-zero-threads", "bench", "--threads 0", r"--threads", lambda w, d: _bench_args(w, d, "--threads", "0"), "bench.json"),
]


# --------------------------------------------------------------------------- running the selected rows


def snapshot(path: Path):
    """Everything about ``path`` a partial write could change: names, sizes, contents' mtimes, link targets."""
    if not os.path.lexists(path):
        return None
    if not path.is_dir() or path.is_symlink():
        return ("file", path.lstat().st_size, path.lstat().st_mtime_ns)
    entries = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        entries[p.relative_to(path).as_posix()] = (os.readlink(p) if p.is_symlink() else None, st.st_size if p.is_file() else 0,
                                                   st.st_mtime_ns if p.is_file() else 0)
    return entries


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess | None
    before: object
    after: object
    missing: str | None = None


@pytest.fixture(scope="module")
def outcomes(request, world) -> dict[str, Outcome]:
    """Set up every selected row, run them all (forked CLI children, 2 at a time), snapshot their outputs."""
    selected = [item.callspec.params["row"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "row" in item.callspec.params]
    rows_dir = world.root / "rows"
    help_run = h.cli_many([("help", ["--help"], world.root)], world.root / "logs-help")["help"]
    available = {c for c in LATE_COMMANDS if re.search(rf"^\s+{c}(\s|$)", help_run.stdout, re.MULTILINE)}
    results: dict[str, Outcome] = {}
    jobs, outs = [], {}
    for row in selected:
        if row.command in LATE_COMMANDS and row.command not in available:
            results[row.id] = Outcome(None, None, None, missing=row.command)
            continue
        d = rows_dir / row.id
        d.mkdir(parents=True)
        jobs.append((row.id, row.setup(world, d), world.root))
        outs[row.id] = (d / row.out, snapshot(d / row.out))
    for rid, proc in h.cli_many(jobs, world.root / "logs").items():
        out, before = outs[rid]
        results[rid] = Outcome(proc, before, snapshot(out))
    return results


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_clear_line_and_exit_2(row, outcomes):
    o = outcomes[row.id]
    if o.missing:
        pytest.skip(f"'wavedistill {o.missing}' is not registered yet ('wavedistill --help' does not list it)")
    line = h.assert_stderr_one_error(o.proc, row.command)
    assert re.search(row.expect, line, re.IGNORECASE), line
    assert o.after == o.before, f"--out changed: before {o.before!r}, after {o.after!r}"


@pytest.mark.slow
def test_forked_children_behave_like_python_m_wavedistill(world, tmp_path):
    """The forked children of the table behave exactly like ``python -m wavedistill`` (checked on three rows)."""
    rows = [r for r in ROWS if r.id in ("config-unknown-key", "prepare-corrupt-only", "synth-unusable-inputs")]
    if not h.has_command("synthesize"):
        rows = [r for r in rows if r.command != "synthesize"]
    jobs, real, outs = [], {}, {}
    for row in rows:
        d = tmp_path / row.id
        d.mkdir()
        argv = row.setup(world, d)
        jobs.append((row.id, argv, world.root))
        before = snapshot(d / row.out)
        real[row.id] = h.cli(*argv, cwd=world.root, timeout=240)
        outs[row.id] = (d / row.out, before)
    forked = h.cli_many(jobs, tmp_path / "logs")
    for row in rows:
        p = real[row.id]
        assert (p.returncode, p.stderr, p.stdout) == (forked[row.id].returncode, forked[row.id].stderr, forked[row.id].stdout)
        out, before = outs[row.id]
        assert snapshot(out) == before


def test_table_and_doc_agree():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)) >= 25
    assert {r.command for r in ROWS} >= {"prepare", "train-teacher", "distill", "synthesize", "eval", "bench"}
    doc = DOC.read_text(encoding="utf-8")
    documented = re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", doc, re.MULTILINE)
    assert documented == ids


# --------------------------------------------------------------------------- property tests

SETTINGS = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])


@SETTINGS
@given(data=st.binary(min_size=0, max_size=2048), suffix=st.sampled_from([".wav", ".flac", ".ogg", ".bin", ""]))
def test_load_audio_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    _check_load(path, 8000)


@SETTINGS
@given(
    samples=st.integers(1, 400),
    channels=st.integers(1, 4),
    rate=st.sampled_from([1, 7, 100, 4000, 8000, 11025, 16000, 22050, 44100, 96000]),
    subtype=st.sampled_from(["PCM_16", "PCM_24", "FLOAT", "DOUBLE", "PCM_U8"]),
    kind=st.sampled_from(["normal", "loud", "nan", "inf", "zeros"]),
    seed=st.integers(0, 2**16),
)
def test_load_audio_random_arrays(tmp_path, samples, channels, rate, subtype, kind, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, channels)) * {"loud": 50.0}.get(kind, 0.3)
    if kind == "nan":
        x[rng.integers(samples), rng.integers(channels)] = np.nan
    elif kind == "inf":
        x[rng.integers(samples), rng.integers(channels)] = -np.inf
    elif kind == "zeros":
        x[:] = 0
    path = tmp_path / "a.wav"
    sf.write(str(path), x, rate, subtype=subtype)
    out = _check_load(path, 8000)
    if out is not None and rate == 8000:
        assert out.shape == (samples,)


def _check_load(path: Path, rate: int):
    """load_audio either returns finite float32 mono or raises AudioError with a one-line message; nothing else."""
    try:
        out = load_audio(path, rate, max_seconds=30.0)
    except AudioError as e:
        msg = str(e)
        out = None
    if out is None:
        assert msg and "\n" not in msg
        return None
    assert out.dtype == np.float32 and out.ndim == 1 and out.shape[0] > 0
    assert np.isfinite(out).all()
    return out


@SETTINGS
@given(
    length=st.integers(257, 4000),
    n_mels=st.sampled_from([8, 16, 40, 80]),
    hop=st.sampled_from([40, 80, 100, 128]),
    amp=st.sampled_from([0.0, 1e-6, 0.1, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_mel_is_finite_with_the_right_shape(length, n_mels, hop, amp, seed):
    fc = FeatureConfig(sample_rate=8000, n_fft=256, win_length=200, hop_length=hop, n_mels=n_mels, fmin=40.0, fmax=4000.0)
    fc.validate()
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(length).astype(np.float32) * amp)
    mel = MelExtractor(fc)(x)
    assert mel.shape == (n_mels, length // hop)
    assert torch.isfinite(mel).all()
    assert mel.dtype == torch.float32


_KEYS = [f"{s}.{f.name}" for s, cls in [("features", FeatureConfig)] for f in dataclasses.fields(cls)] + [
    "train.batch_size", "train.lr", "train.mixed_precision", "teacher.layers", "teacher.upsample_scales", "teacher.output",
    "student.flow_layers", "student.stacks_per_flow", "distill.loss", "distill.stft_fft_sizes", "prepare.valid_fraction",
    "teacher", "x.y", "features.", ".n_mels", "a.b.c", "",
]
_VALUES = st.one_of(
    st.sampled_from(["1", "-1", "0", "3.5", "1e400", ".nan", "-.inf", "true", "null", "[]", "[4, 4, 5]", "[1, -2]", "{a: 1}",
                     "mol", "gaussian", "bf16", "'8000'", "[", "]]", ": :", "&a [*a]", "!!python/object:os.system x", "~"]),
    st.text(max_size=20),
)


@SETTINGS
@given(items=st.lists(st.tuples(st.sampled_from(_KEYS) | st.text(max_size=12), _VALUES), max_size=4),
       raw=st.lists(st.text(max_size=25), max_size=2))
def test_override_parser_gives_config_or_user_error(items, raw):
    overrides = [f"{k}={v}" for k, v in items] + raw
    try:
        cfg = load_config(None, overrides)
    except UserError as e:
        cfg = None
        msg = str(e)
    if cfg is None:
        assert msg
    else:
        assert isinstance(cfg, Config)
        for value in (cfg.train.lr, cfg.features.fmin, cfg.features.fmax):
            assert math.isfinite(value)


def test_overrides_accept_scientific_notation():
    """``train.lr=3e-4`` is the example the override error message itself gives; PyYAML reads it as a string."""
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    assert load_config(None, ["distill.kl_weight=1e0"]).distill.kl_weight == 1.0
