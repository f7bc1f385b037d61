"""Source-filter structure: LP from the mel, the LP recurrence and its adjoint, LP/pre-emphasis flows,
and the teacher and student with them (likelihood, generation, Jacobian, chunking)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wavedistill.config import FeatureConfig, StudentConfig, TeacherConfig
from wavedistill.data.audio import MelExtractor
from wavedistill.data.lpc import MelLPC, combine_preemphasis, levinson
from wavedistill.errors import UserError
from wavedistill.flows import Deemphasis, LPCoefficients, LPSynthesis, SourceFilterContext, lp_prediction
from wavedistill.inference.synthesis import Vocoder
from wavedistill.kernels import lp_recurrence
from wavedistill.models.student import Student
from wavedistill.models.teacher import Teacher
from wavedistill.nn.distributions import quantize

F64 = torch.float64
TINY = FeatureConfig(sample_rate=8000, n_fft=64, win_length=48, hop_length=6, n_mels=5, fmin=0.0, fmax=4000.0)


def naive_recurrence(e, coef, history=None):
    """``y_t = e_t + Σ_k coef[:, t, k]·y_{t-1-k}`` one step at a time (autograd reference)."""
    B, T = e.shape
    p = coef.shape[2]
    ys = []
    for t in range(T):
        acc = e[:, t]
        for k in range(p):
            s = t - 1 - k
            if s >= 0:
                acc = acc + coef[:, t, k] * ys[s]
            elif history is not None:
                acc = acc + coef[:, t, k] * history[:, -s - 1]
        ys.append(acc)
    return torch.stack(ys, 1)


def stable_coefficients(B, F, p, seed=0, bound=0.9):
    """Random per-frame predictors with reflection coefficients in (-bound, bound): each frame's filter is stable."""
    g = torch.Generator().manual_seed(seed)
    k = (torch.rand(B, F, p, generator=g, dtype=F64) * 2 - 1) * bound
    a = torch.zeros(B, F, 0, dtype=F64)
    for i in range(p):  # step-up recursion
        a = torch.cat([a - k[..., i : i + 1] * a.flip(-1), k[..., i : i + 1]], dim=-1)
    return a


@pytest.mark.parametrize("path", ["compiled", "blocked"])
def test_recurrence_matches_naive_loop_and_gradcheck(path, monkeypatch):
    if path == "compiled" and not lp_recurrence.compiled_available():
        pytest.skip(f"compiled LP recurrence unavailable: {lp_recurrence.build_error()}")
    if path == "blocked":
        monkeypatch.setenv("WAVEDISTILL_LP_RECURRENCE", "blocked")
    B, T, p, hop, start = 2, 53, 4, 7, 3
    a = stable_coefficients(B, 9, p)
    g = torch.Generator().manual_seed(1)
    e = torch.randn(B, T, generator=g, dtype=F64)
    hist = torch.randn(B, p, generator=g, dtype=F64)
    coef = LPCoefficients(a, hop, start).per_sample(T, B)
    torch.testing.assert_close(lp_recurrence.lp_synthesis(e, a, hop, start, hist), naive_recurrence(e, coef, hist),
                               atol=1e-12, rtol=0)
    # The adjoint equals autograd through the naive loop, and passes gradcheck.
    w = torch.randn(B, T, generator=g, dtype=F64)
    e1 = e.clone().requires_grad_()
    (naive_recurrence(e1, coef, hist) * w).sum().backward()
    e2 = e.clone().requires_grad_()
    (lp_recurrence.lp_synthesis(e2, a, hop, start, hist) * w).sum().backward()
    torch.testing.assert_close(e2.grad, e1.grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x: lp_recurrence.lp_synthesis(x, a, hop, start, hist),
                                    (e[:, :20].clone().requires_grad_(),))


