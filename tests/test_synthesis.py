"""Synthesis: the Vocoder API, seamless chunking for teacher and student, and the synthesize command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import wavedistill
from conftest import speech_like
from helpers_train import assert_stderr_one_error, cli
from wavedistill.checkpoint import model_config, save_checkpoint
from wavedistill.cli import main
from wavedistill.config import FeatureConfig, StudentConfig, TeacherConfig
from wavedistill.models.student import Student
from wavedistill.inference.synthesis import Vocoder, run_synthesize
from wavedistill.models.teacher import Teacher

FC = FeatureConfig()  # 8 kHz, hop 80, 64 mels, n_fft 512


pytestmark = pytest.mark.usefixtures("single_thread")


def make_checkpoint(root: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random-weight checkpoint under ``root/<kind>``; returns the experiment directory.

    Weights are perturbed away from the initialisation (whose zero IAF heads ignore
    their inputs), so outputs depend on history, conditioning and noise.
    """
    torch.manual_seed(seed)
    if kind == "teacher":
        cfg = TeacherConfig(layers=4, stacks=2, residual_channels=8, gate_channels=16, skip_channels=8, cond_channels=8,
                            mixtures=2)
        cls = Teacher
    else:
        # 6-layer flows (dilations up to 32): the student's receptive field (255) exceeds a hop (80)
        cfg = StudentConfig(flow_layers=[6, 6], stacks_per_flow=[1, 1], residual_channels=8, gate_channels=16,
                            cond_channels=8)
        cls = Student
    cfg.validate(FC)
    model = cls(cfg, FC.n_mels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    exp = root / kind
    save_checkpoint(exp, 1, model.state_dict(), model_config(kind, cfg, FC), None, keep=2)
    return exp


def random_mel(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, FC.n_mels, frames, generator=g) - 4.0


def mel_of(audio: np.ndarray) -> np.ndarray:
    from wavedistill.data.audio import MelExtractor

    x = torch.from_numpy(MelExtractor.align(audio, FC.hop_length))
    return MelExtractor(FC)(x).numpy()


# --------------------------------------------------------------------------- API


def test_load_gives_a_vocoder_of_the_right_kind(tmp_path):
    for kind in ("teacher", "student"):
        voc = wavedistill.load(make_checkpoint(tmp_path, kind))
        assert voc.kind == kind
        assert (voc.sample_rate, voc.hop) == (8000, 80)
        mel = random_mel(1, 6)[0]
        y = voc.synthesize(mel, seed=1)
        assert y.shape == (6 * 80,)
        assert torch.isfinite(y).all() and y.abs().max() <= 1.0 and y.std() > 0


def test_load_accepts_step_dir_and_latest_link(tmp_path):
    exp = make_checkpoint(tmp_path, "student")
    step = exp / "checkpoints" / "step-00000001"
    mel = random_mel(1, 5)
    ys = [Vocoder.load(p).synthesize(mel, seed=3) for p in (exp, step, exp / "checkpoints" / "latest")]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_mel_from_audio_matches_the_checkpoint_features(tmp_path, write_audio):
    voc = Vocoder.load(make_checkpoint(tmp_path, "student"))
    audio = speech_like(8000, seconds=0.5)
    from_array = voc.mel_from_audio(audio)
    assert from_array.shape == (64, 50)
    np.testing.assert_allclose(from_array.numpy(), mel_of(audio), atol=1e-6)
    # a 16 kHz file is resampled to the model rate first
    path = write_audio("hi.wav", speech_like(16000, seconds=0.5), sample_rate=16000)
    assert voc.mel_from_audio(path).shape == (64, 50)


def test_student_matches_its_own_sampler_and_depends_on_seed(tmp_path):
    voc = Vocoder.load(make_checkpoint(tmp_path, "student"))
    mel = random_mel(2, 12)
    y = voc.synthesize(mel, seed=5)
    torch.testing.assert_close(y, voc.model.synthesize(mel, seed=5), atol=1e-5, rtol=0)
    assert not torch.allclose(y, voc.synthesize(mel, seed=6), atol=1e-3)


def test_student_chunked_equals_unchunked(tmp_path, monkeypatch):
    voc = Vocoder.load(make_checkpoint(tmp_path, "student"))
    assert voc.left_frames >= 2  # the flows see more than one hop of history
    mel = random_mel(2, 23, seed=1)
    whole = voc.synthesize(mel, seed=7, temperature=0.8)
    assert whole.shape == (2, 23 * 80)
    for chunk in (1, 2, 5, 22):
        torch.testing.assert_close(voc.synthesize(mel, seed=7, temperature=0.8, chunk_frames=chunk), whole, atol=1e-5, rtol=0)
    # the comparison is sensitive: without the discarded left frames the chunk starts would differ
    monkeypatch.setattr(Vocoder, "left_frames", property(lambda self: 0))
    assert not torch.allclose(voc.synthesize(mel, seed=7, temperature=0.8, chunk_frames=2), whole, atol=1e-5)


def test_items_of_different_lengths_batch_like_alone(tmp_path):
    for kind in ("student", "teacher"):
        voc = Vocoder.load(make_checkpoint(tmp_path, kind))
        mels = [random_mel(1, f, seed=f)[0] for f in (7, 3, 5)]
        together = voc.synthesize_items(mels, seed=2, chunk_frames=2)
        for m, y in zip(mels, together):
            assert y.shape == (m.shape[1] * 80,)
            torch.testing.assert_close(y, voc.synthesize(m, seed=2), atol=1e-5, rtol=0)


def test_teacher_chunked_equals_unchunked_float64(tmp_path, monkeypatch):
    voc = Vocoder.load(make_checkpoint(tmp_path, "teacher"))
    voc.model.double()
    mel = random_mel(2, 7, seed=3).double()
    whole = voc.synthesize(mel, seed=11)
    assert whole.dtype == torch.float64 and whole.shape == (2, 7 * 80)
    torch.testing.assert_close(whole, voc.model.generate(mel, seed=11), atol=1e-9, rtol=0)
    for chunk in (1, 3):
        torch.testing.assert_close(voc.synthesize(mel, seed=11, chunk_frames=chunk), whole, atol=1e-9, rtol=0)
    assert not torch.allclose(voc.synthesize(mel, seed=12), whole, atol=1e-3)
    # the comparison is sensitive: conditioning cut at chunk edges (no frame context) changes the samples
    monkeypatch.setattr(Vocoder, "frame_context", property(lambda self: 0))
    assert not torch.allclose(voc.synthesize(mel, seed=11, chunk_frames=3), whole, atol=1e-3)


def test_teacher_chunked_equals_unchunked_float32(tmp_path):
    voc = Vocoder.load(make_checkpoint(tmp_path, "teacher"))
    mel = random_mel(1, 6, seed=4)
    whole = voc.synthesize(mel, seed=1)
    torch.testing.assert_close(voc.synthesize(mel, seed=1, chunk_frames=2), whole, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the command


def _pcm16(path: Path) -> tuple[np.ndarray, sf._SoundFileInfo]:
    info = sf.info(str(path))
    return sf.read(str(path), dtype="float64")[0], info


def test_cli_synthesize_mixed_good_and_bad_inputs(tmp_path, write_audio):
    exp = make_checkpoint(tmp_path, "student")
    good_wav = write_audio("in/a.wav", speech_like(8000, seconds=1.0), subtype="PCM_16")  # 100 frames
    mel_b = mel_of(speech_like(8000, seconds=0.5, silence=0.1, f0=200.0))  # 50 frames
    np.save(tmp_path / "in" / "b.npy", mel_b)
    write_audio("c.wav", speech_like(16000, seconds=0.6, silence=0.1, f0=120.0), sample_rate=16000)  # 60 frames after resampling
    write_audio("in/sub/a.wav", speech_like(8000, seconds=0.3, silence=0.05, f0=90.0), subtype="PCM_16")  # 30 frames, same stem
    lst = tmp_path / "lists" / "more.txt"
    lst.parent.mkdir()
    lst.write_text("# a comment\n../c.wav\n\n../in/sub/a.wav\n../gone.wav\n", encoding="utf-8")
    (tmp_path / "in" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    np.save(tmp_path / "in" / "wrong.npy", np.zeros((10, 20), dtype=np.float32))
    nan = mel_b.copy()
    nan[3, 7] = np.nan
    np.save(tmp_path / "in" / "nan.npy", nan)
    write_audio("in/empty.wav", np.zeros(0, dtype=np.float32), subtype="PCM_16")
    bad = ["missing.wav", "corrupt.wav", "wrong.npy", "nan.npy", "empty.wav", "gone.wav"]
    out = tmp_path / "out"

    proc = cli("synthesize", "--checkpoint", exp, "--out-dir", out, "--batch-size", "2", "--seed", "0",
               good_wav, tmp_path / "in" / "b.npy", lst, tmp_path / "in" / "missing.wav", tmp_path / "in" / "corrupt.wav",
               tmp_path / "in" / "wrong.npy", tmp_path / "in" / "nan.npy", tmp_path / "in" / "empty.wav")

    assert proc.returncode == 1, proc.stderr[-3000:]  # issue 15: some inputs skipped -> exit 1 (the others written)
    assert "Traceback" not in proc.stderr
    skipped = [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == len(bad), proc.stderr
    for name in bad:
        assert sum(name in ln for ln in skipped) == 1, (name, skipped)
    assert any("mel channels" in ln for ln in skipped if "wrong.npy" in ln)
    assert any("NaN" in ln for ln in skipped if "nan.npy" in ln)
    expected = {"a.wav": 100, "b.wav": 50, "c.wav": 60, "a-2.wav": 30}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # nothing else, no temporaries
    for name, frames in expected.items():
        audio, info = _pcm16(out / name)
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (8000, 1, "PCM_16", frames * 80), name
        assert audio.std() > 0
    assert "synthesized 4 file(s)" in proc.stdout.strip().splitlines()[-1]
    assert "real-time factor" in proc.stdout
    # each file is what the API gives for its mel alone with the same seed, whatever it was batched with
    expect_b = wavedistill.load(exp).synthesize(torch.from_numpy(mel_b), seed=0).numpy()
    np.testing.assert_allclose(_pcm16(out / "b.wav")[0], expect_b, atol=1.5 / 32768)


def test_cli_synthesize_all_bad_exits_2_with_one_line(tmp_path):
    exp = make_checkpoint(tmp_path, "student")
    np.save(tmp_path / "wrong.npy", np.zeros((10, 20), dtype=np.float32))
    # random bytes that make libsndfile's mpg123 decoder print its own warning on fd 2 unless silenced
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    out = tmp_path / "out"
    proc = cli("synthesize", "--checkpoint", exp, "--out-dir", out, tmp_path / "missing.wav", tmp_path / "wrong.npy",
               tmp_path / "noise.wav")
    line = assert_stderr_one_error(proc, "synthesize")
    assert "all 3 input(s)" in line and "missing.wav" in line and "wrong.npy" in line and "noise.wav" in line
    assert not out.exists() or not any(out.iterdir())


def test_run_synthesize_teacher_in_chunks_matches_api(tmp_path, write_audio):
    exp = make_checkpoint(tmp_path, "teacher")
    wav = write_audio("x.wav", speech_like(8000, seconds=0.15, silence=0.02), subtype="PCM_16")
    result = run_synthesize(exp, [str(wav)], tmp_path / "out", chunk_seconds=0.04, seed=4)
    assert result["outputs"] == [str(tmp_path / "out" / "x.wav")] and result["skipped"] == []
    voc = wavedistill.load(exp)
    expect = voc.synthesize(voc.mel_from_audio(wav), seed=4).numpy()
    got, info = _pcm16(tmp_path / "out" / "x.wav")
    assert info.frames == 15 * 80
    np.testing.assert_allclose(got, expect, atol=1.5 / 32768)


def test_cuda_without_gpu_is_a_one_line_error(tmp_path, capsys, write_audio):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    exp = make_checkpoint(tmp_path, "student")
    wav = write_audio("x.wav")
    rc = main(["synthesize", "--checkpoint", str(exp), "--out-dir", str(tmp_path / "out"), "--device", "cuda", str(wav)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("wavedistill synthesize: error:") and "CUDA" in err[0]
