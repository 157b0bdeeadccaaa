"""Triton quantizers: the reference math of :mod:`quantkit.reference`, bit for bit, on the GPU.

One entry point, :func:`quantize`, for every format the converter writes. It returns ``q`` and
``scale`` on the input's device, bit-identical to ``scaled.quantize(w, spec, block_size)`` for
bf16 / fp16 / fp32 weights, and the two SQNR sums of ``quantize.quantize_tensor`` (``sum w^2`` and
``sum (w - q.float()*scale)^2``) as 0-d float64 tensors, accumulated in the same kernels (fp32 per
program, fp64 across programs).

Kernels (each reads every weight once from device memory and writes ``q`` once):

==============  ================================================================================
granularity     kernels
==============  ================================================================================
tensor          ``_amax_partials`` (persistent grid, one NaN-propagating |w| max per program),
                then ``_quant_flat``: every program folds the partials into the scale itself
                (no host round trip, no atomics, deterministic) and quantizes its slices.
row             ``_quant_rows``: one program per row block; amax over the row, then quantize
                (one pass from registers when a row fits in one tile, else a second pass over
                the row, which is then still in L2).
block           ``_quant_blocks``: one program per b x b tile (b a power of two), single pass
                from registers for b <= 128.
==============  ================================================================================

Exactness, and why it holds on the GPU and under ``TRITON_INTERPRET=1`` alike:

* ``w / scale`` uses ``tl.math.div_rn`` (IEEE round-to-nearest division; Triton's ``/`` lowers to
  an approximate division on NVIDIA GPUs).
* amax is an integer max over the bits of |w| (sign bit cleared): exact, and NaN-propagating because
  every NaN's bits exceed Inf's (a float ``tl.max`` drops NaN on the GPU). So a NaN weight gives a
  NaN scale and an Inf weight an Inf scale, as in the reference.
* INT8 round-half-to-even is ``(x + 1.5*2^23) - 1.5*2^23``: exact for |x| < 2^22, and every
  larger |x| keeps its sign and clamps to +-127 like the reference (libdevice ``rint`` does not
  run in the interpreter).
* FP8 rounding is done in fp32 arithmetic to the fp8 grid of x's binade (the same add/subtract
  trick with a per-element constant), then the bits are assembled with integer ops. This is RNE
  with fp8 subnormals and signed zeros exactly as torch's ``.to(float8)`` after the clamp, and it
  runs identically under the interpreter, whose own fp32->fp8 cast is not RNE (it rounds half up).
  (A variant using the GPU's cast instruction, ``x.to(tl.float8e4nv, fp_downcast_rounding="rtne")``,
  gave the same q on an H100 and ran up to ~10% faster per call, but its noise sum, dequantized
  through Triton's fp8->fp32 upcast, came out NaN; it was dropped rather than shipped untested.)

Where a region's scale is NaN or Inf (the weight holds NaN/Inf), ``q`` in that region is
unspecified; callers detect it with ``torch.isfinite(scale)`` and refuse the weight, as the
converter does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import QuantkitError
from ..formats.scaled import ScaledFormat

_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23

# fp8 formats: (mantissa bits, exponent bias, smallest normal exponent)
_FP8 = {
    torch.float8_e4m3fn: (3, 7, -6),
    torch.float8_e5m2: (2, 15, -14),
}


@triton.jit
def _abs_bits(w):
    """|w| as int32 bits. Integer order of these bits is float order for non-negative floats, and
    every NaN sorts above Inf: an integer max is an exact, NaN-propagating float amax."""
    return w.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _as_f32(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_f32(ptrs, mask, IN_BF16: tl.constexpr):
    """Load weights as fp32. bf16 arrives as int16 bits and is widened by a shift: exact for
    subnormals too (the interpreter's own bf16 -> fp32 conversion is not)."""
    if IN_BF16:
        w = (tl.load(ptrs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _load_f32_full(ptrs, IN_BF16: tl.constexpr):
    if IN_BF16:
        w = (tl.load(ptrs).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        w = tl.load(ptrs).to(tl.float32)
    return w


@triton.jit
def _quant_values(w, scale, QMAX: tl.constexpr, IS_INT: tl.constexpr, MBITS: tl.constexpr,
                  EBIAS: tl.constexpr, EMIN: tl.constexpr,
                  SUB_MUL: tl.constexpr, MIN_NORMAL: tl.constexpr):
    """w (fp32) and its broadcast scale -> (stored values, dequantized fp32 values)."""
    x = tl.math.div_rn(w, scale)
    if IS_INT:
        r = (x + _RNE_MAGIC) - _RNE_MAGIC  # round half to even (exact for |x| < 2^22)
        r = tl.minimum(tl.maximum(r, -QMAX), QMAX)
        q = r.to(tl.int8)
        deq = r * scale
    else:
        x = tl.minimum(tl.maximum(x, -QMAX), QMAX)
        a = tl.abs(x)
        e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, EMIN)  # binade (>= EMIN)
        c = ((e - MBITS + 150) << 23).to(tl.float32, bitcast=True)  # 2^23 * the fp8 ulp there
        r = (a + c) - c  # |x| rounded to the fp8 grid, ties to even
        normal = (r.to(tl.int32, bitcast=True) >> (23 - MBITS)) - ((127 - EBIAS) << MBITS)
        sub = (tl.minimum(r, MIN_NORMAL) * SUB_MUL).to(tl.int32)  # fp8 subnormal: r / 2^(EMIN-MBITS)
        neg = x.to(tl.int32, bitcast=True) < 0  # sign bit: -0.0 stays -0.0
        bits = tl.where(r >= MIN_NORMAL, normal, sub) | tl.where(neg, 0x80, 0)
        q = bits.to(tl.uint8)
        deq = tl.where(neg, -r, r) * scale
    return q, deq


@triton.jit
def _amax_partials(w_ptr, part_ptr, numel, IN_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ntiles = tl.cdiv(numel, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for t in range(pid, ntiles, nprog):
        offs = tl.cast(t, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        w = _load_f32(w_ptr + offs, offs < numel, IN_BF16)
        acc = tl.maximum(acc, _abs_bits(w))
    tl.store(part_ptr + pid, tl.max(acc, 0))


@triton.jit
def _quant_flat(w_ptr, q_ptr, part_ptr, nparts, scale_ptr, stats_ptr, numel,
                QMAX: tl.constexpr, IS_INT: tl.constexpr, MBITS: tl.constexpr, EBIAS: tl.constexpr,
                EMIN: tl.constexpr,
                SUB_MUL: tl.constexpr, MIN_NORMAL: tl.constexpr, IN_BF16: tl.constexpr,
                BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    p = tl.arange(0, PBLOCK)
    amax = _as_f32(tl.max(tl.load(part_ptr + p, mask=p < nparts, other=0), 0))
    scale = tl.math.div_rn(amax, QMAX)
    scale = tl.where(amax == 0.0, 1.0, scale)
    if pid == 0:
        tl.store(scale_ptr, scale)
    sig = tl.zeros([BLOCK], dtype=tl.float32)
    noi = tl.zeros([BLOCK], dtype=tl.float32)
    ntiles = tl.cdiv(numel, BLOCK)
    for t in range(pid, ntiles, nprog):
        offs = tl.cast(t, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        w = _load_f32(w_ptr + offs, m, IN_BF16)
        q, deq = _quant_values(w, scale, QMAX, IS_INT, MBITS, EBIAS, EMIN, SUB_MUL, MIN_NORMAL)
        tl.store(q_ptr + offs, q, mask=m)
        d = tl.where(m, w - deq, 0.0)
        sig += w * w
        noi += d * d
    tl.store(stats_ptr + 2 * pid, tl.sum(sig, 0))
    tl.store(stats_ptr + 2 * pid + 1, tl.sum(noi, 0))


@triton.jit
def _quant_rows(w_ptr, q_ptr, scale_ptr, stats_ptr, n, k,
                QMAX: tl.constexpr, IS_INT: tl.constexpr, MBITS: tl.constexpr, EBIAS: tl.constexpr,
                EMIN: tl.constexpr,
                SUB_MUL: tl.constexpr, MIN_NORMAL: tl.constexpr, IN_BF16: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    base = rows.to(tl.int64)[:, None] * k
    cols = tl.arange(0, BLOCK_K)
    sig = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    noi = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    if ONE_PASS:
        m = rmask[:, None] & (cols[None, :] < k)
        w = _load_f32(w_ptr + base + cols[None, :], m, IN_BF16)
        amax = _as_f32(tl.max(_abs_bits(w), 1))
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, QMAX))
        tl.store(scale_ptr + rows, scale, mask=rmask)
        q, deq = _quant_values(w, scale[:, None], QMAX, IS_INT, MBITS, EBIAS, EMIN, SUB_MUL, MIN_NORMAL)
        tl.store(q_ptr + base + cols[None, :], q, mask=m)
        d = tl.where(m, w - deq, 0.0)
        sig += w * w
        noi += d * d
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
        for k0 in range(0, k, BLOCK_K):
            c = k0 + cols
            m = rmask[:, None] & (c[None, :] < k)
            w = _load_f32(w_ptr + base + c[None, :], m, IN_BF16)
            acc = tl.maximum(acc, _abs_bits(w))
        amax = _as_f32(tl.max(acc, 1))
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, QMAX))
        tl.store(scale_ptr + rows, scale, mask=rmask)
        for k0 in range(0, k, BLOCK_K):
            c = k0 + cols
            m = rmask[:, None] & (c[None, :] < k)
            w = _load_f32(w_ptr + base + c[None, :], m, IN_BF16)
            q, deq = _quant_values(w, scale[:, None], QMAX, IS_INT, MBITS, EBIAS, EMIN, SUB_MUL, MIN_NORMAL)
            tl.store(q_ptr + base + c[None, :], q, mask=m)
            d = tl.where(m, w - deq, 0.0)
            sig += w * w
            noi += d * d
    tl.store(stats_ptr + 2 * pid, tl.sum(tl.sum(sig, 1), 0))
    tl.store(stats_ptr + 2 * pid + 1, tl.sum(tl.sum(noi, 1), 0))


@triton.jit
def _quant_blocks(w_ptr, q_ptr, scale_ptr, stats_ptr, k, kb,
                  QMAX: tl.constexpr, IS_INT: tl.constexpr, MBITS: tl.constexpr, EBIAS: tl.constexpr,
                  EMIN: tl.constexpr,
                SUB_MUL: tl.constexpr, MIN_NORMAL: tl.constexpr, IN_BF16: tl.constexpr,
                  B: tl.constexpr, RB: tl.constexpr):
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    r = tl.arange(0, RB)
    cols = bj.to(tl.int64) * B + tl.arange(0, B)
    row0 = bi.to(tl.int64) * B
    sig = tl.zeros([RB, B], dtype=tl.float32)
    noi = tl.zeros([RB, B], dtype=tl.float32)
    if RB == B:
        offs = (row0 + r)[:, None] * k + cols[None, :]
        w = _load_f32_full(w_ptr + offs, IN_BF16)
        amax = _as_f32(tl.max(tl.max(_abs_bits(w), 1), 0))
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, QMAX))
        q, deq = _quant_values(w, scale, QMAX, IS_INT, MBITS, EBIAS, EMIN, SUB_MUL, MIN_NORMAL)
        tl.store(q_ptr + offs, q)
        d = w - deq
        sig += w * w
        noi += d * d
    else:
        acc = tl.zeros([RB, B], dtype=tl.int32)
        for r0 in range(0, B, RB):
            offs = (row0 + r0 + r)[:, None] * k + cols[None, :]
            acc = tl.maximum(acc, _abs_bits(_load_f32_full(w_ptr + offs, IN_BF16)))
        amax = _as_f32(tl.max(tl.max(acc, 1), 0))
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, QMAX))
        for r0 in range(0, B, RB):
            offs = (row0 + r0 + r)[:, None] * k + cols[None, :]
            w = _load_f32_full(w_ptr + offs, IN_BF16)
            q, deq = _quant_values(w, scale, QMAX, IS_INT, MBITS, EBIAS, EMIN, SUB_MUL, MIN_NORMAL)
            tl.store(q_ptr + offs, q)
            d = w - deq
            sig += w * w
            noi += d * d
    tl.store(scale_ptr + bi * kb + bj, scale)
    pid = bi * kb + bj
    tl.store(stats_ptr + 2 * pid, tl.sum(tl.sum(sig, 1), 0))
    tl.store(stats_ptr + 2 * pid + 1, tl.sum(tl.sum(noi, 1), 0))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, so the persistent loops run more than once


def _format_args(spec: ScaledFormat) -> dict:
    if spec.is_int:
        return dict(QMAX=spec.qmax, IS_INT=True, MBITS=0, EBIAS=0, EMIN=0, SUB_MUL=1.0, MIN_NORMAL=0.0)
    mbits, ebias, emin = _FP8[spec.weight_dtype]
    return dict(QMAX=spec.qmax, IS_INT=False, MBITS=mbits, EBIAS=ebias, EMIN=emin,
                SUB_MUL=2.0 ** (mbits - emin), MIN_NORMAL=2.0 ** emin)


FLAT_BLOCK = 4096
ROW_TILE = 4096  # elements of one row-kernel tile
BLOCK_TILE = 16384  # elements of one block-kernel tile (b x b up to b = 128 in one pass)


Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def quantize(w: torch.Tensor, spec: ScaledFormat, block_size: int, *, flat_block: int = FLAT_BLOCK,
             programs: int | None = None, row_tile: int = ROW_TILE, block_tile: int = BLOCK_TILE,
             num_warps: int = 8) -> Quantized:
    """Quantize a 2-D bf16/fp16/fp32 weight on its device: ``(q, scale, signal, noise)``.

    ``q`` and ``scale`` equal ``scaled.quantize(w, spec, block_size)`` bit for bit; ``signal``
    and ``noise`` are 0-d float64 tensors on the device (reading them synchronizes).
    ``flat_block``/``programs`` (per-tensor kernels), ``row_tile`` (elements of a row-kernel tile)
    and ``block_tile`` (elements of a block-kernel tile) are tile sizes, powers of two; tests use
    small ones to reach every code path on small tensors."""
    if w.dim() != 2 or w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QuantkitError(f"Triton quantizer needs a 2-D bf16/fp16/fp32 tensor, got {w.dtype} {tuple(w.shape)}",
                            fix="keep this tensor")
    w = w.contiguous()
    n, k = w.shape
    dev = w.device
    fa = _format_args(spec)
    in_bf16 = w.dtype == torch.bfloat16
    fa["IN_BF16"] = in_bf16
    w_arg = w.view(torch.int16) if in_bf16 else w
    q = torch.empty((n, k), dtype=spec.weight_dtype, device=dev)
    q_arg = q if spec.is_int else q.view(torch.uint8)
    scale = torch.empty(spec.scale_shape((n, k), block_size), dtype=torch.float32, device=dev)
    if w.numel() == 0:
        raise QuantkitError("Triton quantizer got an empty weight", fix="keep this tensor")
    if spec.granularity == "tensor":
        numel = w.numel()
        tiles = triton.cdiv(numel, flat_block)
        nprog = max(1, min(tiles, programs or 4 * _sm_count(dev)))
        parts = torch.empty(nprog, dtype=torch.int32, device=dev)  # amax bits per program
        stats = torch.empty((nprog, 2), dtype=torch.float32, device=dev)
        _amax_partials[(nprog,)](w_arg, parts, numel, IN_BF16=in_bf16, BLOCK=flat_block, num_warps=num_warps)
        _quant_flat[(nprog,)](w_arg, q_arg, parts, nprog, scale, stats, numel, **fa, BLOCK=flat_block,
                              PBLOCK=triton.next_power_of_2(nprog), num_warps=num_warps)
    elif spec.granularity == "row":
        block_k = min(triton.next_power_of_2(k), row_tile)
        block_m = max(1, row_tile // block_k)
        nprog = triton.cdiv(n, block_m)
        stats = torch.empty((nprog, 2), dtype=torch.float32, device=dev)
        _quant_rows[(nprog,)](w_arg, q_arg, scale, stats, n, k, **fa, BLOCK_M=block_m, BLOCK_K=block_k,
                              ONE_PASS=k <= block_k, num_warps=num_warps)
    else:
        b = block_size
        if b < 1 or b & (b - 1) or n % b or k % b:
            raise QuantkitError(f"block size {b} must be a power of two dividing {n}x{k}",
                                fix="use --block-size 128 or 64, or keep this tensor")
        rb = min(b, max(1, block_tile // b))
        stats = torch.empty((n // b * (k // b), 2), dtype=torch.float32, device=dev)
        _quant_blocks[(n // b, k // b)](w_arg, q_arg, scale, stats, k, k // b, **fa, B=b, RB=rb,
                                        num_warps=num_warps if b * rb >= 4096 else 4)
    s = stats.sum(0, dtype=torch.float64)
    return q, scale, s[0], s[1]
