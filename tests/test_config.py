"""Recipe configs: YAML files onto dataclasses, typed overrides, one-line UserErrors."""

from __future__ import annotations

import math
import tempfile

import pytest
import yaml
from hypothesis import configuration as _hypothesis_configuration
from hypothesis import given, settings
from hypothesis import strategies as st

# keep hypothesis's cache (it writes one while collecting) out of the source tree
_hypothesis_configuration.set_hypothesis_home_dir(tempfile.mkdtemp(prefix="wavedistill-hypothesis-"))

from wavedistill.config import Config, TeacherConfig, load_config
from wavedistill.errors import UserError

RECIPE = {
    "features": {"sample_rate": 8000, "hop_length": 80, "n_mels": 32},
    "teacher": {"layers": 8, "stacks": 2, "residual_channels": 16, "upsample_scales": [4, 4, 5], "output": "gaussian"},
    "train": {"lr": 0.002, "batch_size": 3},
}


def write_yaml(tmp_path, data, name: str = "conf.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def assert_one_line(e: pytest.ExceptionInfo) -> None:
    msg = str(e.value)
    assert msg and "\n" not in msg.strip(), msg


def test_load_config_from_yaml(tmp_path):
    cfg = load_config(write_yaml(tmp_path, RECIPE))
    assert isinstance(cfg, Config)
    assert cfg.features.n_mels == 32 and cfg.features.hop_length == 80
    assert cfg.teacher.layers == 8 and cfg.teacher.output == "gaussian"
    assert cfg.teacher.upsample_scales == [4, 4, 5]
    assert cfg.train.lr == 0.002 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 3
    # untouched keys keep their defaults
    assert cfg.teacher.gate_channels == TeacherConfig().gate_channels
    assert cfg.student == Config().validate().student


def test_int_given_for_float_becomes_float(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"train": {"lr": 1}}))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_empty_file_and_no_file_give_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == Config().validate()
    assert load_config(None) == Config().validate()


def test_repo_recipes_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    "override,section,key,value",
    [
        ("train.lr=0.0003", "train", "lr", 3e-4),
        ("train.lr=3e-4", "train", "lr", 3e-4),
        ("train.lr=1e-3", "train", "lr", 1e-3),
        ("train.lr=2.5E-5", "train", "lr", 2.5e-5),
        ("teacher.layers=10", "teacher", "layers", 10),
        ("teacher.upsample_scales=[4,4,5]", "teacher", "upsample_scales", [4, 4, 5]),
        ("teacher.upsample_scales=[2, 8, 5]", "teacher", "upsample_scales", [2, 8, 5]),
        ("teacher.output=gaussian", "teacher", "output", "gaussian"),
        ("train.mixed_precision=bf16", "train", "mixed_precision", "bf16"),
        ("features.fmin=0", "features", "fmin", 0.0),
    ],
)
def test_override_accepted(override, section, key, value):
    cfg = load_config(None, [override])
    got = getattr(getattr(cfg, section), key)
    assert got == value
    assert type(got) is type(value)


def test_override_applies_on_top_of_file(tmp_path):
    cfg = load_config(write_yaml(tmp_path, RECIPE), ["teacher.layers=12", "train.batch_size=7"])
    assert cfg.teacher.layers == 12 and cfg.train.batch_size == 7
    assert cfg.teacher.residual_channels == 16  # from the file
    assert cfg.train.lr == 0.002


def test_later_override_wins():
    assert load_config(None, ["train.batch_size=2", "train.batch_size=5"]).train.batch_size == 5


@pytest.mark.parametrize(
    "override",
    [
        "teacher.layers=ten",
        "teacher.layers=1.5",
        "teacher.layers=10.0",
        "teacher.layers=true",  # bool is not an int
        "teacher.layers=",
        "teacher.layers=[10]",
        "train.lr=true",  # nor a float
        "train.lr=fast",
        "train.lr=.nan",
        "train.lr=.inf",
        "train.lr=1" + "0" * 400,  # an int too large for a float
        "train.bogus=1",
        "bogus.x=1",
        "teacher=1",
        "teacher.layers",
        "a.b.c=1",
        "teacher.output=foo",
        "teacher.output=1",
        "teacher.upsample_scales=[4,4]",
        "teacher.upsample_scales=4",
        "teacher.upsample_scales=[4,4,5.0]",
        "teacher.upsample_scales=[4,-4,-5]",
        "teacher.residual_channels=-8",
        "teacher.residual_channels=0",
        "teacher.layers=-20",
        "train.batch_size=-1",
        "train.segment_samples=0",
        "features.hop_length=-80",
        "features.n_mels=-64",
        "train.lr=-0.001",
        "teacher.n_speakers=-1",
        "teacher.layers=7",  # not a multiple of stacks
        "teacher.gate_channels=15",
        "teacher.kernel_size=4",
        "train.ema_decay=1.0",
    ],
)
def test_override_rejected(override):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert_one_line(e)


def test_unknown_key_message_names_the_key():
    with pytest.raises(UserError, match="train.bogus"):
        load_config(None, ["train.bogus=1"])
    with pytest.raises(UserError, match="bogus"):
        load_config(None, ["bogus.x=1"])


def test_literal_message_lists_choices():
    with pytest.raises(UserError) as e:
        load_config(None, ["teacher.output=foo"])
    assert "mol" in str(e.value) and "gaussian" in str(e.value)


