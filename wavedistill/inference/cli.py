"""CLI entries for synthesize, eval and bench (registered by :func:`wavedistill.cli.build_parser`)."""

from __future__ import annotations

import argparse


def _synthesize(args: argparse.Namespace) -> int:
    from .synthesis import run_synthesize

    run_synthesize(args.checkpoint, args.inputs, args.out_dir, device=args.device, seed=args.seed,
                   temperature=args.temperature, batch_size=args.batch_size, chunk_seconds=args.chunk_seconds,
                   speaker=args.speaker)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..eval.report import run_eval

    run_eval(args.checkpoint, args.data, args.out, split=args.split, max_utterances=args.max_utterances,
             seed=args.seed, device=args.device)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ..eval.bench import run_bench

    run_bench(args.checkpoint, device=args.device, seconds=args.seconds, repeats=args.repeats, json_path=args.json,
              plot_path=args.plot, threads=args.threads)
    return 0


def register(sub) -> None:
    sp = sub.add_parser(
        "synthesize", help="vocode audio files, .npy log-mels or list files with a teacher or student checkpoint",
        description="Write OUT_DIR/<input stem>.wav (16-bit PCM, model rate) for every usable INPUT. Audio files are "
        "copy-synthesised from their log-mel; .npy files hold a log-mel [n_mels, frames]; .txt/.list/.scp files list "
        "one path per line (relative to the list). Unusable inputs are reported and skipped.",
    )
    sp.add_argument("--checkpoint", required=True, help="checkpoint directory, latest/best link or experiment directory")
    sp.add_argument("--out-dir", required=True, help="directory for the output wavs")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    sp.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sp.add_argument("--temperature", type=float, default=1.0, help="noise scale (default 1.0)")
    sp.add_argument("--batch-size", type=int, default=4, help="inputs of similar length synthesised together (default 4)")
    sp.add_argument("--chunk-seconds", type=float, default=None,
                    help="synthesise long inputs in chunks of this many seconds (same output, bounded memory)")
    sp.add_argument("--speaker", type=int, default=None, help="speaker id for a multi-speaker teacher")
    sp.add_argument("inputs", nargs="+", metavar="INPUT")
    sp.set_defaults(func=_synthesize)

    sp = sub.add_parser("eval", help="objective metrics (PESQ, STOI, MCD, ...) of checkpoints and Griffin-Lim on a split")
    sp.add_argument("--checkpoint", action="append", required=True, help="checkpoint to evaluate (repeatable)")
    sp.add_argument("--data", required=True, help="feature cache written by 'wavedistill prepare'")
    sp.add_argument("--split", default="test", choices=("train", "valid", "test"))
    sp.add_argument("--out", required=True, help="report directory (metrics.json, report.md, spectrograms/, wav/)")
    sp.add_argument("--max-utterances", type=int, default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    sp.set_defaults(func=_eval)

    sp = sub.add_parser("bench", help="generation speed (samples/s, real-time factor, FLOP efficiency)")
    sp.add_argument("--checkpoint", action="append", required=True, help="checkpoint to time (repeatable)")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    sp.add_argument("--seconds", type=float, default=1.0, help="seconds of audio per run (default 1.0)")
    sp.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    sp.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    sp.add_argument("--plot", default=None, metavar="FILE", help="write a bar chart of samples/s (PNG)")
    sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sp.set_defaults(func=_bench)
