"""``wavedistill info``: what a checkpoint is (kind, size, features, step, metrics), or which checkpoints a directory holds.

Reads only YAML (``safe_load``), JSON and safetensors headers: nothing is unpickled and no weights are loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from .checkpoint import read_checkpoint_config, resolve_checkpoint
from .errors import UserError


def parameter_count(path: Path) -> int:
    """Number of values in a safetensors file, from its header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            total = 0
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                total += n
            return total
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _trainer(ckpt: Path) -> dict:
    try:
        d = json.loads((ckpt / "state" / "trainer.json").read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def summary(path: str | Path) -> dict:
    """Facts about one checkpoint as a dict."""
    ckpt = resolve_checkpoint(path)
    cfg = read_checkpoint_config(ckpt)
    trainer = _trainer(ckpt)
    # model cards and exported checkpoints carry no state/: the step is then unknown unless the name says it
    step = trainer.get("step")
    if step is None and ckpt.name.startswith("step-") and ckpt.name[5:].isdigit():
        step = int(ckpt.name[5:])
    params = parameter_count(ckpt / "model.safetensors")
    state_params = ckpt / "state" / "params.safetensors"
    metric = {"teacher": "valid NLL (bits/sample)", "coupling": "valid dequantized NLL bound (bits/sample)"}.get(
        cfg["kind"], "valid KL + stft_weight·STFT") if not cfg.get("teacher") else "valid KL + stft_weight·STFT"
    return {
        "path": str(ckpt),
        "kind": cfg["kind"],
        "output": cfg["model"].get("output") or cfg["model"].get("distribution") or ("gaussian" if cfg["kind"] == "coupling" else None),
        "parameters": params,
        "size_bytes": (ckpt / "model.safetensors").stat().st_size,
        "trainable_state": state_params.is_file(),
        "step": step,
        "best_metric": trainer.get("best_valid"),
        "metric_name": metric,
        "bad_steps": trainer.get("bad_steps_total"),
        "target_steps": ((trainer.get("config") or {}).get("train") or {}).get("max_steps"),
        "features": cfg["features"],
        "model": cfg["model"],
        "teacher": cfg.get("teacher"),
        "version": cfg.get("wavedistill_version"),
        "card": (ckpt / "README.md").is_file(),
    }


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def describe_checkpoint(path: str | Path) -> str:
    s = summary(path)
    f = s["features"]
    lines = [
        f"checkpoint  {s['path']}",
        f"kind        {s['kind']} ({s['output']})",
        f"weights     {_fmt_count(s['parameters'])} ({s['parameters']:,} values incl. buffers); model.safetensors {s['size_bytes'] / 1e6:.1f} MB",
        f"features    {f['sample_rate']} Hz, {f['n_mels']} mels, hop {f['hop_length']}, n_fft {f['n_fft']}, "
        f"win {f['win_length']}, {f['fmin']:g}-{f['fmax']:g} Hz",
        f"model       " + ", ".join(f"{k}={v}" for k, v in s["model"].items()),
        f"step        {s['step'] if s['step'] is not None else 'unknown (exported)'}"
        + (f" of {s['target_steps']}" if s["target_steps"] else ""),
    ]
    if s["best_metric"] is not None:
        lines.append(f"best        {s['metric_name']} {s['best_metric']:.4f}")
    if s["bad_steps"]:
        lines.append(f"bad steps   {s['bad_steps']} non-finite steps skipped")
    if s["teacher"]:
        lines.append(f"teacher     {s['teacher']}")
    lines.append(f"resumable   {'yes (state/)' if s['trainable_state'] else 'no (inference weights only)'}")
    if s["card"]:
        lines.append(f"model card  {Path(s['path']) / 'README.md'}")
    lines.append(f"version     wavedistill {s['version']}")
    return "\n".join(lines)


def find_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` (hidden and temporary directories skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("state", "logs", "samples"))
        if "model.safetensors" in filenames and "config.yaml" in filenames:
            found.append(Path(dirpath))
    return sorted(found)


def describe_directory(root: Path) -> str:
    ckpts = find_checkpoints(root)
    if not ckpts:
        raise UserError(f"{root} holds no checkpoints (directories with model.safetensors and config.yaml)")
    links: dict[Path, list[str]] = {}
    for name in ("latest", "best"):
        for link in root.rglob(name):
            if link.is_symlink():
                links.setdefault(link.resolve(), []).append(name)
    rows = []
    for c in ckpts:
        try:
            s = summary(c)
        except UserError as e:
            rows.append((str(c.relative_to(root)) or ".", "?", "", "", "", f"unreadable: {' '.join(str(e).split())}"))
            continue
        note = ",".join(links.get(c.resolve(), []))
        best = f"{s['best_metric']:.4f}" if s["best_metric"] is not None else "-"
        rows.append((str(c.relative_to(root)) or ".", s["kind"], str(s["step"]) if s["step"] is not None else "-",
                     _fmt_count(s["parameters"]), best, note))
    head = ("checkpoint", "kind", "step", "params", "best valid", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = [f"{len(ckpts)} checkpoint(s) under {root}"]
    for r in [head, *rows]:
        out.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(out)


def describe(path: str | Path) -> str:
    """``info`` output: one checkpoint in detail, or the checkpoints under a directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist; pass a checkpoint directory or a directory holding checkpoints")
    if (p / "model.safetensors").is_file():
        return describe_checkpoint(p)
    if p.is_dir():
        return describe_directory(p)
    raise UserError(f"{p} is neither a checkpoint nor a directory")
