"""The WaveNet teacher: causality, cached vs naive vs parallel generation, likelihood."""

from __future__ import annotations

import pytest
import torch

from wavedistill.config import TeacherConfig
from wavedistill.nn.distributions import quantize
from wavedistill.generation.cached import CachedGenerator
from wavedistill.nn.wavenet import ResidualLayer, WaveNet
from wavedistill.models.teacher import Teacher

F64 = torch.float64
N_MELS = 5
SCALES = [2, 3]  # hop 6


def tiny_teacher(output: str = "mol", kernel_size: int = 2, mixtures: int = 3, n_speakers: int = 0, seed: int = 0) -> Teacher:
    cfg = TeacherConfig(
        layers=6, stacks=2, kernel_size=kernel_size, residual_channels=8, gate_channels=16, skip_channels=8,
        cond_channels=8, upsample_scales=SCALES, n_speakers=n_speakers, speaker_channels=4, output=output,
        mixtures=mixtures, log_scale_min=-9.0,
    )
    cfg.validate()
    torch.manual_seed(seed)
    t = Teacher(cfg, N_MELS).double().eval()
    with torch.no_grad():  # non-trivial normalisation statistics and livelier outputs
        t.cond.set_stats(torch.linspace(-1, 1, N_MELS, dtype=F64), torch.linspace(0.5, 2, N_MELS, dtype=F64))
        for p in t.net.parameters():
            p.mul_(1.5)
    return t


def random_mel(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, N_MELS, frames, generator=torch.Generator().manual_seed(seed), dtype=F64)


