"""Fused Triton ``F.linear`` for the 4-bit layouts awq4 (``awq_w4a16``) and w4a8 (``asym_w4a8_int8``,
4-bit codes); GPU, on CPU only under ``TRITON_INTERPRET=1``. Both GEMMs read the packed weight and
its scales directly and decode each weight tile in registers inside the K loop (no dequantized
weight in memory); one program computes a BLOCK_M x BLOCK_N tile of ``y = x W^T (+ bias)``.

* :func:`awq4_linear` -- W4A16 (kitchen's ``gemv_awq_w4a16``: activations stay in the compute
  dtype). BLOCK_K is the group (64): one bf16 scale and zero row per K step. The weight tile is
  decoded as :meth:`quantkit.formats.awq4.AWQ4Format.dequantize` does in compute dtype D
  (bf16: ``bf16(bf16((c - 8) s) + z)``, each op rounded as torch's bf16 ops round; fp16 and fp32:
  ``(c - 8) s + z`` in fp32, the product exact, then cast to D), then a D x D tensor-core dot with
  fp32 accumulation, bias added in fp32, output in x's dtype. So the result is
  ``F.linear(x, dequantize(W, x.dtype), bias)`` up to the order of the fp32 sums.
* :func:`w4a8_linear` -- W4A8 as comfy-kitchen runs the layout (eager / Triton backends of
  ``w4a8_int8_linear``: the weight decoded onto its INT8 grid, the activation rotated and quantized
  to INT8 per token, an INT8 GEMM):

  1. :func:`rotate_quantize` -- x rotated per ConvRot group by the block-diagonal H (kitchen's own
     ``torch.matmul`` in x's dtype), then per token (one Triton pass) ``s = max(amax / 127, 1e-30)`` (fp32) and ``q = clamp(rint(D(x_rot / D(s))), -128,
     127)``: kitchen divides in x's dtype D by the scale cast to D (0 replaced by D's tiny);
  2. the GEMM: per weight tile, codes unpacked, ``i8 = clamp(rint(codebook[c] * float(s_rel)), -127,
     127)`` (the 4-bit codebook, or ``c - 8`` without one), an exact int32 dot over all of K, then
     ``D(acc * (s_x[m] * s_channel[n]))`` and the bias added in D (kitchen's eager order).

  The result differs from dequantize + F.linear (what quantkit's runtime computes elsewhere) by
  the activation's INT8 rounding, as kitchen's own kernels do.

Block sizes are autotuned per (M bucket, N, K) over small sm_90-minded sets (:data:`AWQ_CONFIGS`,
:data:`W4A8_CONFIGS`); ``config=`` pins one. Import this module only where triton is installed; set
``TRITON_INTERPRET=1`` before importing it to run on CPU. Shapes outside the kernels' contract
raise ValueError (:mod:`.linear` checks them first and falls back to dequantize + F.linear).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_tiles import launch, swizzle

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAGIC = 12582912.0  # 1.5 * 2^23: (y + MAGIC) - MAGIC rounds half to even, exact for |y| < 2^22


def _m_bucket(m: int) -> int:
    """The autotuner's M key: powers of two up to 4096 (a new token count reuses its bucket's
    choice instead of tuning again)."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


@triton.jit
def _to(x, dt: tl.constexpr, RNE: tl.constexpr):
    """fp32 ``x`` cast to ``dt``. RNE (the interpreter, whose fp32 -> bf16 cast truncates): a bf16
    target is rounded half to even on the bits first (what the GPU's cast does), so the cast is exact."""
    if RNE:
        if dt == tl.bfloat16:
            b = x.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
            x = b.to(tl.float32, bitcast=True)
    return x.to(dt)


# ---- awq4 ----------------------------------------------------------------------------------------

