"""Triton kernels for the W8A8 linear paths (GPU; on CPU only under ``TRITON_INTERPRET=1``).

* :func:`quantize_activations` -- one pass per token: amax per group of ``group`` columns, then
  ``q = clamp(rne(x / scale))`` (INT8) or ``clamp(x / scale)`` cast to FP8. Bit-identical to
  :func:`quantkit.runtime.activations.quantize_activations` (IEEE division via ``div_rn``; INT8
  round-half-even by adding and subtracting 1.5 * 2^23, exact for |y| < 2^22).
* :func:`w8a8_block_matmul` -- ``Y = X W^T + bias`` for INT8 X with per-token group scales
  ``[M, K/b]`` and INT8 W with ``b x b`` tile scales ``[N/b, K/b]`` (the int8-block format). The K
  loop steps one group (``BLOCK_K = b``) at a time: an exact int32 tensor-core dot per step, scaled
  into an fp32 accumulator by ``(dot * x_scale[m]) * w_scale[n]``, so the result is the torch
  reference :func:`quantkit.runtime.activations.w8a8_block_matmul` up to FMA contraction on the GPU
  (bit-identical in the interpreter).

Import this module only where triton is installed; set ``TRITON_INTERPRET=1`` before importing it
to run on CPU. It needs no ComfyUI.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_RNE_MAGIC = 12582912.0  # 1.5 * 2**23


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, stride_xm, stride_qm, stride_sm,
                      GROUP: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    m = tl.program_id(0)
    g = tl.program_id(1)
    x_row = x_ptr + m * stride_xm + g * GROUP
    q_row = q_ptr + m * stride_qm + g * GROUP
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(0, GROUP, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + idx, mask=idx < GROUP, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    a = tl.max(amax, axis=0)
    qmax = tl.full((), QMAX, tl.float32)
    scale = tl.math.div_rn(a, qmax)
    scale = tl.where(a == 0.0, 1.0, scale)
    tl.store(s_ptr + m * stride_sm + g, scale)
    for off in range(0, GROUP, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + idx, mask=idx < GROUP, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, tl.zeros_like(x) + scale)
        if IS_INT:
            y = (y + 12582912.0) - 12582912.0
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(q_row + idx, y.to(q_ptr.dtype.element_ty), mask=idx < GROUP)


def quantize_activations(x: torch.Tensor, dtype: torch.dtype, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M,K], scale [M,K/group] fp32)`` for a 2-D activation ``x`` (rows contiguous)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    qmax = 127.0 if dtype == torch.int8 else float(torch.finfo(dtype).max)
    block = min(triton.next_power_of_2(group), 1024)
    _act_quant_kernel[(m, k // group)](x, q, s, x.stride(0), q.stride(0), s.stride(0), GROUP=group, BLOCK=block,
                                       QMAX=qmax, IS_INT=dtype == torch.int8, num_warps=4 if block >= 512 else 1)
    return q, s


@triton.jit
def _w8a8_block_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                       stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask,
                       stride_bsn, stride_bsk, stride_cm, stride_cn,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n  # tiles of GROUP_M row-blocks walked column by column (L2 reuse)
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0)
        dot = tl.dot(a, b, out_dtype=tl.int32)
        sa = tl.load(as_ptrs, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptrs, mask=mask_n, other=0.0)
        acc = acc + (dot.to(tl.float32) * sa[:, None]) * sb[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        as_ptrs += stride_ask
        bs_ptrs += stride_bsk
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(_w8a8_block_kernel)


def w8a8_block_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as :func:`quantkit.runtime.activations.w8a8_block_matmul`."""
    m, k = xq.shape
    n = wq.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    args = (xq, xs, wq, ws, bias if bias is not None else c, c, m, n, k,
            xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), xs.stride(0), xs.stride(1),
            ws.stride(0), ws.stride(1), c.stride(0), c.stride(1))
    if INTERPRET:  # one small fixed tile: every config computes the same function
        bm = bn = min(32, block)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _w8a8_block_kernel[grid](*args, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block,
                                 GROUP_M=2)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _tuned[grid](*args, HAS_BIAS=bias is not None, BLOCK_K=block)
    return c
