"""Triton kernel for the inner column block of GPTQ-style error feedback (:func:`quantkit.learned.gptq`).

GPTQ's sequential dependency runs along the columns only: every row of W is rounded independently,
with the same upper Cholesky factor U of the inverse Hessian. So one program takes a tile of rows
and one block of up to ``COLS`` columns, keeps the tile in registers, and runs the whole per-column
loop on it (round the column, divide its error by U[j, j], subtract ``err * U[j, :]`` from the
tile), writing the grid values and the scaled errors. The trailing update of the columns right of
the block is :func:`rank1_chain` (below), :func:`quantkit.learned.trailing_update`'s fixed order.
This replaces ~8 PyTorch kernel launches per column (launch-bound on a GPU) with one launch per
column block.

Numerics follow :func:`quantkit.learned.to_grid` exactly: ``w / s`` is IEEE division
(``tl.math.div_rn``), int8 rounds half to even with the 1.5 * 2^23 trick and clamps, fp8 rounds to
the format's grid of x's binade with ties to even after the clamp (the arithmetic of
:mod:`quantkit.kernels.triton_quant`, so it runs identically under ``TRITON_INTERPRET=1``). Kernels
launch with ``enable_fp_fusion=False``: every product and difference rounds once, as in the PyTorch
loop, so the grid values are the loop's bit for bit on any device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.scaled import ScaledFormat
from .triton_quant import _FP8, _RNE_MAGIC

ROWS = 32  # rows per program
COLS = 128  # columns per block (quantkit.learned.COLUMN_BLOCK)


@triton.jit
def _grid(x, QMAX: tl.constexpr, IS_INT: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """x = w / scale (fp32) -> the grid value as fp32 (== learned.to_grid)."""
    if IS_INT:
        x = tl.minimum(tl.maximum(x, -4194304.0), 4194304.0)  # keep the RNE trick exact; clamps below
        r = (x + _RNE_MAGIC) - _RNE_MAGIC
        g = tl.minimum(tl.maximum(r, -QMAX), QMAX)
    else:
        x = tl.minimum(tl.maximum(x, -QMAX), QMAX)
        a = tl.abs(x)
        e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, EMIN)
        c = ((e - MBITS + 150) << 23).to(tl.float32, bitcast=True)
        r = (a + c) - c
        g = tl.where(x.to(tl.int32, bitcast=True) < 0, -r, r)
    return g


@triton.jit
def _gptq_block(w_ptr, s_ptr, u_ptr, q_ptr, e_ptr, n, k, i1, width,
                QMAX: tl.constexpr, IS_INT: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                ROWS: tl.constexpr, COLS: tl.constexpr):
    """w, s, q [B, n, k] fp32 contiguous; u [B, k, k]; e [B, n, COLS]. Columns i1 .. i1+width-1."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    rmask = rows < n
    cmask = cols < width
    base = b * n * k + rows.to(tl.int64)[:, None] * k + i1
    tile = tl.load(w_ptr + base + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    ubase = u_ptr + b * k * k + i1 * k + i1
    ebase = e_ptr + b * n * COLS + rows.to(tl.int64) * COLS
    rbase = b * n * k + rows.to(tl.int64) * k + i1
    for j in range(width):
        col = tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)
        sc = tl.load(s_ptr + rbase + j, mask=rmask, other=1.0)
        g = _grid(tl.math.div_rn(col, sc), QMAX, IS_INT, MBITS, EMIN)
        d = tl.load(ubase + j * k + j)
        err = tl.math.div_rn(col - g * sc, d)
        urow = tl.load(ubase + j * k + cols, mask=cmask & (cols >= j), other=0.0)
        tile = tile - err[:, None] * urow[None, :]
        tl.store(q_ptr + rbase + j, g, mask=rmask)
        tl.store(ebase + j, err, mask=rmask)


def _fmt(spec: ScaledFormat) -> dict:
    if spec.is_int:
        return dict(QMAX=float(spec.qmax), IS_INT=True, MBITS=0, EMIN=0)
    mbits, _, emin = _FP8[spec.weight_dtype]
    return dict(QMAX=float(spec.qmax), IS_INT=False, MBITS=mbits, EMIN=emin)


def gptq_block(w: torch.Tensor, s: torch.Tensor, u: torch.Tensor, q: torch.Tensor, err: torch.Tensor,
               i1: int, i2: int, spec: ScaledFormat, rows: int = ROWS, num_warps: int = 4) -> None:
    """In place: q[:, :, i1:i2] = grid values, err[:, :, :i2-i1] = scaled errors of the block's columns.
    w, s, q [B, N, K] fp32 contiguous; u [B, K, K] fp32 contiguous (upper factor); err [B, N, COLS]."""
    bsz, n, k = w.shape
    width = i2 - i1
    assert 0 < width <= COLS and err.shape == (bsz, n, COLS)
    for t in (w, s, u, q, err):
        assert t.dtype == torch.float32 and t.is_contiguous()
    grid = (triton.cdiv(n, rows), bsz)
    _gptq_block[grid](w, s, u, q, err, n, k, i1, width, ROWS=rows, COLS=COLS, num_warps=num_warps,
                      enable_fp_fusion=False, **_fmt(spec))


@triton.jit
def _rank1_chain(w_ptr, e_ptr, u_ptr, n, width, t, ldw, lde, ldu, BM: tl.constexpr, BN: tl.constexpr):
    """w[:, :width] -= e[:, i] * u[i, :width] for i = 0 .. t-1, in that order, each product and
    difference rounded once (launched with enable_fp_fusion=False)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < n
    cmask = cols < width
    r64 = rows.to(tl.int64)
    ptrs = w_ptr + r64[:, None] * ldw + cols[None, :]
    m = rmask[:, None] & cmask[None, :]
    acc = tl.load(ptrs, mask=m, other=0.0)
    for i in range(t):
        e = tl.load(e_ptr + r64 * lde + i, mask=rmask, other=0.0)
        u = tl.load(u_ptr + i * ldu + cols, mask=cmask, other=0.0)
        acc = acc - e[:, None] * u[None, :]
    tl.store(ptrs, acc, mask=m)


def rank1_chain(w: torch.Tensor, e: torch.Tensor, u: torch.Tensor, bm: int = 64, bn: int = 64,
                num_warps: int = 4) -> None:
    """In place, ``w -= e @ u`` as the chain of rank-1 updates of :func:`quantkit.learned.trailing_update`
    (the same bytes). w [N, W], e [N, T], u [T, W] fp32 with unit column stride."""
    n, width = w.shape
    t = e.shape[1]
    assert u.shape == (t, width)
    for x in (w, e, u):
        assert x.dtype == torch.float32 and x.stride(1) == 1
    grid = (triton.cdiv(n, bm), triton.cdiv(width, bn))
    _rank1_chain[grid](w, e, u, n, width, t, w.stride(0), e.stride(0), u.stride(0), BM=bm, BN=bn,
                       num_warps=num_warps, enable_fp_fusion=False)
