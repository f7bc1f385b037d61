"""One training run in one experiment directory: lock, graceful stop, resume checks, config.yaml and train.log.

Both training loops use a :class:`Session`::

    with Session(out, "teacher", resume=..., force=..., explicit_max_steps=...) as session:
        ckpt = session.resume(cfg, cfg.teacher)        # where to resume from (None: fresh run)
        ...
        session.start(acc, cfg)                        # before the first write: lock, config.yaml, train.log, hparams
        while ...:
            ...
            session.end_step(run, save_fn)             # SIGINT/SIGTERM: checkpoint this step, then stop

* **Lock.** ``EXP/.wavedistill.lock`` is held with ``fcntl.flock`` for the whole run
  (:class:`~wavedistill.fileio.DirectoryLock`); a second run on the same ``--out`` is
  refused before it reads or writes anything, naming the holder's PID.
* **Graceful stop.** The first SIGINT or SIGTERM lets the current step finish, writes a
  checkpoint at that step (atomically, like every checkpoint) and exits with 130 / 143.
  A second signal stops at once; the last checkpoint on disk is intact.
* **Resume.** ``--resume`` continues ``checkpoints/latest``; ``--resume CKPT`` continues a
  chosen step.  The model and features must match (never overridable); the other
  hyperparameters must match too unless they are in :data:`MAY_CHANGE` or ``--force`` is
  given.  The step target (``train.max_steps``) of the run is kept unless ``--max-steps``
  or ``train.max_steps=N`` is given.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import Config
from ..errors import Interrupted, UserError
from ..fileio import DirectoryLock, atomic_write_text
from .state import check_resume

# Settings a resume may change without --force: bookkeeping, not the optimisation itself.
MAY_CHANGE = frozenset({
    "train.max_steps", "train.log_every", "train.valid_every", "train.valid_utterances", "train.valid_segment_samples",
    "train.save_every", "train.keep_checkpoints", "train.sample_every", "train.sample_seconds", "train.max_bad_steps",
    "train.num_threads", "train.kernels", "train.init_from", "train.max_cpu_seconds",
})
CHECKED_SECTIONS = ("train", "distill")  # model and features are checked by check_resume (never overridable)
SIGNAL_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def changed_settings(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """``(section.key, old, new)`` for every train/distill setting that differs between two config dicts.

    A key the saved config lacks (a setting added to the package after the checkpoint was written) counts as its
    default, which is what the run was trained with."""
    defaults = Config().to_dict()
    out = []
    for section in CHECKED_SECTIONS:
        old_s, new_s = saved.get(section) or {}, now.get(section) or {}
        default_s = defaults.get(section) or {}
        for key in sorted(set(old_s) | set(new_s)):
            old = old_s[key] if key in old_s else default_s.get(key)
            if old != new_s.get(key):
                out.append((f"{section}.{key}", old, new_s.get(key)))
    return out


def saved_config(ckpt: Path) -> dict:
    """The full run config stored with a checkpoint's training state ({} when absent)."""
    try:
        trainer = json.loads((ckpt / "state" / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # load_training_state reports it properly
    cfg = trainer.get("config") if isinstance(trainer, dict) else None
    return cfg if isinstance(cfg, dict) else {}


def hparams(cfg: Config) -> dict[str, Any]:
    """The config flattened to ``section.key`` scalars, as TensorBoard's hyperparameter table wants them."""
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        for key, v in values.items():
            flat[f"{section}.{key}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return flat


class TextLog:
    """Append-only plain-text ``train.log``: one line per logged step (every scalar) and start/resume/stop lines."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None

    def line(self, text: str) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self._f.flush()

    def scalars(self, values: dict, step: int | None) -> None:
        parts = []
        for k, v in values.items():
            if isinstance(v, float):
                parts.append(f"{k}={v:.6g}")
            elif isinstance(v, (int, str, bool)):
                parts.append(f"{k}={v}")
        if parts:
            self.line(f"step {step}: " + " ".join(parts))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def text_tracker(log: TextLog):
    """An accelerate tracker that mirrors ``acc.log`` into ``train.log``."""
    from accelerate.tracking import GeneralTracker

    class _Tracker(GeneralTracker):
        name = "train.log"
        requires_logging_directory = False
        main_process_only = True

        def __init__(self):
            super().__init__()

        @property
        def tracker(self):
            return log

        def store_init_configuration(self, values: dict) -> None:
            pass

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            log.scalars(values, step)

    return _Tracker()


class Session:
    """Lock, signals, resume checks and the run's text record for one training run in ``out``."""

    def __init__(self, out: str | Path, kind: str, resume: bool | str | Path = False, force: bool = False,
                 explicit_max_steps: bool = False):
        self.exp = Path(out)
        self.kind = kind
        self.resume_arg = resume
        self.force = force
        self.explicit_max_steps = explicit_max_steps
        self.lock = DirectoryLock(self.exp, "--out")
        self.log = TextLog(self.exp / "train.log")
        self.resumed_from: Path | None = None
        self.step = 0
        self._signal: int | None = None
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Session":
        self.lock.check()  # another run holds --out: refuse before reading or writing anything
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore_signals()
        if self.lock.held:
            if exc_type is None:
                self.log.line(f"finished at step {self.step}")
            elif not issubclass(exc_type, Interrupted):
                self.log.line(f"failed at step {self.step}: {exc_type.__name__}: {' '.join(str(exc).split())}")
        self.log.close()
        self.lock.release()

    # ------------------------------------------------------------------ resume
    def resume(self, cfg: Config, model_cfg) -> Path | None:
        """The checkpoint to continue (None: fresh run), after checking that the settings allow it."""
        ckpt = check_resume(self.exp, self.resume_arg, self.kind, model_cfg, cfg.features)
        if ckpt is None:
            return None
        saved = saved_config(ckpt)
        if saved and not self.explicit_max_steps:
            target = (saved.get("train") or {}).get("max_steps")
            if isinstance(target, int) and target > 0:
                cfg.train.max_steps = target  # the run's step target survives the resume
        changes = changed_settings(saved, cfg.to_dict()) if saved else []
        refused = [c for c in changes if c[0] not in MAY_CHANGE]
        shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in (refused or changes))
        if refused and not self.force:
            raise UserError(f"cannot resume: settings changed since {ckpt.name} ({shown}); restore them, or pass --force "
                            f"to continue with the new values")
        if changes:
            print(f"resume from {ckpt.name} with changed settings: "
                  + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes), flush=True)
        self.resumed_from = ckpt
        return ckpt

    # ------------------------------------------------------------------ the run
    def start(self, acc, cfg: Config) -> None:
        """Main process, before the first write: take the lock, write config.yaml and train.log's first line,
        log the hyperparameters to TensorBoard, and catch SIGINT/SIGTERM from now on."""
        self.lock.acquire()
        atomic_write_text(self.exp / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        acc.log_with.append(text_tracker(self.log))
        acc.init_trackers(self.kind, config=hparams(cfg))
        how = f"resume from {self.resumed_from}" if self.resumed_from is not None else "start"
        self.log.line(f"{how} {self.kind} training (target step {cfg.train.max_steps})")
        self._install_signals()

    def end_step(self, run, save: Callable[[], Any]) -> None:
        """After a finished step: when a stop was asked for, checkpoint this step (unless just saved) and stop."""
        self.step = run.step
        if self._signal is None:
            return
        last = run.last_good
        if last is None or Path(last).name != f"step-{run.step:08d}":
            save()
        code = SIGNAL_CODES.get(self._signal, 130)
        name = signal.Signals(self._signal).name
        self.log.line(f"stopped by {name} at step {run.step}; checkpoint {run.last_good}")
        raise Interrupted(f"stopped by {name} at step {run.step}; checkpoint written to {run.last_good}; "
                          f"continue with --resume", code)

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNAL_CODES:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # second signal: stop now; checkpoints are written atomically
            if self.lock.held:
                with contextlib.suppress(OSError):
                    self.log.line(f"stopped at once by a second {signal.Signals(signum).name} during step {self.step + 1}")
            raise Interrupted(f"stopped at once by a second {signal.Signals(signum).name}; the last checkpoint is intact",
                              SIGNAL_CODES.get(signum, 130))
        self._signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then writing a checkpoint "
              "(send it again to stop at once)", flush=True)


def explicit_max_steps(max_steps: int | None, overrides: list[str] | None) -> bool:
    """Whether the command line sets the step target (``--max-steps N`` or ``train.max_steps=N``)."""
    return max_steps is not None or any(o.split("=", 1)[0].strip() == "train.max_steps" for o in overrides or [])
