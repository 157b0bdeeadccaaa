"""Triton quantizers of ``mxfp8`` and ``nvfp4``: the bytes of their torch ``quantize`` on the GPU.

:func:`mxfp8` and :func:`nvfp4` return ``(stored, signal, noise)``: ``stored`` holds exactly the
tensors of ``formats.mxfp8.quantize(w)`` / ``formats.nvfp4.quantize(w)`` (default options: the
nvfp4 scale search over :data:`quantkit.formats.nvfp4.SEARCH_OFFSETS`), same names, dtypes, shapes,
padding and blocked scale layout (:mod:`quantkit.formats._blocked`), byte for byte, on ``w``'s
device; ``signal`` = sum w^2 and ``noise`` = sum (w - dequant)^2 are 0-d float64 tensors on that
device (each element's fp32 difference squared in fp64, summed in fp64: the sums the C kernels of
:mod:`.native_blocks` report in ``ErrorStats``, there with fp32 runs). :func:`quantize_stored` is the
``(stored, ErrorStats)`` form of ``Format.quantize_native``.

Kernels (one program per tile of BM rows x NBLK blocks; every weight is read once and every output
byte written once; the scales go straight to their blocked position):

* ``_mxfp8_kernel``: block amax (integer max over the bits), the E8M0 exponent from the bits of
  ``amax / 448`` (``_e8m0.ceil_exponent``), elements ``e4m3(clamp(w / 2^(e-127)))``.
* nvfp4: ``triton_quant._amax_partials`` (the tensor amax, for ``weight_scale_2``; folded on the
  device by ``nvfp4.global_scale``, no host round trip), then ``_nvfp4_kernel``: each block's
  kitchen scale code, then the candidates (``SEARCH_OFFSETS``) one after the other in registers, each
  with its E2M1 values, its fp32 errors and their fp64 tree sum; the first smallest error wins (strict ``<`` in
  offset order, as the reference), and its values are packed two a byte.

Exactness (on the GPU and under ``TRITON_INTERPRET=1`` alike), on top of :mod:`.triton_quant`'s
(``div_rn`` for every division the reference makes, integer amax, bf16 widened by a shift, fp8
rounding in fp32 arithmetic with the bits assembled by integer ops, RNE by adding and subtracting
1.5 * 2^23):

* kernels launch with ``enable_fp_fusion=False``: ``x - v * total`` must round the product before
  the subtraction, as torch does; a fused multiply-add would change the errors the search compares.
* the block error is the reference's ``tree_sum_fp64``: the 16 fp32 differences squared in fp64
  (exact), then element i + 8 added onto i, then + 4, + 2, + 1, each level a sum over an axis of
  two (one IEEE addition, the same in either order).
* E4M3 scale values are assembled from their codes' bits (normal) or ``m * 2^-9`` (subnormal).

NaN / Inf: both functions raise :class:`QuantkitError` (the message of :mod:`.native_blocks`) when
the weight holds one, checked from the amax bits the kernels compute anyway (this reads one small
device tensor: a synchronization, as reading the sums is).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import QuantkitError
from ..formats import mxfp8 as mx_spec
from ..formats import nvfp4 as nv_spec
from .triton_quant import _abs_bits, _amax_partials, _as_f32, _load_f32, _quant_values, _sm_count

_INF_BITS = 0x7F800000
# E4M3 constants for triton_quant._quant_values: QMAX, IS_INT, MBITS, EBIAS, EMIN, SUB_MUL, MIN_NORMAL
_E4M3_QMAX = tl.constexpr(448.0)
_E4M3_SUB_MUL = tl.constexpr(512.0)  # 2^(MBITS - EMIN)
_E4M3_MIN_NORMAL = tl.constexpr(0.015625)  # 2^-6
_E2M1_MAX = tl.constexpr(6.0)


@triton.jit
def _blocked_offset(r, j, cp4):
    """Offset of scale (row r, block j) in the blocked layout (formats/_blocked.py): tile
    (r // 128, j // 4) of 512 entries, in it 16 * (r % 32) + 4 * ((r // 32) % 4) + j % 4."""
    return ((r // 128) * cp4 + j // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + (j % 4)


@triton.jit
def _e4m3(x, scale):
    """(E4M3 bits, dequantized fp32) of x / scale clamped to +-448, round to nearest even."""
    return _quant_values(x, scale, _E4M3_QMAX, False, 3, 7, -6, _E4M3_SUB_MUL, _E4M3_MIN_NORMAL)


@triton.jit
def _load_tile(w_ptr, n, k, B: tl.constexpr, IN_BF16: tl.constexpr, BM: tl.constexpr, NBLK: tl.constexpr):
    """This program's tile of BM rows x NBLK blocks of B: (program index, block-column index pb, rows r
    [BM], blocks blk [NBLK], r as int64 [BM, 1, 1], columns [1, NBLK, B], the weights in fp32
    [BM, NBLK, B], +0 past the edges: the padding)."""
    pm = tl.program_id(0)
    pb = tl.program_id(1)
    pid = pm * tl.num_programs(1) + pb
    r = pm * BM + tl.arange(0, BM)
    blk = pb * NBLK + tl.arange(0, NBLK)
    r64 = r.to(tl.int64)[:, None, None]
    col = blk[None, :, None] * B + tl.arange(0, B)[None, None, :]
    return pid, pb, r, blk, r64, col, _load_f32(w_ptr + r64 * k + col, (r64 < n) & (col < k), IN_BF16)


@triton.jit
def _mxfp8_kernel(w_ptr, q_ptr, e_ptr, stats_ptr, bits_ptr, n, k, rows, nb, cp4,
                  IN_BF16: tl.constexpr, BM: tl.constexpr, NBLK: tl.constexpr):
    pid, pb, r, blk, r64, col, w = _load_tile(w_ptr, n, k, 32, IN_BF16, BM, NBLK)
    abits = tl.max(_abs_bits(w), 2)
    amax = _as_f32(abits)
    sb = tl.math.div_rn(amax, 448.0).to(tl.int32, bitcast=True)
    ex = ((sb >> 23) & 0xFF) + ((sb & 0x7FFFFF) != 0).to(tl.int32)
    ex = tl.minimum(tl.maximum(ex, 1), 254)
    ex = tl.where(amax == 0.0, 0, ex)
    s = (tl.where(ex == 0, 127, ex) << 23).to(tl.float32, bitcast=True)  # 1.0 for a zero block
    q, deq = _e4m3(w, s[:, :, None])
    inside = (r < rows)[:, None] & (blk < nb)[None, :]
    tl.store(q_ptr + r64 * (nb * 32) + col, q, mask=inside[:, :, None])
    tl.store(e_ptr + _blocked_offset(r.to(tl.int64)[:, None], blk[None, :], cp4), ex.to(tl.uint8), mask=inside)
    w64 = w.to(tl.float64)
    d = (w - deq).to(tl.float64)
    tl.store(stats_ptr + 2 * pid, tl.sum(tl.sum(tl.sum(w64 * w64, 2), 1), 0))
    tl.store(stats_ptr + 2 * pid + 1, tl.sum(tl.sum(tl.sum(d * d, 2), 1), 0))
    tl.store(bits_ptr + pid, tl.max(tl.max(abits, 1), 0))


@triton.jit
def _e4m3_value(c):
    """fp32 value of E4M3 codes 0..0x7E (int32)."""
    ex = c >> 3
    m = c & 7
    normal = (((ex + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(ex > 0, normal, m.to(tl.float32) * 0.001953125)  # subnormal: m * 2^-9


@triton.jit
def _e2m1_values(x, total):
    """E2M1 values (fp32) of x / total clamped to +-6, round to nearest even (_e2m1.round_values:
    steps of .5 below 2, 1 below 4, 2 up to 6); 0 where total is 0."""
    zero = total == 0.0
    y = tl.math.div_rn(x, tl.where(zero, 1.0, total))
    y = tl.minimum(tl.maximum(y, -_E2M1_MAX), _E2M1_MAX)
    a = tl.abs(y)
    m = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    mi = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    v = ((a * m + 12582912.0) - 12582912.0) * mi  # powers of two: exact; (t + 1.5 * 2^23) - 1.5 * 2^23 is RNE
    sign = (y.to(tl.int32, bitcast=True) >> 31) << 31  # the sign bit alone (arithmetic shift)
    v = (v.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)  # copysign(v, y)
    return tl.where(zero, 0.0, v)


@triton.jit
def _tree16(d, BM: tl.constexpr, NBLK: tl.constexpr):
    """tree_sum_fp64 of fp32 d [BM, NBLK, 16] over the last axis: fp64 [BM, NBLK]."""
    s = d.to(tl.float64)
    s = s * s
    s = tl.sum(tl.reshape(s, (BM, NBLK, 2, 8)), 2)  # i + 8 onto i
    s = tl.sum(tl.reshape(s, (BM, NBLK, 2, 4)), 2)
    s = tl.sum(tl.reshape(s, (BM, NBLK, 2, 2)), 2)
    return tl.sum(s, 2)


@triton.jit
def _nvfp4_kernel(w_ptr, g_ptr, off_ptr, q_ptr, s_ptr, stats_ptr, n, k, rows, nb, cp4,
                  NOFF: tl.constexpr, IN_BF16: tl.constexpr, BM: tl.constexpr, NBLK: tl.constexpr):
    pid, pb, r, blk, r64, col, x = _load_tile(w_ptr, n, k, 16, IN_BF16, BM, NBLK)
    g = tl.load(g_ptr)
    amax = _as_f32(tl.max(_abs_bits(x), 2))
    b = tl.minimum(tl.math.div_rn(tl.math.div_rn(amax, 6.0), g), 448.0)
    code0, _ = _e4m3(b, 1.0)  # comfy-kitchen's scale; 0: the block stays zero
    code0 = code0.to(tl.int32)
    # offset 0 first: the reference's starting best
    c = tl.minimum(tl.maximum(code0 + tl.load(off_ptr), 1), 0x7E)
    best_c = tl.where(code0 == 0, 0, c)
    total = (g * _e4m3_value(best_c))[:, :, None]
    best_v = _e2m1_values(x, total)
    best_e = _tree16(x - best_v * total, BM, NBLK)
    for t in tl.static_range(1, NOFF):
        c = tl.minimum(tl.maximum(code0 + tl.load(off_ptr + t), 1), 0x7E)
        c = tl.where(code0 == 0, 0, c)
        total = (g * _e4m3_value(c))[:, :, None]
        v = _e2m1_values(x, total)
        e = _tree16(x - v * total, BM, NBLK)
        win = e < best_e  # strict: ties stay with the earlier offset
        best_e = tl.where(win, e, best_e)
        best_c = tl.where(win, c, best_c)
        best_v = tl.where(win[:, :, None], v, best_v)
    # E2M1 codes: magnitude 0..7 by arithmetic on the grid value, bit 3 the sign
    a = tl.abs(best_v)
    mag = tl.where(a < 2.0, a * 2.0, tl.where(a < 4.0, a + 2.0, a * 0.5 + 4.0)).to(tl.int32)
    code = mag | ((best_v.to(tl.int32, bitcast=True) >> 28) & 8)
    hi, lo = tl.split(tl.reshape(code, (BM, NBLK * 8, 2)))  # even column -> high nibble
    byte = ((hi << 4) | lo).to(tl.uint8)
    bcol = pb * (NBLK * 8) + tl.arange(0, NBLK * 8)
    inside = (r < rows)[:, None] & (blk < nb)[None, :]
    tl.store(q_ptr + r.to(tl.int64)[:, None] * (nb * 8) + bcol[None, :], byte,
             mask=(r < rows)[:, None] & (bcol < nb * 8)[None, :])
    tl.store(s_ptr + _blocked_offset(r.to(tl.int64)[:, None], blk[None, :], cp4), best_c.to(tl.uint8), mask=inside)
    x64 = x.to(tl.float64)
    tl.store(stats_ptr + 2 * pid, tl.sum(tl.sum(tl.sum(x64 * x64, 2), 1), 0))
    tl.store(stats_ptr + 2 * pid + 1, tl.sum(tl.sum(best_e, 1), 0))


# Tile sizes (rows x blocks per program), powers of two; tests pass smaller ones.
MXFP8_TILE = (16, 8)  # 16 rows x 256 columns
NVFP4_TILE = (16, 8)  # 16 rows x 128 columns
# With these tiles: 8 (nvfp4) or 16 (mxfp8) elements a thread; for sm_90, 64 and 83 registers (Triton
# 3.6; 72 and 78 with 3.9), no spills. 4 warps on the same tiles took ~250 registers (nvfp4, Triton 3.6).
NUM_WARPS = 8
# Compile options of every launch: no fused multiply-add (the search compares x - v * total rounded as
# torch rounds it); tests compile with these for sm_90 and check the PTX holds no fma.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def _prepare(w: torch.Tensor, fmt: str):
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QuantkitError(f"{fmt}: weight dtype {w.dtype} is not bf16/fp16/fp32",
                            fix="quantize floating-point weights only")
    if w.dim() != 2 or 0 in w.shape:
        raise QuantkitError(f"{fmt}: weight shape {tuple(w.shape)} is not a non-empty 2-D [N, K]",
                            fix="keep this tensor unquantized")
    if w.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise QuantkitError(f"{fmt}: the Triton kernels need a CUDA tensor, got one on {w.device}",
                            fix="move the weight to the GPU, or set TRITON_INTERPRET=1 to run them on the CPU")
    w = w.contiguous()
    in_bf16 = w.dtype == torch.bfloat16
    return w, (w.view(torch.int16) if in_bf16 else w), in_bf16


def _nonfinite(fmt: str) -> QuantkitError:
    return QuantkitError(f"{fmt}: weight holds NaN or Inf values",
                         fix="repair the checkpoint or keep this tensor unquantized")


def _pow2(v: int, what: str) -> int:
    if v < 1 or v & (v - 1):
        raise ValueError(f"{what} must be a power of two, not {v}")
    return v


def _setup(w: torch.Tensor, spec, tile: tuple[int, int]):
    """(tile rows, tile blocks, w as the kernels read it, its kernel argument, bf16 or not, n, k, padded
    rows, blocks a padded row, device) of format module ``spec``'s weight ``w``."""
    bm, nblk = (_pow2(t, "tile") for t in tile)
    w, w_arg, in_bf16 = _prepare(w, spec.NAME)
    n, k = w.shape
    rows, cols = spec.padded_shape((n, k))
    return bm, nblk, w, w_arg, in_bf16, n, k, rows, cols // spec.BLOCK, w.device


def mxfp8(w: torch.Tensor, *, tile: tuple[int, int] = MXFP8_TILE, num_warps: int = NUM_WARPS):
    """``(stored, signal, noise)`` of ``formats.mxfp8.quantize(w)`` (see the module docstring)."""
    bm, nblk, w, w_arg, in_bf16, n, k, rows, nb, dev = _setup(w, mx_spec, tile)
    srows, scols = mx_spec.scale_shape((n, k))
    q = torch.empty(rows, nb * mx_spec.BLOCK, dtype=torch.uint8, device=dev)  # the kernel writes every byte
    e = torch.zeros(srows, scols, dtype=torch.uint8, device=dev)  # it writes [rows, nb]; the rest stays 0
    grid = (triton.cdiv(rows, bm), triton.cdiv(nb, nblk))
    nprog = grid[0] * grid[1]
    stats = torch.empty(nprog, 2, dtype=torch.float64, device=dev)
    bits = torch.empty(nprog, dtype=torch.int32, device=dev)
    _mxfp8_kernel[grid](w_arg, q, e, stats, bits, n, k, rows, nb, scols // 4, IN_BF16=in_bf16, BM=bm, NBLK=nblk,
                        num_warps=num_warps, **LAUNCH_OPTIONS)
    if int(bits.max()) >= _INF_BITS:
        raise _nonfinite("mxfp8")
    s = stats.sum(0)
    return {"weight": q.view(torch.float8_e4m3fn), "weight_scale": e}, s[0], s[1]


def nvfp4(w: torch.Tensor, input_scale: float | None = None, *, tile: tuple[int, int] = NVFP4_TILE,
          num_warps: int = NUM_WARPS, amax_block: int = 4096, programs: int | None = None):
    """``(stored, signal, noise)`` of ``formats.nvfp4.quantize(w, input_scale=input_scale)`` (see the
    module docstring); ``input_scale`` (a calibrated activation scale) is stored as the reference
    stores it, as a 0-d fp32 tensor, here on ``w``'s device."""
    bm, nblk, w, w_arg, in_bf16, n, k, rows, nb, dev = _setup(w, nv_spec, tile)
    numel = w.numel()
    nparts = max(1, min(triton.cdiv(numel, amax_block), programs or 4 * _sm_count(dev)))
    parts = torch.empty(nparts, dtype=torch.int32, device=dev)
    _amax_partials[(nparts,)](w_arg, parts, numel, IN_BF16=in_bf16, BLOCK=amax_block, num_warps=num_warps)
    top = parts.max()
    g = nv_spec.global_scale(top.view(torch.float32)).reshape(())  # on the device: no round trip
    offsets = torch.tensor(nv_spec.SEARCH_OFFSETS, dtype=torch.int32, device=dev)
    srows, scols = nv_spec.scale_shape((n, k))
    q = torch.empty(rows, nb * nv_spec.BLOCK // 2, dtype=torch.uint8, device=dev)  # the kernel writes every byte
    s = torch.zeros(srows, scols, dtype=torch.uint8, device=dev)  # it writes [rows, nb]; the rest stays 0
    grid = (triton.cdiv(rows, bm), triton.cdiv(nb, nblk))
    stats = torch.empty(grid[0] * grid[1], 2, dtype=torch.float64, device=dev)
    _nvfp4_kernel[grid](w_arg, g, offsets, q, s, stats, n, k, rows, nb, scols // 4, NOFF=len(nv_spec.SEARCH_OFFSETS),
                        IN_BF16=in_bf16, BM=bm, NBLK=nblk, num_warps=num_warps, **LAUNCH_OPTIONS)
    if int(top) >= _INF_BITS:
        raise _nonfinite("nvfp4")
    out = {"weight": q, "weight_scale": s.view(torch.float8_e4m3fn), "weight_scale_2": g}
    if input_scale is not None:
        out["input_scale"] = torch.tensor(float(input_scale), dtype=torch.float32, device=dev)
    sums = stats.sum(0)
    return out, sums[0], sums[1]


KERNELS = {"mxfp8": mxfp8, "nvfp4": nvfp4}


def quantize_stored(fmt: str, w: torch.Tensor):
    """``(stored, ErrorStats)`` of format ``fmt`` ("mxfp8" or "nvfp4"), as ``Format.quantize_native``
    returns them from :mod:`.native_blocks`."""
    from ..quantize import ErrorStats
    stored, signal, noise = KERNELS[fmt](w)
    return stored, ErrorStats(float(signal), float(noise))
