"""The CPU backend ``native``: ``cpu_quant.c``, compiled at first use and cached.

Torch's CPU kernels make one pass over memory per operation, and the fp8 cast is scalar code; a
per-tensor fp8 quantization with its SQNR took ~87 ms per 12288 x 3072 bf16 weight on two cores.
``cpu_quant.c`` does the same math in one pass of vector code. Like Triton's launcher, it needs a C
compiler on the machine (``$CC``, else ``cc``, ``gcc`` or ``clang``); without one, :func:`available`
says why and the converter keeps the torch path.

The shared library lives in ``$QUANTKIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/quantkit`` or
``~/.cache/quantkit``), named by a hash of the source, the compiler and this CPU's flags, and is
written under a temporary name and renamed, so concurrent first uses do not clash.

Rows are split over ``torch.get_num_threads()`` threads (ctypes releases the GIL during a call).
Each row's SQNR sums are fp64 in a fixed order, so results do not depend on the thread count.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..formats import scaled
from ..formats.scaled import ScaledFormat
from ..quantize import ErrorStats

SOURCE = Path(__file__).with_name("cpu_quant.c")
CACHE_ENV = "QUANTKIT_CACHE_DIR"
# No -ffast-math and no FMA contraction: every fp32 operation must round as torch's does.
FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
NATIVE_FLAGS = ["-march=native"]
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FP8_MANTISSA = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}  # the kernel knows each one's bias

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if Path(cc).is_file() else None)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quantkit"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str, source: Path = SOURCE) -> tuple[Path, bool]:
    """The built library of ``source`` and whether it lies in a private temporary folder (the cache not
    writable) rather than in the cache."""
    src = source.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(FLAGS).encode(), _cpu_id().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    name = f"{source.stem}-{key}{'.dll' if os.name == 'nt' else '.so'}"
    lib = cache_dir() / name
    if lib.is_file():
        return lib, False
    private = False
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=f".{name}.", suffix=".tmp")
    except OSError:  # cache not writable: build into a private temporary folder, uncached
        lib = Path(tempfile.mkdtemp(prefix="quantkit-native-")) / name
        private = True
        fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        for extra in (NATIVE_FLAGS, []):  # some compilers (Apple clang on arm64) refuse -march=native
            r = subprocess.run([cc, *FLAGS, *extra, str(source), "-o", tmp], capture_output=True, text=True,
                               timeout=300)
            if r.returncode == 0:
                os.replace(tmp, lib)
                return lib, private
        last = (r.stderr or r.stdout).strip().splitlines()
        raise RuntimeError(f"{cc} could not build {source.name}: {last[-1] if last else 'failed'}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if private and not os.path.exists(lib):
            shutil.rmtree(lib.parent, ignore_errors=True)


def open_library(cc: str, source: Path = SOURCE) -> ctypes.CDLL:
    """``source``'s library, built at first use and loaded. One built into a private temporary folder
    is removed once loaded (the process keeps its mapping), so no folder is left behind; Windows cannot
    remove a loaded DLL, so there it stays."""
    path, private = _build(cc, source)
    try:
        return ctypes.CDLL(str(path))
    finally:  # loaded or not
        if private and os.name != "nt":
            shutil.rmtree(path.parent, ignore_errors=True)


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    lib = open_library(cc)
    i64, p, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.qk_row_amax.argtypes = [p, i32, i64, i64, i64, p]
    lib.qk_row_amax.restype = None
    lib.qk_quantize.argtypes = [p, i32, i64, i64, i64, i32, i64, i32, i32, f32, p, p, p, p]
    lib.qk_quantize.restype = None
    lib.qk_rank1_chain.argtypes = [p, i64, p, i64, p, i64, i64, i64, i64, i64]
    lib.qk_rank1_chain.restype = None
    return lib


def available() -> str | None:
    """None when the native kernels are built and loaded (building them on the first call), else why not."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _load()
            except Exception as e:  # no compiler, a failed build, a library that does not load
                _error = f"{type(e).__name__}: {e}"
        return _error


