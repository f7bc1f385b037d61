"""Command-line interface: ``wavedistill <command> ...``.

Every command reports bad input as one line on stderr and exits with code 2.
Options must be spelt out in full (no abbreviations: ``--max-step`` is refused).
Exit codes: 0 success; 1 ``synthesize`` skipped some inputs (the others were written);
2 bad input; 3 training stopped on non-finite steps; 130 / 143 stopped by SIGINT / SIGTERM
(training first writes a checkpoint at the current step).
"""

from __future__ import annotations

import argparse
import sys

from .errors import NonFiniteError, UserError

OVERRIDES_HELP = "config overrides, e.g. train.lr=5e-4 teacher.layers=30 (see 'wavedistill config --show')"


def _prepare(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.prepare import run_prepare

    cfg = load_config(args.config, args.overrides)
    run_prepare(args.wav_dir, args.out, cfg)
    return 0


def _resume_or_override(args: argparse.Namespace) -> None:
    """``--resume train.lr=1e-4``: an override right after a bare --resume is an override, not a checkpoint path."""
    from pathlib import Path

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = True


def _train_teacher(args: argparse.Namespace) -> int:
    from .train.teacher import train_teacher

    _resume_or_override(args)
    train_teacher(args.config, args.data, args.out, overrides=args.overrides, max_steps=args.max_steps, resume=args.resume,
                  force=args.force)
    return 0


def _train_flow(args: argparse.Namespace) -> int:
    from .train.coupling import train_flow

    _resume_or_override(args)
    train_flow(args.config, args.data, args.out, overrides=args.overrides, max_steps=args.max_steps, resume=args.resume,
               force=args.force, teacher=args.teacher)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from .train.distill import distill

    _resume_or_override(args)
    distill(args.config, args.teacher, args.data, args.out, overrides=args.overrides, max_steps=args.max_steps,
            resume=args.resume, force=args.force)
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
    print(export_checkpoint(args.checkpoint, args.out, card, force=args.force))
    return 0


def _config(args: argparse.Namespace) -> int:
    from .config import Config, format_keys, load_config

    cfg = load_config(args.config, args.overrides) if (args.config or args.overrides) else Config()
    source = f"values from {args.config}" if args.config else "defaults"
    if args.overrides:
        source += " with " + " ".join(args.overrides)
    print(f"# every config key: name, value ({source}), type, meaning\n{format_keys(cfg)}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .info import describe

    print(describe(args.path))
    return 0


def _add_training_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--data", required=True, help="feature cache written by 'wavedistill prepare'")
    sp.add_argument("--out", required=True,
                    help="experiment directory (checkpoints/, logs/, samples/, config.yaml, train.log); one run at a time")
    sp.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many steps (overrides train.max_steps; a resumed run keeps its target unless given)")
    sp.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                    help="continue OUT/checkpoints/latest, or the checkpoint CKPT (e.g. OUT/checkpoints/step-00000400)")
    sp.add_argument("--force", action="store_true",
                    help="resume even though optimisation settings (train.lr, train.batch_size, distill.*) changed")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)


