"""Triton kernels for the W8A8 linear paths (GPU; on CPU only under ``TRITON_INTERPRET=1``).

* :func:`quantize_activations` -- one pass per token: amax per group of ``group`` columns, then
  ``q = clamp(rne(x / scale))`` (INT8) or ``clamp(x / scale)`` cast to FP8. Bit-identical to
  :func:`quantkit.runtime.activations.quantize_activations` (IEEE division via ``div_rn``; INT8
  round-half-even by adding and subtracting 1.5 * 2^23, exact for |y| < 2^22).
* :func:`w8a8_block_matmul` -- ``Y = X W^T + bias`` for INT8 X with per-token group scales
  ``[M, K/b]`` and INT8 W with ``b x b`` tile scales ``[N/b, K/b]`` (the int8-block format). The K
  loop steps one group (``BLOCK_K = b``) at a time: an exact int32 tensor-core dot per step, scaled
  into an fp32 accumulator by ``dot * (x_scale[m] * w_scale)``, so the result is the torch
  reference :func:`quantkit.runtime.activations.w8a8_block_matmul` up to FMA contraction on the GPU
  (bit-identical in the interpreter).
* :func:`w8a8_row_matmul` -- the same for INT8 W with one scale per tensor or output row: int32
  accumulation over all of K, scaled once by ``(acc * x_scale[m]) * w_scale[n]``.

Import this module only where triton is installed; set ``TRITON_INTERPRET=1`` before importing it
to run on CPU. It needs no ComfyUI.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, stride_xm, stride_qm, stride_sm, N_GROUPS,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, TILE_G: tl.constexpr, QMAX: tl.constexpr,
                      IS_INT: tl.constexpr):
    """One token row, TILE_G groups of GROUP columns, in a single pass held in registers."""
    m = tl.program_id(0)
    groups = tl.program_id(1) * TILE_G + tl.arange(0, TILE_G)
    cols = tl.arange(0, BLOCK_G)
    mask = (groups[:, None] < N_GROUPS) & (cols[None, :] < GROUP)
    offs = groups[:, None] * GROUP + cols[None, :]
    x = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(a, tl.full((TILE_G,), QMAX, tl.float32))
    scale = tl.where(a == 0.0, 1.0, scale)
    tl.store(s_ptr + m * stride_sm + groups, scale, mask=groups < N_GROUPS)
    y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (TILE_G, BLOCK_G)))
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    tl.store(q_ptr + m * stride_qm + offs, y.to(q_ptr.dtype.element_ty), mask=mask)


_MAX_ROW_TILE = 16384  # elements one program holds; longer groups go to the torch reference


def quantize_activations(x: torch.Tensor, dtype: torch.dtype, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M,K], scale [M,K/group] fp32)`` for a 2-D activation ``x``."""
    m, k = x.shape
    block_g = triton.next_power_of_2(group)
    if block_g > _MAX_ROW_TILE:
        from ..formats import FORMATS
        from .activations import quantize_activations as reference
        return reference(x, FORMATS["int8-row" if dtype == torch.int8 else "fp8"], group)
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    qmax = 127.0 if dtype == torch.int8 else float(torch.finfo(dtype).max)
    n_groups = k // group
    tile_g = min(triton.next_power_of_2(n_groups), max(1, 4096 // block_g))
    warps = max(1, min(16, tile_g * block_g // 512))
    _act_quant_kernel[(m, triton.cdiv(n_groups, tile_g))](
        x, q, s, x.stride(0), q.stride(0), s.stride(0), n_groups, GROUP=group, BLOCK_G=block_g, TILE_G=tile_g,
        QMAX=qmax, IS_INT=dtype == torch.int8, num_warps=warps)
    return q, s


@triton.jit
def _w8a8_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask,
                 stride_bsn, stride_bsk, stride_cm, stride_cn,
                 PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """PER_GROUP: scales per K-group of BLOCK_K (int8-block; BLOCK_N divides the block size, so one
    weight scale per tile and group). Else one scale per token and per output column, applied once
    after an int32 accumulation over all of K (int8 tensor/row)."""
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
    if PER_GROUP:
        as_ptrs = as_ptr + offs_m * stride_asm
        bs_ptr_k = bs_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K // BLOCK_K):
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0)
            dot = tl.dot(a, b, out_dtype=tl.int32)
            s = tl.load(as_ptrs, mask=mask_m, other=0.0) * tl.load(bs_ptr_k)
            # exact int32 -> fp32 for |dot| < 2^22 (BLOCK_K <= 256) with an integer add and a float
            # subtract, both full-rate, instead of the slow I2F conversion
            f = (dot + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            acc = acc + f * s[:, None]
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
            as_ptrs += stride_ask
            bs_ptr_k += stride_bsk
    else:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
            b = tl.load(b_ptrs, mask=mask_n[None, :] & mask_k[:, None], other=0)
            acc_i = tl.dot(a, b, acc_i, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        sa = tl.load(as_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptr + offs_n * stride_bsn, mask=mask_n, other=0.0)
        acc = (acc_i.to(tl.float32) * sa[:, None]) * sb[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "PER_GROUP"])(_w8a8_kernel)


def _launch(xq, xs, wq, ws, bias, out_dtype, per_group: bool, block_k: int, block_n: int, ws_strides):
    m, k = xq.shape
    n = wq.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    args = (xq, xs, wq, ws, bias if bias is not None else c, c, m, n, k,
            xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), xs.stride(0), xs.stride(1),
            *ws_strides, c.stride(0), c.stride(1))
    meta = {"PER_GROUP": per_group, "HAS_BIAS": bias is not None, "BLOCK_N": block_n, "BLOCK_K": block_k}
    if INTERPRET:  # one small fixed tile: every config computes the same function
        grid = (triton.cdiv(m, 32) * triton.cdiv(n, block_n),)
        _w8a8_kernel[grid](*args, BLOCK_M=32, GROUP_M=2, **meta)
    else:
        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, block_n),)
        _tuned[grid](*args, **meta)
    return c


def w8a8_block_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as :func:`quantkit.runtime.activations.w8a8_block_matmul` (``block`` <= 256)."""
    if block > 256:
        from .activations import w8a8_block_matmul as reference
        return reference(xq, xs, wq, ws, block, bias, out_dtype)
    block_n = min(block, 32 if INTERPRET else 128)
    return _launch(xq, xs, wq, ws, bias, out_dtype, True, block, block_n, (ws.stride(0), ws.stride(1)))


def w8a8_row_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as :func:`quantkit.runtime.activations.w8a8_row_matmul`."""
    n = wq.shape[0]
    ws_col = ws.float().reshape(-1).expand(n) if ws.numel() == 1 else ws.reshape(n)
    return _launch(xq, xs, wq, ws_col, bias, out_dtype, False, 32 if INTERPRET else 128,
                   32 if INTERPRET else 128, (ws_col.stride(0), 0))
