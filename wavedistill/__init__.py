"""wavedistill: probability density distillation of neural vocoders."""

from .version import __version__  # noqa: F401  (re-exported)


def load(checkpoint, device="cpu"):
    """Load a teacher or student checkpoint directory; returns a :class:`~wavedistill.synthesis.Vocoder`."""
    from .inference.synthesis import Vocoder

    return Vocoder.load(checkpoint, device=device)
