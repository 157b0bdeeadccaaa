"""Scaled-grid formats and their numerical specification: the whole-tensor torch reference.

A scaled-grid format stores ``q`` on a fixed grid (INT8 or an FP8 type) and fp32 multipliers,
``W ~= q * scale`` with ``scale = amax / qmax``. Granularity, i.e. what one scale covers for a
weight W of shape [N, K] (N = out features):

===========  ===========================  ======================
granularity  scale shape                  one scale covers
===========  ===========================  ======================
tensor       ``[]``                        all of W
row          ``[N, 1]``                    one output row, 1 x K
block        ``[N/b, K/b]``                one b x b tile
===========  ===========================  ======================

Every fast path (the chunked CPU path in :mod:`quantkit.quantize`, the native C and Triton
kernels) must produce bit-identical ``q`` and ``scale`` to these functions; tests hold them to it.

Rules, for W of shape [N, K] in bf16, fp16 or fp32:

* ``amax`` is the largest |w| over the scale's region, computed in fp32 (exact).
* ``scale = amax / qmax`` in fp32; a region whose amax is 0 gets scale 1.0 (its q is all 0).
* INT8: ``q = clamp(round_half_even(w / scale), -127, 127)`` then cast. Never truncate.
* FP8:  ``q = clamp(w / scale, -qmax, qmax)`` then cast (round to nearest even by the cast).
* ``w / scale`` is an fp32 division, the scale broadcast over its region.

torch is imported inside the functions, so the registry stays importable without it.
"""

from __future__ import annotations

import math
from typing import Literal

from .base import SCALED, Format, LayerOpts, Stored, dtype_str

Granularity = Literal["tensor", "row", "block"]


