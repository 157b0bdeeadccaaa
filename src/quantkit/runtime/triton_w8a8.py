"""Triton kernels for the W8A8 linear paths (GPU; on CPU only under ``TRITON_INTERPRET=1``).

* :func:`quantize_activations` -- per token: amax per group of ``group`` columns, then
  ``q = clamp(rne(x / scale))`` (INT8) or ``clamp(x / scale)`` cast to FP8. Groups smaller than K
  (int8-block): one pass over a row held in registers; one scale per token (``group = K``): two
  passes over K in chunks (no padding of K to a power of two), autotuned on K. Bit-identical to
  :func:`quantkit.runtime.activations.quantize_activations` (IEEE division via ``div_rn``; INT8
  round-half-even by adding and subtracting 1.5 * 2^23, exact for |y| < 2^22).
* :func:`quantize_static` -- one fp32 scale for the whole tensor (FP8 with a static ``input_scale``,
  as ComfyUI runs such layers): one pass, bit-identical to :func:`quantkit.reference.quantize_with_scale`.
* :func:`w8a8_block_matmul` -- ``Y = X W^T + bias`` for INT8 X with per-token group scales
  ``[M, K/b]`` and INT8 W with ``b x b`` tile scales ``[N/b, K/b]`` (the int8-block format). The K
  loop steps one group (``BLOCK_K = b``) at a time: an exact int32 tensor-core dot per step, scaled
  into an fp32 accumulator by ``dot * (x_scale[m] * w_scale)`` in group order (autotuned over tile
  shapes and loop structures that all keep that order), so the result is the torch
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

from .triton_tiles import launch, swizzle

from . import gluon_w8a8

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


@triton.jit
def _act_quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, stride_xm, stride_qm, stride_sm,
                           K: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, QMAX: tl.constexpr,
                           IS_INT: tl.constexpr):
    """One scale per token (group = K): ROWS rows per program, K walked in CHUNK-wide pieces twice
    (amax, then quantize; the second read of a row hits L2). No padding of K to a power of two."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    cols = tl.arange(0, CHUNK)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_row = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    amax = tl.zeros((ROWS,), dtype=tl.float32)
    for c0 in range(0, K, CHUNK):
        mask = rmask[:, None] & (c0 + cols[None, :] < K)
        x = tl.load(x_row + c0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.math.div_rn(amax, tl.full((ROWS,), QMAX, tl.float32))
    scale = tl.where(amax == 0.0, 1.0, scale)
    tl.store(s_ptr + rows * stride_sm, scale, mask=rmask)
    for c0 in range(0, K, CHUNK):
        mask = rmask[:, None] & (c0 + cols[None, :] < K)
        x = tl.load(x_row + c0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (ROWS, CHUNK)))
        if IS_INT:
            y = (y + 12582912.0) - 12582912.0
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(q_row + c0 + cols[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _static_quant_kernel(x_ptr, q_ptr, s_ptr, N, BLOCK: tl.constexpr, QMAX: tl.constexpr):
    """One scale for the whole tensor (a static ``input_scale``): q = clamp(x / s), cast; one pass."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(s_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.math.div_rn(x, tl.full((BLOCK,), 0.0, tl.float32) + s)
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    tl.store(q_ptr + offs, y.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(x / scale)`` cast to the FP8 ``dtype``, ``scale`` a one-element fp32 tensor on x's device:
    :func:`quantkit.reference.quantize_with_scale` for a per-tensor scale, in one pass."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    block = 4096
    _static_quant_kernel[(triton.cdiv(n, block),)](x, q, scale.reshape(1).float(), n, BLOCK=block,
                                                   QMAX=float(torch.finfo(dtype).max), num_warps=8)
    return q


_MAX_ROW_TILE = 16384  # elements one program holds; longer groups go to the torch reference
# per-token (group = K) kernel: autotuned on K over these (rows per program, chunk, warps); on the
# H100 sweep one row per program led, chunk 1024 at K = 3072 and 2048 at K = 12288 (DEVELOPMENT.md).
ROWS_CONFIGS = [triton.Config({"ROWS": r, "CHUNK": c}, num_warps=w)
                for r, c, w in ((1, 1024, 4), (1, 2048, 8), (1, 4096, 16), (1, 2048, 4), (1, 4096, 8))]
_rows_tuned = triton.autotune(configs=ROWS_CONFIGS, key=["K"])(_act_quant_rows_kernel)


def quantize_activations(x: torch.Tensor, dtype: torch.dtype, group: int, *, per_token_kernel: str | None = None,
                         rows_cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M,K], scale [M,K/group] fp32)`` for a 2-D activation ``x``.

    ``group < K`` (int8-block): one program holds a row's groups in registers (single pass).
    ``group == K`` (per token): the two-pass ``rows`` kernel, unless ``per_token_kernel="tile"``
    asks for the register-tile kernel (K padded to a power of two; kept for comparison)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    qmax = 127.0 if dtype == torch.int8 else float(torch.finfo(dtype).max)
    if group == k and (per_token_kernel or "rows") == "rows":
        q = torch.empty((m, k), dtype=dtype, device=x.device)
        s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        args = (x, q, s, m, x.stride(0), q.stride(0), s.stride(0))
        if rows_cfg is None and INTERPRET:
            rows_cfg = {"rows": 1, "chunk": 1024, "warps": 4}
        if rows_cfg is not None:
            chunk = min(rows_cfg["chunk"], triton.next_power_of_2(k))
            _act_quant_rows_kernel[(triton.cdiv(m, rows_cfg["rows"]),)](
                *args, K=k, ROWS=rows_cfg["rows"], CHUNK=chunk, QMAX=qmax, IS_INT=dtype == torch.int8,
                num_warps=rows_cfg["warps"])
        else:
            _rows_tuned[lambda cfg: (triton.cdiv(m, cfg["ROWS"]),)](*args, K=k, QMAX=qmax, IS_INT=dtype == torch.int8)
        return q, s
    block_g = triton.next_power_of_2(group)
    if block_g > _MAX_ROW_TILE:
        from ..formats.scaled import grid
        from .activations import quantize_activations as reference
        return reference(x, grid("I8" if dtype == torch.int8 else "F8_E4M3"), group)
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    n_groups = k // group
    tile_g = min(triton.next_power_of_2(n_groups), max(1, 4096 // block_g))
    warps = max(1, min(16, tile_g * block_g // 512))
    _act_quant_kernel[(m, triton.cdiv(n_groups, tile_g))](
        x, q, s, x.stride(0), q.stride(0), s.stride(0), n_groups, GROUP=group, BLOCK_G=block_g, TILE_G=tile_g,
        QMAX=qmax, IS_INT=dtype == torch.int8, num_warps=warps)
    return q, s


@triton.jit
def _scaled_group(d, s_m, s_n, MAGIC: tl.constexpr, COL_SCALES: tl.constexpr):
    """``float(dot) * (x_scale[m] * w_scale[n])`` for one K-group's int32 dot ``d``. Exact int32 ->
    fp32 for |dot| < 2^22 (BLOCK_K <= 256): the dot holds ``dot + 0x4B400000`` (MAGIC: the tensor
    cores added it as the accumulator's initial value; else an integer add here), whose bits read as
    the float 1.5 * 2^23 + dot, and a float subtract takes 1.5 * 2^23 off exactly, instead of the
    slow I2F conversion."""
    if not MAGIC:
        d = d + 0x4B400000
    f = d.to(tl.float32, bitcast=True) - 12582912.0
    if COL_SCALES:  # the tile spans several weight blocks: one weight scale per column
        return f * (s_m[:, None] * s_n[None, :])
    else:
        return f * (s_m * s_n)[:, None]


@triton.jit
def _group_step(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, mask_m, mask_n, init, MAGIC: tl.constexpr,
                COL_SCALES: tl.constexpr):
    """One K-group: its exact int32 dot, scaled (``_scaled_group``) for the fp32 accumulator."""
    a = tl.load(a_ptrs, mask=mask_m[:, None], other=0)
    b = tl.load(b_ptrs, mask=mask_n[None, :], other=0)
    d = tl.dot(a, b, init, out_dtype=tl.int32)
    sm = tl.load(as_ptrs, mask=mask_m, other=0.0)
    sn = tl.load(bs_ptrs, mask=mask_n, other=0.0) if COL_SCALES else tl.load(bs_ptrs)
    return _scaled_group(d, sm, sn, MAGIC, COL_SCALES)


@triton.jit
def _w8a8_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask,
                 stride_bsn, stride_bsk, stride_cm, stride_cn,
                 PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, MAGIC: tl.constexpr = 1, PAIR: tl.constexpr = 0):
    """PER_GROUP: scales per K-group of BLOCK_K (int8-block, weight block = BLOCK_K). Each group's
    int32 dot is scaled into an fp32 accumulator in group order (the reference's order). PAIR: two
    groups per loop step, both dots issued before the first is scaled (fewer waits on the tensor
    cores). Else one scale per token and per output column, applied once after an int32
    accumulation over all of K (int8 tensor/row)."""
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    if PER_GROUP:
        as_ptrs = as_ptr + offs_m * stride_asm
        if BLOCK_N > BLOCK_K:  # one weight scale per column
            bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * stride_bsn
        else:
            bs_ptrs = bs_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn
        if MAGIC:
            init = tl.full((BLOCK_M, BLOCK_N), 0x4B400000, tl.int32)
        else:
            init = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_k = K // BLOCK_K
        if PAIR:  # two groups per iteration: both dots issued before the first is scaled
            for _ in range(0, n_k // 2):
                a0 = tl.load(a_ptrs, mask=mask_m[:, None], other=0)
                b0 = tl.load(b_ptrs, mask=mask_n[None, :], other=0)
                a1 = tl.load(a_ptrs + BLOCK_K * stride_ak, mask=mask_m[:, None], other=0)
                b1 = tl.load(b_ptrs + BLOCK_K * stride_bk, mask=mask_n[None, :], other=0)
                d0 = tl.dot(a0, b0, init, out_dtype=tl.int32)
                d1 = tl.dot(a1, b1, init, out_dtype=tl.int32)
                sm0 = tl.load(as_ptrs, mask=mask_m, other=0.0)
                sm1 = tl.load(as_ptrs + stride_ask, mask=mask_m, other=0.0)
                if BLOCK_N > BLOCK_K:
                    sn0 = tl.load(bs_ptrs, mask=mask_n, other=0.0)
                    sn1 = tl.load(bs_ptrs + stride_bsk, mask=mask_n, other=0.0)
                else:
                    sn0 = tl.load(bs_ptrs)
                    sn1 = tl.load(bs_ptrs + stride_bsk)
                acc = acc + _scaled_group(d0, sm0, sn0, MAGIC, BLOCK_N > BLOCK_K)
                acc = acc + _scaled_group(d1, sm1, sn1, MAGIC, BLOCK_N > BLOCK_K)
                a_ptrs += 2 * BLOCK_K * stride_ak
                b_ptrs += 2 * BLOCK_K * stride_bk
                as_ptrs += 2 * stride_ask
                bs_ptrs += 2 * stride_bsk
            if n_k % 2 == 1:  # the last, odd group
                acc = acc + _group_step(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, mask_m, mask_n, init, MAGIC,
                                        BLOCK_N > BLOCK_K)
        else:
            for _ in range(0, n_k):
                acc = acc + _group_step(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, mask_m, mask_n, init, MAGIC,
                                        BLOCK_N > BLOCK_K)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk
                as_ptrs += stride_ask
                bs_ptrs += stride_bsk
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


def _cfg(bm, bn, warps, stages, pair=0, magic=1, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m, "PAIR": pair, "MAGIC": magic},
                         num_warps=warps, num_stages=stages)


# int8-block (BLOCK_K = 128): the configs within 3% of the best at some shape in the H100 sweeps of
# benchmarks/sweep_w8a8.py (DEVELOPMENT.md). 64x128 tiles with 4 warps led (several programs per
# SM, so one's scaling overlaps another's dots); the first implementation's 128x128 x 8 warps was
# 9-14% slower.
BLOCK_CONFIGS = [
    _cfg(64, 128, 4, 4), _cfg(64, 128, 4, 4, group_m=16), _cfg(64, 128, 4, 3), _cfg(64, 128, 4, 4, magic=0),
    _cfg(128, 128, 8, 3, pair=1),
]
ROW_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_tuned_block = triton.autotune(configs=BLOCK_CONFIGS, key=["M", "N", "K"])(_w8a8_kernel)
_tuned_row = triton.autotune(configs=ROW_CONFIGS, key=["M", "N", "K"])(_w8a8_kernel)


def _launch(xq, xs, wq, ws, bias, out_dtype, per_group: bool, block_k: int, ws_strides, config: dict | None = None):
    m, k = xq.shape
    n = wq.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    args = (xq, xs, wq, ws, bias if bias is not None else c, c, m, n, k,
            xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), xs.stride(0), xs.stride(1),
            *ws_strides, c.stride(0), c.stride(1))
    meta = {"PER_GROUP": per_group, "HAS_BIAS": bias is not None, "BLOCK_K": block_k}
    if INTERPRET and config is None:  # small fixed tiles: every config computes the same function
        config = {"BLOCK_M": 32, "BLOCK_N": min(block_k, 32), "GROUP_M": 2}
    launch(_w8a8_kernel, _tuned_block if per_group else _tuned_row, args, meta, m, n, config)
    return c


def w8a8_block_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int,
                      bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """Same contract as :func:`quantkit.runtime.activations.w8a8_block_matmul` (``block`` <= 256).
    ``config``: explicit kernel parameters (BLOCK_M, BLOCK_N, GROUP_M, PAIR, MAGIC, num_warps,
    num_stages) instead of the autotuned choice; BLOCK_N is a multiple or a divisor of ``block``.
    On an sm_90 GPU (without ``config``) the Gluon kernel of :mod:`.gluon_w8a8` runs instead where
    it timed faster for the shape."""
    if block > 256:
        from .activations import w8a8_block_matmul as reference
        return reference(xq, xs, wq, ws, block, bias, out_dtype)
    if config is None and gluon_w8a8.usable(xq, wq, block):  # Hopper: the Gluon kernel, where faster
        return gluon_w8a8.tuned_block_matmul(
            xq, xs, wq, ws, bias, out_dtype, lambda: triton_block_matmul(xq, xs, wq, ws, block, bias, out_dtype))
    return triton_block_matmul(xq, xs, wq, ws, block, bias, out_dtype, config)


def triton_block_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int,
                        bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """The Triton kernel of :func:`w8a8_block_matmul` (``block`` <= 256), on any GPU."""
    return _launch(xq, xs, wq, ws, bias, out_dtype, True, block, (ws.stride(0), ws.stride(1)), config)


def w8a8_row_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as :func:`quantkit.runtime.activations.w8a8_row_matmul`."""
    n = wq.shape[0]
    ws_col = ws.float().reshape(-1).expand(n) if ws.numel() == 1 else ws.reshape(n)
    return _launch(xq, xs, wq, ws_col, bias, out_dtype, False, 32 if INTERPRET else 128, (ws_col.stride(0), 0))
