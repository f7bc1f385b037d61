"""Generation speed: samples per second, real-time factor and FLOP efficiency.

``wavedistill bench`` times, after a warm-up run, under ``torch.inference_mode``
and with ``torch.cuda.synchronize`` around GPU work, the median of
``--repeats`` runs of each generator:

* ``teacher-naive``  — :meth:`Teacher.generate_naive` (recomputes the receptive
  field every step) on ``min(S, 0.1)`` seconds, since it is slow;
* ``teacher-cached`` — :meth:`Teacher.generate` (ring-buffer queues) on ``S`` seconds;
* ``teacher-cached-fused`` — :class:`wavedistill.fastgen.FastCachedGenerator`,
  when that module exists and reports itself available (CPU only);
* ``student``        — one parallel pass of :meth:`Student.synthesize` on ``S`` seconds;
* ``coupling``       — one parallel inverse pass of :meth:`CouplingVocoder.synthesize` on ``S`` seconds;
* ``griffin-lim``    — librosa mel inversion + 32 Griffin-Lim iterations (CPU).

The entries above run the reference PyTorch layers.  On CUDA, with ``triton``
installed, the fused residual-layer kernels (:mod:`wavedistill.kernels`) are
measured beside them on the same input:

* ``student-fused``          — ``student`` through the fused kernels;
* ``teacher-scoring``        — one parallel likelihood pass :meth:`Teacher.log_prob`
  over ``S`` seconds (the teacher's work in distillation and scoring);
* ``teacher-scoring-fused``  — the same through the fused kernels;
* ``teacher-persistent``     — autoregressive generation in the persistent Triton kernel
  (:class:`~wavedistill.kernels.ar_triton.TritonARGenerator`, one program per stream), one stream;
* ``teacher-persistent-x16`` — the same with 16 streams at once; its samples/s is the total over
  the streams (per stream: divide by ``streams``).

Elsewhere these are listed under the report's ``skipped`` key with the reason.

FLOPs per sample are counted analytically from the model config (a
multiply-add is 2 FLOPs; elementwise work is not counted; the autoregressive
entries count the conditioning projections at frame rate, as they are computed,
the parallel passes per sample), and compared with
the peak of a large float32 matmul measured in the same run.
"""

from __future__ import annotations

import importlib
import io
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .. import kernels
from ..config import FeatureConfig
from ..errors import UserError
from ..generation.cached import FrameConditioning
from ..fileio import atomic_write_bytes, atomic_write_json, describe_os_error

PERSISTENT_STREAMS = 16  # streams of the batched persistent-kernel entry
NAIVE_MAX_SECONDS = 0.02  # the naive reference recomputes the receptive field per sample: keep it short
GRIFFIN_LIM_ITERS = 32


# --------------------------------------------------------------------------- analytic FLOPs


def wavenet_layer_flops(kernel: int, residual: int, gate: int, skip: int, cond: int) -> int:
    """One residual layer, one sample: dilated conv, per-sample conditioning projection, residual and skip 1×1s."""
    half = gate // 2
    return 2 * kernel * residual * gate + 2 * cond * gate + 2 * half * residual + 2 * half * skip


