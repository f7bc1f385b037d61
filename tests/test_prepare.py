"""wavedistill prepare and the FeatureCache reader."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import speech_like
from wavedistill.data.audio import MelExtractor
from wavedistill.config import Config, FeatureConfig
from wavedistill.data.cache import FeatureCache
from wavedistill.errors import UserError
from wavedistill.fileio import load_tensors, save_tensors
from wavedistill.data.prepare import assign_splits, make_uttids, run_prepare

GOOD = ["a.wav", "sub/b.wav", "c.wav", "c.flac", "d e.ogg", "stereo.wav", "rate44k.wav", "deep24.wav"]
BAD = {
    "corrupt.wav": "not a readable audio file",
    "notes.txt": "not a readable audio file",
    "empty.wav": "empty",
    "short.wav": "too short",
    "nan.wav": "NaN",
}


def _write(path: Path, data: np.ndarray, sample_rate: int = 8000, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sample_rate, **kw)


def make_messy_dir(root: Path) -> Path:
    """Good mono/stereo/44.1k/24-bit/flac/ogg files next to every kind of bad file."""
    root.mkdir(parents=True)
    _write(root / "a.wav", speech_like(seed=1), subtype="PCM_16")
    _write(root / "sub" / "b.wav", speech_like(seed=2, f0=180.0), subtype="PCM_16")
    _write(root / "c.wav", speech_like(seed=3), subtype="PCM_16")
    _write(root / "c.flac", speech_like(seed=4), subtype="PCM_16")
    _write(root / "d e.ogg", speech_like(seed=5), subtype="VORBIS")
    _write(root / "stereo.wav", np.stack([speech_like(seed=6), speech_like(seed=7, peak=0.2)], axis=1), subtype="PCM_16")
    _write(root / "rate44k.wav", speech_like(44100, seed=8), 44100, subtype="PCM_16")
    _write(root / "deep24.wav", speech_like(seed=9, peak=0.9), subtype="PCM_24")
    (root / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "notes.txt").write_text("recorded on tuesday\n")
    _write(root / "empty.wav", np.zeros(0, np.float32), subtype="PCM_16")
    _write(root / "short.wav", speech_like(seconds=0.12, silence=0.0, seed=10), subtype="PCM_16")
    nan = speech_like(seed=11)
    nan[3000] = np.nan
    _write(root / "nan.wav", nan, subtype="FLOAT")
    _write(root / ".hidden.wav", speech_like(seed=12), subtype="PCM_16")
    _write(root / ".cache" / "x.wav", speech_like(seed=13), subtype="PCM_16")
    return root


def good_dir(root: Path, n: int = 3) -> Path:
    for i in range(n):
        _write(root / f"utt{i}.wav", speech_like(seed=100 + i, f0=120.0 + 10 * i), subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(wav_dir, out, summary, stderr) of one prepare run over the messy directory."""
    base = tmp_path_factory.mktemp("messy")
    wav_dir = make_messy_dir(base / "wavs")
    out = base / "cache"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = run_prepare(wav_dir, out, Config().validate())
    return wav_dir, out, summary, err.getvalue()


EXPECTED_IDS = {"a", "sub__b", "c", "c-2", "d_e", "stereo", "rate44k", "deep24"}


def test_prepare_caches_good_files_and_skips_bad_ones(prepared):
    wav_dir, out, summary, _ = prepared
    assert set(summary["utterances"]) == EXPECTED_IDS
    assert summary["utterances"]["c"]["source"] == "c.flac" and summary["utterances"]["c-2"]["source"] == "c.wav"
    assert summary["counts"]["found"] == len(GOOD) + len(BAD)  # hidden files are not even looked at
    assert summary["counts"]["used"] == len(GOOD) and summary["counts"]["skipped"] == len(BAD)
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == set(BAD)
    for path, cause in BAD.items():
        assert cause in reasons[path], (path, reasons[path])
    assert "after trimming, need >= 0.3 s" in reasons["short.wav"]


