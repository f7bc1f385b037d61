"""Atomic file writes and safe tensor files.

Every write that matters goes to a temporary name in the same directory, is
flushed and fsync'ed, then renamed over the target: a reader sees the old file
or the new one, never half of one.  Tensors are stored with safetensors (no
pickle anywhere on a loading path).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from .errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_os_error(e: OSError, what: str) -> str:
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {what}; free some space or choose another --out"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {what} ({os.strerror(e.errno)}); choose a writable location"
    return f"could not write {what} ({e.strerror or e}); check the path and the disk"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return st_load_bytes(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a valid safetensors file ({msg}); it may be truncated or corrupt") from None


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place.

    Yields the temporary directory; on success it becomes ``target`` (which
    must not exist yet); on any error it is removed and ``target`` untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous version back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_symlink(link: str | Path, target_name: str) -> None:
    """Point ``link`` at ``target_name`` (relative) atomically."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.lnk")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is corrupt ({e}); delete it and re-run") from None


def unique_names(stems: list[str]) -> list[str]:
    """Output names from input stems; repeats become ``name-2``, ``name-3``... never taking another stem's name."""
    natural = set(stems)
    used: set[str] = set()
    out = []
    for s in stems:
        name, k = s, 2
        while name in used or (name != s and name in natural):
            name, k = f"{s}-{k}", k + 1
        used.add(name)
        out.append(name)
    return out


LOCK_NAME = ".wavedistill.lock"


class DirectoryLock:
    """One writer per directory: an exclusive ``fcntl.flock`` on ``DIR/.wavedistill.lock``.

    The kernel drops the lock when the holder dies (even by SIGKILL), so a
    leftover lock file never blocks the next run.  The file holds the holder's
    PID for the refusal message and is removed on release, together with the
    directory when this lock created it and a failed run left it empty.
    ``check()`` tests for a holder without creating or changing anything.
    """

    def __init__(self, directory: str | Path, what: str = "--out"):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._created_dir = False

    def _refuse(self) -> UserError:
        try:
            pid = self.path.read_text(encoding="ascii").strip() or "unknown"
        except (OSError, UnicodeDecodeError):
            pid = "unknown"
        return UserError(f"{self.what} {self.dir} is in use by another wavedistill run (PID {pid}); "
                         "wait for it to finish or choose another directory")

    def check(self) -> None:
        """Raise a UserError naming the holder's PID when another process holds the lock; write nothing."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or unreadable directory: the real write reports it)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refuse() from None
        finally:
            os.close(fd)  # closing drops a lock taken here

    def acquire(self) -> "DirectoryLock":
        import fcntl

        if self._fd is not None:
            return self
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"{self.what} {self.dir} exists and is not a directory; choose another {self.what}")
        try:
            if not self.dir.exists():
                self.dir.mkdir(parents=True)
                self._created_dir = True
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._refuse() from None
                try:  # the file may have been unlinked by a holder releasing between our open and flock: retry
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError as e:
            raise UserError(describe_os_error(e, f"{self.what} {self.dir}")) from None
        self._fd = fd
        return self

    def release(self, remove_empty_dir: bool = False) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: a waiting opener sees another inode and retries
        os.close(self._fd)
        self._fd = None
        if remove_empty_dir and self._created_dir:
            with contextlib.suppress(OSError):
                self.dir.rmdir()  # only if empty

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(remove_empty_dir=exc_type is not None)