class ScaledFormat(Format):
    """A scaled-grid format: the backends' fast quantizers (``kernel = SCALED``) run it."""

    kernel = SCALED
    weight_dtype_name: str  # safetensors dtype of q: "F8_E4M3", "F8_E5M2", "I8"
    granularity: Granularity
    qmax: float  # largest magnitude the grid holds; scale = amax / qmax
    writes_input_scale: bool  # the format's loader reads L.input_scale
    static_input: bool = False  # the runtime quantizes inputs with a stored input_scale (FP8 E4M3)

    def __init__(self, name: str, comfy_format: str, weight_dtype_name: str, qmax: float, summary: str,
                 *, stock_comfy: bool, writes_input_scale: bool, runtime_layout: str, node_target: str,
                 static_input: bool = False):
        self.name, self.comfy_format, self.weight_dtype_name, self.qmax = name, comfy_format, weight_dtype_name, qmax
        self.summary, self.stock_comfy, self.writes_input_scale = summary, stock_comfy, writes_input_scale
        self.runtime_layout, self.node_target, self.static_input = runtime_layout, node_target, static_input

    @property
    def weight_dtype(self):
        from ..dtypes import torch_dtype
        return torch_dtype(self.weight_dtype_name)

    @property
    def is_int(self) -> bool:
        return self.weight_dtype_name == "I8"

    def scale_shape(self, shape: tuple[int, int], block_size: int) -> tuple[int, ...]:
        n, k = shape
        if self.granularity == "tensor":
            return ()
        if self.granularity == "row":
            return (n, 1)
        return (n // block_size, k // block_size)

    def describe(self) -> tuple[str, str]:
        return self.weight_dtype_name, {"tensor": "fp32 []", "row": "fp32 [N,1]", "block": "fp32 [N/b,K/b]"}[self.granularity]

    def block_size(self, opts: LayerOpts) -> int:
        """The tile size the math uses (0 unless block-wise)."""
        return 0

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        if len(shape) != 2:
            return f"{len(shape)}-D weight, format needs 2-D"
        return None

    def stored(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> list[Stored]:
        out = [Stored("weight", self.weight_dtype_name, tuple(shape)),
               Stored("weight_scale", "F32", self.scale_shape(shape, opts.block_size))]
        if self.writes_input_scale:
            out.append(Stored("input_scale", "F32", ()))
        return out

    def marker(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> dict:
        return {"format": self.comfy_format, "orig_dtype": dtype_str(orig_dtype), "orig_shape": list(shape)}

    def pack(self, q, scale) -> dict:
        """The stored tensors from a fast quantizer's (q, scale); input_scale 1.0 (static 1.0 is what
        a missing one means; calibration may replace it)."""
        import torch
        out = {"weight": q, "weight_scale": scale}
        if self.writes_input_scale:
            out["input_scale"] = torch.ones((), dtype=torch.float32)
        return out

    def static_input_scale(self, stats: dict):
        """FP8: max |x| over the calibration set / qmax (the range maps onto the full grid; larger
        inputs at run time are clamped). INT8 layers take no input_scale from calibration."""
        if self.is_int or not self.writes_input_scale:
            return None
        import torch
        amax = float(stats["absmax"].max())
        return torch.tensor(amax / self.qmax if amax > 0 else 1.0, dtype=torch.float32)

    def quantize(self, w, opts: LayerOpts) -> dict:
        return self.pack(*quantize(w, self, self.block_size(opts)))

    def layer_block_size(self, layer: str, marker: dict, shapes: dict[str, tuple[int, ...]]) -> int:
        """The tile size of a layer read from a file (0 unless block-wise); QuantkitError naming the
        layer's tensor when its shapes do not fit."""
        return 0

    def dequantize(self, tensors: dict, marker: dict, dtype, layer: str = "") -> object:
        b = self.layer_block_size(layer, marker, {k: tuple(v.shape) for k, v in tensors.items()})
        return dequantize(tensors["weight"], tensors["weight_scale"], self, b, dtype)


def grid(weight_dtype_name: str, granularity: Granularity | None = None) -> ScaledFormat:
    """The first registered scaled-grid format whose q is ``weight_dtype_name`` (and whose scales
    have ``granularity``): the grid the runtime quantizes activations on, the format old flags name."""
    from .base import FORMATS
    for f in FORMATS.values():
        if f.kernel == SCALED and f.weight_dtype_name == weight_dtype_name and granularity in (None, f.granularity):
            return f
    raise KeyError(f"no scaled-grid format stores {weight_dtype_name} with {granularity} scales")


def region_amax(w, spec: ScaledFormat, block_size: int):
    """fp32 amax per scale region: shape [] / [N,1] / [N/b,K/b]."""
    a = w.abs()
    if spec.granularity == "tensor":
        return a.amax().float()
    if spec.granularity == "row":
        return a.amax(dim=1, keepdim=True).float()
    n, k = w.shape
    b = block_size
    return a.reshape(n // b, b, k // b, b).amax(dim=(1, 3)).float()


def scale_from_amax(amax, spec: ScaledFormat):
    import torch
    amax = amax.float()
    # A same-device tensor divisor: PyTorch's CUDA kernel turns division by a CPU scalar into a
    # multiplication by its reciprocal, which is not the same fp32 number.
    scale = amax / torch.full_like(amax, spec.qmax)
    return torch.where(amax == 0, torch.ones_like(scale), scale)  # NaN/Inf stay visible


def compute_scale(w, spec: ScaledFormat, block_size: int):
    return scale_from_amax(region_amax(w, spec, block_size), spec)


def expand_scale(scale, shape: tuple[int, int], spec: ScaledFormat, block_size: int):
    """Broadcastable view of the scale over W's elements."""
    if spec.granularity in ("tensor", "row"):
        return scale
    return scale.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def quantize_with_scale(w, scale, spec: ScaledFormat, block_size: int):
    x = w.float() / expand_scale(scale, tuple(w.shape), spec, block_size)
    if spec.is_int:
        return x.round().clamp(-spec.qmax, spec.qmax).to(spec.weight_dtype)
    return x.clamp(-spec.qmax, spec.qmax).to(spec.weight_dtype)


def quantize(w, spec: ScaledFormat, block_size: int):
    """Round-to-nearest quantization: returns (q, scale)."""
    scale = compute_scale(w, spec, block_size)
    return quantize_with_scale(w, scale, spec, block_size), scale


def dequantize(q, scale, spec: ScaledFormat, block_size: int, dtype=None):
    """What ComfyUI computes for each format (see the contract note), in compute dtype ``dtype``
    (default fp32)."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
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


def sqnr(w, deq) -> float:
    """SQNR in dB of ``deq`` against ``w``, both summed in fp64 (row chunks of :data:`SQNR_ROWS`)."""
    if w.dim() == 0:
        w, deq = w.reshape(1), deq.reshape(1)
    signal = noise = 0.0
    for i in range(0, w.shape[0], SQNR_ROWS):
        w64 = w[i:i + SQNR_ROWS].double()
        signal += float((w64 * w64).sum())
        noise += float(((w64 - deq[i:i + SQNR_ROWS].double()) ** 2).sum())
    return sqnr_db(signal, noise)