def wavenet_flops(layers: int, kernel: int, residual: int, gate: int, skip: int, cond: int, out_channels: int) -> int:
    """A whole WaveNet per sample: 1→R input, the layers, and the two 1×1 head layers.

    With a skip stack the last layer has no residual projection (its output would never be read).
    """
    head_in = skip if skip > 0 else residual
    unused_res = 2 * (gate // 2) * residual if skip > 0 else 0
    return (2 * residual + layers * wavenet_layer_flops(kernel, residual, gate, skip, cond) - unused_res
            + 2 * head_in * head_in + 2 * head_in * out_channels)


def conditioning_flops(n_mels: int, cond: int, scales: list[int]) -> float:
    """:class:`~wavedistill.layers.ConditionNet` per output sample: the 5-tap frame conv and the upsampling filters
    (in their polyphase form, :func:`~wavedistill.nn.wavenet.stretch_smooth`: 3 multiply-adds per output value)."""
    hop = math.prod(scales)
    flops = 2 * 5 * n_mels * cond / hop
    rate = 1
    for s in scales:
        rate *= s
        flops += 2 * 3 * cond * rate / hop
    return flops


def teacher_flops_per_sample(teacher) -> float:
    """A cached generation step (the work is independent of the receptive field).

    The conditioning projections of all ``L`` layers are computed at frame rate and then upsampled
    (:class:`~wavedistill.generation.FrameConditioning`): ``2·C·L·G/hop`` for the projection plus
    ``2·(2·ctx+1)·L·G`` for the banded upsampling per sample (``ctx = upsample_context``; block
    context is not counted), plus the frame conv — instead of ``2·C·G`` per layer and sample.
    """
    cfg = teacher.cfg
    net = wavenet_flops(cfg.layers, cfg.kernel_size, cfg.residual_channels, cfg.gate_channels, cfg.skip_channels,
                        0, teacher.dist.n_params)
    hop, ctx, lg = teacher.cond.hop, teacher.cond.upsample_context, cfg.layers * cfg.gate_channels
    frame_conv = 2 * 5 * teacher.n_mels * cfg.cond_channels / hop
    return net + frame_conv + 2 * cfg.cond_channels * lg / hop + 2 * (2 * ctx + 1) * lg


def teacher_scoring_flops_per_sample(teacher) -> float:
    """One parallel (teacher-forced) pass: every layer projects the upsampled conditioning per sample."""
    cfg = teacher.cfg
    net = wavenet_flops(cfg.layers, cfg.kernel_size, cfg.residual_channels, cfg.gate_channels, cfg.skip_channels,
                        cfg.cond_channels, teacher.dist.n_params)
    return net + conditioning_flops(teacher.n_mels, cfg.cond_channels, teacher.cond.scales)


def naive_teacher_flops_per_sample(teacher, samples: int) -> float:
    """What ``generate_naive`` actually computes: the whole net over a window of ``min(t+1, rf)`` samples at step ``t``."""
    cfg = teacher.cfg
    net = wavenet_flops(cfg.layers, cfg.kernel_size, cfg.residual_channels, cfg.gate_channels, cfg.skip_channels,
                        cfg.cond_channels, teacher.dist.n_params)
    rf = teacher.receptive_field
    positions = sum(min(t + 1, rf) for t in range(samples))
    return net * positions / samples + conditioning_flops(teacher.n_mels, cfg.cond_channels, teacher.cond.scales)


def student_flops_per_sample(student) -> float:
    """All IAF flows (WaveNets without skip stacks, 2 outputs each) plus the conditioning net."""
    cfg = student.cfg
    flows = sum(
        wavenet_flops(n, cfg.kernel_size, cfg.residual_channels, cfg.gate_channels, 0, cfg.cond_channels, 2)
        for n in cfg.flow_layers
    )
    return flows + conditioning_flops(student.n_mels, cfg.cond_channels, student.cond.scales)


def coupling_flops_per_sample(model) -> float:
    """One parallel inverse pass of the coupling flow: every step's 1×1 conv and coupling WaveNet at grouped rate."""
    cfg, g = model.cfg, model.group
    total = 0.0
    for step in model.steps:
        net = step.flows[2].net
        c, R, L = step.flows[1].lower.shape[0], net.channels, net.layers
        per_position = (2 * c * c + 2 * net.kept * R + 2 * cfg.cond_channels * g * 2 * R * L
                        + 2 * cfg.kernel_size * R * 2 * R * L + 2 * R * 2 * R * (L - 1) + 2 * R * R
                        + 2 * R * net.end.out_channels)
        total += per_position / g
    return total + conditioning_flops(model.n_mels, cfg.cond_channels, model.cond.scales)


def griffin_lim_flops_per_sample(n_fft: int, hop: int, n_iter: int = GRIFFIN_LIM_ITERS) -> float:
    """Estimate: per iteration one STFT and one inverse STFT, each ~5·N·log2(N) per frame (mel inversion not counted)."""
    return n_iter * 2 * 5 * n_fft * math.log2(n_fft) / hop


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: Callable[[], object] | None = None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after one warm-up call (``warmup`` or ``fn`` itself)."""
    with torch.inference_mode():
        (warmup or fn)()
        _sync(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
    return times


def peak_gflops(device: torch.device, n: int = 2048, repeats: int = 3) -> float:
    """Median GFLOP/s of an ``n×n @ n×n`` float32 matmul on ``device``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    times = time_call(lambda: torch.mm(a, b), device, repeats)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def bench_mel(features: FeatureConfig, seconds: float, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A deterministic plausible log-mel ``[1, n_mels, frames]`` (content does not change the cost)."""
    frames = max(1, round(seconds * features.sample_rate / features.hop_length))
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, features.n_mels, frames, generator=g) - 4.0).to(device, dtype)


def _fastgen():
    try:
        mod = importlib.import_module("wavedistill.generation.cpp")
    except ImportError:
        return None
    try:
        return mod if mod.available() else None
    except Exception:  # a broken optional extension must not break the benchmark
        return None


def _entry(generator: str, checkpoint: str | None, device: torch.device, sample_rate: int, samples: int,
           times: list[float], flops: float | None, peak: float) -> dict:
    med = statistics.median(times)
    sps = samples / med
    audio = samples / sample_rate
    achieved = flops * sps / 1e9 if flops is not None else None
    return {
        "generator": generator,
        "checkpoint": checkpoint,
        "device": str(device),
        "sample_rate": sample_rate,
        "samples": samples,
        "audio_seconds": audio,
        "median_seconds": med,
        "times": times,
        "samples_per_second": sps,
        "real_time_factor": med / audio,
        "x_real_time": audio / med,
        "flops_per_sample": flops,
        "achieved_gflops": achieved,
        "fraction_of_peak": achieved / peak if achieved is not None and peak > 0 else None,
    }


def fused_unavailable(device: torch.device) -> str | None:
    """Why the fused-kernel entries are not measured on ``device`` (None when they are)."""
    if device.type != "cuda":
        return "needs a CUDA device (the Triton kernels run on CPU only in Triton's interpreter, for tests)"
    if not kernels.triton_available():
        return "needs the triton package, which does not import here"
    return None


def _skip(generator: str, checkpoint: str | None, device: torch.device, reason: str) -> dict:
    return {"generator": generator, "checkpoint": checkpoint, "device": str(device), "reason": reason}


def bench_checkpoint(voc, seconds: float, repeats: int, peak: float, temperature: float = 1.0,
                     skipped: list[dict] | None = None) -> list[dict]:
    """Result entries for one checkpoint; entries that cannot run here are appended to ``skipped``."""
    with kernels.use_mode("reference"):
        results = _bench_reference(voc, seconds, repeats, peak, temperature)
    results.extend(_bench_fused(voc, seconds, repeats, peak, temperature, skipped if skipped is not None else []))
    return results


def _bench_fused(voc, seconds: float, repeats: int, peak: float, temperature: float, skipped: list[dict]) -> list[dict]:
    """The parallel passes through the reference layers and through the fused kernels, side by side (CUDA)."""
    model, fc, dev = voc.model, voc.features, voc.device
    name = str(voc.path)
    if voc.kind == "coupling":
        return []  # no fused kernels for the coupling flow: its reference pass is already parallel
    persistent = ["teacher-persistent", f"teacher-persistent-x{PERSISTENT_STREAMS}"]
    names = ["student-fused"] if voc.kind == "student" else ["teacher-scoring", "teacher-scoring-fused"] + persistent
    reason = fused_unavailable(dev)
    if reason is not None:
        skipped.extend(_skip(n, name, dev, reason) for n in names)
        return []
    mel = bench_mel(fc, seconds, dev, voc.dtype)
    samples = mel.shape[2] * voc.hop
    if voc.kind == "student":
        with kernels.use_mode("triton"):
            times = time_call(lambda: model.synthesize(mel, seed=0, temperature=temperature), dev, repeats)
        return [_entry("student-fused", name, dev, fc.sample_rate, samples, times, student_flops_per_sample(model), peak)]
    g = torch.Generator().manual_seed(0)
    audio = (0.3 * torch.randn(1, samples, generator=g)).clamp(-1.0, 1.0).to(dev)
    flops = teacher_flops_per_sample(model)
    results = []
    for generator, mode in (("teacher-scoring", "reference"), ("teacher-scoring-fused", "triton")):
        with kernels.use_mode(mode):
            times = time_call(lambda: model.log_prob(audio, mel), dev, repeats)
        results.append(_entry(generator, name, dev, fc.sample_rate, samples, times,
                              teacher_scoring_flops_per_sample(model), peak))
    from ..generation import triton as ar_triton

    reason = ar_triton.unsupported_reason(model)
    if reason is not None:
        skipped.extend(_skip(n, name, dev, reason) for n in persistent)
        return results
    gen = ar_triton.TritonARGenerator(model)
    for generator, streams in zip(persistent, (1, PERSISTENT_STREAMS)):
        def generate(m=mel.expand(streams, -1, -1), n=streams):  # conditioning and noise timed, as in teacher-cached
            c = FrameConditioning.from_mel(model.cond, m)
            return gen.run(c, model.make_noise(n, c.shape[2], 0, dev), temperature)

        times = time_call(generate, dev, repeats)
        entry = _entry(generator, name, dev, fc.sample_rate, streams * samples, times, flops, peak)
        entry["streams"] = streams
        results.append(entry)
    return results


def _bench_reference(voc, seconds: float, repeats: int, peak: float, temperature: float) -> list[dict]:
    model, fc, dev = voc.model, voc.features, voc.device
    sr, hop = fc.sample_rate, voc.hop
    name = str(voc.path)
    mel = bench_mel(fc, seconds, dev, voc.dtype)
    samples = mel.shape[2] * hop
    short = mel[:, :, :2]
    results = []
    if voc.kind == "student":
        times = time_call(lambda: model.synthesize(mel, seed=0, temperature=temperature), dev, repeats)
        results.append(_entry("student", name, dev, sr, samples, times, student_flops_per_sample(model), peak))
        return results
    if voc.kind == "coupling":
        times = time_call(lambda: model.synthesize(mel, seed=0, temperature=temperature), dev, repeats)
        results.append(_entry("coupling", name, dev, sr, samples, times, coupling_flops_per_sample(model), peak))
        return results

    naive_mel = bench_mel(fc, min(seconds, NAIVE_MAX_SECONDS), dev, voc.dtype)
    n_naive = naive_mel.shape[2] * hop
    times = time_call(lambda: model.generate_naive(naive_mel, seed=0, temperature=temperature), dev, repeats,
                      warmup=lambda: model.generate_naive(short, seed=0, temperature=temperature))
    results.append(_entry("teacher-naive", name, dev, sr, n_naive, times,
                          naive_teacher_flops_per_sample(model, n_naive), peak))
    # the Python cached generator (the reference); the compiled one is reported as teacher-cached-fused
    times = time_call(lambda: model.generate(mel, seed=0, temperature=temperature, fast=False), dev, repeats,
                      warmup=lambda: model.generate(short, seed=0, temperature=temperature, fast=False))
    cached = teacher_flops_per_sample(model)
    results.append(_entry("teacher-cached", name, dev, sr, samples, times, cached, peak))

    fg = _fastgen() if dev.type == "cpu" and voc.dtype == torch.float32 else None
    if fg is not None:
        gen = fg.FastCachedGenerator(model)

        def fused(m=mel):
            c = FrameConditioning.from_mel(model.cond, m)
            noise = model.make_noise(c.shape[0], c.shape[2], 0, c.device, c.dtype)
            return gen.run(c, noise, temperature)

        times = time_call(fused, dev, repeats, warmup=lambda: fused(short))
        results.append(_entry("teacher-cached-fused", name, dev, sr, samples, times, cached, peak))
    return results


def bench_griffin_lim(features: FeatureConfig, seconds: float, repeats: int, peak: float) -> dict:
    from .report import griffin_lim

    mel = bench_mel(features, seconds, torch.device("cpu"))[0].numpy()
    samples = mel.shape[1] * features.hop_length
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large", category=UserWarning)  # very short --seconds
        times = time_call(lambda: griffin_lim(mel, features, n_iter=GRIFFIN_LIM_ITERS), torch.device("cpu"), repeats)
    flops = griffin_lim_flops_per_sample(features.n_fft, features.hop_length)
    return _entry("griffin-lim", None, torch.device("cpu"), features.sample_rate, samples, times, flops, peak)


def _progress(line: str) -> None:
    """Progress on stderr as the benchmark goes (the table comes on stdout at the end)."""
    print(f"bench: {line}", file=sys.stderr, flush=True)


def checkpoint_label(path: str | None) -> str:
    """``experiment/step-N`` for a checkpoint under ``EXP/checkpoints``, else the directory name."""
    if not path:
        return "-"
    p = Path(path)
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "checkpoints" else p.name


def format_table(report: dict) -> str:
    rows = [("generator", "checkpoint", "samples/s", "RTF", "x real time", "GFLOP/s", "% peak")]
    for r in report["results"]:
        ck = checkpoint_label(r["checkpoint"])
        gf = f"{r['achieved_gflops']:.3f}" if r["achieved_gflops"] is not None else "-"
        fr = f"{100 * r['fraction_of_peak']:.2f}" if r["fraction_of_peak"] is not None else "-"
        rows.append((r["generator"], ck, f"{r['samples_per_second']:,.0f}", f"{r['real_time_factor']:.4g}",
                     f"{r['x_real_time']:.4g}", gf, fr))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in report.get("skipped", []):
        lines.append(f"skipped {r['generator']} ({checkpoint_label(r['checkpoint'])}): {r['reason']}")
    lines.append(f"device {report['device']}, {report['threads']} thread(s), peak {report['peak_gflops']:.1f} GFLOP/s "
                 f"(fp32 matmul); RTF = compute s per audio s (<1 is faster than real time)")
    return "\n".join(lines)


def plot_png(report: dict) -> bytes:
    """Bar chart of samples/s per generator (log axis) with the sample rate marked as real time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    labels = [r["generator"] + (f"\n{checkpoint_label(r['checkpoint'])}" if r["checkpoint"] else "") for r in res]
    values = [r["samples_per_second"] for r in res]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(res) + 2.5), 5), dpi=100)
    ax.bar(range(len(res)), values, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xticks(range(len(res)), labels, fontsize=8, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_ylabel("samples / s")
    for rate in sorted({r["sample_rate"] for r in res}):
        ax.axhline(rate, color="tab:red", linestyle="--", linewidth=1, label=f"real time ({rate} Hz)")
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)  # a legend, not text on the bars: nothing collides
    ax.set_title(f"generation speed on {report['device']} ({report['threads']} thread(s))", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_bench(checkpoints: list[str], device: str = "cpu", seconds: float = 1.0, repeats: int = 3,
              json_path: str | Path | None = None, plot_path: str | Path | None = None, threads: int | None = None,
              griffin_lim: bool = True) -> dict:
    """Benchmark every checkpoint (and Griffin-Lim); print a table; optionally write JSON and a PNG plot."""
    from ..version import __version__
    from ..inference.synthesis import Vocoder

    if not checkpoints:
        raise UserError("pass at least one --checkpoint")
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"--seconds must be a positive number, got {seconds}")
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    vocoders = [Vocoder.load(c, device) for c in checkpoints]
    dev = vocoders[0].device
    if dev.type == "cpu" and any(v.kind == "teacher" for v in vocoders):
        # build (or load) the C++ generator now, so that no timed run includes compiling it
        t0 = time.perf_counter()
        fg = _fastgen()
        how = "ready" if fg is not None else "unavailable (teacher-cached-fused skipped)"
        _progress(f"C++ generator {how} in {time.perf_counter() - t0:.1f} s (not part of any timing)")
    peak = peak_gflops(dev)
    _progress(f"peak fp32 matmul: {peak:.1f} GFLOP/s")
    results, skipped = [], []
    for i, voc in enumerate(vocoders, 1):
        _progress(f"[{i}/{len(vocoders)}] {voc.kind} {checkpoint_label(str(voc.path))}: timing {repeats} run(s) of "
                  f"{seconds:g} s ...")
        for r in bench_checkpoint(voc, seconds, repeats, peak, skipped=skipped):
            results.append(r)
            _progress(f"    {r['generator']}: {r['samples_per_second']:,.0f} samples/s, RTF {r['real_time_factor']:.4g}")
    if griffin_lim:
        cpu_peak = peak if dev.type == "cpu" else peak_gflops(torch.device("cpu"))
        _progress("griffin-lim ...")
        results.append(bench_griffin_lim(vocoders[0].features, seconds, repeats, cpu_peak))
    report = {
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "threads": torch.get_num_threads(),
        "sample_rate": vocoders[0].sample_rate,
        "torch": torch.__version__,
        "wavedistill_version": __version__,
        "seconds": seconds,
        "repeats": repeats,
        "peak_gflops": peak,
        "results": results,
        "skipped": skipped,
    }
    print(format_table(report))
    try:
        if json_path is not None:
            atomic_write_json(json_path, report)
        if plot_path is not None:
            atomic_write_bytes(plot_path, plot_png(report))
    except OSError as e:
        raise UserError(describe_os_error(e, str(e.filename or json_path or plot_path))) from None
    return report
