"""Conditioning projections at frame rate (wavedistill.generation.cached.FrameConditioning).

``W · upsample(h) == upsample(W · h)``: the projections of all layers computed from the frames
and then upsampled (in blocks, with frame context) must equal the per-sample projections of the
upsampled conditioning, and generation through them must equal generation through the old
per-sample path with the same noise (Python, C++ and, in Triton's interpreter, the persistent kernel).
"""

from __future__ import annotations

import pytest
import torch

from wavedistill import kernels
from wavedistill.generation import cpp as fastgen
from wavedistill.config import TeacherConfig
from wavedistill.generation.cached import CachedGenerator, FrameConditioning
from wavedistill.models.teacher import Teacher


def teacher(scales=(2, 3), n_speakers: int = 0, output: str = "gaussian", dtype=torch.float32, seed: int = 0) -> Teacher:
    cfg = TeacherConfig(layers=4, stacks=2, residual_channels=12, gate_channels=20, skip_channels=10, cond_channels=8,
                        upsample_scales=list(scales), output=output, mixtures=3, n_speakers=n_speakers)
    cfg.validate()
    torch.manual_seed(seed)
    t = Teacher(cfg, n_mels=5).eval()
    with torch.no_grad():
        for conv in t.cond.smooth:  # non-uniform filters, so an error in the edge kernels shows
            conv.weight.copy_(torch.rand_like(conv.weight) + 0.1)
        for layer in t.net.layers:
            layer.cond.weight.mul_(3.0)
    return t.to(dtype)


def mel_and_speaker(t: Teacher, batch: int, frames: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, t.n_mels, frames, generator=g, dtype=next(t.parameters()).dtype)
    speaker = torch.arange(batch) % t.cfg.n_speakers if t.cfg.n_speakers else None
    return mel, speaker


def per_sample(t: Teacher, gen: CachedGenerator, mel, speaker) -> torch.Tensor:
    return torch.einsum("gc,bct->bgt", gen.w_cond, t.condition(mel, speaker))


def test_condition_net_split_is_forward():
    t = teacher(n_speakers=2, dtype=torch.float64)
    mel, spk = mel_and_speaker(t, 2, 9)
    assert torch.equal(t.cond(mel, spk), t.cond.upsample(t.cond.frames(mel, spk)))
    assert t.cond.frame_context == 2 + t.cond.upsample_context