def test_hop_mismatch_message(tmp_path):
    with pytest.raises(UserError, match="hop_length"):
        load_config(None, ["teacher.upsample_scales=[4,4]"])
    # explicit scales in a file and a changed hop disagree; changing both is fine
    path = write_yaml(tmp_path, RECIPE)
    with pytest.raises(UserError, match="hop_length"):
        load_config(path, ["features.hop_length=100"])
    cfg = load_config(path, ["features.hop_length=100", "teacher.upsample_scales=[4,5,5]"])
    assert cfg.features.hop_length == 100 and cfg.teacher.upsample_scales == [4, 5, 5]


@pytest.mark.parametrize("hop", [1, 2, 7, 16, 80, 100, 120, 160, 200, 240, 256, 300, 441, 512])
def test_empty_upsample_scales_are_derived_from_hop(hop):
    cfg = load_config(None, [f"features.hop_length={hop}", f"features.n_fft={max(512, hop)}", f"features.win_length={hop}"])
    for scales in (cfg.teacher.upsample_scales, cfg.student.upsample_scales):
        assert math.prod(scales) == hop
        assert all(isinstance(s, int) and s >= 1 for s in scales)
        if hop > 1:
            assert all(s > 1 for s in scales)
        largest_prime = max((p for p in range(2, hop + 1) if hop % p == 0 and all(p % q for q in range(2, p))), default=1)
        assert max(scales) <= max(8, largest_prime)


def test_auto_upsample_scales_documented_examples():
    """The docstring promises 80 → [4, 4, 5] and 256 → [4, 8, 8]."""
    from wavedistill.config import auto_upsample_scales

    assert auto_upsample_scales(80) == [4, 4, 5]
    assert auto_upsample_scales(256) == [4, 8, 8]


@pytest.mark.parametrize(
    "text",
    [
        "teacher: [1, 2\n",  # invalid YAML
        "teacher:\n  layers: 10\n layers: 3\n",  # bad indentation
        "- 1\n- 2\n",  # a list at top level
        "just a string\n",
        "teacher: 5\n",  # section is not a mapping
        "teacher:\n  - layers\n",
        "teacher:\n  layers: ten\n",
        "teacher:\n  layers: true\n",
        "teacher:\n  bogus: 1\n",
        "bogus:\n  x: 1\n",
        "train:\n  lr: -1.0\n",
        "teacher:\n  upsample_scales: [4, 4]\n",
        "teacher: !!python/object/apply:os.system ['true']\n",
    ],
)
def test_bad_files_rejected(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert_one_line(e)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError):
        load_config(tmp_path)  # a directory


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"teacher:\n  layers: \xff\xfe\n")
    with pytest.raises(UserError):
        load_config(path)


def test_yaml_exponent_floats_in_files(tmp_path):
    """``lr: 3e-4`` is how people write learning rates; it must load as a float."""
    cfg = load_config(write_yaml(tmp_path, "train:\n  lr: 3e-4\n  min_lr_ratio: 5e-2\n"))
    assert cfg.train.lr == 3e-4 and cfg.train.min_lr_ratio == 0.05


def test_validate_is_rerun_on_loaded_values(tmp_path):
    # every section is validated, including ones the file does not mention
    with pytest.raises(UserError):
        load_config(write_yaml(tmp_path, {"features": {"win_length": 1024, "n_fft": 512}}))
    with pytest.raises(UserError):
        load_config(write_yaml(tmp_path, {"distill": {"stft_fft_sizes": [512], "stft_hop_sizes": [128, 64]}}))


# --------------------------------------------------------------------------- property tests of the override parser


NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-12, max_value=1e6),
)


def outcome(override: str):
    """The config or the UserError; any other exception propagates and fails the test."""
    try:
        return load_config(None, [override])
    except UserError as e:
        err = e
    assert "\n" not in str(err).strip()
    return err


@settings(max_examples=300, deadline=None, database=None)
@given(NUMBERS)
def test_property_lr_override(value):
    result = outcome(f"train.lr={value!r}")
    as_float_ok = isinstance(value, (int, float)) and value > 0
    if as_float_ok:
        try:
            f = float(value)
        except OverflowError:
            f = math.inf
        as_float_ok = math.isfinite(f)
    if as_float_ok:
        assert isinstance(result, Config), f"train.lr={value!r} was refused: {result}"
        assert result.train.lr == float(value)
        assert type(result.train.lr) is float
    else:
        assert isinstance(result, UserError), f"train.lr={value!r} was accepted"


@settings(max_examples=300, deadline=None, database=None)
@given(NUMBERS)
def test_property_layers_override(value):
    result = outcome(f"teacher.layers={value!r}")
    if isinstance(value, int) and value > 0 and value % TeacherConfig().stacks == 0:
        assert isinstance(result, Config), f"teacher.layers={value!r} was refused: {result}"
        assert result.teacher.layers == value and type(result.teacher.layers) is int
    else:
        assert isinstance(result, UserError), f"teacher.layers={value!r} was accepted"


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(max_size=30))
def test_property_arbitrary_override_text(raw):
    """Whatever follows ``teacher.layers=``, the outcome is a Config or a UserError."""
    result = outcome(f"teacher.layers={raw}")
    if isinstance(result, Config):
        assert type(result.teacher.layers) is int and result.teacher.layers > 0


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=4))
def test_property_upsample_scales(scales):
    result = outcome(f"teacher.upsample_scales={scales}")
    if math.prod(scales) == 80:
        assert isinstance(result, Config) and result.teacher.upsample_scales == scales
    else:
        assert isinstance(result, UserError)


def test_yaml_no_is_the_word_not_a_boolean(tmp_path):
    """YAML 1.1 reads `no` as False; `train.mixed_precision=no` must still mean 'no'."""
    from wavedistill.config import load_config

    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n")
    assert load_config(f).train.mixed_precision == "no"
    with pytest.raises(UserError):
        load_config(None, ["teacher.output=yes"])