@triton.jit
def _tile(x_ptr, q_ptr, M, N, stride_xm, stride_qn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile: rows offs_m and columns offs_n with their masks, the K offsets of
    one step (offs_k; offs_b for its packed bytes, two 4-bit codes a byte), and the pointers to the
    first step's activations [BLOCK_M, BLOCK_K] and weight bytes [BLOCK_N, BLOCK_K / 2]."""
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn + offs_b[None, :]
    return offs_m, offs_n, offs_k, offs_b, offs_m < M, offs_n < N, x_ptrs, q_ptrs


@triton.jit
def _awq_kernel(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, M, N, K, M_KEY,
                stride_xm, stride_qn, stride_sg, stride_cm,
                MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                GROUP: tl.constexpr, GROUP_M: tl.constexpr, F32_DOT: tl.constexpr = 0, RNE: tl.constexpr = 0):
    """MODE 0: bf16 (each decode op rounded to bf16), 1: fp16 (decode in fp32, cast), 2: fp32.
    F32_DOT: the dot on the operands widened to fp32 (the same products and fp32 sums), for the
    interpreter: its bf16 ``tl.dot`` returns garbage in triton 3.9 and its fp16 one sums in fp16."""
    offs_m, offs_n, offs_k, offs_b, mask_m, mask_n, x_ptrs, q_ptrs = _tile(
        x_ptr, q_ptr, M, N, stride_xm, stride_qn, BLOCK_M, BLOCK_N, GROUP, GROUP_M)
    s_ptrs = s_ptr + offs_n
    z_ptrs = z_ptr + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // GROUP):
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(q_ptrs, mask=mask_n[:, None], other=0).to(tl.int32) & 0xFF
        s = tl.load(s_ptrs, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptrs, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        lo = ((b & 0xF) - 8).to(tl.float32)
        hi = ((b >> 4) - 8).to(tl.float32)
        if MODE == 0:
            w_lo = _to(_to(lo * s, tl.bfloat16, RNE).to(tl.float32) + z, tl.bfloat16, RNE)
            w_hi = _to(_to(hi * s, tl.bfloat16, RNE).to(tl.float32) + z, tl.bfloat16, RNE)
        else:
            w_lo = (lo * s + z).to(x_ptr.dtype.element_ty)
            w_hi = (hi * s + z).to(x_ptr.dtype.element_ty)
        w = tl.interleave(w_lo, w_hi)  # [BLOCK_N, GROUP]: even column = low nibble
        if MODE == 2 or F32_DOT:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += GROUP
        q_ptrs += GROUP // 2
        s_ptrs += stride_sg
        z_ptrs += stride_sg
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, _to(acc, c_ptr.dtype.element_ty, RNE), mask=mask_m[:, None] & mask_n[None, :])


def _cfg(bm, bn, warps, stages, group_m=8, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m, **extra},
                         num_warps=warps, num_stages=stages)


# sm_90 (H200): small M is a weight stream (narrow N tiles: enough programs for 132 SMs), large M
# tensor-core bound. The decode's temporaries need registers: these are the tiles that compiled
# for sm_90 (AOT on CPU with triton 3.6 and 3.9, ptxas -v / cuobjdump) without spilling (128 x 256,
# and 128 x 64, 64 x 128, 64 x 64 at 4 warps spilled), in 3-33 KB of shared memory, mma.sync below
# 64 rows, wgmma from 64, no serialised-wgmma warnings. Not yet timed on a GPU.
AWQ_CONFIGS = [
    _cfg(16, 16, 4, 4), _cfg(16, 32, 4, 4), _cfg(16, 64, 4, 4), _cfg(32, 64, 4, 4), _cfg(64, 64, 8, 4),
    _cfg(64, 128, 8, 4), _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 4), _cfg(128, 128, 8, 3),
]
_awq_tuned = triton.autotune(configs=AWQ_CONFIGS, key=["M_KEY", "N", "K"])(_awq_kernel)

