"""Teacher noise injection (``teacher.input_noise``, LPCNet's teacher-forcing aid): the history is noisy, the
target clean, and only training adds the noise."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_train import make_cache, write_config
from test_linear_prediction import TINY, speechy_mel, tiny_teacher
from wavedistill.config import TeacherConfig
from wavedistill.errors import UserError
from wavedistill.nn.distributions import quantize
from wavedistill.train.teacher import LN2, MU, mu_law_noise, teacher_nll_bits, train_teacher, validate


def mu_law(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(MU * x.abs()) / math.log1p(MU)


def test_zero_noise_is_the_identity():
    x = torch.linspace(-1, 1, 101)
    assert mu_law_noise(x, 0.0) is x


def test_noise_has_the_asked_std_in_the_mu_law_domain_and_grows_with_amplitude():
    torch.manual_seed(0)
    std = 0.01
    for level in (0.0, 0.02, 0.5):
        x = torch.full((200_000,), level, dtype=torch.float64)
        y = mu_law_noise(x, std)
        assert y.abs().max() <= 1.0
        d = mu_law(y) - mu_law(x)
        assert abs(float(d.mean())) < 2e-4 and abs(float(d.std()) - std) < 2e-4, level
    # in linear units: ~std / (mu / ln(1 + mu)) near silence, several times more at half scale
    quiet = (mu_law_noise(torch.zeros(100_000), std)).std()
    loud = (mu_law_noise(torch.full((100_000,), 0.5), std) - 0.5).std()
    assert math.isclose(float(quiet), std * math.log1p(MU) / MU, rel_tol=0.05)
    assert float(loud) > 50 * float(quiet)


def test_noisy_history_clean_target():
    """The loss is -log p(x_t | noisy x_<t), the prediction included: equal to scoring x with the parameters
    computed from the noisy input, and different from the clean NLL."""
    t = tiny_teacher(lpc_order=4, preemphasis=0.8).float()
    mel = speechy_mel(8).float()
    audio = 0.3 * torch.sin(torch.arange(48) * 0.7)[None]
    x = quantize(audio)
    torch.manual_seed(3)
    got = teacher_nll_bits(t, audio, mel, 0, input_noise=0.05)
    torch.manual_seed(3)
    noisy = mu_law_noise(x, 0.05)
    want = -t.dist.log_prob_discrete(t(noisy, mel), x).mean() / LN2
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    clean = teacher_nll_bits(t, audio, mel, 0)
    assert not torch.allclose(got, clean)
    # the parameters at t read only the noisy x_<t: changing the noisy x_t itself changes nothing at t
    bumped = noisy.clone()
    bumped[0, 20] += 0.1
    p0, p1 = t(noisy, mel), t(bumped, mel)
    torch.testing.assert_close(p0[..., :21], p1[..., :21], rtol=0, atol=0)
    assert not torch.allclose(p0[..., 21:], p1[..., 21:])


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_bad_input_noise_is_a_user_error(value):
    with pytest.raises(UserError, match="teacher.input_noise"):
        TeacherConfig(input_noise=value).validate(TINY)


def test_training_with_noise_injection(tmp_path):
    """A short run with input noise trains (finite training and validation figures), the setting is kept in the
    checkpoint, and two validations under different RNG states agree (validation adds no noise)."""
    from wavedistill.checkpoint import load_model
    from wavedistill.config import load_config
    from wavedistill.data.cache import FeatureCache

    _, cache = make_cache(tmp_path, n=6)
    cfg = write_config(tmp_path / "t.yaml", teacher={"input_noise": 0.02}, train={"valid_every": 2, "save_every": 2})
    out = train_teacher(cfg, cache, tmp_path / "exp", max_steps=2)
    assert out["step"] == 2
    assert math.isfinite(out["valid_bits"]) and math.isfinite(out["history"][0]["train_bits"])
    model, _, _ = load_model(tmp_path / "exp" / "checkpoints" / "latest", kind="teacher")
    assert model.cfg.input_noise == 0.02
    fc = FeatureCache(cache)
    valid = [(u, *fc.load(u)) for u in fc.ids("valid")]
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(validate(model, valid, load_config(cfg).train, model.cond.frame_context, "cpu"))
    assert runs[0] == runs[1] and math.isclose(runs[0], out["valid_bits"], rel_tol=1e-5)


def test_training_steps_pass_the_configured_noise_on(tmp_path, monkeypatch):
    """The training objective scores its batches with ``teacher.input_noise`` (and only training batches do)."""
    import wavedistill.train.teacher as teacher_mod

    seen = []
    real = teacher_mod.teacher_nll_bits

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("input_noise", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_mod, "teacher_nll_bits", spy)
    _, cache = make_cache(tmp_path, n=6)
    cfg = write_config(tmp_path / "t.yaml", teacher={"input_noise": 0.02}, train={"valid_every": 100, "save_every": 100})
    train_teacher(cfg, cache, tmp_path / "exp", max_steps=2)
    # two training steps with the noise, then the final validation without it
    assert seen[:2] == [0.02, 0.02] and len(seen) > 2 and all(v == 0.0 for v in seen[2:])
