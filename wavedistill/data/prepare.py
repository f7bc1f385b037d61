"""``wavedistill prepare``: turn a directory of audio into a feature cache.

Layout of the cache directory ``OUT``::

    feats/<uttid>.safetensors   audio float32 [T] and mel float32 [n_mels, T // hop]
    train.txt valid.txt test.txt
    mel_stats.safetensors       per-channel mean and std of the train mels
    summary.json                written last: its presence marks a complete cache

Every feats file records (in its safetensors metadata) the feature parameters,
the trim level and the source file's size and mtime; a re-run reuses files whose
record still matches, so an interrupted or repeated run skips done work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from ..version import __version__
from .audio import AudioError, MelExtractor, load_audio, trim_silence
from ..config import Config, FeatureConfig
from ..errors import UserError
from ..fileio import DirectoryLock, unique_names, atomic_write_json, atomic_write_text, describe_os_error, read_json, save_tensors

SPLITS = ("train", "valid", "test")
CLIP_LEVEL = 0.999  # a file whose peak reaches this is counted as clipped
_META_KEY = "wavedistill"


def run_prepare(wav_dir: str | Path, out: str | Path, cfg: Config) -> dict[str, Any]:
    """Build (or resume) the feature cache ``out`` from the audio under ``wav_dir``; returns the summary."""
    wav_dir, out = Path(wav_dir), Path(out)
    if not wav_dir.exists():
        raise UserError(f"--wav-dir {wav_dir} does not exist; point it at a directory of wav/flac/ogg files")
    if not wav_dir.is_dir():
        raise UserError(f"--wav-dir {wav_dir} is not a directory; point it at a directory of wav/flac/ogg files")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    check_summary_features(out, cfg.features)
    with DirectoryLock(out):  # one writer per cache; on failure an --out this run created is removed again
        return _build(wav_dir, out, cfg)


def _build(wav_dir: Path, out: Path, cfg: Config) -> dict[str, Any]:
    sources = find_audio_files(wav_dir, exclude=out)
    uttids = make_uttids(sources)
    writer = _CacheWriter(out)
    feats = MelExtractor(cfg.features)
    sr, prep = cfg.features.sample_rate, cfg.prepare

    utterances: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    reused = 0
    for rel, uttid in tqdm(list(zip(sources, uttids)), desc="prepare", unit="file", file=sys.stderr, disable=None):
        src = wav_dir / rel
        try:
            entry = _reuse(out, uttid, src, rel, cfg)
            was_cached = entry is not None
            if entry is None:
                entry = _process(src, rel, uttid, cfg, feats, writer)
            seconds = entry.pop("trimmed_samples") / sr
            if seconds < prep.min_seconds:
                raise AudioError(f"too short: {seconds:.2f} s after trimming, need >= {prep.min_seconds:g} s")
            if seconds > prep.max_seconds:
                raise AudioError(f"too long: {seconds:.1f} s after trimming, limit is {prep.max_seconds:g} s")
        except AudioError as e:
            skipped.append({"path": rel.as_posix(), "reason": str(e)})
            continue
        utterances[uttid] = entry
        reused += was_cached

    if not utterances:
        what = f"{len(sources)} files, all skipped: {skipped[0]['reason']}" if skipped else "no files found"
        raise UserError(f"no usable audio in {wav_dir} ({what}); point --wav-dir at a directory of wav/flac/ogg files")

    for s in skipped:
        print(f"skipped {wav_dir / s['path']}: {s['reason']}", file=sys.stderr)
    splits = assign_splits(sorted(utterances), prep.valid_fraction, prep.test_fraction, prep.seed)
    writer.begin()
    for name in SPLITS:
        writer.text(f"{name}.txt", "".join(f"{u}\n" for u in splits[name]))
    mean, std = _mel_stats(out, splits["train"], cfg.features.n_mels)
    writer.tensors("mel_stats.safetensors", {"mean": mean, "std": std})

    summary = _summary(cfg, sources, utterances, skipped, splits)
    writer.json("summary.json", summary)
    _report(summary, out, reused)
    return summary


# --------------------------------------------------------------------------- files and ids


def find_audio_files(wav_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Regular, non-hidden files under ``wav_dir`` (recursively), as sorted relative paths.

    Whether a file is audio is left to soundfile; ``exclude`` (the output
    directory, when it lies inside ``wav_dir``) is not searched.
    """
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for root, dirs, files in os.walk(wav_dir):
        if skip is not None and Path(root).resolve() == skip:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(root) / name
            if not name.startswith(".") and path.is_file():
                found.append(path.relative_to(wav_dir))
    return sorted(found, key=lambda p: p.as_posix())


