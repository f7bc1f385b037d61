"""Evaluation: metrics with known answers, degenerate inputs, and the eval command on a tiny cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.fft import idct

from conftest import speech_like
from helpers_train import cli
from wavedistill.checkpoint import model_config, save_checkpoint
from wavedistill.config import FeatureConfig, StudentConfig, config_from_dict
from wavedistill.eval.report import (
    METRICS,
    MetricUndefined,
    Scorer,
    griffin_lim,
    log_mel_l1,
    mel_cepstral_distortion,
    pesq_score,
    system_names,
)
from wavedistill.models.student import Student

FC = FeatureConfig()


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speech_like(8000, seconds=2.0, silence=0.2)


def with_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """``x`` plus white noise at ``snr_db`` relative to the power of ``x``."""
    noise = np.random.default_rng(seed).standard_normal(x.shape[0])
    noise *= math.sqrt(np.mean(x.astype(np.float64) ** 2) / 10 ** (snr_db / 10) / np.mean(noise**2))
    return (x + noise).astype(np.float32)


def test_identical_signals_score_perfectly(speech):
    values, reasons = Scorer(FC).score(speech, speech)
    assert reasons == {}
    assert values["pesq"] > 4.0
    assert values["stoi"] > 0.999
    assert abs(values["mcd_db"]) < 1e-9
    assert abs(values["log_mel_l1"]) < 1e-9
    assert abs(values["spectral_convergence"]) < 1e-9


def test_white_noise_at_10_db_scores_worse_on_every_metric(speech):
    scorer = Scorer(FC)
    clean, _ = scorer.score(speech, speech)
    noisy, reasons = scorer.score(speech, with_noise(speech, 10.0))
    assert reasons == {}
    assert noisy["pesq"] < clean["pesq"] - 1.0
    assert noisy["stoi"] < 0.95
    assert noisy["mcd_db"] > 1.0
    assert noisy["log_mel_l1"] > 0.1
    assert noisy["spectral_convergence"] > 0.1
    # and 20 dB is better than 10 dB
    milder, _ = scorer.score(speech, with_noise(speech, 20.0))
    for m in ("pesq", "stoi"):
        assert milder[m] > noisy[m], m
    for m in ("mcd_db", "log_mel_l1", "spectral_convergence"):
        assert milder[m] < noisy[m], m


def test_mcd_known_answer():
    """A difference of exactly 1 in cepstral coefficient c_3 (and any in c0) is (10/ln 10)·sqrt(2) dB."""
    rng = np.random.default_rng(0)
    ref = rng.normal(-4.0, 1.0, size=(64, 30))
    delta = np.zeros(64)
    delta[0], delta[3] = 5.0, 1.0  # c0 (level) is excluded from MCD
    deg = ref + idct(delta, type=2, norm="ortho")[:, None]
    assert mel_cepstral_distortion(ref, deg) == pytest.approx(10 / math.log(10) * math.sqrt(2), rel=1e-9)
    assert log_mel_l1(ref, ref + 0.25) == pytest.approx(0.25)


def test_lengths_are_truncated_to_the_shorter(speech):
    values, _ = Scorer(FC).score(speech, speech[:-123])
    assert abs(values["mcd_db"]) < 1e-9 and abs(values["spectral_convergence"]) < 1e-9


def test_silence_gives_null_with_a_reason_not_a_crash():
    silence = np.zeros(16000, dtype=np.float32)
    with pytest.raises(MetricUndefined):
        pesq_score(silence, silence, 8000)
    values, reasons = Scorer(FC).score(silence, silence)
    assert values["pesq"] is None and "silent" in reasons["pesq"]
    assert values["stoi"] is None and reasons["stoi"]
    assert set(values) == set(METRICS)


def test_griffin_lim_inverts_a_log_mel(speech):
    scorer = Scorer(FC)
    mel = scorer.log_mel(speech)
    y = griffin_lim(mel, FC, seed=0)
    assert y.shape == (mel.shape[1] * FC.hop_length,) and y.dtype == np.float32
    np.testing.assert_array_equal(y, griffin_lim(mel, FC, seed=0))  # seeded: deterministic
    values, _ = scorer.score(speech, y)
    assert values["log_mel_l1"] < 0.5  # the mel is reproduced closely (the phase is not)
    assert values["stoi"] > 0.8


# --------------------------------------------------------------------------- the command


def _student_checkpoint(exp: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = StudentConfig(flow_layers=[2, 2], stacks_per_flow=[1, 1], residual_channels=8, gate_channels=16, cond_channels=8)
    cfg.validate(FC)
    model = Student(cfg, FC.n_mels)
    save_checkpoint(exp, 1, model.state_dict(), model_config("student", cfg, FC), None, keep=1)
    return exp


def test_system_names_are_kinds_and_unique(tmp_path):
    class V:
        def __init__(self, kind, path):
            self.kind, self.path = kind, Path(path)

    assert system_names([V("teacher", "/x/t/checkpoints/step-00000010"), V("student", "/x/s/checkpoints/step-00000020")]) == [
        "teacher", "student"]
    two = system_names([V("student", "/x/a/checkpoints/step-00000001"), V("student", "/x/b/checkpoints/step-00000001"),
                        V("student", "/x/b/checkpoints/step-00000001")])
    assert two[0] == "student-a-step-00000001" and two[1] == "student-b-step-00000001" and len(set(two)) == 3


def test_eval_command_writes_metrics_report_and_wavs(tmp_path):
    from wavedistill.data.prepare import run_prepare

    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for i in range(4):
        sf.write(str(wavs / f"utt{i}.wav"), speech_like(8000, seconds=0.8, silence=0.05, f0=110 + 30 * i, seed=i), 8000,
                 subtype="PCM_16")
    cfg = config_from_dict({"prepare": {"valid_fraction": 0.25, "test_fraction": 0.25}}).validate()
    run_prepare(wavs, tmp_path / "cache", cfg)
    test_ids = (tmp_path / "cache" / "test.txt").read_text().split()
    assert len(test_ids) == 1
    a = _student_checkpoint(tmp_path / "exp-a", 0)
    b = _student_checkpoint(tmp_path / "exp-b", 1)
    report = tmp_path / "report"

    proc = cli("eval", "--checkpoint", a, "--checkpoint", b, "--data", tmp_path / "cache", "--split", "test",
               "--out", report, "--max-utterances", "2", "--seed", "3")

    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((report / "metrics.json").read_text())
    systems = metrics["systems"]
    assert set(systems) == {"griffin_lim", "student-exp-a-step-00000001", "student-exp-b-step-00000001"}
    for name, res in systems.items():
        assert set(res["mean"]) == set(METRICS)
        assert set(res["per_utterance"]) == set(test_ids)
        for uttid, vals in res["per_utterance"].items():
            for m in METRICS:
                v = vals[m]
                assert (v is None and m in vals["null_reasons"]) or (isinstance(v, float) and math.isfinite(v)), (name, m, v)
        info = sf.info(str(report / "wav" / name / f"{test_ids[0]}.wav"))
        assert (info.samplerate, info.subtype) == (8000, "PCM_16")
    assert systems["griffin_lim"]["mean"]["log_mel_l1"] is not None
    assert metrics["config"]["split"] == "test" and metrics["config"]["n_utterances"] == 1
    md = (report / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert table[0].startswith("| system |") and set(table[1]) <= set("|-:")
    assert len(table) == 2 + len(systems)
    png = report / "spectrograms" / f"{test_ids[0]}.png"
    assert f"(spectrograms/{test_ids[0]}.png)" in md
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(report.rglob("*.tmp"))
    assert "| system |" in proc.stdout


def test_eval_temperature_scales_the_vocoder_noise_only(tmp_path):
    """--temperature reaches the vocoders (as synthesize's does) and is recorded; Griffin-Lim does not change."""
    from wavedistill.inference.synthesis import Vocoder

    wavs = tmp_path / "wavs"
    wavs.mkdir()
    sf.write(str(wavs / "a.wav"), speech_like(8000, seconds=0.5, silence=0.05, seed=3), 8000, subtype="FLOAT")
    ckpt = _student_checkpoint(tmp_path / "exp", 0)
    out = {}
    for t in ("1", "0.25"):
        proc = cli("eval", "--checkpoint", ckpt, "--wav-dir", wavs, "--out", tmp_path / f"r{t}", "--temperature", t)
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = json.loads((tmp_path / f"r{t}" / "metrics.json").read_text())
        assert m["config"]["temperature"] == float(t)
        out[t] = {s: sf.read(str(tmp_path / f"r{t}" / "wav" / s / "a.wav"))[0] for s in ("griffin_lim", "student")}
    np.testing.assert_array_equal(out["1"]["griffin_lim"], out["0.25"]["griffin_lim"])
    assert np.abs(out["1"]["student"] - out["0.25"]["student"]).max() > 1e-3
    voc = Vocoder.load(ckpt)
    x, _ = sf.read(str(wavs / "a.wav"), dtype="float32")
    want = voc.synthesize(voc.mel_from_audio(x[: len(x) // voc.hop * voc.hop]), seed=0, temperature=0.25).numpy()
    np.testing.assert_allclose(out["0.25"]["student"], np.clip(want, -1, 1), atol=1.5 / 32768)
    assert "temperature 0.25" in (tmp_path / "r0.25" / "report.md").read_text()


# ---------------------------------------------------------------------------- speech-frame MCD and F0 metrics


def harmonic_tone(f0: float, seconds: float = 1.5, sample_rate: int = 8000, seed: int = 0) -> np.ndarray:
    """A voiced stand-in with a known, steady F0: decaying harmonics under a smooth envelope, then silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) / k for k in range(1, 8))
    env = np.clip(np.sin(np.pi * t / (0.8 * seconds)), 0, None) * (t < 0.8 * seconds)
    return (0.3 * x * env / np.abs(x).max()).astype(np.float32)


def test_f0_metrics_known_answers():
    scorer = Scorer(FC)
    ref = harmonic_tone(150.0)
    same, reasons = scorer.score(ref, ref)
    assert reasons == {}
    assert same["f0_rmse_cents"] == pytest.approx(0.0, abs=1e-9) and same["vuv_error"] == 0.0
    # the same tone a semitone up: 100 cents off (pYIN's 10-cent bins and the frame edges leave a little slack)
    up, _ = scorer.score(ref, harmonic_tone(150.0 * 2 ** (100 / 1200)))
    assert up["f0_rmse_cents"] == pytest.approx(100.0, abs=15.0)
    assert up["vuv_error"] < 0.1
    # white noise of the same power is unvoiced: the voiced frames of the reference all count as V/UV errors
    noise = np.random.default_rng(3).standard_normal(ref.shape[0]).astype(np.float32) * ref.std()
    noisy, _ = scorer.score(ref, noise)
    assert noisy["vuv_error"] > 0.7 * voiced_fraction(ref) > 0.3


def voiced_fraction(x: np.ndarray) -> float:
    from wavedistill.eval.report import f0_track

    _, voiced = f0_track(x, FC.sample_rate, FC.hop_length, FC.n_fft)
    return float(voiced.mean())


def test_mcd_counts_speech_frames_only():
    """Near-silent reference frames (below the 40 dB speech threshold) do not enter the MCD mean."""
    from wavedistill.eval.report import speech_frames

    rng = np.random.default_rng(1)
    ref = rng.normal(-2.0, 0.5, size=(64, 40))
    ref[:, 30:] = -11.5  # log-floor silence, far below the loudest frames
    mask = speech_frames(ref)
    assert mask[:30].all() and not mask[30:].any()
    deg = ref.copy()
    deg[:, 30:] = rng.normal(-8.0, 2.0, size=(64, 10))  # anything at all in the silence
    assert mel_cepstral_distortion(ref, deg, frames=mask) == pytest.approx(0.0, abs=1e-12)
    assert mel_cepstral_distortion(ref, deg) > 1.0
    with pytest.raises(MetricUndefined):
        mel_cepstral_distortion(ref, deg, frames=np.zeros(40, bool))
