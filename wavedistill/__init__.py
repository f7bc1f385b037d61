"""wavedistill: probability density distillation of neural vocoders."""

__version__ = "0.1.0"


def load(checkpoint, device="cpu"):
    """Load a teacher or student checkpoint directory; returns a :class:`~wavedistill.synthesis.Vocoder`."""
    from .inference.synthesis import Vocoder

    return Vocoder.load(checkpoint, device=device)