def _base_id(rel: Path) -> str:
    stem = rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix()
    return "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in stem.split("/"))


def make_uttids(sources: list[Path]) -> list[str]:
    """Utterance ids from relative paths: '/' becomes '__', unsafe characters '_'.

    Files that map to the same id (``a.wav`` and ``a.flac``) get ``-2``, ``-3``...
    in sorted order, never taking a name another file maps to naturally.
    """
    return unique_names([_base_id(rel) for rel in sources])


def assign_splits(uttids: list[str], valid_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Deterministic train/valid/test split by hashing each uttid with ``seed``.

    valid and test get ``round(fraction * N)`` utterances each, at least one each
    (when their fraction is positive) once N >= 3; train is never empty.
    """
    n = len(uttids)
    counts = []
    for frac in (valid_fraction, test_fraction):
        k = round(frac * n)
        if n >= 3 and frac > 0:
            k = max(k, 1)
        counts.append(k)
    n_valid, n_test = counts
    while n_valid + n_test > n - 1 and (n_valid or n_test):
        if n_test >= n_valid:
            n_test -= 1
        else:
            n_valid -= 1
    order = sorted(uttids, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
    return {
        "valid": sorted(order[:n_valid]),
        "test": sorted(order[n_valid : n_valid + n_test]),
        "train": sorted(order[n_valid + n_test :]),
    }


# --------------------------------------------------------------------------- one utterance


def _record(cfg: Config, rel: Path, src: Path) -> dict[str, Any]:
    st = src.stat()
    return {
        "features": dataclasses.asdict(cfg.features),
        "trim_top_db": cfg.prepare.trim_top_db,
        "source": rel.as_posix(),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
    }


def _feats_path(out: Path, uttid: str) -> Path:
    return out / "feats" / f"{uttid}.safetensors"


def _reuse(out: Path, uttid: str, src: Path, rel: Path, cfg: Config) -> dict[str, Any] | None:
    """The entry of an already-written feats file that still matches its source, else None."""
    path = _feats_path(out, uttid)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
        want = _record(cfg, rel, src)
        if any(meta.get(k) != v for k, v in want.items()):
            return None
        return {k: meta[k] for k in ("source", "samples", "frames", "peak", "trimmed_samples")}
    except Exception:  # unreadable or foreign file: recompute it
        return None


def _process(src: Path, rel: Path, uttid: str, cfg: Config, feats: MelExtractor, writer: "_CacheWriter") -> dict[str, Any]:
    fc, prep = cfg.features, cfg.prepare
    audio = load_audio(src, fc.sample_rate, max_seconds=2 * prep.max_seconds + 30)
    trimmed = trim_silence(audio, prep.trim_top_db)
    n_trimmed = int(trimmed.shape[0])
    if not np.any(trimmed):
        raise AudioError("silent: every sample is zero")
    entry: dict[str, Any] = {"source": rel.as_posix(), "trimmed_samples": n_trimmed}
    if not prep.min_seconds * fc.sample_rate <= n_trimmed <= prep.max_seconds * fc.sample_rate:
        return entry  # the caller rejects it with the duration in the reason
    wav = torch.from_numpy(np.ascontiguousarray(MelExtractor.align(trimmed, fc.hop_length)))
    with torch.no_grad():
        mel = feats(wav)
    entry.update(samples=int(wav.shape[0]), frames=int(mel.shape[-1]), peak=float(wav.abs().max()))
    meta = {**_record(cfg, rel, src), **entry}
    writer.tensors(f"feats/{uttid}.safetensors", {"audio": wav, "mel": mel.contiguous()}, {_META_KEY: json.dumps(meta)})
    return entry


# --------------------------------------------------------------------------- cache-level outputs


class _CacheWriter:
    """Writes into the cache; the first write removes a previous summary.json.

    Until the new summary is written the cache reads as incomplete, and when no
    usable audio is found nothing at all is written.
    """

    def __init__(self, out: Path):
        self.out = out
        self._begun = False

    def begin(self) -> None:
        if not self._begun:
            self._begun = True
            try:
                (self.out / "summary.json").unlink(missing_ok=True)
            except OSError as e:
                raise UserError(describe_os_error(e, str(self.out / "summary.json"))) from None

    def _guard(self, name: str, write) -> None:
        self.begin()
        try:
            write(self.out / name)
        except OSError as e:
            raise UserError(describe_os_error(e, str(self.out / name))) from None

    def tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        self._guard(name, lambda p: save_tensors(p, tensors, metadata))

    def text(self, name: str, text: str) -> None:
        self._guard(name, lambda p: atomic_write_text(p, text))

    def json(self, name: str, obj: Any) -> None:
        self._guard(name, lambda p: atomic_write_json(p, obj))


def check_summary_features(out: Path, features: FeatureConfig) -> None:
    """Refuse to mix feature parameters: an existing summary must match ``features``."""
    path = out / "summary.json"
    if not path.is_file():
        return
    data = read_json(path, "feature-cache summary")
    recorded = data.get("features") if isinstance(data, dict) else None
    wanted = dataclasses.asdict(features)
    if recorded != wanted:
        diffs = [f"{k}: {recorded.get(k) if isinstance(recorded, dict) else None!r} -> {v!r}"
                 for k, v in wanted.items() if not isinstance(recorded, dict) or recorded.get(k) != v]
        detail = "; ".join(diffs) or "different keys"
        raise UserError(f"{out} was prepared with other feature parameters ({detail}); use a new --out or delete it")


def _mel_stats(out: Path, train: list[str], n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the train mels (float64 sums; std floored at 1e-3)."""
    total = torch.zeros(n_mels, dtype=torch.float64)
    total_sq = torch.zeros(n_mels, dtype=torch.float64)
    count = 0
    for uttid in train:
        with safe_open(str(_feats_path(out, uttid)), framework="pt") as f:
            mel = f.get_tensor("mel").to(torch.float64)
        total += mel.sum(dim=1)
        total_sq += (mel * mel).sum(dim=1)
        count += mel.shape[1]
    mean = total / max(count, 1)
    var = torch.clamp(total_sq / max(count, 1) - mean * mean, min=0.0)
    std = torch.clamp(var.sqrt(), min=1e-3)
    return mean.float(), std.float()


def _summary(cfg: Config, sources: list[Path], utterances: dict[str, dict], skipped: list[dict], splits: dict) -> dict:
    sr = cfg.features.sample_rate
    seconds = {u: e["samples"] / sr for u, e in utterances.items()}
    peaks = [e["peak"] for e in utterances.values()]
    return {
        "wavedistill_version": __version__,
        "features": dataclasses.asdict(cfg.features),
        "prepare": dataclasses.asdict(cfg.prepare),
        "counts": {
            "found": len(sources),
            "used": len(utterances),
            "skipped": len(skipped),
            **{name: len(splits[name]) for name in SPLITS},
        },
        "durations_seconds": {
            "total": round(sum(seconds.values()), 3),
            **{name: round(sum(seconds[u] for u in splits[name]), 3) for name in SPLITS},
        },
        "peaks": {
            "max": max(peaks),
            "median": statistics.median(peaks),
            "clipped_files": sum(p >= CLIP_LEVEL for p in peaks),
        },
        "skipped": skipped,
        "utterances": {u: utterances[u] for u in sorted(utterances)},
    }


def _report(summary: dict, out: Path, reused: int) -> None:
    c, d, p = summary["counts"], summary["durations_seconds"], summary["peaks"]
    total = d["total"]
    length = f"{total / 3600:.2f} h" if total >= 3600 else f"{total / 60:.1f} min"
    again = f", {reused} reused from a previous run" if reused else ""
    print(
        f"prepared {c['used']} of {c['found']} files ({c['skipped']} skipped{again}): "
        f"train {c['train']}, valid {c['valid']}, test {c['test']}; {length} of audio"
    )
    note = "; audio is never normalised, check those recordings" if p["clipped_files"] else ""
    print(f"peaks: max {p['max']:.3f}, median {p['median']:.3f}; {p['clipped_files']} clipped files (peak >= {CLIP_LEVEL}{note})")
    print(f"feature cache: {out} (summary.json lists every skipped file and utterance)")