def test_prepare_prints_one_line_per_skipped_file(prepared):
    wav_dir, _, _, err = prepared
    lines = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(lines) == len(BAD)
    assert any(line.startswith(f"skipped {wav_dir / 'nan.wav'}: ") and "NaN" in line for line in lines)


def test_prepare_writes_feats_with_aligned_audio_and_mel(prepared):
    wav_dir, out, summary, _ = prepared
    mel = MelExtractor(FeatureConfig())
    for uttid, entry in summary["utterances"].items():
        t = load_tensors(out / "feats" / f"{uttid}.safetensors")
        audio, m = t["audio"], t["mel"]
        assert audio.dtype == torch.float32 and m.dtype == torch.float32
        assert audio.shape == (entry["samples"],) and m.shape == (64, entry["frames"])
        assert entry["samples"] == entry["frames"] * 80
        assert 0.5 <= entry["samples"] / 8000 <= 0.7  # 0.2 s of silence trimmed from each end
        assert entry["peak"] == pytest.approx(float(audio.abs().max()))
        torch.testing.assert_close(m, mel(audio))


def test_prepare_keeps_levels_and_mixes_stereo(prepared):
    wav_dir, out, summary, _ = prepared
    peaks = {u: e["peak"] for u, e in summary["utterances"].items()}
    assert peaks["deep24"] == pytest.approx(0.9, abs=1e-4)  # never normalised
    assert peaks["a"] == pytest.approx(0.5, abs=1e-4)
    stereo = load_tensors(out / "feats" / "stereo.safetensors")["audio"].numpy()
    raw, _ = sf.read(str(wav_dir / "stereo.wav"), dtype="float32")
    mix = raw.mean(axis=1)
    starts = [o for o in range(len(mix) - len(stereo) + 1) if np.array_equal(mix[o : o + len(stereo)], stereo)]
    assert len(starts) == 1
    assert summary["peaks"]["max"] == pytest.approx(0.9, abs=1e-4)
    assert summary["peaks"]["clipped_files"] == 0


def test_prepare_splits_cover_every_utterance_once(prepared):
    _, out, summary, _ = prepared
    splits = {name: (out / f"{name}.txt").read_text().split() for name in ("train", "valid", "test")}
    everything = splits["train"] + splits["valid"] + splits["test"]
    assert sorted(everything) == sorted(EXPECTED_IDS)
    assert len(splits["valid"]) == 1 and len(splits["test"]) == 1 and len(splits["train"]) == 6
    assert {k: summary["counts"][k] for k in splits} == {k: len(v) for k, v in splits.items()}
    d = summary["durations_seconds"]
    assert d["total"] == pytest.approx(d["train"] + d["valid"] + d["test"], abs=1e-2)


def test_prepare_summary_records_parameters(prepared):
    _, out, summary, _ = prepared
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["features"] == dataclasses.asdict(FeatureConfig())
    assert summary["prepare"]["seed"] == 1234 and "wavedistill_version" in summary
    assert sorted(p.name for p in out.iterdir()) == [
        "feats", "mel_stats.safetensors", "summary.json", "test.txt", "train.txt", "valid.txt",
    ]


