"""The likelihood table of ``wavedistill eval``: bits per 16-bit sample of the real audio, lower is better.

* teacher — the exact discrete NLL ``−log₂ P(codes)`` of its mixture of logistics (or Gaussian), one parallel pass;
* coupling — the uniformly dequantized bound ``(−log p(x) − T·log w)/(T·ln 2)``, ``w = 2/65535``: in expectation
  over the noise an upper bound on the model's discrete NLL, so on the teacher's scale (one draw, seeded);
* students — n/a (an IAF's density of given audio needs a sequential inverse);
* ``gaussian baseline`` — an i.i.d. Gaussian fit to the utterance itself (its own mean and standard deviation),
  discretised to the 16-bit bins (``pdf·w``, exact to far below 0.001 bits for ``σ ≫ w``): what a model that knows
  only the loudness would score.

Each utterance is scored on its first :data:`LIKELIHOOD_SECONDS` seconds (bounded memory and time).
"""

from __future__ import annotations

import math

import torch

from ..nn.distributions import quantize
from ..train.coupling import bits_per_sample, dequantize_audio

LIKELIHOOD_SECONDS = 4.0
GAUSSIAN_BASELINE = "gaussian baseline"
BIN_WIDTH = 2.0 / 65535
WHAT = {"teacher": "exact discrete NLL", "coupling": "dequantized bound (>= its discrete NLL)",
        GAUSSIAN_BASELINE: "i.i.d. Gaussian of the utterance's own mean and std, discretised"}


def _crop(voc_hop: int, sample_rate: int, audio, mel):
    a = torch.as_tensor(audio, dtype=torch.float32).flatten()
    m = torch.as_tensor(mel, dtype=torch.float32)
    frames = min(m.shape[-1], a.shape[0] // voc_hop, max(1, int(LIKELIHOOD_SECONDS * sample_rate) // voc_hop))
    return a[: frames * voc_hop], m[:, :frames]


@torch.no_grad()
def model_bits(voc, audio, mel, seed: int = 0) -> float | None:
    """Bits/sample of ``audio`` under the vocoder's model (None where no likelihood is available)."""
    if voc.kind not in ("teacher", "coupling") or getattr(voc.model.cfg, "n_speakers", 0):
        return None
    a, m = _crop(voc.hop, voc.sample_rate, audio, mel)
    if a.numel() == 0:
        return None
    a, m = a[None].to(voc.device, voc.dtype), m[None].to(voc.device, voc.dtype)
    if voc.kind == "teacher":
        return float(-voc.model.log_prob(a, m).double().mean() / math.log(2.0))
    x = dequantize_audio(a, torch.Generator().manual_seed(seed)).to(voc.dtype)
    return float(bits_per_sample(voc.model(x, m).double(), x.shape[1])[0])


def gaussian_baseline_bits(audio, sample_rate: int, hop: int) -> float:
    """Bits/sample of the i.i.d. Gaussian fit to the (quantised) audio itself, discretised to 16-bit bins."""
    a = torch.as_tensor(audio, dtype=torch.float64).flatten()
    a = quantize(a[: min(a.shape[0], max(hop, int(LIKELIHOOD_SECONDS * sample_rate) // hop * hop))])
    mu, sd = a.mean(), a.std(unbiased=False).clamp_min(BIN_WIDTH)
    log_pdf = -0.5 * ((a - mu) / sd) ** 2 - torch.log(sd) - 0.5 * math.log(2 * math.pi)
    return float(-(log_pdf + math.log(BIN_WIDTH)).mean() / math.log(2.0))


def likelihood_table(result: dict) -> list[str]:
    """Markdown rows from ``result["likelihood"]`` (empty unless some checkpoint has a likelihood)."""
    lk = result.get("likelihood")
    if not lk or all(v is None for n, v in lk["bits_per_sample"].items() if n != GAUSSIAN_BASELINE):
        return []  # no checkpoint with a likelihood (students only): the baseline alone says nothing
    lines = [f"Likelihood of the real audio (first {lk['seconds']:g} s of each utterance), bits per 16-bit sample, "
             "lower is better:", "", "| system | bits/sample ↓ | what |", "|---|---:|---|"]
    for name, bits in lk["bits_per_sample"].items():
        lines.append(f"| {name} | {'n/a' if bits is None else f'{bits:.3f}'} | {lk['what'].get(name, 'no tractable likelihood')} |")
    return lines