_AWQ_MODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def awq4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, group: int = 64, config: dict | None = None) -> torch.Tensor:
    """``x [.., K] @ W^T + bias`` for awq4 storage: ``qweight`` I8 [N, K/2], ``scale``/``zeros`` [K/group,
    N] (bf16 as written, or fp16/fp32); output in x's dtype (bf16, fp16 or fp32)."""
    n, kh = qweight.shape
    k = 2 * kh
    if x.dtype not in _AWQ_MODE:
        raise ValueError(f"awq4_linear: input dtype {x.dtype} is not bf16, fp16 or fp32")
    if x.shape[-1] != k or group not in (32, 64, 128) or k % group:
        raise ValueError(f"awq4_linear: x [.., {x.shape[-1]}] / weight [{n}, {kh}] x2 / group {group} unsupported")
    if tuple(scale.shape) != (k // group, n) or tuple(zeros.shape) != (k // group, n):
        raise ValueError(f"awq4_linear: scale {list(scale.shape)} / zeros {list(zeros.shape)} are not [{k // group}, {n}]")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight, scale, zeros = qweight.contiguous(), scale.contiguous(), zeros.contiguous()
    m = x2.shape[0]
    c = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (x2, qweight, scale, zeros, bias if bias is not None else c, c, m, n, k, _m_bucket(m),
            x2.stride(0), qweight.stride(0), scale.stride(0), c.stride(0))
    meta = {"MODE": _AWQ_MODE[x.dtype], "HAS_BIAS": bias is not None, "GROUP": group,
            "F32_DOT": int(INTERPRET), "RNE": int(INTERPRET)}
    if config is None and INTERPRET:
        config = {"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2}
    launch(_awq_kernel, _awq_tuned, args, meta, m, n, config)
    return c.reshape(*x.shape[:-1], n)


# ---- w4a8: activations ---------------------------------------------------------------------------

@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, CHUNK: tl.constexpr, TINY: tl.constexpr,
                       RNE: tl.constexpr = 0):
    """One (rotated) token per program, K walked in CHUNK-wide pieces twice: amax, then quantize."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CHUNK)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    amax = tl.zeros((CHUNK,), dtype=tl.float32)
    for c0 in range(0, K, CHUNK):
        x = tl.load(x_row + c0 + cols, mask=c0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    a = tl.max(amax, axis=0)
    scale = tl.maximum(tl.math.div_rn(a, 127.0), 1e-30)
    tl.store(s_ptr + row, scale)
    sq = _to(scale, x_ptr.dtype.element_ty, RNE).to(tl.float32)  # kitchen divides by the scale in x's dtype
    sq = tl.where(sq == 0.0, TINY, sq)  # (fp16: 1e-30 flushes to 0; kitchen takes fp16's tiny)
    sq_v = tl.full((CHUNK,), 0.0, tl.float32) + sq
    for c0 in range(0, K, CHUNK):
        mask = c0 + cols < K
        x = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        y = _to(tl.math.div_rn(x, sq_v), x_ptr.dtype.element_ty, RNE).to(tl.float32)  # the quotient in x's dtype
        y = (y + 12582912.0) - 12582912.0
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)
        tl.store(q_row + c0 + cols, y.to(tl.int8), mask=mask)


@functools.cache
def _hadamard(g: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    from ..formats import _hadamard
    return _hadamard.matrix(g).to(device=device, dtype=dtype).contiguous()  # entries +-2^-d: exact


def rotate_quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [M, K], scale fp32 [M])`` of a 2-D activation: rotated per ConvRot ``group`` (16, 64
    or 256) and quantized per token as comfy-kitchen's ``int8_linear(convrot=True)`` does. The
    rotation is kitchen's own op (``matmul`` of the [M, K/G, G] view with H in x's dtype: the same
    bits as kitchen on the same device); the quantization one Triton pass per token."""
    m, k = x.shape
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or group not in (16, 64, 256) or k % group:
        raise ValueError(f"rotate_quantize: x {x.dtype} [{m}, {k}] / ConvRot group {group} unsupported")
    r = torch.matmul(x.reshape(m, k // group, group), _hadamard(group, x.dtype, x.device)).reshape(m, k)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    chunk = min(2048, triton.next_power_of_2(k))
    _quant_rows_kernel[(m,)](r, q, s, k, r.stride(0), q.stride(0), CHUNK=chunk, TINY=float(torch.finfo(x.dtype).tiny),
                             RNE=int(INTERPRET), num_warps=4 if chunk <= 1024 else 8)
    return q, s


# ---- w4a8: GEMM ----------------------------------------------------------------------------------

@triton.jit
def _w4a8_kernel(xq_ptr, xs_ptr, q_ptr, r_ptr, cb_ptr, sc_ptr, bias_ptr, c_ptr, M, N, K, M_KEY,
                 stride_xm, stride_qn, stride_rn, stride_cm,
                 GROUP: tl.constexpr, HAS_CB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, RNE: tl.constexpr = 0):
    offs_m, offs_n, offs_k, offs_b, mask_m, mask_n, x_ptrs, q_ptrs = _tile(
        xq_ptr, q_ptr, M, N, stride_xm, stride_qn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    # one s_rel per byte: a byte's two codes share a group (GROUP is even)
    r_ptrs = r_ptr + offs_n.to(tl.int64)[:, None] * stride_rn + ((2 * offs_b) // GROUP)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        bmask = offs_b < (K - k0) // 2
        x = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0)
        b = tl.load(q_ptrs, mask=mask_n[:, None] & bmask[None, :], other=0).to(tl.int32) & 0xFF
        s = tl.load(r_ptrs, mask=mask_n[:, None] & bmask[None, :], other=0.0).to(tl.float32)
        lo = b & 0xF
        hi = b >> 4
        if HAS_CB:
            v_lo = tl.load(cb_ptr + lo)
            v_hi = tl.load(cb_ptr + hi)
        else:
            v_lo = (lo - 8).to(tl.float32)
            v_hi = (hi - 8).to(tl.float32)
        i_lo = tl.minimum(tl.maximum((v_lo * s + 12582912.0) - 12582912.0, -127.0), 127.0).to(tl.int8)
        i_hi = tl.minimum(tl.maximum((v_hi * s + 12582912.0) - 12582912.0, -127.0), 127.0).to(tl.int8)
        w = tl.interleave(i_lo, i_hi)  # [BLOCK_N, BLOCK_K]: even column = low nibble
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // 2
        r_ptrs += BLOCK_K // GROUP
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    sc = tl.load(sc_ptr + offs_n, mask=mask_n, other=0.0)
    out_t = c_ptr.dtype.element_ty
    y = _to(acc.to(tl.float32) * (xs[:, None] * sc[None, :]), out_t, RNE)
    if HAS_BIAS:  # kitchen adds the bias after the cast, in the output dtype
        bias = _to(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32), out_t, RNE)
        y = _to(y.to(tl.float32) + bias.to(tl.float32)[None, :], out_t, RNE)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y, mask=mask_m[:, None] & mask_n[None, :])


# The codebook gathers are staged in shared memory by the pipeliner (16 x 32 x 128: 22 KB at 2
# stages, 55 KB at 4); these tiles compiled for sm_90 (AOT on CPU, triton 3.6 and 3.9) without
# register spills in 20-98 KB of shared memory (at 4 warps 32 x 64 and 64 x 64 x 128 spilled;
# at 8, 128 x 128 x 128, 128 x 256, and 128 x 128 x 64 under triton 3.6). Not yet timed on a GPU.
W4A8_CONFIGS = [
    _cfg(16, 16, 4, 3, BLOCK_K=128), _cfg(16, 32, 4, 3, BLOCK_K=128), _cfg(16, 64, 4, 3, BLOCK_K=64),
    _cfg(16, 64, 4, 2, BLOCK_K=128), _cfg(32, 64, 8, 3, BLOCK_K=128), _cfg(64, 64, 8, 3, BLOCK_K=128),
    _cfg(64, 128, 8, 3, BLOCK_K=64), _cfg(128, 64, 8, 3, BLOCK_K=64), _cfg(128, 128, 8, 4, BLOCK_K=32),
]
_w4a8_tuned = triton.autotune(configs=W4A8_CONFIGS, key=["M_KEY", "N", "K"])(_w4a8_kernel)


def w4a8_matmul(xq: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor, s_rel: torch.Tensor,
                s_channel: torch.Tensor, codebook: torch.Tensor | None, bias: torch.Tensor | None,
                out_dtype: torch.dtype, group: int = 16, config: dict | None = None) -> torch.Tensor:
    """The GEMM of :func:`w4a8_linear` on an already quantized activation (``xq`` int8 [M, K], ``xs``
    fp32 [M])."""
    m, k = xq.shape
    n = qweight.shape[0]
    if s_rel.dtype == torch.uint8:
        s_rel = s_rel.view(torch.float8_e4m3fn)
    if s_rel.dtype not in (torch.float8_e4m3fn, torch.float32):
        raise ValueError(f"w4a8_matmul: s_rel dtype {s_rel.dtype} is not fp8 e4m3 or fp32")
    cb = (codebook.to(device=xq.device, dtype=torch.float32).contiguous() if codebook is not None
          else torch.empty(16, device=xq.device, dtype=torch.float32))
    c = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    qweight, s_rel, sc = qweight.contiguous(), s_rel.contiguous(), s_channel.float().contiguous()
    args = (xq, xs, qweight, s_rel, cb, sc, bias if bias is not None else c, c, m, n, k, _m_bucket(m),
            xq.stride(0), qweight.stride(0), s_rel.stride(0), c.stride(0))
    meta = {"GROUP": group, "HAS_CB": codebook is not None, "HAS_BIAS": bias is not None, "RNE": int(INTERPRET)}
    if config is None and INTERPRET:
        config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
    launch(_w4a8_kernel, _w4a8_tuned, args, meta, m, n, config)
    return c


def w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, s_rel: torch.Tensor, s_channel: torch.Tensor,
                codebook: torch.Tensor | None, bias: torch.Tensor | None, group: int = 16, convrot_group: int = 256,
                config: dict | None = None) -> torch.Tensor:
    """``x [.., K] @ W^T + bias`` for 4-bit w4a8 storage (``qweight`` I8 [N, K/2], ``s_rel`` fp8 [N,
    K/group], ``s_channel`` fp32 [N], ``codebook`` fp32 [16] or None), as comfy-kitchen computes it
    (activation rotated and INT8-quantized per token, INT8 GEMM); output in x's dtype."""
    n, kh = qweight.shape
    k = 2 * kh
    if (x.shape[-1] != k or group % 2 or group < 2 or k % group or k % 16 or tuple(s_rel.shape) != (n, k // group)
            or tuple(s_channel.shape) != (n,) or (codebook is not None and tuple(codebook.shape) != (16,))):
        raise ValueError(f"w4a8_linear: x [.., {x.shape[-1]}] / weight [{n}, {kh}] / s_rel {list(s_rel.shape)} "
                         f"/ group {group} do not form a 4-bit w4a8 layer")
    xq, xs = rotate_quantize(x.reshape(-1, k), convrot_group)
    y = w4a8_matmul(xq, xs, qweight, s_rel, s_channel, codebook, bias, x.dtype, group, config)
    return y.reshape(*x.shape[:-1], n)
