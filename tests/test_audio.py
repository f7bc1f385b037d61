"""wavedistill.data.audio: reading, resampling, trimming, mels, writing, quantisation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import speech_like
from wavedistill.data.audio import AudioError, MelExtractor, load_audio, trim_silence, write_wav
from wavedistill.nn.distributions import quantize as quantize_16bit
from wavedistill.config import FeatureConfig


@pytest.mark.parametrize(
    "name, subtype, fmt, atol",
    [
        ("pcm16.wav", "PCM_16", "WAV", 1 / 32768),
        ("pcm24.wav", "PCM_24", "WAV", 1 / 2**23),
        ("float.wav", "FLOAT", "WAV", 0.0),
        ("pcm16.flac", "PCM_16", "FLAC", 1 / 32768),
        ("pcm24.flac", "PCM_24", "FLAC", 1 / 2**23),
    ],
)
def test_load_formats_keep_samples_and_level(write_audio, name, subtype, fmt, atol):
    x = speech_like()
    path = write_audio(name, x, subtype=subtype, format=fmt)
    y = load_audio(path, 8000)
    assert y.dtype == np.float32 and y.ndim == 1 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=atol + 1e-7, rtol=0)


def test_load_ogg_vorbis(write_audio):
    x = speech_like()
    y = load_audio(write_audio("voice.ogg", x, subtype="VORBIS", format="OGG"), 8000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) <= 1
    n = min(len(x), len(y))
    assert np.corrcoef(x[:n], y[:n])[0, 1] > 0.95


def test_load_never_normalises(write_audio):
    x = speech_like(peak=0.05)
    loud = np.concatenate([x, [1.5, -1.25]]).astype(np.float32)
    assert np.abs(load_audio(write_audio("quiet.wav", x, subtype="FLOAT"), 8000)).max() == pytest.approx(0.05)
    assert load_audio(write_audio("loud.wav", loud, subtype="FLOAT"), 8000)[-2:].tolist() == [1.5, -1.25]


def test_stereo_is_mixed_to_channel_mean(write_audio):
    left = speech_like(f0=120.0, seed=1)
    right = speech_like(f0=210.0, peak=0.3, seed=2)
    y = load_audio(write_audio("stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT"), 8000)
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-7, rtol=0)


def test_multichannel_is_mixed_to_channel_mean(write_audio):
    chans = np.stack([speech_like(seed=s, peak=0.2 + 0.1 * s) for s in range(4)], axis=1)
    y = load_audio(write_audio("quad.wav", chans, subtype="FLOAT"), 8000)
    np.testing.assert_allclose(y, chans.mean(axis=1), atol=1e-7, rtol=0)


def test_resample_preserves_length_and_frequency(write_audio):
    sr_in, freq = 44100, 440.0
    t = np.arange(sr_in) / sr_in
    y = load_audio(write_audio("tone44k.wav", 0.5 * np.sin(2 * np.pi * freq * t), sample_rate=sr_in, subtype="PCM_16"), 8000)
    assert abs(len(y) - 8000) <= 1
    spectrum = np.abs(np.fft.rfft(y[:8000] * np.hanning(8000)))
    peak_hz = np.argmax(spectrum) * 8000 / 8000
    assert peak_hz == pytest.approx(freq, abs=1.0)
    assert np.abs(y[1000:7000]).max() == pytest.approx(0.5, abs=0.02)


def test_resample_is_deterministic(write_audio):
    path = write_audio("s.wav", speech_like(22050), sample_rate=22050, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(path, 8000), load_audio(path, 8000))


@pytest.mark.parametrize("payload", [b"this is a text file, not audio\n" * 20, bytes(range(256)) * 8])
def test_non_audio_is_an_audio_error(tmp_path, payload):
    path = tmp_path / "fake.wav"
    path.write_bytes(payload)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(path, 8000)


def test_missing_file_is_an_audio_error(tmp_path):
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(tmp_path / "nope.wav", 8000)


def test_empty_file_is_an_audio_error(write_audio):
    with pytest.raises(AudioError, match="empty"):
        load_audio(write_audio("empty.wav", np.zeros(0, np.float32), subtype="PCM_16"), 8000)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_an_audio_error(write_audio, bad):
    x = speech_like()
    x[4000] = bad
    with pytest.raises(AudioError, match="NaN or inf"):
        load_audio(write_audio("bad.wav", x, subtype="FLOAT"), 8000)


def test_max_seconds_refuses_long_files(write_audio):
    path = write_audio("long.wav", speech_like(seconds=2.0), subtype="PCM_16")
    with pytest.raises(AudioError, match="too long"):
        load_audio(path, 8000, max_seconds=1.5)
    assert len(load_audio(path, 8000, max_seconds=2.5)) == 16000


def test_trim_removes_leading_and_trailing_silence():
    x = speech_like(silence=0.2)
    y = trim_silence(x, top_db=40)
    assert 0.55 * 8000 <= len(y) <= 0.7 * 8000
    starts = [o for o in range(len(x) - len(y) + 1) if np.array_equal(x[o : o + len(y)], y)]
    assert len(starts) == 1 and 0.1 * 8000 <= starts[0] <= 0.2 * 8000
    assert np.abs(y).max() == np.abs(x).max()


def test_trim_keeps_audio_without_silence():
    x = speech_like(silence=0.0)
    assert len(trim_silence(x, top_db=40)) >= 0.9 * len(x)


def _mel(features=None):
    return MelExtractor(features or FeatureConfig())


def test_mel_filterbank_has_no_empty_filters_and_no_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = _mel()
    assert [str(w.message) for w in caught] == []
    fb = m.mel.mel_scale.fb
    assert fb.shape == (512 // 2 + 1, 64)
    assert bool((fb.sum(dim=0) > 0).all())


def test_mel_shapes_unbatched_and_batched():
    m = _mel()
    x = torch.from_numpy(np.stack([speech_like(seed=0), speech_like(seed=1, f0=200.0)]))
    x = torch.cat([x, 0.01 * torch.ones(2, 50)], dim=1)  # 8050 samples: not a multiple of hop
    single = m(x[0])
    batched = m(x)
    assert single.shape == (64, 8050 // 80) and single.dtype == torch.float32
    assert batched.shape == (2, 64, 8050 // 80)
    torch.testing.assert_close(batched[0], single)
    assert bool(torch.isfinite(batched).all())
    assert float(batched.min()) >= np.log(1e-5) - 1e-6


def test_mel_frame_i_is_centred_at_sample_i_times_hop():
    m = _mel()
    x = torch.zeros(8000)
    x[40 * 80] = 1.0
    energy = m(x).exp().sum(dim=0)
    assert int(energy.argmax()) == 40


def test_align_truncates_to_multiple_of_hop():
    assert MelExtractor.align(np.zeros(8079), 80).shape == (8000,)
    assert MelExtractor.align(torch.zeros(3, 160), 80).shape == (3, 160)
    assert MelExtractor.align(torch.zeros(79), 80).shape == (0,)


def test_write_wav_round_trip_16bit(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.2, 1.2, 4000).astype(np.float32)
    x[:3] = [1.0, -1.0, 0.0]
    path = tmp_path / "out" / "x.wav"
    write_wav(path, torch.from_numpy(x), 8000)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    y, _ = sf.read(str(path), dtype="float32")
    assert np.abs(y - np.clip(x, -1, 1)).max() <= 1 / 32768 + 1e-9
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.wav"]


def test_write_wav_then_load_is_lossless_for_16bit_audio(tmp_path, good_wav):
    x = load_audio(good_wav, 8000)
    write_wav(tmp_path / "copy.wav", x, 8000)
    np.testing.assert_array_equal(load_audio(tmp_path / "copy.wav", 8000), x)


def test_quantize_16bit_maps_onto_grid_and_is_idempotent():
    x = torch.cat([torch.linspace(-1.3, 1.3, 100003), torch.tensor([-1.0, 0.0, 1.0])])
    q = quantize_16bit(x)
    codes = ((q.double() + 1) * 65535 / 2).round().long()
    assert int(codes.min()) >= 0 and int(codes.max()) <= 65535
    grid = (-1 + 2 * torch.arange(65536, dtype=torch.float64) / 65535).float()
    torch.testing.assert_close(q, grid[codes], rtol=0, atol=0)
    torch.testing.assert_close(quantize_16bit(q), q, rtol=0, atol=0)
    inside = x.abs() <= 1
    assert float((q[inside] - x[inside]).abs().max()) <= 1 / 65535 + 1e-6
    assert q[x > 1].eq(1.0).all() and q[x < -1].eq(-1.0).all()


def test_quantize_16bit_keeps_every_grid_point():
    grid = -1 + 2 * torch.arange(65536, dtype=torch.float64) / 65535
    grid = grid.float()
    torch.testing.assert_close(quantize_16bit(grid), grid, rtol=0, atol=0)
