"""Put a quantized .safetensors file into an existing ``torch.nn.Module`` (a diffusers or
transformers model, or any module whose parameter names match the file's tensor names).

Every layer the file marks with ``L.comfy_quant`` must be an ``nn.Linear`` in the module; it is
replaced by :func:`~quantkit.runtime.ops.mixed_precision_ops`'s ``Linear`` holding a
QuantizedTensor weight. Then every tensor in the file is loaded into the module, so the module
ends up with the file's weights throughout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QuantkitError
from ..safetensors_io import SafetensorsReader
from .ops import mixed_precision_ops


@dataclass
class SwapResult:
    quantized: list[str]  # layers now holding a QuantizedTensor weight
    unexpected: list[str]  # file tensors the module has no place for (ignored)


def load_quantized(module: nn.Module, path: str | os.PathLike, *, compute_dtype: torch.dtype | None = None,
                   full_precision_mm: bool = False) -> SwapResult:
    """Swap ``module``'s quantized ``nn.Linear`` layers and load ``path`` into it, in place.

    ``compute_dtype`` (default: the module's floating-point dtype) is what quantized layers
    dequantize to and where their unquantized tensors are stored. Raises :class:`QuantkitError`
    when a marked layer is missing or not an ``nn.Linear``, or the module has a parameter the file
    does not provide."""
    if compute_dtype is None:
        compute_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    with SafetensorsReader(path) as reader:
        names = list(reader.tensors)
        layers = [n.removesuffix(".comfy_quant") for n in names if n.endswith(".comfy_quant")]
        quant_config = _metadata_layers(reader)
        ops = mixed_precision_ops(quant_config, compute_dtype, full_precision_mm)
        for layer in layers:
            _swap_one(module, layer, ops, reader.path)
        state = {n: reader.read(n) for n in names}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5]) + (" ..." if len(result.missing_keys) > 5 else "")
        raise QuantkitError(f"{len(result.missing_keys)} module tensors are not in the file: {shown}", file=path,
                            fix="load the file into the model it was converted from")
    return SwapResult(layers, list(result.unexpected_keys))


def _metadata_layers(reader: SafetensorsReader) -> dict:
    raw = (reader.metadata or {}).get("_quantization_metadata")
    if raw is None:
        return {}
    try:
        return dict(json.loads(raw)["layers"])
    except (ValueError, KeyError, TypeError):
        raise QuantkitError("header entry _quantization_metadata is not {'layers': {...}} JSON", file=reader.path,
                            fix="rewrite the file with quantkit convert") from None


def _swap_one(module: nn.Module, layer: str, ops, path) -> None:
    try:
        old = module.get_submodule(layer)
    except AttributeError:
        raise QuantkitError("the file quantizes this layer but the module has no such submodule", file=path,
                            tensor=f"{layer}.weight", fix="load the file into the model it was converted from") from None
    if not isinstance(old, nn.Linear):
        raise QuantkitError(f"quantized layer is a {type(old).__name__} in the module, not an nn.Linear", file=path,
                            tensor=f"{layer}.weight", fix="only nn.Linear layers can run quantized weights")
    new = ops.Linear(old.in_features, old.out_features, bias=old.bias is not None, device=old.weight.device)
    parent_name, _, child = layer.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)
