"""Checkpoint directories: round trips, links, pruning, atomicity, and refusing unsafe or broken files."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil

import pytest
import torch
import yaml

import wavedistill.checkpoint as ckpt_mod
from wavedistill.checkpoint import (
    load_model,
    load_training_state,
    model_config,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_checkpoint_config,
    resolve_checkpoint,
    save_checkpoint,
)
from wavedistill.config import FeatureConfig, TeacherConfig
from wavedistill.errors import UserError
from wavedistill.fileio import atomic_directory
from wavedistill.models.teacher import Teacher

FEATURES = FeatureConfig(hop_length=16, n_mels=8)


def teacher_cfg(**kw) -> TeacherConfig:
    base = dict(layers=4, stacks=2, kernel_size=2, residual_channels=8, gate_channels=16, skip_channels=8,
                cond_channels=8, upsample_scales=[4, 4], mixtures=2)
    base.update(kw)
    cfg = TeacherConfig(**base)
    cfg.validate(FEATURES)
    return cfg


def make_teacher(seed: int = 0, **kw) -> Teacher:
    torch.manual_seed(seed)
    t = Teacher(teacher_cfg(**kw), FEATURES.n_mels)
    with torch.no_grad():
        t.cond.set_stats(torch.linspace(-2, 2, FEATURES.n_mels), torch.linspace(0.5, 1.5, FEATURES.n_mels))
    return t.eval()


def save(exp, step: int, teacher: Teacher, keep: int = 3, is_best: bool = False, state: dict | None = None):
    conf = model_config("teacher", teacher.cfg, FEATURES)
    return save_checkpoint(exp, step, teacher.state_dict(), conf, state, keep, is_best)


def probe(model: Teacher) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    mel = torch.randn(2, FEATURES.n_mels, 4, generator=g)
    audio = torch.rand(2, 4 * FEATURES.hop_length, generator=g) * 2 - 1
    with torch.no_grad():
        return model.log_prob(audio, mel)


def step_dirs(exp) -> list[str]:
    root = exp / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def leftovers(exp) -> list[str]:
    return sorted(p.name for p in (exp / "checkpoints").iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- round trips and layout


def test_save_and_load_round_trip(tmp_path):
    teacher = make_teacher()
    path = save(tmp_path, 5, teacher)
    assert path == tmp_path / "checkpoints" / "step-00000005"
    assert (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()
    for where in (path, tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "latest"):
        model, features, cfg = load_model(where, kind="teacher")
        assert isinstance(model, Teacher) and not model.training
        assert features == FEATURES
        assert cfg["kind"] == "teacher"
        for k, v in teacher.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        assert torch.equal(probe(model), probe(teacher))
    assert load_model(path)[0].cfg == teacher.cfg


def test_config_yaml_is_plain_and_complete(tmp_path):
    path = save(tmp_path, 1, make_teacher())
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    assert cfg["kind"] == "teacher"
    assert cfg["model"]["residual_channels"] == 8 and cfg["model"]["upsample_scales"] == [4, 4]
    assert cfg["features"]["hop_length"] == 16
    assert "wavedistill_version" in cfg
    assert read_checkpoint_config(path) == cfg


def test_latest_and_best_links(tmp_path):
    t = make_teacher()
    save(tmp_path, 1, t, is_best=True)
    save(tmp_path, 2, t)
    save(tmp_path, 3, t)
    root = tmp_path / "checkpoints"
    assert (root / "latest").is_symlink() and os.readlink(root / "latest") == "step-00000003"
    assert (root / "best").is_symlink() and os.readlink(root / "best") == "step-00000001"
    assert resolve_checkpoint(root / "best") == (root / "step-00000001").resolve()
    save(tmp_path, 4, t, is_best=True)
    assert os.readlink(root / "best") == "step-00000004"
    assert os.readlink(root / "latest") == "step-00000004"
    # relative links: the experiment can be moved
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(str(tmp_path), str(moved))
    try:
        kind = load_model(moved, kind="teacher")[2]["kind"]
    finally:
        shutil.move(str(moved), str(tmp_path))
    assert kind == "teacher"


def test_prune_keeps_recent_and_best(tmp_path):
    t = make_teacher()
    for step in range(1, 8):
        save(tmp_path, step, t, keep=2, is_best=(step == 2))
    assert step_dirs(tmp_path) == ["step-00000002", "step-00000006", "step-00000007"]
    assert os.readlink(tmp_path / "checkpoints" / "best") == "step-00000002"
    assert load_model(tmp_path / "checkpoints" / "best")[2]["kind"] == "teacher"
    save(tmp_path, 8, t, keep=2, is_best=True)
    assert step_dirs(tmp_path) == ["step-00000007", "step-00000008"]


def test_prune_removes_leftover_temporaries(tmp_path):
    t = make_teacher()
    save(tmp_path, 1, t)
    junk = tmp_path / "checkpoints" / ".step-00000002.abc.tmp"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    save(tmp_path, 2, t)
    assert leftovers(tmp_path) == []


def test_resave_same_step_replaces_it(tmp_path):
    save(tmp_path, 3, make_teacher(seed=0))
    other = make_teacher(seed=1)
    save(tmp_path, 3, other)
    assert torch.equal(probe(load_model(tmp_path)[0]), probe(other))
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- interrupted and failing writes


def test_interrupted_write_leaves_nothing_partial(tmp_path, monkeypatch):
    t = make_teacher()
    opt = torch.optim.Adam(t.parameters())
    state = {"params": t.state_dict(), "optimizer": opt.state_dict(), "trainer": {}}
    save(tmp_path, 1, t, state=state)
    before = probe(load_model(tmp_path)[0])

    def boom():
        raise RuntimeError("killed while writing the RNG state")

    monkeypatch.setattr(ckpt_mod, "rng_state", boom)  # model, config, params and optimizer are already written
    with pytest.raises(RuntimeError, match="killed"):
        save(tmp_path, 2, make_teacher(seed=3), state=state)
    assert step_dirs(tmp_path) == ["step-00000001"]
    assert leftovers(tmp_path) == []
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "step-00000001"
    assert torch.equal(probe(load_model(tmp_path)[0]), before)


def test_atomic_directory_cleans_up_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "a.bin").write_bytes(b"x" * 100)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "b.bin").write_bytes(b"y")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "a.bin").write_bytes(b"ok")
    assert (target / "a.bin").read_bytes() == b"ok"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_no_space_is_a_user_error_and_keeps_previous(tmp_path, monkeypatch):
    t = make_teacher()
    save(tmp_path, 1, t)
    before = probe(load_model(tmp_path)[0])
    monkeypatch.setattr(os, "replace", enospc)
    with pytest.raises(UserError) as e:
        save(tmp_path, 2, make_teacher(seed=2))
    monkeypatch.undo()
    assert "space" in str(e.value)
    assert step_dirs(tmp_path) == ["step-00000001"]
    assert leftovers(tmp_path) == []
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "step-00000001"
    assert torch.equal(probe(load_model(tmp_path)[0]), before)


def test_no_space_when_resaving_a_step_keeps_it(tmp_path, monkeypatch):
    """Replacing an existing step directory must not lose it if the final rename fails."""
    t = make_teacher()
    save(tmp_path, 1, t)
    before = probe(load_model(tmp_path)[0])
    real_replace = os.replace
    calls = []

    def second_fails(src, dst, *a, **kw):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:
            enospc()
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(UserError, match="space"):
        save(tmp_path, 1, make_teacher(seed=2))
    monkeypatch.undo()
    assert torch.equal(probe(load_model(tmp_path)[0]), before)


def test_read_only_directory_is_a_user_error(tmp_path):
    t = make_teacher()
    save(tmp_path, 1, t)
    root = tmp_path / "checkpoints"
    os.chmod(root, 0o500)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions")
        with pytest.raises(UserError) as e:
            save(tmp_path, 2, t)
        assert "\n" not in str(e.value)
    finally:
        os.chmod(root, 0o755)
    assert step_dirs(tmp_path) == ["step-00000001"]
    assert load_model(tmp_path)[2]["kind"] == "teacher"


def test_write_error_on_a_file_is_a_user_error(tmp_path, monkeypatch):
    """ENOSPC while writing a file inside the new directory (not only on the rename)."""
    t = make_teacher()
    save(tmp_path, 1, t)
    import pathlib

    real = pathlib.Path.write_bytes

    def fail_state(self, data):
        if self.name == "model.safetensors" and ".tmp" in self.parent.name:
            enospc()
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", fail_state)
    with pytest.raises(UserError, match="space"):
        save(tmp_path, 2, t)
    monkeypatch.undo()
    assert step_dirs(tmp_path) == ["step-00000001"] and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- refusing broken or hostile checkpoints


@pytest.fixture
def saved(tmp_path):
    save(tmp_path, 1, make_teacher())
    return tmp_path / "checkpoints" / "step-00000001"


@pytest.mark.parametrize("keep_bytes", [0, 7, 100, -1])
def test_truncated_weights(saved, keep_bytes):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep_bytes] if keep_bytes >= 0 else data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_model(saved)
    assert "\n" not in str(e.value)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_disguised_as_safetensors_is_not_unpickled(saved, tmp_path):
    # the payload is live: unpickling it creates its marker
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof))).close()
    assert proof.exists()
    for i, dump in enumerate((lambda o, f: f.write_bytes(pickle.dumps(o)), lambda o, f: torch.save(o, f))):
        marker = tmp_path / f"pwned-{i}"
        dump({"net.input.weight": _Payload(marker)}, saved / "model.safetensors")
        with pytest.raises(UserError):
            load_model(saved)
        assert not marker.exists()


def test_yaml_python_tag_is_refused(saved, tmp_path):
    marker = tmp_path / "yaml-pwned"
    cfg = (saved / "config.yaml").read_text()
    (saved / "config.yaml").write_text(f"evil: !!python/object/apply:builtins.open ['{marker}', 'w']\n" + cfg)
    with pytest.raises(UserError):
        load_model(saved)
    assert not marker.exists()
    (saved / "config.yaml").write_text(cfg.replace("kind: teacher", "kind: !!python/name:os.system"))
    with pytest.raises(UserError):
        load_model(saved)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["model"].update(layers="ten"),
        lambda c: c["model"].update(layers=4.0),
        lambda c: c["model"].update(layers=True),
        lambda c: c["model"].update(bogus=1),
        lambda c: c["model"].update(output="wavernn"),
        lambda c: c["features"].update(hop_length="16"),
        lambda c: c["features"].update(hop_length=20),  # product of upsample_scales no longer matches
        lambda c: c.update(kind="vocoder"),
        lambda c: c.pop("kind"),
        lambda c: c.pop("model"),
        lambda c: c.update(features=[1, 2]),
    ],
)
def test_config_with_wrong_types_or_keys(saved, edit):
    cfg = yaml.safe_load((saved / "config.yaml").read_text())
    edit(cfg)
    (saved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError) as e:
        load_model(saved)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["[1, 2, 3]\n", "kind: [teacher\n", "", "\xff\xfe".encode("latin-1").decode("latin-1")])
def test_config_not_a_mapping(saved, text):
    (saved / "config.yaml").write_text(text, encoding="latin-1")
    with pytest.raises(UserError):
        load_model(saved)


@pytest.mark.parametrize("change", [{"residual_channels": 16}, {"layers": 6}, {"mixtures": 3}, {"n_speakers": 2}])
def test_config_shapes_do_not_match_weights(saved, change):
    cfg = yaml.safe_load((saved / "config.yaml").read_text())
    cfg["model"].update(change)
    (saved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="inconsistent"):
        load_model(saved)


def test_nonfinite_weights(saved):
    from wavedistill.fileio import load_tensors, tensors_to_bytes

    t = load_tensors(saved / "model.safetensors")
    t["net.head2.bias"][0] = float("nan")
    (saved / "model.safetensors").write_bytes(tensors_to_bytes(t, {"kind": "teacher"}))
    with pytest.raises(UserError, match="NaN"):
        load_model(saved)


def test_wrong_kind(saved):
    with pytest.raises(UserError, match="student"):
        load_model(saved, kind="student")


@pytest.mark.parametrize("what", ["missing_dir", "empty_dir", "no_config", "no_weights"])
def test_not_a_checkpoint(saved, tmp_path, what):
    if what == "missing_dir":
        target = tmp_path / "nope"
    elif what == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    else:
        (saved / ("config.yaml" if what == "no_config" else "model.safetensors")).unlink()
        target = saved
    with pytest.raises(UserError):
        load_model(target)


# --------------------------------------------------------------------------- optimizer and training state


def adam_two_steps(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 4, generator=g) for _ in range(3)]
    for x in batches[:2]:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model, opt, batches[2]


def one_step(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_optimizer_state_round_trip(tmp_path):
    model, opt, x = adam_two_steps()
    tensors, meta = optimizer_to_tensors(opt.state_dict())
    assert all(torch.is_tensor(v) for v in tensors.values())
    meta = json.loads(json.dumps(meta))  # what is written to disk
    from wavedistill.fileio import load_tensors, save_tensors

    save_tensors(tmp_path / "opt.safetensors", tensors)
    restored = optimizer_from_tensors(load_tensors(tmp_path / "opt.safetensors"), meta)

    model2, _, _ = adam_two_steps(seed=5)  # different weights, to be overwritten
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    opt2.load_state_dict(restored)
    assert opt2.param_groups[0]["lr"] == 1e-2 and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.95)
    after1 = one_step(model, opt, x)
    after2 = one_step(model2, opt2, x)
    for k in after1:
        assert torch.equal(after1[k], after2[k]), k


def test_training_state_round_trip(tmp_path):
    model, opt, x = adam_two_steps()
    teacher = make_teacher()
    state = {"params": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
             "trainer": {"best_valid": 3.5, "scheduler": {"last_epoch": 2}}}
    torch.manual_seed(123)
    path = save(tmp_path, 2, teacher, state=state)
    expected_rand = torch.rand(3)
    st = load_training_state(path)
    assert st["trainer"]["step"] == 2 and st["trainer"]["best_valid"] == 3.5
    assert st["trainer"]["scheduler"] == {"last_epoch": 2}
    for k, v in state["params"].items():
        assert torch.equal(st["params"][k], v)
    ckpt_mod.set_rng_state(*st["rng"])
    assert torch.equal(torch.rand(3), expected_rand)
    model2, _, _ = adam_two_steps(seed=5)
    model2.load_state_dict(st["params"])
    opt2 = torch.optim.Adam(model2.parameters())
    opt2.load_state_dict(st["optimizer"])
    a, b = one_step(model, opt, x), one_step(model2, opt2, x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_without_state_cannot_be_resumed(tmp_path):
    path = save(tmp_path, 1, make_teacher())
    with pytest.raises(UserError, match="resume"):
        load_training_state(path)


def test_corrupt_trainer_json(tmp_path):
    model, opt, _ = adam_two_steps()
    path = save(tmp_path, 1, make_teacher(), state={"params": model.state_dict(), "optimizer": opt.state_dict()})
    (path / "state" / "trainer.json").write_text("{not json")
    with pytest.raises(UserError):
        load_training_state(path)


@pytest.mark.parametrize("content", ["{}", "[]", '{"step": 1}'])
def test_trainer_json_missing_keys(tmp_path, content):
    model, opt, _ = adam_two_steps()
    path = save(tmp_path, 1, make_teacher(), state={"params": model.state_dict(), "optimizer": opt.state_dict()})
    (path / "state" / "trainer.json").write_text(content)
    with pytest.raises(UserError):
        load_training_state(path)