def _flows_demo(args: argparse.Namespace) -> int:
    from .eval.flows_demo import run_flows_demo

    report = run_flows_demo(args.out, steps=args.steps, quick=args.quick, threads=args.threads, seed=args.seed)
    print(f"wrote {args.out}/flows_demo.png, flows_demo.json, flows_demo.md ({report['total_seconds']} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wavedistill", description="Probability density distillation of neural vocoders.", allow_abbrev=False,
        epilog="Exit codes: 0 ok; 1 synthesize skipped some inputs; 2 bad input; 3 non-finite training; "
        "130/143 interrupted (training checkpoints first). 'wavedistill COMMAND --help' describes each command.",
    )
    from .version import __version__

    p.add_argument("--version", action="version", version=f"wavedistill {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sp = sub.add_parser("prepare", help="build a feature cache (waveforms + log-mels) from a directory of audio",
                        allow_abbrev=False)
    sp.add_argument("--wav-dir", required=True, help="directory searched recursively for audio files")
    sp.add_argument("--out", required=True, help="output feature-cache directory (re-running resumes)")
    sp.add_argument("--config", default=None, help="recipe YAML (its features/prepare sections are used)")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    sp.set_defaults(func=_prepare)

    sp = sub.add_parser("train-teacher", help="train a WaveNet teacher by maximum likelihood", allow_abbrev=False,
                        description="Train a WaveNet teacher. Ctrl-C (SIGINT) or SIGTERM finishes the current step, "
                        "writes a checkpoint and exits 130/143; a second signal exits at once.")
    sp.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/demo/conf/teacher.yaml")
    _add_training_options(sp)
    sp.set_defaults(func=_train_teacher)

    sp = sub.add_parser("train-flow", help="train a coupling-flow vocoder (WaveGlow family) by maximum likelihood",
                        allow_abbrev=False,
                        description="Train a coupling-flow vocoder on uniformly dequantized 16-bit audio. Ctrl-C (SIGINT) "
                        "or SIGTERM finishes the current step, writes a checkpoint and exits 130/143; a second signal exits at once.")
    sp.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/demo/conf/coupling.yaml")
    sp.add_argument("--teacher", default=None,
                    help="distil this teacher checkpoint into the flow (KL(flow||teacher) + STFT) instead of maximum likelihood")
    _add_training_options(sp)
    sp.set_defaults(func=_train_flow)

    sp = sub.add_parser("distill", help="distill a trained teacher into a parallel IAF student", allow_abbrev=False,
                        description="Distill a frozen teacher into an IAF student. Ctrl-C (SIGINT) or SIGTERM finishes "
                        "the current step, writes a checkpoint and exits 130/143; a second signal exits at once.")
    sp.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/demo/conf/student.yaml")
    sp.add_argument("--teacher", required=True, help="teacher checkpoint (step directory, latest link or experiment dir)")
    _add_training_options(sp)
    sp.set_defaults(func=_distill)

    sp = sub.add_parser("export", help="copy a checkpoint's weights and config (no training state) for shipping",
                        allow_abbrev=False)
    sp.add_argument("--checkpoint", required=True, help="checkpoint to export (step directory, link or experiment dir)")
    sp.add_argument("--out", required=True, help="new directory for the exported checkpoint")
    sp.add_argument("--card", default=None, help="markdown model card to include as README.md")
    sp.add_argument("--force", action="store_true",
                    help="replace an existing exported checkpoint at --out (its README.md and other files are kept "
                    "unless --card gives a new card)")
    sp.set_defaults(func=_export)

    sp = sub.add_parser("config", help="print every config key with its type, value and meaning", allow_abbrev=False)
    sp.add_argument("--show", action="store_true", help="print the keys (the default action; accepted for clarity)")
    sp.add_argument("--config", default=None, help="show the values this recipe YAML gives instead of the defaults")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    sp.set_defaults(func=_config)

    sp = sub.add_parser("info", help="describe a checkpoint, or list the checkpoints under a directory", allow_abbrev=False)
    sp.add_argument("path", metavar="CKPT|DIR", help="a checkpoint directory, or any directory to search for checkpoints")
    sp.set_defaults(func=_info)

    sp = sub.add_parser("flows-demo", help="fit 2-D toy densities and energies with every flow family; write a PNG and tables",
                        allow_abbrev=False)
    sp.add_argument("--out", required=True, help="output directory (flows_demo.png, .json, .md)")
    sp.add_argument("--steps", type=int, default=None, help="training steps per fit (default 500 for densities, 400 for energies; --quick 15)")
    sp.add_argument("--quick", action="store_true", help="tiny batches, grids and step counts (seconds; a smoke run)")
    sp.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    sp.add_argument("--seed", type=int, default=0, help="random seed of data, initialisation and batches (default 0)")
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
    except KeyboardInterrupt as e:
        detail = f": {e}" if str(e) else ""
        print(f"wavedistill {args.command}: interrupted{detail}", file=sys.stderr)
        return int(getattr(e, "code", 130))


if __name__ == "__main__":
    raise SystemExit(main())