def test_mel_stats_are_train_statistics(prepared):
    _, out, _, _ = prepared
    cache = FeatureCache(out, FeatureConfig())
    mels = torch.cat([mel for _, _, mel in cache.load_split("train")], dim=1).double()
    mean, std = cache.mel_stats()
    assert mean.shape == (64,) and std.shape == (64,)
    torch.testing.assert_close(mean.double(), mels.mean(dim=1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(std.double(), mels.std(dim=1, unbiased=False), atol=1e-4, rtol=1e-4)


def test_feature_cache_reads_what_prepare_wrote(prepared):
    _, out, summary, _ = prepared
    cache = FeatureCache(out)
    assert cache.features == FeatureConfig()
    assert cache.summary["counts"] == summary["counts"]
    ids = cache.ids("train") + cache.ids("valid") + cache.ids("test")
    assert sorted(ids) == sorted(EXPECTED_IDS)
    audio, mel = cache.load(ids[0])
    assert audio.ndim == 1 and mel.shape == (64, audio.shape[0] // 80) and audio.shape[0] % 80 == 0
    with pytest.raises(UserError, match="unknown split"):
        cache.ids("dev")


def test_feature_cache_refuses_other_features(prepared):
    _, out, _, _ = prepared
    with pytest.raises(UserError, match=r"features\.hop_length=80 but the config says 100"):
        FeatureCache(out, dataclasses.replace(FeatureConfig(), hop_length=100))
    with pytest.raises(UserError, match=r"features\.n_mels=64 but the config says 80"):
        FeatureCache(out, dataclasses.replace(FeatureConfig(), n_mels=80))


def test_feature_cache_refuses_a_plain_directory(tmp_path):
    with pytest.raises(UserError, match="is not a prepared feature cache .*; run 'wavedistill prepare --wav-dir"):
        FeatureCache(tmp_path)


def test_feature_cache_load_checks_shapes(tmp_path, prepared):
    _, out, _, _ = prepared
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    save_tensors(copy / "feats" / "a.safetensors", {"audio": torch.zeros(8000), "mel": torch.zeros(64, 99)})
    with pytest.raises(UserError, match="do not match"):
        FeatureCache(copy).load("a")
    (copy / "feats" / "c.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        FeatureCache(copy).load("c")


def test_rerun_resumes_without_recomputing(tmp_path, small_config):
    wav_dir = good_dir(tmp_path / "wavs", 4)
    out = tmp_path / "cache"
    first = run_prepare(wav_dir, out, small_config)
    feats = sorted((out / "feats").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in feats}
    second = run_prepare(wav_dir, out, small_config)
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "feats").iterdir())} == before
    assert second == first

    # an interrupted run (no summary yet) resumes too
    (out / "summary.json").unlink()
    assert run_prepare(wav_dir, out, small_config) == first
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "feats").iterdir())} == before

    # a changed source file is recomputed, the others are not
    _write(wav_dir / "utt1.wav", speech_like(seed=999, peak=0.7), subtype="PCM_16")
    os.utime(wav_dir / "utt1.wav", ns=(before["utt1.safetensors"] + 10**9,) * 2)
    third = run_prepare(wav_dir, out, small_config)
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / "feats").iterdir())}
    assert {k for k in after if after[k] != before[k]} == {"utt1.safetensors"}
    assert third["utterances"]["utt1"]["peak"] == pytest.approx(0.7, abs=1e-4)


def test_rerun_rechecks_durations_of_reused_files(tmp_path, small_config):
    wav_dir = good_dir(tmp_path / "wavs", 3)
    _write(wav_dir / "half.wav", speech_like(seconds=0.6, silence=0.1, seed=5), subtype="PCM_16")
    out = tmp_path / "cache"
    assert run_prepare(wav_dir, out, small_config)["counts"]["used"] == 4
    stricter = dataclasses.replace(small_config, prepare=dataclasses.replace(small_config.prepare, min_seconds=0.5))
    summary = run_prepare(wav_dir, out, stricter)
    assert summary["counts"]["used"] == 3
    assert [s["path"] for s in summary["skipped"]] == ["half.wav"]
    assert "half" not in FeatureCache(out).ids("train") + FeatureCache(out).ids("valid") + FeatureCache(out).ids("test")


def test_other_feature_parameters_on_same_out_are_refused(tmp_path, small_config):
    wav_dir = good_dir(tmp_path / "wavs", 3)
    out = tmp_path / "cache"
    run_prepare(wav_dir, out, small_config)
    summary_before = (out / "summary.json").read_bytes()
    other = dataclasses.replace(small_config, features=dataclasses.replace(small_config.features, n_mels=32))
    with pytest.raises(UserError, match=r"was prepared with other feature parameters \(n_mels: 64 -> 32\); use a new --out"):
        run_prepare(wav_dir, out, other)
    assert (out / "summary.json").read_bytes() == summary_before