@pytest.mark.parametrize("scales", [(2, 3), (4, 4, 5), (8,)])
@pytest.mark.parametrize("frames", [1, 2, 5, 9, 10, 31])
def test_frame_rate_equals_per_sample_float64(scales, frames):
    t = teacher(scales, n_speakers=3, dtype=torch.float64)
    mel, spk = mel_and_speaker(t, 2, frames)
    gen = CachedGenerator(t)
    with torch.no_grad():
        ref = per_sample(t, gen, mel, spk)
        fc = FrameConditioning.from_mel(t.cond, mel, spk)
        T = ref.shape[2]
        torch.testing.assert_close(fc.projections(gen.w_cond, 0, T), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fc.upsampled(), t.condition(mel, spk), rtol=0, atol=0)
        for blk in (1, 7, t.hop, 3 * t.hop + 1):  # blocks (with frame context) equal the unblocked result
            parts = torch.cat([fc.projections(gen.w_cond, a, min(T, a + blk)) for a in range(0, T, blk)], dim=2)
            torch.testing.assert_close(parts, ref, rtol=1e-12, atol=1e-12)
        win = fc.window(T // 3, T)  # a window of the utterance, itself in blocks
        torch.testing.assert_close(win.projections(gen.w_cond, 2, T - T // 3), ref[:, :, T // 3 + 2 :], rtol=1e-12, atol=1e-12)


def test_frame_rate_equals_per_sample_float32():
    t = teacher((4, 4, 5))
    mel, _ = mel_and_speaker(t, 2, 40)
    gen = CachedGenerator(t)
    with torch.no_grad():
        ref = per_sample(t, gen, mel, None)
        fc = FrameConditioning.from_mel(t.cond, mel)
        T = ref.shape[2]
        new = torch.cat([fc.projections(gen.w_cond, a, min(T, a + 1000)) for a in range(0, T, 1000)], dim=2)
    assert ((new - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # cond_block layout [T, L, B, G] is the same whichever way it is computed
    a, b = gen.cond_block(fc, 100, 300), gen.cond_block(t.condition(mel), 100, 300)
    assert a.shape == b.shape == (200, 4, 2, 20)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@pytest.mark.parametrize("n_speakers", [0, 2])
def test_python_generation_equals_per_sample_path(n_speakers):
    t = teacher((2, 3), n_speakers=n_speakers, output="mol", dtype=torch.float64)
    mel, spk = mel_and_speaker(t, 2, 30)
    noise = t.make_noise(2, 30 * t.hop, seed=5, dtype=torch.float64)
    old = CachedGenerator(t).run(t.condition(mel, spk), noise)
    new = t.generate(mel, noise=noise, speaker=spk, fast=False)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-9)
    gen, fc = CachedGenerator(t), FrameConditioning.from_mel(t.cond, mel, spk)  # in pieces, one cache
    gen.block = 17
    cache = gen.new_cache(2)
    half = 77
    parts = [gen.run(fc.window(0, half), noise[:, :, :half], cache=cache),
             gen.run(fc.window(half, fc.shape[2]), noise[:, :, half:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), old, rtol=0, atol=1e-9)


needs_fastgen = pytest.mark.skipif(not fastgen.available(), reason="compiled generator unavailable")


@needs_fastgen
@pytest.mark.parametrize("output,n_speakers", [("gaussian", 0), ("gaussian", 3), ("mol", 0)])
def test_cpp_generation_equals_per_sample_path(output, n_speakers):
    t = teacher((4, 4, 5), n_speakers=n_speakers, output=output)
    mel, spk = mel_and_speaker(t, 2, 40)
    T = 40 * t.hop
    noise = t.make_noise(2, T, seed=6)
    gen = fastgen.FastCachedGenerator(t)
    old, p_old = gen.run(t.condition(mel, spk), noise, return_params=True)
    gen.block = 300  # projection blocks span several C++ calls
    new, p_new = gen.run(FrameConditioning.from_mel(t.cond, mel, spk), noise, return_params=True)
    assert ((p_new - p_old).abs() / p_old.abs().clamp_min(1.0)).max().item() < 1e-4
    assert (new - old).abs().max().item() < 1e-4
    assert torch.equal(new, t.generate(mel, noise=noise, speaker=spk, fast=True)) or \
        (new - t.generate(mel, noise=noise, speaker=spk, fast=True)).abs().max().item() < 1e-5
    py = CachedGenerator(t).run(FrameConditioning.from_mel(t.cond, mel, spk), noise)  # Python, same projections
    assert (new - py).abs().max().item() < 1e-4


@needs_fastgen
def test_cpp_rejects_strided_projections():
    t = teacher()
    gen = fastgen.FastCachedGenerator(t)
    proj = torch.zeros(4, 1, 200)  # [T, B, L*G] but channels not contiguous
    rc = gen._lib.fg_run(gen.weights.data_ptr(), gen.cfg_given.data_ptr(), torch.zeros(4, dtype=torch.int64).data_ptr(),
                         1, 1, 0, proj.data_ptr(), 0, 2, 1, proj.data_ptr(), 0, 0, 0, proj.data_ptr(), proj.data_ptr(),
                         0, 1, 1.0, -9.0, 1.0, 0.7, 1, 1, None, None, 0, 0, 0, None)  # no params, no LP
    assert rc == -4


def test_triton_generation_equals_per_sample_path(monkeypatch):
    pytest.importorskip("triton")
    from wavedistill.generation import triton as ar_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_mode(None)
    t = teacher((2, 3), n_speakers=2, output="mol")
    mel, spk = mel_and_speaker(t, 2, 6)
    T = 6 * t.hop
    noise = t.make_noise(2, T, seed=7)
    gen = ar_triton.TritonARGenerator(t)
    old = gen.run(t.condition(mel, spk), noise)
    gen.block = 13
    new = gen.run(FrameConditioning.from_mel(t.cond, mel, spk), noise)
    assert (new - old).abs().max().item() < 1e-4
    assert (new - CachedGenerator(t).run(t.condition(mel, spk), noise)).abs().max().item() < 1e-4
