"""The shipped demo checkpoints load and give the audio they gave when they were shipped.

Pinned before the package was re-layered (session 3): the first samples and the sum of a short
generation from a fixed mel, for each checkpoint.  A refactor that changes the audio fails here.
``teacher-v1``/``student-v1`` are the original demo pair (``teacher``/``student`` until session 5);
``teacher``/``student`` are the LP pair (``teacher-lp``/``student-lp`` until session 5), pinned in session 5 and re-pinned in session 6,
when the long runs' later steps were exported over them.
New or re-exported checkpoints: ``benchmarks/pin_shipped.py`` prints the pins by this module's procedure;
append new names at the end of PINS (one generator draws every mel in PINS order).
"""

import math
from pathlib import Path

import pytest
import torch

from wavedistill.checkpoint import load_model

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"
PINS = {  # name: (first six samples, sum of all 2 × 960 or 960 samples)
    "teacher-v1": ([-0.08658735454082489, -0.07375926524400711, -0.2725597321987152, -0.20923900604248047,
                    -0.24353115260601044, -0.19042441248893738], 2.6304821554494993),
    "student-v1": ([-0.0033827831503003836, -0.015170852653682232, -0.0026137421373277903, 0.0005280491895973682,
                    0.003713686717674136, 0.0029815370216965675], -0.06183672579936683),
    "clarinet-teacher": ([-0.02387874945998192, -0.022652795538306236, 0.0013272512005642056, 0.014612688682973385,
                          0.0462619848549366, 0.06365381926298141], 4.793974489430639),
    "clarinet-student": ([0.012264737859368324, -0.0025119485799223185, 0.02420949563384056, 0.03555340692400932,
                          0.02905113250017166, 0.02238965407013893], -0.9774031387278228),
    "teacher": ([-0.1469147950410843, -0.03959740698337555, 0.021444661542773247, -0.045706503093242645,
                 0.037056516855955124, 0.02222498506307602], 7.635941088485197),
    "student": ([0.00585529999807477, -0.009854030795395374, 0.016509566456079483, 0.012401054613292217,
                 -0.009745435789227486, 0.022118553519248962], 0.9319455508812098),
}


def shipped_outputs(names=None) -> dict:
    """Each named checkpoint's audio from a fixed mel (the pinned procedure; benchmarks/pin_shipped.py prints it).

    The order matters: one generator draws every checkpoint's mel, in ``names`` order (default: PINS order)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    out = {}
    for name in (list(PINS) if names is None else names):
        model, feat, _ = load_model(SHIPPED / name, device="cpu")
        model.eval()
        mel = torch.randn(1, feat.n_mels, 12, generator=g) * 2 - 5
        with torch.no_grad():
            if model.kind == "teacher":  # the compiled generator and the Python one, same noise
                out[name] = torch.stack([model.generate(mel, seed=7), model.generate(mel, seed=7, fast=False)])
            else:
                out[name] = model.synthesize(mel, seed=7)
    return out


@pytest.fixture(scope="module")
def outputs():
    return shipped_outputs()


@pytest.mark.parametrize("name", list(PINS))
def test_shipped_checkpoint_gives_its_pinned_audio(outputs, name):
    head, total = PINS[name]
    x = outputs[name]
    torch.testing.assert_close(x.flatten()[:6].double(), torch.tensor(head, dtype=torch.float64), atol=1e-6, rtol=0)
    assert math.isclose(float(x.double().sum()), total, abs_tol=1e-3)


@pytest.mark.parametrize("name", ["teacher", "teacher-v1"])
def test_synthesize_takes_the_frame_rate_path_of_teacher_generate(name):
    """`synthesize` (one item, chunked or not) and Teacher.generate give the same samples: one frame-rate path."""
    from wavedistill.inference.synthesis import Vocoder

    torch.set_num_threads(1)
    voc = Vocoder.load(SHIPPED / name)
    mel = torch.randn(voc.n_mels, 14, generator=torch.Generator().manual_seed(5)) * 2 - 5
    with torch.no_grad():
        ref = voc.model.generate(mel[None], seed=11)[0]
    whole = voc.synthesize(mel, seed=11)
    chunked = voc.synthesize(mel, seed=11, chunk_frames=4)
    torch.testing.assert_close(whole, ref, atol=0, rtol=0)
    # chunking runs the conditioning GEMMs at other sizes: on some CPUs (AVX-512 MKL kernels) that changes the
    # last bits (measured: ≤ 7.5e-7 on samples of ~0.1), so chunked synthesis is equal up to float rounding
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=0)
