"""Reading a feature cache written by ``wavedistill prepare`` (see :mod:`wavedistill.prepare`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import FeatureConfig, section_from_dict
from ..errors import UserError
from ..fileio import load_tensors, read_json

SPLITS = ("train", "valid", "test")


class FeatureCache:
    """A prepared data directory: per-utterance audio and log-mels, splits and mel statistics.

    ``features``, when given, must equal the parameters the cache was prepared
    with; a mismatch is a :class:`UserError` naming the first differing key.
    """

    def __init__(self, path: str | Path, features: FeatureConfig | None = None):
        self.path = Path(path)
        summary_path = self.path / "summary.json"
        if not summary_path.is_file():
            raise UserError(
                f"data dir {self.path} is not a prepared feature cache (no summary.json); "
                f"run 'wavedistill prepare --wav-dir WAVS --out {self.path}' first"
            )
        self._summary = read_json(summary_path, "feature-cache summary")
        recorded = self._summary.get("features") if isinstance(self._summary, dict) else None
        try:
            if not isinstance(recorded, dict):
                raise UserError("no 'features' mapping")
            missing = [f.name for f in dataclasses.fields(FeatureConfig) if f.name not in recorded]
            if missing:
                raise UserError(f"features.{missing[0]} is not recorded")
            self._features = section_from_dict(FeatureConfig, recorded, "features")
        except UserError as e:
            raise UserError(f"data dir {self.path} has unusable feature parameters in summary.json ({e}); re-run prepare") from None
        if features is not None:
            self._check(features)

    def _check(self, features: FeatureConfig) -> None:
        have = dataclasses.asdict(self._features)
        for key, want in dataclasses.asdict(features).items():
            if have[key] != want:
                raise UserError(
                    f"data dir {self.path} was prepared with features.{key}={have[key]} but the config says {want}; "
                    "re-run prepare with this config or use the matching config"
                )

    @property
    def features(self) -> FeatureConfig:
        return self._features

    @property
    def summary(self) -> dict[str, Any]:
        return self._summary

    def ids(self, split: str) -> list[str]:
        """Utterance ids of ``split`` ('train', 'valid' or 'test'), in file order."""
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
        path = self.path / f"{split}.txt"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path} is missing; the feature cache is incomplete, re-run prepare") from None
        return [line.strip() for line in text.splitlines() if line.strip()]

    def load(self, uttid: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(audio [T], mel [n_mels, frames])`` of one utterance, with ``T == frames * hop_length``."""
        path = self.path / "feats" / f"{uttid}.safetensors"
        tensors = load_tensors(path)
        audio, mel = tensors.get("audio"), tensors.get("mel")
        fc = self._features
        if audio is None or mel is None:
            raise UserError(f"{path} lacks the 'audio' or 'mel' tensor; re-run prepare")
        if audio.dim() != 1 or mel.dim() != 2 or mel.shape[0] != fc.n_mels or audio.shape[0] != mel.shape[1] * fc.hop_length:
            raise UserError(
                f"{path} has audio {tuple(audio.shape)} and mel {tuple(mel.shape)}, which do not match "
                f"n_mels={fc.n_mels}, hop_length={fc.hop_length}; re-run prepare"
            )
        if not (torch.isfinite(audio).all() and torch.isfinite(mel).all()):
            raise UserError(f"{path} holds NaN or inf values; re-run prepare")
        return audio.float(), mel.float()

    def mel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(mean, std)`` of the train mels, each ``[n_mels]``."""
        path = self.path / "mel_stats.safetensors"
        t = load_tensors(path)
        mean, std = t.get("mean"), t.get("std")
        n = self._features.n_mels
        if mean is None or std is None or tuple(mean.shape) != (n,) or tuple(std.shape) != (n,):
            raise UserError(f"{path} does not hold 'mean' and 'std' of shape [{n}]; re-run prepare")
        return mean.float(), std.float()

    def load_split(self, split: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Every utterance of ``split`` in memory, as ``(uttid, audio, mel)``."""
        return [(u, *self.load(u)) for u in self.ids(split)]
