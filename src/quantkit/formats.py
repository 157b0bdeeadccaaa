"""One small frozen spec per on-disk format. Everything else derives from this table:
CLI choices, writer dtypes, tensor names, ``.comfy_quant`` strings, scale shapes.

Granularity, i.e. what one scale covers for a weight W of shape [N, K] (N = out features):

=========  ===========================  ======================
granularity  scale shape                 one scale covers
=========  ===========================  ======================
tensor     ``[]``                        all of W
row        ``[N, 1]``                    one output row, 1 x K
block      ``[N/b, K/b]``                one b x b tile
=========  ===========================  ======================

Every scale is a multiplier: ``W ~= q * scale`` with ``scale = amax / qmax``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import QuantkitError

Granularity = Literal["tensor", "row", "block"]
DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class FormatSpec:
    name: str  # the --format value
    comfy_format: str  # the "format" string in .comfy_quant
    weight_dtype: torch.dtype
    granularity: Granularity
    qmax: float  # largest magnitude the grid holds; scale = amax / qmax
    stock_comfy: bool  # loads in unmodified ComfyUI
    writes_input_scale: bool  # the format's loader reads L.input_scale
    summary: str

    @property
    def is_int(self) -> bool:
        return not self.weight_dtype.is_floating_point

    @property
    def weight_dtype_name(self) -> str:
        from .dtypes import name_of
        return name_of(self.weight_dtype)

    def scale_shape(self, shape: tuple[int, int], block_size: int) -> tuple[int, ...]:
        n, k = shape
        if self.granularity == "tensor":
            return ()
        if self.granularity == "row":
            return (n, 1)
        return (n // block_size, k // block_size)

    def cannot_take(self, shape: tuple[int, ...], block_size: int) -> str | None:
        """Why a weight of this shape cannot be stored in this format, or None if it can."""
        if len(shape) != 2:
            return f"{len(shape)}-D weight, format needs 2-D"
        if self.granularity == "block":
            n, k = shape
            if n % block_size or k % block_size:
                return f"shape {n}x{k} not divisible by block size {block_size}"
        return None

    def comfy_quant(self, shape: tuple[int, int], orig_dtype: torch.dtype, block_size: int) -> dict:
        d: dict = {"format": self.comfy_format}
        if self.granularity == "block":
            d["group_size"] = block_size
        d["orig_dtype"] = str(orig_dtype).removeprefix("torch.")
        d["orig_shape"] = list(shape)
        return d


FORMATS: dict[str, FormatSpec] = {
    s.name: s
    for s in (
        FormatSpec("fp8", "float8_e4m3fn", torch.float8_e4m3fn, "tensor", 448.0, True, True,
                   "FP8 E4M3, one fp32 scale per tensor"),
        FormatSpec("fp8-e5m2", "float8_e5m2", torch.float8_e5m2, "tensor", 57344.0, True, True,
                   "FP8 E5M2, one fp32 scale per tensor"),
        FormatSpec("int8-tensor", "int8_tensorwise", torch.int8, "tensor", 127.0, True, False,
                   "INT8 symmetric, one fp32 scale per tensor"),
        FormatSpec("int8-row", "int8_tensorwise", torch.int8, "row", 127.0, True, False,
                   "INT8 symmetric, one fp32 scale per output row [N,1]"),
        FormatSpec("int8-block", "int8_blockwise", torch.int8, "block", 127.0, False, True,
                   "INT8 symmetric, one fp32 scale per b x b tile [N/b,K/b]"),
    )
}

DEFAULT_FORMAT = "fp8"

# .comfy_quant "format" strings unmodified ComfyUI loads (comfy-contract.md); any other needs a node.
STOCK_COMFY_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "mxfp8", "nvfp4")
# .comfy_quant keys ComfyUI (or the int8_blockwise node: group_size) acts on; others are ignored.
COMFY_READ_KEYS = ("format", "full_precision_matrix_mult", "convrot", "convrot_groupsize", "group_size")
# The scale tensors a quantized layer L may carry; ComfyUI refuses any of them without L.comfy_quant.
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")
QUANT_SUFFIXES = (".comfy_quant", *SCALE_SUFFIXES)  # every tensor a quantized layer adds besides .weight

# Extra .comfy_quant keys a user may set per layer (or for all layers), with their type. Stock
# ComfyUI reads full_precision_matrix_mult: dequantize and run a normal matmul for that layer.
LAYER_OPTIONS: dict[str, type] = {"full_precision_matrix_mult": bool}
FALLBACK_CHOICES = ("int8-row", "int8-tensor", "fp8", "fp8-e5m2", "keep")


def get_format(name: str) -> FormatSpec:
    try:
        return FORMATS[name]
    except KeyError:
        from .errors import UsageError
        raise UsageError(f"unknown format '{name}'", fix=f"use one of: {', '.join(FORMATS)}") from None


def encode_comfy_quant(d: dict) -> bytes:
    """The bytes of a .comfy_quant tensor: compact UTF-8 JSON, no padding, no NUL."""
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_comfy_quant(raw: bytes) -> dict:
    """The JSON object in a .comfy_quant tensor's bytes, as ComfyUI's ``json.loads`` reads it;
    ValueError when they are not UTF-8 JSON or not an object (callers word their own message)."""
    d = json.loads(bytes(raw).decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(d, dict):
        raise ValueError("comfy_quant JSON is not an object")
    return d


def block_size_of(layer: str, conf: dict, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> int:
    """The tile size b of a block-wise layer read from a file, checked against both shapes: ``group_size``
    of its ``.comfy_quant`` (``conf``), else read off the two shapes (a state dict ComfyUI itself
    saved has none). Raises :class:`QuantkitError` naming the layer's offending tensor. Used by every
    loader of int8-block files (the runtime, the ComfyUI node)."""
    if len(weight_shape) != 2:
        raise QuantkitError(f"int8_blockwise weight is {len(weight_shape)}-D {list(weight_shape)}, needs 2-D [N, K]",
                            tensor=f"{layer}.weight", fix="only linear layers can be stored int8_blockwise")
    n, k = weight_shape
    if len(scale_shape) != 2 or 0 in scale_shape:
        raise QuantkitError(f"weight_scale has shape {list(scale_shape)}, needs a 2-D grid [N/b, K/b]",
                            tensor=f"{layer}.weight_scale", fix="re-convert the layer with quantkit")
    b = conf.get("group_size")
    if b is None:
        if n % scale_shape[0] or k % scale_shape[1] or n // scale_shape[0] != k // scale_shape[1]:
            raise QuantkitError(f"no group_size in .comfy_quant and weight {n}x{k} / scale "
                                f"{scale_shape[0]}x{scale_shape[1]} give no square tile",
                                tensor=f"{layer}.comfy_quant", fix="re-convert the layer with quantkit")
        b = n // scale_shape[0]
    if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
        raise QuantkitError(f"group_size {b!r} is not a positive integer", tensor=f"{layer}.comfy_quant",
                            fix="re-convert the layer with quantkit")
    if n % b or k % b or tuple(scale_shape) != (n // b, k // b):
        raise QuantkitError(f"weight {n}x{k} with group_size {b} needs weight_scale [{n // b}, {k // b}] "
                            f"(N and K divisible by {b}), found {list(scale_shape)}",
                            tensor=f"{layer}.weight_scale", fix="re-convert the layer with quantkit")
    return b