def _library() -> ctypes.CDLL:
    why = available()
    if why is not None:
        raise RuntimeError(f"native CPU kernels unavailable ({why})")
    assert _lib is not None
    return _lib


def _threads(n: int) -> ThreadPoolExecutor:
    """The shared pool, grown to at least ``n`` threads."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="quantkit-native"), n
        return _pool


def parallel(rows: int, step: int, job) -> None:
    """job(r0, r1) over [0, rows) in contiguous slices (multiples of ``step``), one per thread."""
    n = max(1, min(torch.get_num_threads(), rows // step))
    cuts = [rows // step * i // n * step for i in range(n)] + [rows]
    if n == 1:
        job(0, rows)
        return
    pool = _threads(n)
    for f in [pool.submit(job, cuts[i], cuts[i + 1]) for i in range(n)]:
        f.result()


_parallel = parallel


def on_threads(rows: int, job) -> None:
    """job() once on each of ``min(torch.get_num_threads(), rows)`` threads (a kernel that hands out
    its rows itself, through a counter the calls share), and wait for all."""
    n = max(1, min(torch.get_num_threads(), rows))
    if n == 1:
        job()
        return
    pool = _threads(n)
    for f in [pool.submit(job) for _ in range(n)]:
        f.result()


def quantize_tensor(w: torch.Tensor, spec: ScaledFormat, block_size: int,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, ErrorStats]:
    """Quantize a 2-D bf16/fp16/fp32 CPU tensor: (q, scale, error stats), as
    :func:`quantkit.quantize.quantize_tensor`, q and scale bit-identical to ``reference.quantize``. ``out``: a uint8 buffer of at least ``w.numel()`` bytes to hold q. Where a scale is
    NaN/Inf, q is unspecified there (as the reference's)."""
    lib = _library()
    n, k = w.shape
    w = w.contiguous()
    kind = _KIND[w.dtype]
    q = torch.empty((n, k), dtype=spec.weight_dtype) if out is None else \
        out[:n * k].view(spec.weight_dtype).view(n, k)
    gran = {"tensor": 0, "row": 1, "block": 2}[spec.granularity]
    b = block_size if gran == 2 else 1
    if gran == 0:
        amax = torch.empty(n, dtype=torch.float32)
        parallel(n, 1, lambda r0, r1: lib.qk_row_amax(w.data_ptr(), kind, r0, r1, k, amax.data_ptr()))
        scales = scaled.scale_from_amax(amax.max() if n else torch.zeros(()), spec).reshape(1)
    else:
        scales = torch.empty(spec.scale_shape((n, k), block_size), dtype=torch.float32)
    sig = torch.zeros(n, dtype=torch.float64)
    noise = torch.zeros(n, dtype=torch.float64)
    man = _FP8_MANTISSA.get(spec.weight_dtype, 0)

    def job(r0: int, r1: int) -> None:
        lib.qk_quantize(w.data_ptr(), kind, r0, r1, k, gran, b, int(spec.is_int), man, spec.qmax,
                        scales.data_ptr(), q.data_ptr(), sig.data_ptr(), noise.data_ptr())
    parallel(n, b, job)
    if gran == 0:
        scales = scales.reshape(())
    return q, scales, ErrorStats(float(sig.sum()), float(noise.sum()))


def rank1_chain(w: torch.Tensor, e: torch.Tensor, u: torch.Tensor) -> None:
    """In place ``w -= e @ u`` as :func:`quantkit.learned.trailing_update`'s chain of rank-1 updates
    (the same bytes), rows split over threads. fp32 CPU tensors with unit column stride."""
    lib = _library()
    n, width = w.shape
    t = e.shape[1]
    assert u.shape == (t, width)
    for x in (w, e, u):
        assert x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(1) == 1
    parallel(n, 1, lambda r0, r1: lib.qk_rank1_chain(w.data_ptr(), w.stride(0), e.data_ptr(), e.stride(0), u.data_ptr(),
                                                     u.stride(0), r0, r1, width, t))
