"""Prediction gain of linear prediction from the mel on audio files, and speed of the LP recurrence.

    python benchmarks/lp_gain.py FILE... [--orders 8 12 16] [--preemphasis 0 0.85]

Gain = 10·log10(Σx² / Σe²) with ``e_t = x_t − x̂_t`` and ``x̂`` the predictor that
:class:`~wavedistill.data.lpc.MelLPC` derives from the file's own log-mel (demo features), held per
frame exactly as the teacher and student use it (pre-emphasis folded into the predictor of ``x``).
"""

from __future__ import annotations

import argparse
import time

import torch

from wavedistill.config import FeatureConfig
from wavedistill.data.audio import MelExtractor, load_audio
from wavedistill.data.lpc import MelLPC, combine_preemphasis
from wavedistill.flows.linear_prediction import lp_prediction
from wavedistill.kernels.lp_recurrence import lp_synthesis


def gain_db(x: torch.Tensor, features: FeatureConfig, order: int, alpha: float) -> float:
    mel = MelExtractor(features)(x[None].float())
    a = combine_preemphasis(MelLPC(features, order, alpha)(mel), alpha)
    x64 = x[None].double()
    e = x64 - lp_prediction(x64, a, features.hop_length)
    return float(10 * torch.log10((x64 ** 2).sum() / (e ** 2).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--orders", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--preemphasis", type=float, nargs="+", default=[0.0, 0.85])
    args = ap.parse_args()
    features = FeatureConfig()
    xs = [MelExtractor.align(torch.from_numpy(load_audio(f, features.sample_rate)), features.hop_length) for f in args.files]
    for alpha in args.preemphasis:
        for p in args.orders:
            gains = [gain_db(x, features, p, alpha) for x in xs]
            print(f"alpha={alpha:<5} order={p:<3} gain dB: mean {sum(gains) / len(gains):6.2f}  "
                  f"min {min(gains):6.2f}  max {max(gains):6.2f}  ({len(gains)} files)")
    for dtype in (torch.float32, torch.float64):
        e = torch.randn(1, 1_000_000, dtype=dtype)
        a = 0.05 * torch.randn(1, 1_000_000 // 80 + 1, 16, dtype=torch.float64)
        lp_synthesis(e[:, :1000], a, 80)
        t0 = time.perf_counter()
        lp_synthesis(e, a, 80)
        dt = time.perf_counter() - t0
        print(f"LP synthesis recurrence, order 16, {dtype}: {1e6 / dt / 1e6:.1f} M samples/s (one row of 10^6)")


if __name__ == "__main__":
    main()
