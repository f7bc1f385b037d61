"""The coupling-flow vocoder (WaveGlow family): invertibility, log-determinant, the dequantized bound,
chunked synthesis, and training + resume + ``wavedistill synthesize`` end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import speech_like
from helpers_train import cli, make_cache, write_config
from wavedistill.checkpoint import load_model, read_checkpoint_config
from wavedistill.config import CouplingConfig, FeatureConfig, load_config
from wavedistill.errors import UserError
from wavedistill.flows import UniformDequantizer
from wavedistill.inference.synthesis import Vocoder
from wavedistill.models.coupling import CouplingVocoder
from wavedistill.nn.distributions import quantize
from wavedistill.train.coupling import bits_per_sample, dequantize_audio

ALLISON = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
FEATURES = FeatureConfig(n_fft=256, win_length=200, hop_length=80, n_mels=16)
TINY_COUPLING = {"group": 4, "steps": 3, "early_every": 2, "early_channels": 1, "layers": 2, "residual_channels": 8,
                 "cond_channels": 4}


def lively(model: CouplingVocoder, seed: int = 0, scale: float = 0.05) -> CouplingVocoder:
    """Perturb every parameter (the zero-initialised coupling outputs included) so no step is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if hasattr(m, "initialized"):
                m.initialized.fill_(1)
    return model


def make_model(features=FEATURES, seed=0, dtype=torch.float32, **cfg) -> CouplingVocoder:
    c = CouplingConfig(**{**TINY_COUPLING, **cfg})
    c.validate(features)
    torch.manual_seed(seed)
    return lively(CouplingVocoder(c, features.n_mels, features), seed).to(dtype).eval()


def real_audio(seconds: float = 2.0, sample_rate: int = 8000) -> np.ndarray:
    """A few seconds of recorded speech when the Asterisk prompts are installed, else the synthetic helper."""
    files = sorted(ALLISON.glob("*.wav"))[:8] if ALLISON.is_dir() else []
    parts, n = [], 0
    for f in files:
        x, sr = sf.read(str(f), dtype="float32")
        if sr == sample_rate and x.ndim == 1:
            parts.append(x)
            n += x.shape[0]
        if n >= seconds * sample_rate:
            break
    if n < seconds * sample_rate:
        return speech_like(sample_rate, seconds=seconds, seed=3).astype(np.float32)
    return np.concatenate(parts)[: int(seconds * sample_rate)]


