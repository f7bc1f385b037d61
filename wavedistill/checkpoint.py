"""Checkpoint directories: safe to load, atomic to write, easy to resume.

Layout of ``EXP/checkpoints/step-00001000/``::

    model.safetensors   generation weights (EMA) — all that synthesis needs
    config.yaml         kind, model constructor arguments, features, version
    state/              exact-resume state: raw weights, optimizer, RNG, counters
        params.safetensors  optimizer.safetensors  rng.safetensors  trainer.json

``latest`` and ``best`` are symbolic links to step directories, swapped
atomically.  Nothing here unpickles: tensors are safetensors, everything else
is JSON or YAML read with ``safe_load``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .version import __version__
from .config import CouplingConfig, FeatureConfig, StudentConfig, TeacherConfig, section_from_dict
from .errors import UserError
from .fileio import atomic_directory, atomic_symlink, describe_os_error, load_tensors, tensors_to_bytes

STEP_RE = re.compile(r"^step-(\d{8})$")
KINDS = {"teacher": TeacherConfig, "student": StudentConfig, "coupling": CouplingConfig}


# --------------------------------------------------------------------------- optimizer state


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "scalars": {}}
    for idx, st in state["state"].items():
        for name, v in st.items():
            key = f"{idx}.{name}"
            if torch.is_tensor(v):
                tensors[key] = v
            else:
                meta["scalars"][key] = v
    return tensors, meta


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# --------------------------------------------------------------------------- writing


def model_config(kind: str, model_cfg, features: FeatureConfig, extra: dict | None = None) -> dict:
    return {
        "kind": kind,
        "wavedistill_version": __version__,
        "model": dataclasses.asdict(model_cfg),
        "features": dataclasses.asdict(features),
        **(extra or {}),
    }


def write_model_dir(path: Path, weights: dict[str, torch.Tensor], config: dict) -> None:
    """Write ``model.safetensors`` + ``config.yaml`` into an existing directory."""
    (path / "model.safetensors").write_bytes(tensors_to_bytes(weights, {"kind": config["kind"]}))
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def save_checkpoint(
    exp_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    config: dict,
    state: dict | None,
    keep: int,
    is_best: bool = False,
) -> Path:
    """Atomically write ``EXP/checkpoints/step-N``, then move ``latest`` (and ``best``) to it."""
    root = Path(exp_dir) / "checkpoints"
    target = root / f"step-{step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_directory(target) as tmp:
            write_model_dir(tmp, weights, config)
            if state is not None:
                sd = tmp / "state"
                sd.mkdir()
                (sd / "params.safetensors").write_bytes(tensors_to_bytes(state["params"]))
                opt_t, opt_meta = optimizer_to_tensors(state["optimizer"])
                (sd / "optimizer.safetensors").write_bytes(tensors_to_bytes(opt_t))
                rng_t, rng_meta = rng_state()
                (sd / "rng.safetensors").write_bytes(tensors_to_bytes(rng_t))
                trainer = dict(state.get("trainer", {}))
                trainer.update({"step": step, "optimizer": opt_meta, "rng": rng_meta})
                (sd / "trainer.json").write_text(json.dumps(trainer), encoding="utf-8")
        atomic_symlink(root / "latest", target.name)
        if is_best:
            atomic_symlink(root / "best", target.name)
    except OSError as e:
        raise UserError(describe_os_error(e, f"checkpoint {target}") + "; the previous checkpoint is intact") from None
    prune_checkpoints(root, keep)
    return target


def prune_checkpoints(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if STEP_RE.match(p.name) and p.is_dir())
    protected = set()
    for name in ("latest", "best"):
        link = root / name
        if link.is_symlink():
            protected.add(os.readlink(link))
    for p in steps[: max(0, len(steps) - keep)]:
        if p.name not in protected:
            gone = root / f".{p.name}.del"
            os.replace(p, gone)
            shutil.rmtree(gone, ignore_errors=True)
    # leftovers of interrupted writes
    for pat in (".step-*.tmp", ".step-*.del", ".step-*.old"):
        for p in root.glob(pat):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- reading


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a step directory, a ``latest``/``best`` link, or an experiment directory."""
    p = Path(path)
    if (p / "checkpoints" / "latest").exists():
        p = p / "checkpoints" / "latest"
    elif (p / "latest").exists() and not (p / "model.safetensors").exists():
        p = p / "latest"
    if not p.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint directory (it holds model.safetensors and config.yaml)")
    if not (p / "config.yaml").is_file() or not (p / "model.safetensors").is_file():
        raise UserError(f"{path} is not a wavedistill checkpoint (needs model.safetensors and config.yaml)")
    return p.resolve()


def read_checkpoint_config(path: str | Path) -> dict:
    p = resolve_checkpoint(path)
    try:
        cfg = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{p / 'config.yaml'} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or cfg.get("kind") not in KINDS:
        raise UserError(f"{p / 'config.yaml'} does not describe a teacher, student or coupling checkpoint (missing or unknown 'kind')")
    for key in ("model", "features"):
        if not isinstance(cfg.get(key), dict):
            raise UserError(f"{p / 'config.yaml'} lacks its '{key}' section; the checkpoint is incomplete")
    return cfg