def random_audio(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return (torch.rand(batch, length, generator=torch.Generator().manual_seed(seed), dtype=F64) * 1.6 - 0.8)


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("kernel_size", [2, 3])
@pytest.mark.parametrize("dilation", [1, 4])
def test_residual_layer_is_causal(kernel_size, dilation):
    torch.manual_seed(0)
    layer = ResidualLayer(residual=6, gate=8, skip=5, cond=3, kernel_size=kernel_size, dilation=dilation).double()
    g = torch.Generator().manual_seed(1)
    T, t0 = 40, 23
    x = torch.randn(2, 6, T, generator=g, dtype=F64)
    c = torch.randn(2, 3, T, generator=g, dtype=F64)
    out, skip = layer(x, c)
    x2, c2 = x.clone(), c.clone()
    x2[:, :, t0:] += torch.randn(2, 6, T - t0, generator=g, dtype=F64)
    c2[:, :, t0:] += torch.randn(2, 3, T - t0, generator=g, dtype=F64)
    out2, skip2 = layer(x2, c2)
    assert out.shape == x.shape and skip.shape == (2, 5, T)
    assert torch.equal(out[:, :, :t0], out2[:, :, :t0])
    assert torch.equal(skip[:, :, :t0], skip2[:, :, :t0])
    assert not torch.equal(out[:, :, t0], out2[:, :, t0])  # the perturbation is seen from t0 on
    # the layer's own reach: x[s] influences outputs s .. s + (k-1)·d only
    s = 5
    x3 = x.clone()
    x3[:, :, s] += 1.0
    out3, skip3 = layer(x3, c)
    changed = (out3 != out).any(dim=1).any(dim=0) | (skip3 != skip).any(dim=1).any(dim=0)
    reach = (kernel_size - 1) * dilation
    assert changed[s] and changed[s + reach]
    assert not changed[:s].any() and not changed[s + reach + 1 :].any()


@pytest.mark.parametrize("output,kernel_size", [("mol", 2), ("gaussian", 3)])
def test_each_teacher_layer_is_causal(output, kernel_size):
    teacher = tiny_teacher(output, kernel_size)
    g = torch.Generator().manual_seed(3)
    T, t0 = 50, 29
    R, C = teacher.cfg.residual_channels, teacher.cfg.cond_channels
    for i, layer in enumerate(teacher.net.layers):
        x = torch.randn(2, R, T, generator=g, dtype=F64)
        c = torch.randn(2, C, T, generator=g, dtype=F64)
        with torch.no_grad():
            out, skip = layer(x, c)
            x2, c2 = x.clone(), c.clone()
            x2[:, :, t0:] += 1.0
            c2[:, :, t0:] -= 1.0
            out2, skip2 = layer(x2, c2)
        assert torch.equal(out[:, :, :t0], out2[:, :, :t0]), f"layer {i}"
        assert torch.equal(skip[:, :, :t0], skip2[:, :, :t0]), f"layer {i}"
        assert not torch.equal(out[:, :, t0:], out2[:, :, t0:]), f"layer {i}"


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_wavenet_is_causal_with_exact_receptive_field(kernel_size):
    torch.manual_seed(0)
    net = WaveNet(1, 7, layers=6, stacks=2, kernel_size=kernel_size, residual_channels=8, gate_channels=16,
                  skip_channels=8, cond_channels=4).double()
    rf = net.receptive_field
    assert rf == (kernel_size - 1) * (1 + 2 + 4) * 2 + 1
    g = torch.Generator().manual_seed(2)
    T = 3 * rf
    x = torch.randn(2, 1, T, generator=g, dtype=F64)
    c = torch.randn(2, 4, T, generator=g, dtype=F64)
    y = net(x, c)
    assert y.shape == (2, 7, T)
    t0 = rf + 5
    x2, c2 = x.clone(), c.clone()
    x2[:, :, t0:] = torch.randn(2, 1, T - t0, generator=g, dtype=F64)
    c2[:, :, t0:] = torch.randn(2, 4, T - t0, generator=g, dtype=F64)
    y2 = net(x2, c2)
    assert torch.equal(y[:, :, :t0], y2[:, :, :t0])
    assert not torch.equal(y[:, :, t0], y2[:, :, t0])
    # x[s] reaches outputs s .. s + rf - 1 and nothing else
    s = 4
    x3 = x.clone()
    x3[:, :, s] += 0.5
    changed = (net(x3, c) != y).any(dim=1).any(dim=0)
    assert changed[s] and changed[s + rf - 1]
    assert not changed[:s].any() and not changed[s + rf :].any()


@pytest.mark.parametrize("output,kernel_size", [("mol", 2), ("gaussian", 3)])
def test_teacher_is_causal_and_shifted(output, kernel_size):
    teacher = tiny_teacher(output, kernel_size)
    frames = 12
    mel = random_mel(2, frames)
    T = frames * teacher.hop
    audio = random_audio(2, T)
    with torch.no_grad():
        p = teacher(audio, mel)
        assert p.shape == (2, teacher.dist.n_params, T)
        t0 = 31
        a2 = audio.clone()
        a2[:, t0:] = random_audio(2, T - t0, seed=9)
        p2 = teacher(a2, mel)
        # outputs up to and including t0 do not depend on x[t0:] (the input is shifted by one)
        assert torch.equal(p[:, :, : t0 + 1], p2[:, :, : t0 + 1])
        assert not torch.equal(p[:, :, t0 + 1], p2[:, :, t0 + 1])
        # x[t] itself: changing only x[t0] leaves params at t0 alone and moves t0 + 1
        a3 = audio.clone()
        a3[:, t0] += 0.3
        p3 = teacher(a3, mel)
        assert torch.equal(p[:, :, : t0 + 1], p3[:, :, : t0 + 1])
        assert not torch.equal(p[:, :, t0 + 1], p3[:, :, t0 + 1])
        assert torch.equal(p[:, :, t0 + teacher.receptive_field + 1 :], p3[:, :, t0 + teacher.receptive_field + 1 :])


# --------------------------------------------------------------------------- generation


def parallel_resample(teacher: Teacher, y: torch.Tensor, mel: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0,
                      speaker=None) -> torch.Tensor:
    """Teacher-forced pass on ``y`` and the same noise: reproduces ``y`` iff generation is consistent."""
    with torch.no_grad():
        c = teacher.condition(mel, speaker)
        params = teacher.params_from_cond(y, c)
        return teacher.dist.sample(params, noise, temperature)


CASES = [
    pytest.param("mol", 2, 0, id="mol-k2"),
    pytest.param("gaussian", 3, 0, id="gaussian-k3"),
    pytest.param("mol", 2, 3, id="mol-k2-speakers"),
    pytest.param("gaussian", 3, 3, id="gaussian-k3-speakers"),
]


@pytest.mark.parametrize("output,kernel_size,n_speakers", CASES)
def test_cached_equals_naive_equals_parallel(output, kernel_size, n_speakers):
    teacher = tiny_teacher(output, kernel_size, n_speakers=n_speakers)
    frames = 14
    T = frames * teacher.hop
    assert T > teacher.receptive_field + 20
    mel = random_mel(2, frames)
    speaker = torch.tensor([2, 0]) if n_speakers else None
    noise = teacher.make_noise(2, T, seed=5, dtype=F64)
    y = teacher.generate(mel, noise=noise, speaker=speaker)
    y_naive = teacher.generate_naive(mel, noise=noise, speaker=speaker)
    assert y.shape == (2, T) and y.dtype == F64
    assert y.abs().max() <= 1.0
    assert y[:, 1:].std() > 1e-3  # not a degenerate constant signal
    torch.testing.assert_close(y, y_naive, atol=1e-9, rtol=0)
    torch.testing.assert_close(parallel_resample(teacher, y, mel, noise, speaker=speaker), y, atol=1e-9, rtol=0)
    # the two batch items are generated independently: item 0 alone gives the same samples
    y0 = teacher.generate(mel[:1], noise=noise[:1], speaker=None if speaker is None else speaker[:1])
    torch.testing.assert_close(y0[0], y[0], atol=1e-9, rtol=0)
    if n_speakers:
        other = teacher.generate(mel, noise=noise, speaker=torch.tensor([1, 1]))
        assert not torch.allclose(other, y)


def test_speaker_teacher_requires_speaker():
    teacher = tiny_teacher("mol", 2, n_speakers=3)
    with pytest.raises(ValueError):
        teacher.generate(random_mel(1, 3))


@pytest.mark.parametrize("temperature", [0.7])
def test_cached_equals_parallel_with_temperature(temperature):
    teacher = tiny_teacher("mol", 3)
    mel = random_mel(2, 10)
    noise = teacher.make_noise(2, 10 * teacher.hop, seed=3, dtype=F64)
    y = teacher.generate(mel, noise=noise, temperature=temperature)
    torch.testing.assert_close(teacher.generate_naive(mel, noise=noise, temperature=temperature), y, atol=1e-9, rtol=0)
    torch.testing.assert_close(parallel_resample(teacher, y, mel, noise, temperature), y, atol=1e-9, rtol=0)


def test_generate_length_and_seed():
    teacher = tiny_teacher("mol", 2)
    for frames in (1, 7):
        mel = random_mel(3, frames)
        a = teacher.generate(mel, seed=11)
        assert a.shape == (3, frames * teacher.hop)
        assert torch.equal(a, teacher.generate(mel, seed=11))
    assert not torch.equal(teacher.generate(mel, seed=11), teacher.generate(mel, seed=12))


@pytest.mark.parametrize("output", ["mol", "gaussian"])
def test_temperature_zero_is_noise_free_with_one_component(output):
    teacher = tiny_teacher(output, 2, mixtures=1)
    mel = random_mel(2, 6)
    a = teacher.generate(mel, seed=1, temperature=0.0)
    b = teacher.generate(mel, seed=2, temperature=0.0)
    assert torch.equal(a, b)
    # and it follows the mean of the teacher-forced pass exactly
    with torch.no_grad():
        params = teacher.params_from_cond(a, teacher.condition(mel))
    mean = params[:, 1] if output == "mol" else params[:, 0]
    torch.testing.assert_close(a, mean.clamp(-1, 1), atol=1e-9, rtol=0)


def test_generation_cache_step_api_continues():
    """Driving CachedGenerator.step by hand over two halves with one cache equals one pass."""
    teacher = tiny_teacher("gaussian", 3)
    frames = 12
    mel = random_mel(2, frames)
    T = frames * teacher.hop
    noise = teacher.make_noise(2, T, seed=8, dtype=F64)
    full = teacher.generate(mel, noise=noise)
    gen = CachedGenerator(teacher)
    c = teacher.condition(mel)
    cache = gen.new_cache(2)
    out = torch.zeros(2, T, dtype=F64)
    x_prev = torch.zeros(2, dtype=F64)
    half = T // 2
    for start, stop in ((0, half), (half, T)):
        cb = gen.cond_block(c, start, stop)
        for t in range(start, stop):
            params = gen.step(x_prev, cb[t - start], cache)
            x_prev = teacher.dist.sample(params[:, :, None], noise[:, :, t : t + 1])[:, 0]
            out[:, t] = x_prev
    assert cache.t == T
    torch.testing.assert_close(out, full, atol=1e-9, rtol=0)
    cache.reset()
    assert cache.t == 0 and all(not b.any() for b in cache.buffers)


def test_generation_cache_run_continues():
    """``CachedGenerator.run(..., cache=...)`` on the second half continues the first half's run.

    The cache holds the layer queues and the time step; the previous sample
    (the network's next input) has to carry over too.
    """
    teacher = tiny_teacher("mol", 2)
    frames = 12
    mel = random_mel(2, frames)
    T = frames * teacher.hop
    noise = teacher.make_noise(2, T, seed=4, dtype=F64)
    gen = CachedGenerator(teacher)
    with torch.no_grad():
        c = teacher.condition(mel)
    full = gen.run(c, noise)
    half = 5 * teacher.hop
    cache = gen.new_cache(2)
    first = gen.run(c[:, :, :half], noise[:, :, :half], cache=cache)
    second = gen.run(c[:, :, half:], noise[:, :, half:], cache=cache)
    assert cache.t == T
    torch.testing.assert_close(first, full[:, :half], atol=1e-9, rtol=0)
    torch.testing.assert_close(second, full[:, half:], atol=1e-9, rtol=0)


def test_generate_float32_close_to_float64():
    teacher = tiny_teacher("gaussian", 2)
    mel = random_mel(1, 8)
    noise = teacher.make_noise(1, 8 * teacher.hop, seed=1, dtype=F64)
    y64 = teacher.generate(mel, noise=noise)
    t32 = teacher.float()
    y32 = t32.generate(mel.float(), noise=noise.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize("output", ["mol", "gaussian"])
def test_log_prob_matches_distribution(output):
    teacher = tiny_teacher(output, 2).float()
    frames = 9
    mel = random_mel(2, frames).float()
    audio = quantize(random_audio(2, frames * teacher.hop).float())
    audio[0, :5] = 1.0  # edge codes included
    audio[1, -5:] = -1.0
    lp = teacher.log_prob(audio, mel)
    assert lp.shape == (2, frames * teacher.hop)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    x = quantize(audio)
    expect = teacher.dist.log_prob_discrete(teacher(x, mel), x)
    assert torch.equal(lp, expect)
    # unquantised input is scored as its 16-bit code
    off = audio + 0.3 * (2 / 65535) * (torch.rand(audio.shape, generator=torch.Generator().manual_seed(3)) - 0.5)
    assert torch.equal(teacher.log_prob(off, mel), lp)
    ld = teacher.log_density(x, mel)
    assert ld.shape == lp.shape and torch.isfinite(ld).all()


def test_log_prob_backpropagates_to_every_parameter():
    """Every parameter must take part in the loss (unused parameters also break DistributedDataParallel)."""
    teacher = tiny_teacher("mol", 2, n_speakers=2).float().train()
    mel = random_mel(2, 5).float()
    audio = random_audio(2, 5 * teacher.hop).float()
    loss = -teacher.log_prob(audio, mel, torch.tensor([0, 1])).mean()
    loss.backward()
    for name, p in teacher.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