def test_inverse_of_forward_is_identity_on_real_audio():
    model = make_model(group=8, steps=4, early_every=2, early_channels=2, dtype=torch.float64)
    x = torch.from_numpy(real_audio(2.0)).double()[None]
    x = x[:, : x.shape[1] // 80 * 80]
    mel = torch.randn(1, 16, x.shape[1] // 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = model.condition(mel)
    with torch.no_grad():
        z, ladj = model.transform(x, c)
        back = model.inverse(z, c)
    assert z.shape == x.shape and ladj.shape == (1,)
    assert (z - x).abs().max() > 1e-2  # the flow does something
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)


def test_log_det_matches_autograd_jacobian():
    model = make_model(dtype=torch.float64, seed=2)  # group 4, 3 steps, one early output
    hop = FEATURES.hop_length
    mel = torch.randn(1, 16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    c = model.condition(mel)[:, :, :16]
    x = 0.3 * torch.randn(1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, ladj = model.transform(x, c)
    jac = torch.autograd.functional.jacobian(lambda v: model.transform(v[None], c)[0][0], x[0])
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(ladj[0], logabs, atol=1e-9, rtol=1e-9)
    assert abs(logabs.item()) > 0.1  # a non-trivial Jacobian
    assert hop % model.group == 0


def test_every_parameter_gets_a_gradient():
    model = make_model(seed=3).train()
    x = 0.1 * torch.randn(2, 160)
    mel = torch.randn(2, 16, 2)
    model(x, mel).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_dequantized_bound_is_above_the_exact_discrete_nll():
    """Group 2, two samples: the discrete probability of a bin square is a 2-D integral, computed by quadrature.

    A coarse grid (bin width 0.25) makes the gap between the bound and the exact NLL visible; the bound uses the
    same ``bits_per_element`` (with its −log w term) as training.  Without the −log w term the "bound" would be
    ~2 bits below the exact value and the test fails."""
    feats = FeatureConfig(n_fft=256, win_length=200, hop_length=2, n_mels=16, fmax=4000.0)
    model = make_model(feats, seed=5, dtype=torch.float64, group=2, steps=2, early_every=0, early_channels=0,
                       upsample_scales=[2])
    dq = UniformDequantizer(levels=8, scale=4.0, offset=-1.0)  # bins of width 0.25 on [-1, 1)
    mel = torch.randn(1, 16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    c = model.condition(mel)
    codes = torch.tensor([[3, 5]])
    n_grid = 200
    u = (torch.arange(n_grid, dtype=torch.float64) + 0.5) / n_grid
    uu = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        x = dq.dequantize(codes.expand(uu.shape[0], 2), uu)
        log_p = model.log_prob_from_cond(x, c.expand(x.shape[0], -1, -1))
    exact_bits = -(torch.logsumexp(log_p, 0) - math.log(len(log_p)) + 2 * dq.log_bin_width) / (2 * math.log(2))
    bound_bits = dq.bits_per_element(log_p, 2).mean()
    assert bound_bits >= exact_bits - 1e-9
    assert bound_bits - exact_bits < 0.5  # a bound, not a loose number
    assert -(log_p.mean()) / (2 * math.log(2)) < exact_bits - 1.0  # the −log w term matters here


def test_training_dequantization_stays_inside_the_bins():
    audio = torch.tensor([[-1.0, -0.5, 0.0, 0.3, 1.0]])
    x = dequantize_audio(audio, torch.Generator().manual_seed(0))
    w = 2 / 65535
    assert (x.double() - quantize(audio).double()).abs().max() <= w / 2 + 1e-7  # within the sample's 16-bit bin
    # the bound in bits/sample: continuous NLL plus −log2(w) ≈ 15 bits per sample
    assert bits_per_sample(torch.zeros(1, dtype=torch.float64), 5).item() == pytest.approx(-math.log2(w))


def test_chunked_synthesis_equals_unchunked():
    model = make_model(seed=7)
    voc = Vocoder(model, FEATURES, {"kind": "coupling"})
    mel = torch.randn(16, 37, generator=torch.Generator().manual_seed(8))
    whole = voc.synthesize(mel, seed=3)
    assert whole.shape == (37 * 80,)
    for chunk in (1, 5, 11):
        torch.testing.assert_close(voc.synthesize(mel, seed=3, chunk_frames=chunk), whole, atol=2e-5, rtol=0)
    assert not torch.allclose(voc.synthesize(mel, seed=4), whole)  # the seed matters
    # temperature σ scales the noise: σ = 0 is the deterministic "mean" path, same for every seed
    torch.testing.assert_close(voc.synthesize(mel, seed=1, temperature=0.0), voc.synthesize(mel, seed=2, temperature=0.0))


def test_config_refuses_a_group_that_does_not_divide_the_hop():
    with pytest.raises(UserError, match="multiple of coupling.group"):
        CouplingConfig(group=6).validate(FEATURES)
    with pytest.raises(UserError, match="fewer than 2"):
        CouplingConfig(group=4, steps=6, early_every=1, early_channels=1).validate(FEATURES)
    with pytest.raises(UserError, match="coupling.kernel_size"):
        load_config(None, ["coupling.kernel_size=2"])


def test_train_flow_resume_and_synthesize_cli(tmp_path):
    _, cache = make_cache(tmp_path, n=4)
    conf = write_config(tmp_path / "coupling.yaml", coupling=dict(TINY_COUPLING),
                        train={"max_steps": 2, "save_every": 2, "valid_every": 2, "log_every": 1})
    exp = tmp_path / "exp"
    run = cli("train-flow", "--config", conf, "--data", cache, "--out", exp)
    assert run.returncode == 0, run.stderr
    assert "bits/sample" in run.stdout
    again = cli("train-flow", "--config", conf, "--data", cache, "--out", exp, "--resume", "--max-steps", "3")
    assert again.returncode == 0, again.stderr
    latest = exp / "checkpoints" / "latest"
    assert latest.resolve().name == "step-00000003"
    cfg = read_checkpoint_config(latest)
    assert cfg["kind"] == "coupling" and cfg["model"]["group"] == 4
    model, _, _ = load_model(latest)
    assert isinstance(model, CouplingVocoder)
    assert all(bool(m.initialized) for m in model.modules() if hasattr(m, "initialized"))  # ActNorm was initialised
    wav = tmp_path / "in.wav"
    sf.write(str(wav), speech_like(8000, seconds=0.5, seed=2), 8000, subtype="PCM_16")
    out = tmp_path / "out"
    syn = cli("synthesize", "--checkpoint", latest, "--out-dir", out, "--seed", "1", wav)
    assert syn.returncode == 0, syn.stderr
    y, sr = sf.read(str(next(out.glob("*.wav"))))
    assert sr == 8000 and y.shape[0] == 4000 // 80 * 80 and np.isfinite(y).all()
    bad = cli("train-flow", "--config", conf, "--data", tmp_path / "missing", "--out", tmp_path / "exp2")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_likelihood_table_baseline_and_coupling_bound():
    from wavedistill.eval.likelihood import gaussian_baseline_bits, model_bits

    sd = 0.1
    audio = sd * torch.randn(32000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = 0.5 * math.log2(2 * math.pi * math.e * sd * sd) - math.log2(2 / 65535)  # differential entropy − log2 w
    assert gaussian_baseline_bits(audio, 8000, 80) == pytest.approx(expected, abs=0.01)
    model = make_model(seed=11)
    voc = Vocoder(model, FEATURES, {"kind": "coupling"})
    a = 0.1 * torch.randn(800, generator=torch.Generator().manual_seed(10))
    mel = torch.randn(16, 10)
    bits = model_bits(voc, a, mel, seed=0)
    x = dequantize_audio(a[None], torch.Generator().manual_seed(0))
    assert bits == pytest.approx(bits_per_sample(model(x, mel[None]), 800).item(), rel=1e-6)
    student_like = Vocoder(model, FEATURES, {"kind": "coupling"})
    student_like.model = type("S", (), {"kind": "student", "cfg": None})()
    assert model_bits(student_like, a, mel) is None


def test_flow_kl_estimator_on_gaussian_pairs_matches_the_closed_form():
    """q = N(μq, σq²) as a flow x = μq + σq·z (log-det Σ log σq), p = N(μp, σp²): the estimator's KL, cross-entropy
    and entropy against their closed forms (an entropy counted twice, CE − 2H, is off by ~H and fails)."""
    from wavedistill.train.losses import flow_kl_terms, gaussian_kl

    g = torch.Generator().manual_seed(12)
    d, n = 8, 40000
    mu_q, ls_q = torch.randn(d, generator=g, dtype=torch.float64), 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    mu_p, ls_p = torch.randn(d, generator=g, dtype=torch.float64), 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = mu_q + torch.exp(ls_q) * z
    ladj_inv = ls_q.sum().expand(n)
    log_p = (-0.5 * ((x - mu_p) / torch.exp(ls_p)) ** 2 - ls_p - 0.5 * math.log(2 * math.pi)).sum(-1)
    kl, ce, h = flow_kl_terms(ladj_inv, log_p, d)
    want_kl = gaussian_kl(mu_q, ls_q, mu_p, ls_p).sum().item() / d
    want_h = (ls_q + 0.5 * math.log(2 * math.pi * math.e)).sum().item() / d
    stderr = kl.std().item() / math.sqrt(n)
    assert h.mean().item() == pytest.approx(want_h, abs=1e-12)  # entropy from the log-det: exact
    assert abs(kl.mean().item() - want_kl) < 5 * stderr + 1e-9
    assert ce.mean().item() == pytest.approx(want_kl + want_h, abs=5 * stderr + 1e-9)


def test_sampling_log_det_is_minus_the_density_log_det():
    model = make_model(seed=13, dtype=torch.float64)
    mel = torch.randn(2, 16, 3, dtype=torch.float64)
    c = model.condition(mel)
    z = torch.randn(2, 240, dtype=torch.float64)
    x, ladj_inv = model.inverse_and_log_det(z, c)
    z2, ladj = model.transform(x, c)
    torch.testing.assert_close(z2, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9, rtol=0)
    assert ladj_inv.abs().min() > 1e-3


def test_distill_teacher_into_the_flow_cli(tmp_path):
    _, cache = make_cache(tmp_path, n=4)
    conf = write_config(tmp_path / "c.yaml", coupling=dict(TINY_COUPLING),
                        train={"max_steps": 2, "save_every": 2, "valid_every": 2, "log_every": 1})
    teacher = tmp_path / "teacher"
    assert cli("train-teacher", "--config", conf, "--data", cache, "--out", teacher, "--max-steps", "1").returncode == 0
    exp = tmp_path / "flow"
    run = cli("train-flow", "--config", conf, "--data", cache, "--out", exp, "--teacher", teacher)
    assert run.returncode == 0, run.stderr
    assert "kl" in run.stdout and "ce" in run.stdout and "bits/sample" in run.stdout
    cfg = read_checkpoint_config(exp / "checkpoints" / "latest")
    assert cfg["kind"] == "coupling" and cfg["teacher"] == str(teacher)
    bad = cli("train-flow", "--config", conf, "--data", cache, "--out", tmp_path / "flow2", "--teacher", tmp_path / "nope")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