def test_empty_directory_is_a_user_error(tmp_path, small_config):
    (tmp_path / "wavs").mkdir()
    with pytest.raises(UserError, match="no usable audio in .* \\(no files found\\); point --wav-dir"):
        run_prepare(tmp_path / "wavs", tmp_path / "cache", small_config)
    assert not (tmp_path / "cache").exists()


def test_directory_of_bad_files_is_a_user_error_and_writes_nothing(tmp_path, small_config):
    wav_dir = tmp_path / "wavs"
    wav_dir.mkdir()
    (wav_dir / "a.wav").write_bytes(b"RIFF....WAVEjunk")
    (wav_dir / "b.txt").write_text("hello")
    with pytest.raises(UserError, match=r"\(2 files, all skipped: not a readable audio file"):
        run_prepare(wav_dir, tmp_path / "cache", small_config)
    assert not (tmp_path / "cache").exists()


def test_missing_wav_dir_is_a_user_error(tmp_path, small_config):
    with pytest.raises(UserError, match="does not exist"):
        run_prepare(tmp_path / "nowhere", tmp_path / "cache", small_config)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        run_prepare(tmp_path / "file", tmp_path / "cache", small_config)


def test_out_inside_wav_dir_is_not_scanned(tmp_path, small_config):
    wav_dir = good_dir(tmp_path / "wavs", 3)
    run_prepare(wav_dir, wav_dir / "cache", small_config)
    summary = run_prepare(wav_dir, wav_dir / "cache", small_config)
    assert summary["counts"]["found"] == 3 and summary["skipped"] == []


def test_cli_prepare_on_empty_dir_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "wavedistill", "prepare", "--wav-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no usable audio" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_make_uttids():
    rels = [Path(p) for p in ["a-2.wav", "a.flac", "a.wav", "sub/x y.wav", "sub/deeper/z+1.flac", "noext"]]
    assert make_uttids(rels) == ["a-2", "a", "a-3", "sub__x_y", "sub__deeper__z_1", "noext"]


@pytest.mark.parametrize("n, sizes", [(1, (1, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (10, (8, 1, 1)), (100, (92, 4, 4))])
def test_assign_splits_sizes_and_cover(n, sizes):
    ids = [f"u{i:03d}" for i in range(n)]
    s = assign_splits(ids, 0.04, 0.04, seed=1234)
    assert (len(s["train"]), len(s["valid"]), len(s["test"])) == sizes
    assert sorted(s["train"] + s["valid"] + s["test"]) == ids


def test_assign_splits_is_deterministic_and_seeded():
    ids = [f"u{i:03d}" for i in range(200)]
    a = assign_splits(ids, 0.1, 0.1, seed=1)
    assert assign_splits(list(reversed(ids)), 0.1, 0.1, seed=1) == a
    assert assign_splits(ids, 0.1, 0.1, seed=2)["valid"] != a["valid"]
    big = assign_splits(ids[:4], 0.49, 0.49, seed=1)
    assert len(big["train"]) >= 1


@pytest.mark.slow
def test_prepare_demo_corpus(tmp_path, demo_wav_dir, small_config):
    wav_dir = tmp_path / "wavs"
    wav_dir.mkdir()
    names = sorted(p.name for p in demo_wav_dir.iterdir() if p.suffix == ".wav")[:12]
    for name in names:
        shutil.copy(demo_wav_dir / name, wav_dir / name)
    summary = run_prepare(wav_dir, tmp_path / "cache", small_config)
    c = summary["counts"]
    assert c["found"] == 12 and c["used"] + c["skipped"] == 12 and c["used"] >= 10
    assert (c["valid"], c["test"]) == (1, 1) and c["train"] == c["used"] - 2
    assert 0.0 < summary["peaks"]["max"] <= 1.0
    cache = FeatureCache(tmp_path / "cache", small_config.features)
    for uttid, audio, mel in cache.load_split("valid"):
        assert mel.shape == (64, audio.shape[0] // 80)
