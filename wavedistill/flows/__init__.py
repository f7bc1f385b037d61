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
from .continuous import CNF, TimeMLP, exact_trace, hutchinson_trace
from .coupling import (
    ChannelCoupling,
    MaskedCoupling,
    Permutation,
    Scaling,
    alternating_mask,
    checkerboard_mask,
    soft_clamp,
)
from .dequantization import UniformDequantizer, VariationalDequantizer, audio_dequantizer, image_dequantizer
from .distribution import FlowDistribution, StandardLogistic, StandardNormal
from .glow import ActNorm, InvertibleConv1x1, Squeeze1d, Squeeze2d, unsqueeze1d, unsqueeze2d
from .made import IAF, MADE, MAF, MADEAffine
from .planar import PlanarFlow, RadialFlow
from .sylvester import (
    HouseholderSylvester,
    OrthogonalizationError,
    OrthogonalSylvester,
    SylvesterFlow,
    TriangularSylvester,
    orthogonalize,
)

__all__ = [
    "AffineAutoregressive", "AffineFlow", "Flow", "FlowSequence", "IAFLayer", "InverseFlow", "InverseNotAvailable",
    "affine_map", "soft_bound", "upcast",
    "Deemphasis", "LPCoefficients", "LPSynthesis", "SourceFilterContext", "lp_prediction",
    "CNF", "TimeMLP", "exact_trace", "hutchinson_trace",
    "ChannelCoupling", "MaskedCoupling", "Permutation", "Scaling", "alternating_mask", "checkerboard_mask", "soft_clamp",
    "UniformDequantizer", "VariationalDequantizer", "audio_dequantizer", "image_dequantizer",
    "FlowDistribution", "StandardLogistic", "StandardNormal",
    "ActNorm", "InvertibleConv1x1", "Squeeze1d", "Squeeze2d", "unsqueeze1d", "unsqueeze2d",
    "IAF", "MADE", "MAF", "MADEAffine",
    "PlanarFlow", "RadialFlow",
    "HouseholderSylvester", "OrthogonalizationError", "OrthogonalSylvester", "SylvesterFlow", "TriangularSylvester",
    "orthogonalize",
]