def build_model(cfg: dict):
    """Instantiate the model a checkpoint config describes (weights not loaded)."""
    features = section_from_dict(FeatureConfig, cfg["features"], "features")
    model_cfg = section_from_dict(KINDS[cfg["kind"]], cfg["model"], cfg["kind"])
    try:
        features.validate()
        model_cfg.validate(features)
    except UserError as e:
        raise UserError(f"checkpoint config is invalid: {e}") from None
    if cfg["kind"] == "teacher":
        from .models.teacher import Teacher

        return Teacher(model_cfg, features.n_mels, features), features
    if cfg["kind"] == "coupling":
        from .models.coupling import CouplingVocoder

        return CouplingVocoder(model_cfg, features.n_mels, features), features
    from .models.student import Student

    return Student(model_cfg, features.n_mels, features), features


def load_weights(model: torch.nn.Module, path: Path) -> None:
    tensors = load_tensors(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{path} does not match its config.yaml ({what}); the checkpoint is inconsistent")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise UserError(
                f"{path}: tensor {k} has shape {tuple(v.shape)} but config.yaml implies {tuple(own[k].shape)}; the checkpoint is inconsistent"
            )
        if not torch.isfinite(v).all():
            raise UserError(f"{path}: tensor {k} holds NaN or inf values; the checkpoint is corrupt")
    model.load_state_dict(tensors)


def load_model(path: str | Path, kind: str | None = None, device: str | torch.device = "cpu"):
    """Load a checkpoint for inference: returns ``(model, features, config)``."""
    p = resolve_checkpoint(path)
    cfg = read_checkpoint_config(p)
    if kind is not None and cfg["kind"] != kind:
        raise UserError(f"{path} is a {cfg['kind']} checkpoint, but a {kind} checkpoint is needed here")
    model, features = build_model(cfg)
    load_weights(model, p / "model.safetensors")
    return model.to(device).eval(), features, cfg


def load_training_state(path: Path) -> dict:
    sd = path / "state"
    if not sd.is_dir():
        raise UserError(f"{path} has no training state (state/); it cannot be resumed")
    try:
        trainer = json.loads((sd / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{sd / 'trainer.json'} is unreadable ({e}); resume from another checkpoint") from None
    if not isinstance(trainer, dict) or not all(k in trainer for k in ("step", "optimizer", "rng", "scheduler")):
        raise UserError(f"{sd / 'trainer.json'} is incomplete (needs step, optimizer, rng, scheduler); resume from another checkpoint")
    return {
        "params": load_tensors(sd / "params.safetensors"),
        "optimizer": optimizer_from_tensors(load_tensors(sd / "optimizer.safetensors"), trainer["optimizer"]),
        "rng": (load_tensors(sd / "rng.safetensors"), trainer["rng"]),
        "trainer": trainer,
    }


def export_checkpoint(src: str | Path, dst: str | Path, card: str | None = None, force: bool = False) -> Path:
    """Copy a checkpoint's inference part (weights + config, no training state) to ``dst`` atomically.

    An existing ``dst`` is refused unless ``force``; then it must be an exported checkpoint (no ``state/``), and
    everything in it that export does not write (its ``README.md`` model card unless ``card`` replaces it, any other
    file) is carried into the new version.
    """
    p = resolve_checkpoint(src)
    model, _, cfg = load_model(p)  # validates everything before anything is written
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir() or dst.is_symlink():
            raise UserError(f"--out {dst} exists and is not a directory; choose a new --out")
        if not force:
            raise UserError(f"--out {dst} already exists; choose a new --out, or pass --force to replace the exported "
                            f"weights (its README.md and other files are kept)")
        if not (dst / "model.safetensors").is_file():
            raise UserError(f"--out {dst} exists and is not a checkpoint; choose a new --out")
        if (dst / "state").exists():
            raise UserError(f"--out {dst} is a training checkpoint (it has state/); export to a new directory")
        if dst.resolve() == p:
            raise UserError(f"--out {dst} is the checkpoint being exported; choose a new --out")
    written = {"model.safetensors", "config.yaml"} | ({"README.md"} if card else set())
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    try:
        with atomic_directory(dst) as tmp:
            write_model_dir(tmp, weights, cfg)
            if card:
                (tmp / "README.md").write_text(card, encoding="utf-8")
            if dst.is_dir():
                for item in dst.iterdir():  # keep what export did not write: the model card, figures, notes
                    if item.name not in written:
                        if item.is_dir() and not item.is_symlink():
                            shutil.copytree(item, tmp / item.name, symlinks=True)
                        else:
                            shutil.copy2(item, tmp / item.name, follow_symlinks=False)
    except OSError as e:
        raise UserError(describe_os_error(e, f"checkpoint {dst}")) from None
    return dst
