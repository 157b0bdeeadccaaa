"""Torch reference for the W8A8 paths: dynamic activation quantization and the block-scaled matmul.

These are the specification the Triton kernels in :mod:`quantkit.runtime.triton_w8a8` are tested
against (bit for bit under ``TRITON_INTERPRET=1``), and the CPU fast path. The rules are the
converter's (:mod:`quantkit.reference`): ``scale = amax / qmax`` in fp32 (1.0 where amax is 0),
``q = clamp(round_half_even(x / scale))`` for INT8, ``clamp(x / scale)`` then an RNE cast for FP8.

Activations X ``[M, K]`` get one scale per token and per group of ``group`` columns:
``scale`` has shape ``[M, K / group]`` (``group = K``: one scale per token).
"""

from __future__ import annotations

import torch

from ..formats import scaled
from ..formats.scaled import ScaledFormat


def quantize_activations(x: torch.Tensor, spec: ScaledFormat, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-group quantization of a 2-D activation: returns ``(q [M,K], scale [M,K/group])``."""
    m, k = x.shape
    xg = x.float().reshape(m, k // group, group)
    scale = scaled.scale_from_amax(xg.abs().amax(dim=2), spec)
    y = xg / scale[..., None]
    if spec.is_int:
        q = y.round().clamp(-spec.qmax, spec.qmax).to(spec.weight_dtype)
    else:
        q = y.clamp(-spec.qmax, spec.qmax).to(spec.weight_dtype)
    return q.reshape(m, k), scale


def w8a8_block_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``Y = X W^T + bias`` from int8 X ``[M,K]`` with scales ``[M,K/b]`` and int8 W ``[N,K]`` with
    ``b x b`` tile scales ``[N/b,K/b]``. Per K-group: an exact int32 dot, then
    ``acc = acc + dot * (x_scale * w_scale)`` in fp32, in group order; bias added in fp32 last."""
    m, k = xq.shape
    n = wq.shape[0]
    ws_cols = ws.repeat_interleave(block, 0)  # [N, K/b]: each output column's scale per group
    acc = torch.zeros(m, n, dtype=torch.float32, device=xq.device)
    for g in range(k // block):
        cols = slice(g * block, (g + 1) * block)
        dot = int_dot(xq[:, cols], wq[:, cols])
        acc = acc + dot.float() * (xs[:, g:g + 1] * ws_cols[:, g][None, :])
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def w8a8_row_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``Y = X W^T + bias`` from int8 X ``[M,K]`` with per-token scales ``[M,1]`` and int8 W ``[N,K]``
    with a scale per tensor ``[]`` or per row ``[N,1]``: one exact int32 dot over all of K, then
    ``(acc * x_scale) * w_scale`` in fp32, plus bias in fp32."""
    y = (int_dot(xq, wq).float() * xs) * ws.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b.T`` for int8 ``a [M,K]`` and ``b [N,K]``: ``torch._int_mm`` where it runs
    (CPU; CUDA with M > 16 and K, N multiples of 8), else an fp64 matmul (exact for these sizes)."""
    m, k = a.shape
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0):
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    return (a.double() @ b.double().t()).to(torch.int32)
