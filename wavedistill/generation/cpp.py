"""Fast CPU autoregressive generation for the WaveNet teacher (a compiled step loop).

:class:`FastCachedGenerator` computes exactly what
:class:`~wavedistill.generation.CachedGenerator` computes — the same linearised
weights, the same ring-buffer caches (it uses and returns
:class:`~wavedistill.generation.GenerationCache` objects, so a cache can be
handed from one generator to the other, ``x_prev`` included), the same
per-step maths and the same sampling from explicit uniform noise — but runs the
loop over time steps and layers in C++ (``wavedistill/generation/csrc/fastgen.cpp``), so
it is bound by memory bandwidth (the ~2 MB of demo-size weights stream from
cache at every step) instead of Python overhead.  Results agree with the
Python generator to float32 rounding (~2e-7), because the sums run in a
different order; see ``tests/test_fastgen.py``.

Everything inside the loop runs in the extension: the sampling from explicit uniform noise (Gumbel-max over
the mixture logits, logistic or normal inverse CDF, with the clamps and
operation order of :mod:`wavedistill.distributions`).  The conditioning
projections of all layers come from Python: with a
:class:`~wavedistill.generation.FrameConditioning` (what :meth:`Teacher.generate`
passes) they are computed at frame rate and upsampled, ``PROJECTION_BLOCK``
steps at a time, laid out ``[T, B, L·G]`` and read in place by the extension;
with a plain upsampled ``c [B, C, T]`` (the per-sample reference) the extension
projects every step itself (one matrix product per chunk of 32 steps, kept in
cache).  The torch work between calls runs on ``threads`` intra-op threads:
on a busy machine a parallel torch op leaves OpenMP workers spinning on the
other core, which cost this path ~40% of its speed in measurements.

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load`
(``-O3 -march=native``, no fast-math: tanh and sigmoid use ~1-ulp polynomial
approximations) into a build directory outside the source tree, one per CPU
kind and source version: ``$WAVEDISTILL_EXTENSIONS_DIR``, else
``$TORCH_EXTENSIONS_DIR/wavedistill``, else ``~/.cache/wavedistill/torch_extensions``.
Concurrent builds are serialised by torch's file lock.  It has a plain C ABI
(called through :mod:`ctypes`, which releases the GIL), so the build needs no
torch or pybind11 headers: the compiler runs ~2 s.  Set ``WAVEDISTILL_NO_FASTGEN=1`` to
disable it.  :func:`available` says whether it can be used; when it cannot,
:func:`build_error` says why and :class:`FastCachedGenerator` raises
:class:`FastGenUnavailable`.

Source-filter teachers (linear prediction / pre-emphasis, ``teacher.source``): :meth:`FastCachedGenerator.run`
takes the window's :class:`~wavedistill.flows.LPCoefficients` as ``lpc=`` like the Python generator, hands
the extension the predictor of every step (``LPCoefficients.per_sample``, one block at a time, so the frame
convention lives in one place) and the last ``p`` samples of every row, and the extension adds the
prediction to the locations before sampling; the history is carried in ``cache.lp_history``.

Only float32 teachers on the CPU are supported (the Python generator remains
the path for other devices and dtypes).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from ..nn.distributions import DiscretizedGaussian, DiscretizedMixtureOfLogistics
from .cached import PROJECTION_BLOCK, CachedGenerator, FrameConditioning, GenerationCache
from ..kernels import cbuild
from ..nn.wavenet import SQRT_HALF

__all__ = [
    "FastCachedGenerator", "FastGenUnavailable", "available", "build_error", "flops_per_sample", "library_path",
    "supports",
]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "fastgen.cpp"
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-pthread"]
_LDFLAGS = ["-pthread"]
_PAD = 16  # floats; must equal PAD in fastgen.cpp
_ABI = 7

_lock = threading.Lock()
_lib = None
_lib_path: str | None = None
_error: str | None = None


class FastGenUnavailable(RuntimeError):
    """The compiled generator cannot be built or loaded here (see :func:`build_error`)."""


def _load(verbose: bool = False):
    """Build (once per CPU kind and source version) and load the library; cache the outcome."""
    global _lib, _lib_path, _error
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        try:
            if cbuild.disabled():
                raise FastGenUnavailable("disabled by WAVEDISTILL_NO_FASTGEN")
            lib, path = cbuild.build("wavedistill_fastgen", _SOURCE, _CFLAGS, _LDFLAGS, verbose)
            if lib.fg_abi_version() != _ABI:
                raise FastGenUnavailable(f"{path} has ABI {lib.fg_abi_version()}, expected {_ABI}")
            if _PAD % lib.fg_vector_width():
                raise FastGenUnavailable(f"vector width {lib.fg_vector_width()} does not divide {_PAD}")
            p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
            lib.fg_run.restype = ctypes.c_int
            lib.fg_run.argtypes = [p, p, p, i64, i64, i64, p, i64, i64, i64, p, i64, i64, i64, p, p, i64, i64,
                                   f32, f32, f32, f32, i64, i64, p, p, i64, i64, i64, p]
            lib.fg_ndtri.restype, lib.fg_ndtri.argtypes = ctypes.c_double, [ctypes.c_double]
            _lib, _lib_path = lib, path
        except Exception as e:  # no compiler, no ninja, read-only cache, ...: report, never crash the caller
            _error = f"{type(e).__name__}: {e}".strip()
        return _lib


def available() -> bool:
    """True if the compiled generator builds and loads here (builds it on first call)."""
    return _load() is not None


def build_error() -> str | None:
    """Why :func:`available` is False (``None`` when it is True or was not checked yet)."""
    _load()
    return _error


def library_path() -> str | None:
    """Path of the loaded shared library (``None`` if unavailable)."""
    _load()
    return _lib_path


def _pad(n: int) -> int:
    return (n + _PAD - 1) // _PAD * _PAD


class FastCachedGenerator:
    """Drop-in for :class:`~wavedistill.generation.CachedGenerator` with the step loop compiled.

    ``threads``: at most this many threads, each generating its own batch
    rows (independent streams, no synchronisation inside a call), so batch 1
    runs on one thread.  One thread is the default: a step streams all the
    weights (~2 MB at demo size) from the cache, one thread running several
    rows streams them once for all of them, and on the shared 2-core machine
    where this was measured one thread generating batch 2 beat two threads
    (29.6k vs 16.7k samples/s).  ``split_channels=True`` also puts the
    threads that batch rows leave over to work inside a step: they split the
    gated channels of every layer and meet at one barrier per layer.  A
    demo-size step is ~1 MFLOP (~40 µs); splitting batch 1 over 2 threads ran
    3-4x *slower* there (a barrier waits for a descheduled partner).
    """

    block = 1024  # samples per C++ call (and per progress callback)

    def __init__(self, teacher, threads: int = 1, split_channels: bool = False):
        self._lib = _load()
        if self._lib is None:
            raise FastGenUnavailable(f"fast CPU generation is unavailable: {_error}")
        self.ref = ref = CachedGenerator(teacher)
        if ref.device.type != "cpu" or ref.dtype != torch.float32:
            raise ValueError(f"FastCachedGenerator needs a float32 teacher on the CPU, got {ref.dtype} on {ref.device}")
        if isinstance(ref.dist, DiscretizedMixtureOfLogistics):
            self.kind, self.mixtures, self.n_noise = 0, ref.dist.k, ref.dist.k + 1
        elif isinstance(ref.dist, DiscretizedGaussian):
            self.kind, self.mixtures, self.n_noise = 1, 1, 1
        else:
            raise ValueError(f"unsupported output distribution {type(ref.dist).__name__}")
        self.dist = ref.dist
        self.threads = max(1, int(threads))
        self.split_channels = bool(split_channels)
        self._pack()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def _pack(self) -> None:
        ref, w = self.ref, self.ref.weights
        k, L = w.kernel_size, len(w.layers)
        R, G, S = w.residual, w.gate, w.skip
        H = G // 2
        P = w.h2w.shape[1]
        Rp, Hp, Sp, Pp = _pad(R), _pad(H), _pad(S), _pad(P)
        chunks: list[torch.Tensor] = []
        size = 0

        def put(t: torch.Tensor) -> int:
            nonlocal size
            off = size
            flat = t.detach().to(torch.float32).reshape(-1)
            chunks.append(flat)
            size += flat.numel()
            extra = (-size) % _PAD
            if extra:
                chunks.append(flat.new_zeros(extra))
                size += extra
            return off

        def vec(v: torch.Tensor, n: int) -> torch.Tensor:
            out = torch.zeros(n)
            out[: v.numel()] = v
            return out

        def gate_cols(m: torch.Tensor) -> torch.Tensor:
            """``[..., G]`` → ``[..., 2·Hp]`` with the tanh and sigmoid halves padded separately."""
            out = m.new_zeros(*m.shape[:-1], 2 * Hp)
            out[..., :H] = m[..., :H]
            out[..., Hp : Hp + H] = m[..., H:]
            return out

        cfg = [L, k, R, Rp, G, H, Hp, S, Sp, P, Pp, self.kind, self.mixtures, self.n_noise]
        off_in, off_bin = put(vec(w.w_in, Rp)), put(vec(w.b_in, Rp))
        h1w = torch.zeros(Sp, Sp)
        h1w[:S, :S] = w.h1w
        h2w = torch.zeros(Sp, Pp)
        h2w[:S, :P] = w.h2w
        heads = [put(h1w), put(vec(w.h1b, Sp)), put(h2w), put(vec(w.h2b, Pp))]
        C = w.w_cond.shape[1]
        LGp = _pad(L * G)
        wc = torch.zeros(C, LGp)
        wc[:, : L * G] = w.w_cond.t()  # [C, L*G]: column l*G + g
        self._c_index = len(cfg) + 2 + len(heads)  # where C sits: 0 there means "projections given"
        cfg += [off_in, off_bin] + heads + [C, LGp, put(wc)]
        for layer in w.layers:
            d, b_conv, w_out, b_out = layer.dilation, layer.b_conv, layer.w_out, layer.b_out
            wg = torch.zeros(k, Rp, G)
            wg[:, :R] = layer.w_taps.reshape(k, R, G)
            wg = gate_cols(wg.reshape(k * Rp, G))
            wo = torch.zeros(Hp, Rp + Sp)
            wo[:H, :R] = w_out[:, :R]
            wo[:H, Rp : Rp + S] = w_out[:, R:]
            bo = torch.zeros(Rp + Sp)
            bo[:R], bo[Rp : Rp + S] = b_out[:R], b_out[R:]
            cfg += [d, put(wg), put(gate_cols(b_conv)), put(wo), put(bo)]
        self.weights = torch.cat(chunks).contiguous()
        self.cfg = torch.tensor(cfg, dtype=torch.int64)
        self.cfg_given = self.cfg.clone()
        self.cfg_given[self._c_index] = 0
        self.dims = dict(L=L, k=k, R=R, G=G, S=S, P=P, C=C)
        self.skip_scale = ref.skip_scale

    # ------------------------------------------------------------------ API (as CachedGenerator)
    def new_cache(self, batch: int) -> GenerationCache:
        return self.ref.new_cache(batch)

    @torch.no_grad()
    def run(self, c, noise: torch.Tensor, temperature: float = 1.0, cache: GenerationCache | None = None,
            progress=None, lpc=None, return_params: bool = False):
        """Same contract as :meth:`CachedGenerator.run`: conditioning ``c`` (a
        :class:`~wavedistill.generation.FrameConditioning`, or upsampled ``[B, C, T]``: the per-sample
        reference) and uniform ``noise [B, n_noise, T]`` → samples ``[B, T]``.

        ``lpc`` (:class:`~wavedistill.flows.LPCoefficients` of this window, source-filter teachers): every
        step's location is shifted by ``Σ_k a_k(t)·x_{t-1-k}`` over the generated history, which is kept in
        ``cache.lp_history`` (``[B, p]`` float32, most recent first), so chunks continue seamlessly.

        With ``return_params=True`` also returns the distribution parameters of every step
        ``[B, P, T]`` (what ``CachedGenerator.step`` returned, shifted by the prediction with ``lpc``),
        for testing.
        """
        B, C, T = c.shape
        if c.device.type != "cpu":
            raise ValueError("FastCachedGenerator runs on the CPU; move c to the CPU")
        if C != self.dims["C"]:
            raise ValueError(f"c has {C} channels, the teacher expects {self.dims['C']}")
        frame_rate = isinstance(c, FrameConditioning)
        if frame_rate:
            if c.dtype != torch.float32:
                c = FrameConditioning(c.cond, c.h.float(), c.start, c.stop)
            cf = c
        else:
            cf = c if c.dtype == torch.float32 else c.to(torch.float32)
        if noise.device.type != "cpu":
            raise ValueError("FastCachedGenerator runs on the CPU; move noise to the CPU")
        nf = noise if noise.dtype == torch.float32 else noise.to(torch.float32)  # as dist.sample casts it
        if noise.shape[0] != B or noise.shape[1] < self.n_noise or noise.shape[2] < T:
            raise ValueError(f"noise must be [B={B}, {self.n_noise}, >={T}], got {tuple(noise.shape)}")
        cache = cache or self.new_cache(B)
        ptrs = []
        for buf, m in zip(cache.buffers, self.ref.sizes):
            if buf.shape != (m, B, self.dims["R"]) or buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device.type != "cpu":
                raise ValueError("cache does not match this generator and batch size")
            ptrs.append(buf.data_ptr())
        bufs = torch.tensor(ptrs, dtype=torch.int64)
        out = torch.empty(B, T, dtype=torch.float32)  # every sample is written by the kernel
        if cache.x_prev is not None:  # continue from the last sample of a previous run
            x_prev = cache.x_prev.detach().to(device="cpu", dtype=torch.float32).reshape(B).clone()
        else:
            x_prev = torch.zeros(B, dtype=torch.float32)
        params = torch.empty(T, B, self.dims["P"], dtype=torch.float32) if return_params else None
        hist = self._lp_history(lpc, cache, B)
        teams = min(self.threads, B)
        team_size = self.threads // teams if self.split_channels else 1
        span = self.block * max(1, -(-PROJECTION_BLOCK // self.block))  # steps per projection block
        proj = proj_start = None
        for start in range(0, T, self.block):
            stop = min(T, start + self.block)
            if frame_rate:
                if proj is None or stop > proj_start + proj.shape[0]:
                    proj_start = start
                    with _torch_threads(self.threads):
                        proj = cf.projections_tbd(self.ref.w_cond, start, min(T, start + span))  # [n, B, L*G]
                cb = proj[start - proj_start :]
                strides = (cb.stride(1), 1, cb.stride(0))  # (batch, channel, step) as the extension indexes
            else:
                cb = cf[:, :, start:stop]
                strides = cb.stride()
            nz = nf[:, :, start:stop]
            coef = None
            if lpc is not None:  # [B, n, p]: the predictor of every step of the block, as CachedGenerator.run
                coef = lpc.shifted(start).per_sample(stop - start, B, torch.float32).contiguous()
            rc = self._lib.fg_run(
                self.weights.data_ptr(), (self.cfg_given if frame_rate else self.cfg).data_ptr(), bufs.data_ptr(),
                B, stop - start, cache.t, cb.data_ptr(), *strides, nz.data_ptr(), *nz.stride(), x_prev.data_ptr(),
                out[:, start:].data_ptr(), T, 1, float(temperature), float(self.dist.log_scale_min),
                float(self.skip_scale), float(SQRT_HALF), teams, team_size,
                params[start:].data_ptr() if params is not None else None,
                coef.data_ptr() if coef is not None else None, *(coef.stride()[:2] if coef is not None else (0, 0)),
                hist.shape[1] if hist is not None else 0, hist.data_ptr() if hist is not None else None,
            )
            if rc != 0:
                raise RuntimeError(f"fastgen kernel rejected its configuration (code {rc})")
            cache.t += stop - start
            if progress is not None:
                progress(stop - start)
        cache.x_prev = x_prev
        cache.lp_history = hist
        if return_params:
            return out, params.permute(1, 2, 0)
        return out

    @staticmethod
    def _lp_history(lpc, cache: GenerationCache, B: int) -> torch.Tensor | None:
        """The LP history ``[B, p]`` the extension updates in place (a copy of ``cache.lp_history``, else zeros);
        ``None`` without ``lpc`` (as the Python generator, which then drops the cache's history)."""
        if lpc is None:
            return None
        if lpc.a.device.type != "cpu":
            raise ValueError("FastCachedGenerator runs on the CPU; move the LP coefficients to the CPU")
        p = lpc.order
        if lpc.a.dim() != 3 or lpc.a.shape[0] not in (1, B):
            raise ValueError(f"LP coefficients must be [1 or B={B}, frames, p], got {tuple(lpc.a.shape)}")
        if cache.lp_history is None:
            return torch.zeros(B, p, dtype=torch.float32)
        if tuple(cache.lp_history.shape) != (B, p):
            raise ValueError(f"cache.lp_history is {tuple(cache.lp_history.shape)}, expected [B={B}, p={p}]")
        return cache.lp_history.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


class _torch_threads:
    """Runs a block of torch work on at most ``n`` intra-op threads, then restores the setting."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n < self.old:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)


def ndtri(p: float) -> float:
    """The extension's standard normal quantile (float64), exposed for testing."""
    if _load() is None:
        raise FastGenUnavailable(f"fast CPU generation is unavailable: {_error}")
    return float(_lib.fg_ndtri(float(p)))


def supports(teacher) -> bool:
    """True if :class:`FastCachedGenerator` can run this teacher: float32 on the CPU, extension available."""
    p = next(teacher.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and available()


def flops_per_sample(layers: int, kernel: int, residual: int, gate: int, skip: int, n_params: int) -> int:
    """Multiply-adds × 2 of one cached step: gate, residual/skip and head matvecs."""
    per_layer = 2 * kernel * residual * gate + 2 * (gate // 2) * (residual + skip)
    return layers * per_layer + 2 * skip * skip + 2 * skip * n_params
