"""The numerical specification: whole-tensor torch reference quantizers.

Every fast path (the chunked CPU path in :mod:`quantkit.quantize`, Triton kernels) must produce
bit-identical ``q`` and ``scale`` to these functions; tests hold them to it.

Rules, for W of shape [N, K] in bf16, fp16 or fp32:

* ``amax`` is the largest |w| over the scale's region, computed in fp32 (exact).
* ``scale = amax / qmax`` in fp32; a region whose amax is 0 gets scale 1.0 (its q is all 0).
* INT8: ``q = clamp(round_half_even(w / scale), -127, 127)`` then cast. Never truncate.
* FP8:  ``q = clamp(w / scale, -qmax, qmax)`` then cast (round to nearest even by the cast).
* ``w / scale`` is an fp32 division, the scale broadcast over its region.
"""

from __future__ import annotations

import math

import torch

from .formats import FormatSpec


def region_amax(w: torch.Tensor, spec: FormatSpec, block_size: int) -> torch.Tensor:
    """fp32 amax per scale region: shape [] / [N,1] / [N/b,K/b]."""
    a = w.abs()
    if spec.granularity == "tensor":
        return a.amax().float()
    if spec.granularity == "row":
        return a.amax(dim=1, keepdim=True).float()
    n, k = w.shape
    b = block_size
    return a.reshape(n // b, b, k // b, b).amax(dim=(1, 3)).float()


def scale_from_amax(amax: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    amax = amax.float()
    # A same-device tensor divisor: PyTorch's CUDA kernel turns division by a CPU scalar into a
    # multiplication by its reciprocal, which is not the same fp32 number.
    scale = amax / torch.full_like(amax, spec.qmax)
    return torch.where(amax == 0, torch.ones_like(scale), scale)  # NaN/Inf stay visible


def compute_scale(w: torch.Tensor, spec: FormatSpec, block_size: int) -> torch.Tensor:
    return scale_from_amax(region_amax(w, spec, block_size), spec)


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], spec: FormatSpec,
                 block_size: int) -> torch.Tensor:
    """Broadcastable view of the scale over W's elements."""
    if spec.granularity in ("tensor", "row"):
        return scale
    return scale.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, spec: FormatSpec,
                        block_size: int) -> torch.Tensor:
    x = w.float() / expand_scale(scale, tuple(w.shape), spec, block_size)
    if spec.is_int:
        return x.round().clamp(-spec.qmax, spec.qmax).to(spec.weight_dtype)
    return x.clamp(-spec.qmax, spec.qmax).to(spec.weight_dtype)


def quantize(w: torch.Tensor, spec: FormatSpec, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization: returns (q, scale)."""
    scale = compute_scale(w, spec, block_size)
    return quantize_with_scale(w, scale, spec, block_size), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, spec: FormatSpec, block_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What ComfyUI computes for each format (see the contract note), in compute dtype ``dtype``."""
    if spec.is_int:
        if spec.granularity == "block":
            n, k = q.shape
            b = block_size
            t = q.reshape(n // b, b, k // b, b).permute(0, 2, 1, 3).to(dtype) * scale[..., None, None]
            return t.permute(0, 2, 1, 3).reshape(n, k).to(dtype)
        return (q.float() * scale).to(dtype)
    return q.to(dtype) * scale.to(dtype)


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(sum w^2 / sum (w - deq)^2); inf when exact, -inf for an all-zero signal with error."""
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


SQNR_ROWS = 1024  # rows per fp64 chunk: no whole-tensor fp64 copy of w or deq


def sqnr(w: torch.Tensor, deq: torch.Tensor) -> float:
    """SQNR in dB of ``deq`` against ``w``, both summed in fp64 (row chunks of :data:`SQNR_ROWS`)."""
    if w.dim() == 0:
        w, deq = w.reshape(1), deq.reshape(1)
    signal = noise = 0.0
    for i in range(0, w.shape[0], SQNR_ROWS):
        w64 = w[i:i + SQNR_ROWS].double()
        signal += float((w64 * w64).sum())
        noise += float(((w64 - deq[i:i + SQNR_ROWS].double()) ** 2).sum())
    return sqnr_db(signal, noise)