def test_blocked_equals_compiled_on_a_long_float32_signal(monkeypatch):
    if not lp_recurrence.compiled_available():
        pytest.skip(f"compiled LP recurrence unavailable: {lp_recurrence.build_error()}")
    T, hop = 40_000, 80
    a = stable_coefficients(1, T // hop + 1, 16, seed=3, bound=0.5).float()  # switching frames stays bounded
    e = torch.randn(2, T, generator=torch.Generator().manual_seed(4))
    y_c = lp_recurrence.lp_synthesis(e, a, hop)
    monkeypatch.setenv("WAVEDISTILL_LP_RECURRENCE", "blocked")
    y_b = lp_recurrence.lp_synthesis(e, a, hop)
    assert y_c.abs().max() > 1.0
    torch.testing.assert_close(y_b, y_c, atol=2e-4 * float(y_c.abs().max()), rtol=0)


def test_lpc_from_the_mel_of_an_ar_process_recovers_its_coefficients():
    """AR(2) with poles at radius 0.9, 600 Hz and radius 0.7, 2 kHz; 4 s at 8 kHz, demo features.

    The mel (64 bands) keeps this smooth spectrum, but the Hann window, the lag window and the −40 dB floor
    bias the estimate slightly: the frame-median coefficients must lie within 0.08 of the truth, and the
    gain from the mel's predictor within 0.3 dB of the true predictor's (a wrong mel inversion — magnitude
    taken as power, missing floor — misses both by far)."""
    feats = FeatureConfig()
    poles = [0.9 * np.exp(2j * np.pi * 600 / 8000), 0.7 * np.exp(2j * np.pi * 2000 / 8000)]
    poly = np.real(np.poly(poles + [np.conj(q) for q in poles]))  # 1 + c1 z^-1 + ...
    true = torch.tensor(-poly[1:], dtype=F64)
    rng = np.random.default_rng(0)
    e = rng.standard_normal(32000 + 1000) * 0.01
    x = np.zeros_like(e)
    for t in range(len(e)):
        x[t] = e[t] + sum(true[k].item() * x[t - 1 - k] for k in range(4) if t - 1 - k >= 0)
    x = torch.tensor(x[1000:], dtype=torch.float32)
    mel = MelExtractor(feats)(x[None])
    a, k = MelLPC(feats, 4)(mel, return_reflection=True)
    assert (k.abs() < 1).all()
    med = a[0].median(dim=0).values
    assert (med - true).abs().max() < 0.08, (med, true)
    x64 = x[None].double()
    gain = lambda pred: 10 * math.log10(float((x64 ** 2).sum() / ((x64 - pred) ** 2).sum()))
    g_true = gain(lp_prediction(x64, true.view(1, 1, 4), 80))
    g_mel = gain(lp_prediction(x64, a, 80))
    assert g_true > 8 and g_mel > g_true - 0.3, (g_mel, g_true)


@pytest.mark.parametrize("kind", ["floor", "random", "loud"])
def test_reflection_coefficients_stay_inside_the_unit_circle(kind):
    feats = FeatureConfig()
    g = torch.Generator().manual_seed(0)
    mel = {"floor": torch.full((2, 64, 5), math.log(feats.log_floor)),
           "random": torch.randn(2, 64, 50, generator=g) * 6 - 4,
           "loud": torch.randn(2, 64, 5, generator=g) + 8}[kind]
    a, k = MelLPC(feats, 16, 0.85)(mel, return_reflection=True)
    assert torch.isfinite(a).all() and (k.abs() < 1).all()


def test_levinson_solves_the_normal_equations():
    r = torch.tensor([2.0, 1.2, 0.5, 0.1, -0.05], dtype=F64)
    a, _, err = levinson(r, 4)
    Rm = torch.stack([torch.stack([r[abs(i - j)] for j in range(4)]) for i in range(4)])
    torch.testing.assert_close(Rm @ a, r[1:], atol=1e-12, rtol=0)
    torch.testing.assert_close(err, r[0] - (a * r[1:]).sum(), atol=1e-12, rtol=0)


def test_combined_predictor_equals_lp_of_the_preemphasised_signal_then_deemphasis():
    a = stable_coefficients(1, 3, 4)
    x = torch.randn(1, 40, dtype=F64, generator=torch.Generator().manual_seed(2))
    s = x - 0.85 * torch.nn.functional.pad(x[:, :-1], (1, 0))
    want = 0.85 * torch.nn.functional.pad(x[:, :-1], (1, 0)) + lp_prediction(s, a, 16)
    torch.testing.assert_close(lp_prediction(x, combine_preemphasis(a, 0.85), 16), want, atol=1e-12, rtol=0)


def test_analysis_after_synthesis_is_the_identity_and_logdet_is_zero():
    B, T = 2, 90
    lpc = LPCoefficients(stable_coefficients(B, 6, 5), 16, 8, torch.randn(B, 5, dtype=F64))
    ctx = SourceFilterContext(None, lpc, torch.randn(B, 1, dtype=F64))
    e = torch.randn(B, T, dtype=F64, generator=torch.Generator().manual_seed(3))
    for flow in (LPSynthesis(), Deemphasis(0.9)):
        x, ladj = flow(e, ctx)
        back, ladj_inv = flow.inverse(x, ctx)
        torch.testing.assert_close(back, e, atol=1e-10, rtol=0)
        assert ladj.abs().max() == 0 and ladj_inv.abs().max() == 0
        pre, _ = flow.inv(x, ctx)  # pre-emphasis / LP analysis as flows of their own
        torch.testing.assert_close(pre, e, atol=1e-10, rtol=0)


def tiny_student(lpc_order=4, preemphasis=0.8, seed=0):
    cfg = StudentConfig(flow_layers=[3, 3], stacks_per_flow=[1, 1], kernel_size=2, residual_channels=6,
                        gate_channels=8, cond_channels=4, upsample_scales=[2, 3], init_log_scale=-1.0,
                        lpc_order=lpc_order, preemphasis=preemphasis)
    cfg.validate(TINY)
    torch.manual_seed(seed)
    s = Student(cfg, TINY.n_mels, TINY).double().eval()
    with torch.no_grad():
        for f in s.flow.flows[: s.n_iaf]:
            torch.nn.init.normal_(f.net.head2.weight, std=0.3)
    return s


def tiny_teacher(lpc_order=4, preemphasis=0.8, output="mol", seed=0):
    cfg = TeacherConfig(layers=4, stacks=2, kernel_size=2, residual_channels=6, gate_channels=8, skip_channels=6,
                        cond_channels=4, upsample_scales=[2, 3], output=output, mixtures=3, log_scale_min=-9.0,
                        lpc_order=lpc_order, preemphasis=preemphasis)
    cfg.validate(TINY)
    torch.manual_seed(seed)
    t = Teacher(cfg, TINY.n_mels, TINY).double().eval()
    with torch.no_grad():
        for p in t.net.parameters():
            p.mul_(1.5)
    return t


def speechy_mel(frames, batch=1, seed=1):
    return torch.randn(batch, TINY.n_mels, frames, generator=torch.Generator().manual_seed(seed), dtype=F64) - 3.0


def test_student_jacobian_is_lower_triangular_with_diagonal_exp_log_s():
    s = tiny_student()
    mel = speechy_mel(4)
    z = torch.randn(1, 24, dtype=F64, generator=torch.Generator().manual_seed(5))
    J = torch.autograd.functional.jacobian(lambda q: s(q, mel)[0][0], z)[:, 0]  # [T, T]
    _, mu, log_s = s(z, mel)
    assert J.triu(1).abs().max() == 0
    torch.testing.assert_close(torch.diagonal(J), torch.exp(log_s[0]), atol=1e-12, rtol=0)
    assert J.tril(-1).abs().max() > 1e-2  # the filter flows really are in the chain
    # x_t = μ_tot,t + s_tot,t·z_t with μ_tot including the filters' prediction
    x, _, _ = s(z, mel)
    torch.testing.assert_close(x, mu + torch.exp(log_s) * z, atol=1e-12, rtol=0)
    # and the sequential inverse recovers z, so log_prob is the exact density
    torch.testing.assert_close(s.log_prob(x, mel), s.base_log_prob(z) - log_s, atol=1e-9, rtol=0)


def test_student_chunked_synthesis_equals_unchunked():
    s = tiny_student().float()
    voc = Vocoder(s, TINY, {})
    mels = [speechy_mel(23, seed=7)[0].float(), speechy_mel(17, seed=8)[0].float()]
    whole = voc.synthesize_items(mels, seed=3, rows=[0, 1])
    for chunk in (1, 4, 9):
        parts = voc.synthesize_items(mels, seed=3, rows=[0, 1], chunk_frames=chunk)
        for w, p in zip(whole, parts):
            torch.testing.assert_close(p, w, atol=1e-5, rtol=0)


def test_teacher_parallel_likelihood_equals_step_by_step_scoring():
    t = tiny_teacher()
    mel = speechy_mel(5, batch=2)
    audio = torch.rand(2, 30, dtype=F64, generator=torch.Generator().manual_seed(4)) * 1.6 - 0.8
    x = quantize(audio)  # float64 codes: the parallel pass below runs in float64 throughout
    parallel = t.dist.log_prob_discrete(t(x, mel), x)
    torch.testing.assert_close(t.log_prob(audio, mel), parallel, atol=1e-5, rtol=0)  # log_prob: float32 codes
    c = t.condition(mel)
    coef = t.source.predictor(mel, dtype=F64).per_sample(30, 2)
    x_in = torch.nn.functional.pad(x[:, :-1], (1, 0)).unsqueeze(1)
    seq = []
    for step in range(30):
        params = t.net(x_in[:, :, : step + 1], c[:, :, : step + 1])[:, :, -1:]
        pred = sum(coef[:, step, k] * x[:, step - 1 - k] for k in range(coef.shape[2]) if step - 1 - k >= 0)
        params = t.dist.shift(params, torch.as_tensor(pred, dtype=F64).expand(2)[:, None])
        seq.append(t.dist.log_prob_discrete(params, x[:, step : step + 1])[:, 0])
    torch.testing.assert_close(parallel, torch.stack(seq, 1), atol=1e-9, rtol=0)
    plain = tiny_teacher(0, 0.0)
    assert (parallel - plain.log_prob(audio, mel)).abs().max() > 1e-3  # the prediction changes the scores


@pytest.mark.parametrize("output", ["mol", "gaussian"])
def test_teacher_cached_generation_equals_naive_and_chunks(output):
    t = tiny_teacher(output=output)
    mel = speechy_mel(6, batch=2, seed=2)
    noise = t.make_noise(2, 36, seed=5, dtype=F64)
    naive = t.generate_naive(mel, noise=noise)
    cached = t.generate(mel, noise=noise, fast=False)
    torch.testing.assert_close(cached, naive, atol=1e-9, rtol=0)
    assert naive.abs().max() > 1e-3
    assert t.generate(mel, noise=noise) is not None  # fast=None falls back to the Python generator
    with pytest.raises(ValueError, match="linear prediction"):
        t.generate(mel, noise=noise, fast=True)
    # the Vocoder's chunks carry the LP history in the cache
    voc = Vocoder(t, TINY, {})
    items = [mel[0], mel[1, :, :4]]
    whole = voc.synthesize_items(items, seed=2, rows=[0, 1])
    parts = voc.synthesize_items(items, seed=2, rows=[0, 1], chunk_frames=2)
    for w, p in zip(whole, parts):
        torch.testing.assert_close(p, w, atol=1e-9, rtol=0)


def test_features_off_leave_models_unchanged():
    assert tiny_student(0, 0.0).source is None and tiny_teacher(0, 0.0).source is None
    assert set(tiny_student().state_dict()) == set(tiny_student(0, 0.0).state_dict())
    assert set(tiny_teacher().state_dict()) == set(tiny_teacher(0, 0.0).state_dict())


@pytest.mark.parametrize("key,value", [("lpc_order", -1), ("lpc_order", 2.5), ("lpc_order", 40), ("preemphasis", 1.0),
                                       ("preemphasis", -0.1)])
def test_bad_source_filter_config_is_a_user_error(key, value):
    for cls in (TeacherConfig, StudentConfig):
        cfg = cls(**{key: value})
        with pytest.raises(UserError, match=key):
            cfg.validate(TINY)
