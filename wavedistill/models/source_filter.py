"""The source-filter front of a vocoder: pre-emphasis and linear prediction from the mel (REFERENCE.md §7).

:class:`SourceFilter` holds what the teacher and the student share: the mel → LP analysis
(:class:`~wavedistill.data.lpc.MelLPC`, of the pre-emphasised signal when ``α > 0``) and ``α``.  It has no
parameters and no saved buffers, so a model's state dict is the same with and without it.

* Teacher: the prediction of ``x_t`` from ``x_<t`` is the order-``p(+1)`` predictor of ``x`` that pre-emphasis and
  LP make together, ``(1 − α z⁻¹)·A(z)`` (:meth:`predictor`); the teacher adds it to its output location.
* Student: the IAFs make the excitation ``e``; :class:`~wavedistill.flows.LPSynthesis` with :meth:`lpc` and then
  :class:`~wavedistill.flows.Deemphasis` make ``x`` from it — the same predictor, factored.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import FeatureConfig
from ..data.lpc import MelLPC, combine_preemphasis
from ..flows.linear_prediction import LPCoefficients


class SourceFilter(nn.Module):
    def __init__(self, features: FeatureConfig, lpc_order: int, preemphasis: float):
        super().__init__()
        self.hop = features.hop_length
        self.lpc_order, self.preemphasis = int(lpc_order), float(preemphasis)
        self.analysis = MelLPC(features, self.lpc_order, self.preemphasis) if self.lpc_order else None

    @property
    def order(self) -> int:
        """Order of the combined predictor of ``x`` (:meth:`predictor`)."""
        return self.lpc_order + (1 if self.preemphasis else 0)

    def lpc(self, mel: torch.Tensor, context: int = 0, dtype=torch.float32) -> LPCoefficients | None:
        """LP predictors of the (pre-emphasised) signal per frame of ``mel [B, n_mels, F]`` whose first
        ``context`` frames lie before sample 0; ``None`` when LP is off."""
        if self.analysis is None:
            return None
        return LPCoefficients(self.analysis(mel).to(dtype), self.hop, context * self.hop)

    def predictor(self, mel: torch.Tensor, context: int = 0, dtype=torch.float32) -> LPCoefficients:
        """The combined predictor of ``x`` (pre-emphasis folded into LP), ``a [B or 1, F, order]``."""
        if self.analysis is None:  # pre-emphasis only: x̂_t = α·x_{t-1} for every frame
            a = torch.full((mel.shape[0], 1, 1), self.preemphasis, dtype=torch.float64, device=mel.device)
            return LPCoefficients(a.to(dtype), self.hop, 0)
        a = combine_preemphasis(self.analysis(mel), self.preemphasis)
        return LPCoefficients(a.to(dtype), self.hop, context * self.hop)


def make_source_filter(cfg, features: FeatureConfig | None) -> SourceFilter | None:
    """``None`` when ``cfg.lpc_order`` and ``cfg.preemphasis`` are both 0 (the model is unchanged)."""
    order, alpha = getattr(cfg, "lpc_order", 0), getattr(cfg, "preemphasis", 0.0)
    if not order and not alpha:
        return None
    if features is None:
        raise ValueError("linear prediction / pre-emphasis need the feature parameters: pass features=")
    return SourceFilter(features, order, alpha)
