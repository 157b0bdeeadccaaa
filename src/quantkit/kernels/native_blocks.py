"""The native CPU kernels of int8-convrot, mxfp8 and nvfp4: ``cpu_blocks.c``, built and cached as
:mod:`.native` builds ``cpu_quant.c`` (same compiler, flags and cache; rows split over
``torch.get_num_threads()`` threads). Each returns the stored tensors of its format's torch
``quantize`` (the spec), byte for byte, and the error sums the converter reports (fp32 runs added in fp64; int8-convrot:
of the rotated weight, the same up to fp32 rounding since the rotation is orthogonal).
"""

from __future__ import annotations

import ctypes
import threading

import torch

from ..errors import QuantkitError
from ..quantize import ErrorStats
from . import native

SOURCE = native.SOURCE.with_name("cpu_blocks.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _load() -> ctypes.CDLL:
    cc = native._compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    lib = native.open_library(cc, SOURCE)
    i64, p, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.qk_block16_amax.argtypes = [p, i32, i64, i64, i64, i64, p]
    lib.qk_mxfp8.argtypes = [p, i32, i64, i64, i64, i64, p, p, p, p, p]
    lib.qk_nvfp4.argtypes = [p, i32, i64, i64, i64, i64, f32, p, p, i32, p, i64, p, p, p, p, i64]
    lib.qk_absmax_bits.argtypes = [p, i32, i64, i64, i64, p]
    lib.qk_convrot.argtypes = [p, i32, i64, i64, i64, i64, i32, p, p, p, p, p]
    lib.qk_nvfp4_fixed_offsets.argtypes = []
    lib.qk_nvfp4_fixed_offsets.restype = i32
    for f in (lib.qk_block16_amax, lib.qk_mxfp8, lib.qk_nvfp4, lib.qk_absmax_bits, lib.qk_convrot):
        f.restype = None
    return lib


def available() -> str | None:
    """None when the kernels are built and loaded (building them on the first call), else why not."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _load()
            except Exception as e:  # no compiler, a failed build, a library that does not load
                _error = f"{type(e).__name__}: {e}"
        return _error


def _prepare(w: torch.Tensor, fmt: str):
    if w.dtype not in native._KIND:
        raise QuantkitError(f"{fmt}: weight dtype {w.dtype} is not bf16/fp16/fp32", fix="quantize floating-point weights only")
    if w.dim() != 2 or 0 in w.shape:
        raise QuantkitError(f"{fmt}: weight shape {tuple(w.shape)} is not a non-empty 2-D [N, K]",
                            fix="keep this tensor unquantized")
    return w.contiguous(), native._KIND[w.dtype]


def _nonfinite(fmt: str) -> QuantkitError:
    return QuantkitError(f"{fmt}: weight holds NaN or Inf values", fix="repair the checkpoint or keep this tensor unquantized")


def _weight_buffer(out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The kernel's weight tensor: fresh, or the front of ``out`` (a uint8 buffer the caller reuses once the
    weight is written: no page faults on new memory for every layer)."""
    if out is None:
        return torch.empty(shape, dtype=dtype)
    return out[:shape[0] * shape[1] * dtype.itemsize].view(dtype).view(shape)


def _stats(sig: torch.Tensor, noise: torch.Tensor) -> ErrorStats:
    return ErrorStats(float(sig.sum()), float(noise.sum()))


def convrot(w: torch.Tensor, group: int, out: torch.Tensor | None = None) -> tuple[dict, ErrorStats]:
    """int8-convrot with ConvRot group ``group`` (a power of 4 dividing K, checked by the caller); ``out``
    (every kernel here): a uint8 buffer of at least the weight's bytes to hold it, or None."""
    assert _lib is not None
    w, kind = _prepare(w, "int8-convrot")
    n, k = w.shape
    d = (group.bit_length() - 1) // 2
    q = _weight_buffer(out, (n, k), torch.int8)
    scale = torch.empty(n, 1, dtype=torch.float32)
    sig, noise = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    ok = torch.zeros(n, dtype=torch.uint8)
    native.parallel(n, 1, lambda r0, r1: _lib.qk_convrot(w.data_ptr(), kind, r0, r1, k, group, d, q.data_ptr(),
                                                         scale.data_ptr(), sig.data_ptr(), noise.data_ptr(),
                                                         ok.data_ptr()))
    if int(ok.min()) != 1:
        if int(ok.max()) == 2:
            raise MemoryError("int8-convrot: no memory for a row buffer")
        raise _nonfinite("int8-convrot")
    return {"weight": q, "weight_scale": scale}, _stats(sig, noise)


def mxfp8(w: torch.Tensor, out: torch.Tensor | None = None) -> tuple[dict, ErrorStats]:
    from ..formats import _blocked
    from ..formats.mxfp8 import padded_shape
    assert _lib is not None
    w, kind = _prepare(w, "mxfp8")
    n, k = w.shape
    rows, cols = padded_shape((n, k))
    nb = cols // 32
    q = _weight_buffer(out, (rows, cols), torch.uint8)  # the kernel writes rows < n whole; the padded rows are zero
    e = torch.empty(rows, nb, dtype=torch.uint8)
    q[n:] = 0
    e[n:] = 0
    sig, noise = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    ok = torch.zeros(n, dtype=torch.uint8)
    native.parallel(n, 1, lambda r0, r1: _lib.qk_mxfp8(w.data_ptr(), kind, r0, r1, k, nb, e.data_ptr(), q.data_ptr(),
                                                       sig.data_ptr(), noise.data_ptr(), ok.data_ptr()))
    if int(ok.min()) != 1:
        raise _nonfinite("mxfp8")
    return {"weight": q.view(torch.float8_e4m3fn), "weight_scale": _blocked.swizzle(e)}, _stats(sig, noise)


_LUT = None
_SLICES_PER_THREAD = 32


def nvfp4(w: torch.Tensor, out: torch.Tensor | None = None) -> tuple[dict, ErrorStats]:
    """nvfp4 with the scale search (:data:`quantkit.formats.nvfp4.SEARCH_OFFSETS`)."""
    global _LUT
    from ..formats import _blocked, nvfp4 as spec
    assert _lib is not None
    w, kind = _prepare(w, "nvfp4")
    n, k = w.shape
    rows, cols = spec.padded_shape((n, k))
    nb = cols // 16
    amax = torch.empty(n, dtype=torch.int32)  # each row's largest |w| as ordered bits (NaN above inf)
    native.parallel(n, 1, lambda r0, r1: _lib.qk_absmax_bits(w.data_ptr(), kind, r0, r1, k, amax.data_ptr()))
    top = int(amax.max())
    if top >= 0x7F800000:
        raise _nonfinite("nvfp4")
    g = spec.global_scale(torch.tensor([top], dtype=torch.int32).view(torch.float32))
    if _LUT is None:
        _LUT = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float().contiguous()
    off = torch.tensor(spec.SEARCH_OFFSETS, dtype=torch.int32)
    # the scale codes straight into the blocked layout (_blocked.swizzle's): the kernel writes the
    # entries of rows < n, blocks < nb; the padding stays zero
    best = torch.zeros(_blocked.blocked_shape(rows, nb), dtype=torch.uint8)
    tiles4 = best.shape[1] // 4
    q = _weight_buffer(out, (rows, cols // 2), torch.uint8)  # the kernel writes rows < n whole; padded rows are zero
    q[n:] = 0
    sig, noise = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    gf = float(g)
    # the threads take slices of _SLICES_PER_THREAD-th of their share as they come free (a thread the
    # writer or another process slows down takes fewer), through one counter in the kernel: no GIL
    # between slices
    handed = torch.zeros(1, dtype=torch.int64)
    chunk = max(1, n // (_SLICES_PER_THREAD * max(1, torch.get_num_threads())))
    native.on_threads(n, lambda: _lib.qk_nvfp4(w.data_ptr(), kind, 0, n, k, nb, gf, _LUT.data_ptr(), off.data_ptr(),
                                               len(spec.SEARCH_OFFSETS), best.data_ptr(), tiles4, q.data_ptr(),
                                               sig.data_ptr(), noise.data_ptr(), handed.data_ptr(), chunk))
    return {"weight": q, "weight_scale": best.view(torch.float8_e4m3fn),
            "weight_scale_2": g.reshape(())}, _stats(sig, noise)
