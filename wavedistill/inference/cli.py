"""CLI entries for synthesize, eval and bench (registered by :func:`wavedistill.cli.build_parser`)."""

from __future__ import annotations

import argparse


def _synthesize(args: argparse.Namespace) -> int:
    from .synthesis import run_synthesize

    result = run_synthesize(args.checkpoint, args.inputs, args.out_dir, device=args.device, seed=args.seed,
                            temperature=args.temperature, batch_size=args.batch_size, chunk_seconds=args.chunk_seconds,
                            speaker=args.speaker, sample_rate=args.sample_rate, subtype=args.subtype,
                            skip_existing=args.skip_existing)
    return 1 if result["skipped"] else 0  # some inputs were unusable: the others are written, the status says so


def _eval(args: argparse.Namespace) -> int:
    from ..eval.report import run_eval

    run_eval(args.checkpoint, args.data, args.out, split=args.split, max_utterances=args.max_utterances,
             seed=args.seed, device=args.device, wav_dir=args.wav_dir, temperature=args.temperature)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ..eval.bench import run_bench

    run_bench(args.checkpoint, device=args.device, seconds=args.seconds, repeats=args.repeats, json_path=args.json,
              plot_path=args.plot, threads=args.threads)
    return 0


def register(sub) -> None:
    sp = sub.add_parser(
        "synthesize", help="vocode audio files, directories, .npy log-mels or list files with a teacher or student checkpoint",
        allow_abbrev=False,
        description="Write OUT_DIR/<input stem>.wav for every usable INPUT. Audio files are copy-synthesised from their "
        "log-mel; .npy files hold a log-mel [n_mels, frames]; directories are searched recursively for audio and .npy "
        "files; .txt/.list/.scp files list one path per line (relative to the list). Output is written as it is "
        "produced, in chunks, so memory stays bounded for inputs of any length. Unusable inputs are reported and "
        "skipped, and the exit status is then 1 (the other outputs are written); colliding names get -2, -3... and "
        "the mapping is printed.",
    )
    sp.add_argument("--checkpoint", required=True, help="checkpoint directory, latest/best link or experiment directory")
    sp.add_argument("--out-dir", required=True, help="directory for the output wavs (created if needed)")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    sp.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sp.add_argument("--temperature", type=float, default=1.0, help="noise scale (default 1.0)")
    sp.add_argument("--batch-size", type=int, default=None,
                    help="inputs of similar length synthesised together (default 1 on CPU, where batching is slower; 4 on CUDA)")
    sp.add_argument("--chunk-seconds", type=float, default=10.0,
                    help="synthesise in chunks of this many seconds (default 10; any value gives the same audio, "
                    "larger ones use more memory)")
    sp.add_argument("--speaker", type=int, default=None, help="speaker id for a multi-speaker teacher")
    sp.add_argument("--sample-rate", type=int, default=None,
                    help="output sample rate in Hz (default: the model's; others are resampled with soxr)")
    sp.add_argument("--subtype", default="PCM_16", help="WAV sample format: PCM_16 (default), PCM_24, PCM_32, FLOAT, ...")
    sp.add_argument("--skip-existing", action="store_true", help="keep outputs that already exist instead of rewriting them")
    sp.add_argument("inputs", nargs="+", metavar="INPUT", help="audio file, directory, .npy log-mel or list file")
    sp.set_defaults(func=_synthesize)

    sp = sub.add_parser("eval", help="objective metrics (PESQ, STOI, MCD, ...) of checkpoints and Griffin-Lim on a split",
                        allow_abbrev=False)
    sp.add_argument("--checkpoint", action="append", required=True, help="checkpoint to evaluate (repeatable)")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", default=None, help="feature cache written by 'wavedistill prepare'")
    src.add_argument("--wav-dir", default=None,
                     help="evaluate on the audio files under this directory instead (no cache needed: log-mels are "
                     "computed with the checkpoints' features; e.g. unseen speakers)")
    sp.add_argument("--split", default="test", choices=("train", "valid", "test"), help="split of --data (default test)")
    sp.add_argument("--out", required=True,
                    help="report directory (metrics.json, report.md, spectrograms/, wav/); a re-run replaces what the "
                    "previous eval wrote there, and a non-empty directory eval did not write is refused")
    sp.add_argument("--max-utterances", type=int, default=None, help="evaluate only the first N utterances")
    sp.add_argument("--seed", type=int, default=0, help="noise seed of the vocoders and of Griffin-Lim (default 0)")
    sp.add_argument("--temperature", type=float, default=1.0,
                    help="noise scale of the vocoders, as in synthesize (default 1.0; Griffin-Lim and the likelihood "
                    "column do not depend on it)")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    sp.set_defaults(func=_eval)

    sp = sub.add_parser("bench", help="generation speed (samples/s, real-time factor, FLOP efficiency)", allow_abbrev=False)
    sp.add_argument("--checkpoint", action="append", required=True, help="checkpoint to time (repeatable)")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    sp.add_argument("--seconds", type=float, default=1.0, help="seconds of audio per run (default 1.0)")
    sp.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    sp.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    sp.add_argument("--plot", default=None, metavar="FILE", help="write a bar chart of samples/s (PNG)")
    sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sp.set_defaults(func=_bench)
