"""Command-line interface: ``wavedistill <command> ...``.

Every command reports bad input as one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import NonFiniteError, UserError


def _prepare(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.prepare import run_prepare

    cfg = load_config(args.config, args.overrides)
    run_prepare(args.wav_dir, args.out, cfg)
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    from .train.teacher import train_teacher

    train_teacher(args.config, args.data, args.out, overrides=args.overrides, max_steps=args.max_steps, resume=args.resume)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from .train.distill import distill

    distill(args.config, args.teacher, args.data, args.out, overrides=args.overrides, max_steps=args.max_steps, resume=args.resume)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import export_checkpoint

    card = None
    if args.card:
        from pathlib import Path

        path = Path(args.card)
        if not path.is_file():
            raise UserError(f"model card {path} does not exist")
        card = path.read_text(encoding="utf-8")
    print(export_checkpoint(args.checkpoint, args.out, card))
    return 0


def _flows_demo(args: argparse.Namespace) -> int:
    from .eval.flows_demo import run_flows_demo

    report = run_flows_demo(args.out, steps=args.steps, quick=args.quick, threads=args.threads, seed=args.seed)
    print(f"wrote {args.out}/flows_demo.png, flows_demo.json, flows_demo.md ({report['total_seconds']} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wavedistill", description="Probability density distillation of neural vocoders.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"wavedistill {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sp = sub.add_parser("prepare", help="build a feature cache (waveforms + log-mels) from a directory of audio")
    sp.add_argument("--wav-dir", required=True, help="directory searched recursively for audio files")
    sp.add_argument("--out", required=True, help="output feature-cache directory")
    sp.add_argument("--config", default=None, help="recipe YAML (features/prepare sections are used)")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value")
    sp.set_defaults(func=_prepare)

    sp = sub.add_parser("train-teacher", help="train a WaveNet teacher by maximum likelihood")
    sp.add_argument("--config", required=True)
    sp.add_argument("--data", required=True, help="feature cache written by 'wavedistill prepare'")
    sp.add_argument("--out", required=True, help="experiment directory (checkpoints, logs)")
    sp.add_argument("--max-steps", type=int, default=None)
    sp.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value")
    sp.set_defaults(func=_train_teacher)

    sp = sub.add_parser("distill", help="distill a trained teacher into a parallel IAF student")
    sp.add_argument("--config", required=True)
    sp.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    sp.add_argument("--data", required=True, help="feature cache written by 'wavedistill prepare'")
    sp.add_argument("--out", required=True, help="experiment directory (checkpoints, logs)")
    sp.add_argument("--max-steps", type=int, default=None)
    sp.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value")
    sp.set_defaults(func=_distill)

    sp = sub.add_parser("export", help="copy a checkpoint's weights and config (no training state) for shipping")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--card", default=None, help="markdown model card to include as README.md")
    sp.set_defaults(func=_export)

    sp = sub.add_parser("flows-demo", help="fit 2-D toy densities and energies with every flow family; write a PNG and tables")
    sp.add_argument("--out", required=True, help="output directory (flows_demo.png, .json, .md)")
    sp.add_argument("--steps", type=int, default=None, help="training steps per fit (default 500 for densities, 400 for energies; --quick 15)")
    sp.add_argument("--quick", action="store_true", help="tiny batches, grids and step counts (seconds; a smoke run)")
    sp.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=_flows_demo)

    from .inference.cli import register

    register(sub)  # synthesize, eval, bench
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            return int(args.func(args) or 0)
        except BaseException:
            from tqdm import tqdm
            for bar in list(getattr(tqdm, "_instances", [])):
                bar.close()
            raise
    except UserError as e:
        msg = " ".join(str(e).split())
        print(f"wavedistill {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"wavedistill {args.command}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"wavedistill {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
