"""The format registry: one module per format family, each registering its formats by defining them.

=================  ================  ==========================================================
module             --format          ``.comfy_quant`` format
=================  ================  ==========================================================
:mod:`.fp8`        fp8, fp8-e5m2     float8_e4m3fn, float8_e5m2 (one fp32 scale per tensor)
:mod:`.int8`       int8-tensor/-row  int8_tensorwise (scale ``[]`` or ``[N,1]``)
:mod:`.int8_block` int8-block        int8_blockwise (``group_size`` b, scale ``[N/b,K/b]``)
:mod:`.int8_convrot` int8-convrot    int8_tensorwise + ``convrot``, ``convrot_groupsize`` G (W rotated along K)
:mod:`.mxfp8`      mxfp8             mxfp8 (F8_E4M3 padded to 32, E8M0 block-32 scales, swizzled)
:mod:`.nvfp4`      nvfp4             nvfp4 (packed E2M1 padded to 16, E4M3 block-16 scales + fp32)
=================  ================  ==========================================================

The 4-bit formats stock ComfyUI loads: :mod:`.w4a8` (w4a8, w4a8-6bit: asym_w4a8_int8),
:mod:`.int4_convrot` (int4-convrot: convrot_w4a4), :mod:`.awq4` (awq4: awq_w4a16).

:mod:`.base` is the interface (:class:`~.base.Format`), :mod:`.scaled` the shared scaled-grid math
(the numerical spec of the first five formats above), the private ``_hadamard``, ``_blocked``,
``_e2m1``, ``_e8m0`` and ``_common`` modules the helpers of the last three (they import torch; the
format modules import them only when they compute), :mod:`.unwritten` the 2-D check of any other
format string. Planning, the writer, ``inspect`` / ``verify``, the runtime
and the node ask this registry; no module outside this package names a format. Importing it does
not import torch.
"""

from __future__ import annotations

import json

from . import unwritten
from . import legacy  # noqa: F401  (legacy scaled_fp8 files: read and upgraded, never a --format)
from .base import (DEFAULT_BLOCK_SIZE, FORMATS, SCALED, Format, LayerOpts, Stored, Violation, register,
                   unregister)

# .comfy_quant "format" strings unmodified ComfyUI loads (comfy-contract.md); any other needs a node.
STOCK_COMFY_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "mxfp8", "nvfp4",
                       "convrot_w4a4", "asym_w4a8_int8", "awq_w4a16")
# .comfy_quant keys ComfyUI (or the int8_blockwise node: group_size) acts on; others are ignored.
COMFY_READ_KEYS = ("format", "full_precision_matrix_mult", "convrot", "convrot_groupsize", "group_size",
                   "linear_dtype")
# The scale tensors a quantized layer L may carry; ComfyUI refuses any of them without L.comfy_quant.
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")
# every tensor a quantized layer adds besides .weight (the 4-bit formats' own tensors included)
QUANT_SUFFIXES = (".comfy_quant", *SCALE_SUFFIXES, ".weight_s_rel", ".weight_s_channel", ".weight_codebook",
                  ".weight_zeros", ".pre_quant_scale")

# Extra .comfy_quant keys a user may set per layer (or for all layers), with their type. Stock
# ComfyUI reads full_precision_matrix_mult: dequantize and run a normal matmul for that layer.
LAYER_OPTIONS: dict[str, type] = {"full_precision_matrix_mult": bool}

# Each module registers its formats; the order is the registry's (choices, `quantkit formats`). A new
# format family is one more module on this list.
FORMAT_MODULES = ("fp8", "int8", "int8_block", "int8_convrot", "mxfp8", "nvfp4",
                  "w4a8", "int4_convrot", "awq4")
import importlib  # noqa: E402
for _m in FORMAT_MODULES:
    importlib.import_module(f"{__name__}.{_m}")
from . import fp8, int8  # noqa: E402  (the defaults below)

DEFAULT_FORMAT = fp8.FP8.name
DEFAULT_FALLBACK = int8.INT8_ROW.name
# --fallback choices: formats that take every 2-D weight (the default first), or keep the layer
FALLBACK_CHOICES = (DEFAULT_FALLBACK, *(f.name for f in FORMATS.values() if f.fallback and f.name != DEFAULT_FALLBACK),
                    "keep")
from .int8_block import block_size_of  # noqa: E402


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        from ..errors import UsageError
        raise UsageError(f"unknown format '{name}'", fix=f"use one of: {', '.join(FORMATS)}") from None


def formats_with_option(option: str) -> list[str]:
    """The format names that read a LayerOpts field (``block_size``: the block formats)."""
    return [f.name for f in FORMATS.values() if option in f.option_names]


def format_of_marker(marker: dict, shapes: dict[str, tuple[int, ...]]) -> Format | None:
    """The registered format of a layer read from a file: its decoded marker and the shapes of its
    tensors by suffix (``{"weight": ..., "weight_scale": ...}``); None when no format is it."""
    for f in FORMATS.values():
        if f.recognizes(marker, shapes):
            return f
    return None


def shapes_by_layer(tensors: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{name: anything with .shape}`` -> ``{layer: {suffix: shape}}``, the suffix being what follows
    the name's last dot (``L.weight_scale`` -> ``L``, ``weight_scale``): one pass over a file's tensors."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, t in tensors.items():
        layer, _, suffix = name.rpartition(".")
        out.setdefault(layer, {})[suffix] = tuple(t.shape)
    return out


def check_layer(layer: str, marker: dict, T: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> list[Violation]:
    """Contract violations of one marked layer whose ``.weight`` exists (``T``: name -> TensorInfo;
    ``shapes``: the layer's entry of :func:`shapes_by_layer`): the identified format's check, else
    that of the first format sharing its comfy string (which says why it does not fit), else the
    generic check of :mod:`.unwritten`."""
    if shapes is None:
        shapes = shapes_by_layer({n: t for n, t in T.items() if n.startswith(layer + ".")}).get(layer, {})
    fmt = format_of_marker(marker, shapes) or next(
        (f for f in FORMATS.values() if f.comfy_format == marker.get("format")), None)
    if fmt is not None:
        return fmt.check(layer, marker, T)
    return unwritten.CHECKS.get(marker.get("format"), unwritten.GENERIC)(layer, marker, T)


def comfy_formats() -> list[str]:
    """The .comfy_quant format strings the registered formats write, in registry order, once each."""
    return list(dict.fromkeys(f.comfy_format for f in FORMATS.values()))


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


__all__ = ["FORMATS", "Format", "LayerOpts", "Stored", "Violation", "SCALED", "register", "unregister",
           "get_format", "format_of_marker", "check_layer", "shapes_by_layer", "formats_with_option", "comfy_formats",
           "encode_comfy_quant", "decode_comfy_quant", "block_size_of", "DEFAULT_FORMAT", "DEFAULT_FALLBACK",
           "DEFAULT_BLOCK_SIZE", "FALLBACK_CHOICES", "STOCK_COMFY_FORMATS", "COMFY_READ_KEYS",
           "SCALE_SUFFIXES", "QUANT_SUFFIXES", "LAYER_OPTIONS"]
