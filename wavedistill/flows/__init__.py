"""wavedistill's flow library: one contract (:mod:`.base`) and one module per family."""

from .autoregressive import IAFLayer
from .linear_prediction import Deemphasis, LPCoefficients, LPSynthesis, SourceFilterContext, lp_prediction
from .base import (
    AffineAutoregressive,
    AffineFlow,
    Flow,
    FlowSequence,
    InverseFlow,
    InverseNotAvailable,
    affine_map,
    soft_bound,
    upcast,
)

__all__ = [
    "AffineAutoregressive", "AffineFlow", "Flow", "FlowSequence", "IAFLayer", "InverseFlow", "InverseNotAvailable",
    "affine_map", "soft_bound", "upcast",
    "Deemphasis", "LPCoefficients", "LPSynthesis", "SourceFilterContext", "lp_prediction",
]
