"""Build a C++ source into a plain shared library (C ABI, loaded with :mod:`ctypes`), once per CPU kind and source.

The compiled generator (:mod:`wavedistill.generation.cpp`) and the LP recurrence
(:mod:`wavedistill.kernels.lp_recurrence`) both build this way.  The library lands in
``$WAVEDISTILL_EXTENSIONS_DIR`` (or ``$TORCH_EXTENSIONS_DIR/wavedistill``, or
``~/.cache/wavedistill/torch_extensions``) under a name that hashes the CPU (``-march=native``
depends on it), the source, the flags and the torch version: a changed source builds into a new
directory and never overwrites a library another process has loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch


def disabled() -> bool:
    """``WAVEDISTILL_NO_FASTGEN=1`` turns every compiled CPU path off (the PyTorch paths remain)."""
    return os.environ.get("WAVEDISTILL_NO_FASTGEN", "") not in ("", "0")


def cpu_tag() -> str:
    """Short hash of what ``-march=native`` depends on, so builds for different CPUs never mix."""
    text = platform.machine() + platform.system()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features", "model name", "cpu family", "model", "CPU part", "CPU implementer"):
                    text += line
                if not line.strip() and text:
                    break  # the first processor is enough
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def source_tag(source: Path, flags: list[str]) -> str:
    h = hashlib.sha1(source.read_bytes())
    h.update(" ".join(flags + [torch.__version__]).encode())
    return h.hexdigest()[:8]


def build_root() -> Path:
    if os.environ.get("WAVEDISTILL_EXTENSIONS_DIR"):
        return Path(os.environ["WAVEDISTILL_EXTENSIONS_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "wavedistill"
    return Path.home() / ".cache" / "wavedistill" / "torch_extensions"


def build(prefix: str, source: Path, cflags: list[str], ldflags: list[str] | None = None,
          verbose: bool = False) -> tuple[ctypes.CDLL, str]:
    """Compile ``source`` (if not built yet) and load it: ``(library, path)``.  Raises on any failure."""
    if not source.is_file():
        raise FileNotFoundError(f"source {source} is missing (package installed without its csrc/ folder)")
    ldflags = list(ldflags or [])
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # importing it warns about a CUDA toolkit without a GPU: not our concern
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_log.setLevel(level)
    name = f"{prefix}_{cpu_tag()}_{source_tag(source, cflags + ldflags)}"
    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=ldflags,
        build_directory=str(build_dir), is_python_module=False, with_cuda=False, verbose=verbose,
    )
    return ctypes.CDLL(str(path)), str(path)


class CompiledLibrary:
    """A C-ABI library built and loaded once per process, thread-safe; ``None`` plus the reason when it cannot be.

    ``abi_symbol``/``abi``: the library's version function and the version this Python side expects;
    ``signatures``: ``{function: argtypes}`` (all return ``void``).  Any failure — no compiler, a read-only
    cache, ``WAVEDISTILL_NO_FASTGEN=1`` — is kept as :meth:`error` and the caller takes its PyTorch path.
    """

    def __init__(self, prefix: str, source: Path, cflags: list[str], ldflags: list[str] | None, abi_symbol: str,
                 abi: int, signatures: dict):
        import threading

        self.prefix, self.source, self.cflags, self.ldflags = prefix, source, cflags, ldflags
        self.abi_symbol, self.abi, self.signatures = abi_symbol, abi, signatures
        self._lock = threading.Lock()
        self._lib = None
        self._error: str | None = None

    def load(self):
        with self._lock:
            if self._lib is not None or self._error is not None:
                return self._lib
            try:
                if disabled():
                    raise RuntimeError("disabled by WAVEDISTILL_NO_FASTGEN")
                lib, path = build(self.prefix, self.source, self.cflags, self.ldflags)
                version = getattr(lib, self.abi_symbol)()
                if version != self.abi:
                    raise RuntimeError(f"{path} has ABI {version}, expected {self.abi}")
                for name, args in self.signatures.items():
                    getattr(lib, name).argtypes = args
                    getattr(lib, name).restype = None
                self._lib = lib
            except Exception as e:  # no compiler, read-only cache, ...: the caller's PyTorch path still works
                self._error = f"{type(e).__name__}: {e}".strip()
            return self._lib

    def available(self) -> bool:
        return self.load() is not None

    def error(self) -> str | None:
        """Why :meth:`available` is False (``None`` when it is True)."""
        self.load()
        return self._error
