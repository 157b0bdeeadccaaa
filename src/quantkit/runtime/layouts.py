"""One ``QuantizedLayout`` per on-disk format, and the registry that names them.

A layout says how a :class:`~quantkit.runtime.tensor.QuantizedTensor` stores its data: ``quantize``
returns ``(qdata, params)`` and ``dequantize`` turns them back into a float tensor. The math is
:mod:`quantkit.reference` (the converter's numerical spec), so a file written by ``quantkit convert``
and a tensor quantized here are bit-identical, and dequantization is what ComfyUI computes.

==========================  ==================  ============================  =================
layout name                 ``format`` string   ``weight_scale``              quantkit --format
==========================  ==================  ============================  =================
TensorCoreFP8E4M3Layout     float8_e4m3fn       fp32 ``[]``                   fp8
TensorCoreFP8E5M2Layout     float8_e5m2         fp32 ``[]``                   fp8-e5m2
TensorWiseINT8Layout        int8_tensorwise     fp32 ``[]`` or ``[N,1]``      int8-tensor, int8-row
BlockWiseINT8Layout         int8_blockwise      fp32 ``[N/b,K/b]``            int8-block
==========================  ==================  ============================  =================

``TensorCoreFP8Layout`` is a second name for the E4M3 layout, as in ComfyUI and comfy-kitchen. The
first three names are comfy-kitchen's; kitchen has no block-wise INT8 layout, so that name is ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import scaled
from ..errors import QuantkitError
from ..formats import DEFAULT_BLOCK_SIZE, FORMATS, ScaledFormat


@dataclass(frozen=True)
class LayoutParams:
    """What a layout needs beside ``qdata``. ``scale`` is the multiplier (``W ~= q * scale``) in the
    format's scale shape; ``block_size`` is set for block layouts only (0 otherwise)."""

    scale: torch.Tensor
    orig_dtype: torch.dtype
    orig_shape: tuple[int, ...]
    block_size: int = 0

    def replace(self, **changes) -> LayoutParams:
        return dataclasses.replace(self, **changes)


class QuantizedLayout:
    """Base class. Subclasses name the :class:`ScaledFormat` whose math they run."""

    Params: ClassVar[type[LayoutParams]] = LayoutParams
    spec: ClassVar[ScaledFormat]

    @classmethod
    def spec_for(cls, params: LayoutParams) -> ScaledFormat:
        return cls.spec

    @classmethod
    def quantize(cls, tensor: torch.Tensor, **kwargs) -> tuple[torch.Tensor, LayoutParams]:
        """Round-to-nearest quantization of a float tensor with the converter's math."""
        block_size = kwargs.pop("block_size", 0)
        if kwargs:
            raise TypeError(f"{cls.__name__}.quantize() got unexpected arguments {sorted(kwargs)}")
        return cls._quantize(tensor, cls.spec, block_size)

    @classmethod
    def _quantize(cls, tensor: torch.Tensor, spec: ScaledFormat, block_size: int) -> tuple[torch.Tensor, LayoutParams]:
        why = spec.cannot_take(tuple(tensor.shape), LayerOpts(block_size))
        if why:
            raise QuantkitError(f"cannot quantize to {cls.__name__}: {why}",
                                fix="quantize a 2-D weight whose shape the format accepts")
        q, scale = scaled.quantize(tensor, spec, block_size)
        return q, LayoutParams(scale, tensor.dtype, tuple(tensor.shape), block_size)

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: LayoutParams,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor, computed as ComfyUI does in compute dtype ``dtype`` (default: the
        original dtype)."""
        spec = cls.spec_for(params)
        return scaled.dequantize(qdata, params.scale, spec, params.block_size, dtype or params.orig_dtype)

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: LayoutParams) -> dict[str, torch.Tensor]:
        """Suffixes to append to a weight's key (``""`` is the weight itself) for saving."""
        return {"": qdata, "_scale": params.scale}


class TensorCoreFP8E4M3Layout(QuantizedLayout):
    spec = FORMATS["fp8"]


class TensorCoreFP8E5M2Layout(QuantizedLayout):
    spec = FORMATS["fp8-e5m2"]


class TensorWiseINT8Layout(QuantizedLayout):
    """INT8 with one scale per tensor (``[]``) or per output row (``[N,1]``, ``per_channel=True``)."""

    spec = FORMATS["int8-tensor"]

    @classmethod
    def spec_for(cls, params: LayoutParams) -> ScaledFormat:
        return FORMATS["int8-row"] if params.scale.dim() else FORMATS["int8-tensor"]

    @classmethod
    def quantize(cls, tensor: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, LayoutParams]:
        return cls._quantize(tensor, FORMATS["int8-row" if per_channel else "int8-tensor"], 0)


class BlockWiseINT8Layout(QuantizedLayout):
    """INT8 with one scale per ``b x b`` tile of W (``group_size`` in ``.comfy_quant``)."""

    spec = FORMATS["int8-block"]

    @classmethod
    def quantize(cls, tensor: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[torch.Tensor, LayoutParams]:
        return cls._quantize(tensor, cls.spec, block_size)


# ---- registry ------------------------------------------------------------------------------------

LAYOUTS: dict[str, type[QuantizedLayout]] = {}


def register_layout_class(name: str, cls: type[QuantizedLayout]) -> None:
    """Register ``cls`` under ``name``; a name can be registered once."""
    if name in LAYOUTS:
        raise QuantkitError(f"layout '{name}' is already registered (as {LAYOUTS[name].__name__})",
                            fix="pick another name for the new layout")
    if not (isinstance(cls, type) and issubclass(cls, QuantizedLayout)):
        raise QuantkitError(f"layout '{name}': {cls!r} is not a QuantizedLayout subclass",
                            fix="subclass quantkit.runtime.QuantizedLayout")
    LAYOUTS[name] = cls


def get_layout_class(name: str | type[QuantizedLayout]) -> type[QuantizedLayout]:
    if isinstance(name, type) and issubclass(name, QuantizedLayout):
        return name
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise QuantkitError(f"unknown layout '{name}'", fix=f"use one of: {', '.join(sorted(LAYOUTS))}") from None


for _cls in (TensorCoreFP8E4M3Layout, TensorCoreFP8E5M2Layout, TensorWiseINT8Layout, BlockWiseINT8Layout):
    register_layout_class(_cls.__name__, _cls)
register_layout_class("TensorCoreFP8Layout", TensorCoreFP8E4M3Layout)
TensorCoreFP8Layout = TensorCoreFP8E4M3Layout

# The layout each quantkit format loads into; int8-tensor and int8-row share one comfy format.
LAYOUT_FOR_FORMAT: dict[str, str] = {
    "fp8": "TensorCoreFP8E4M3Layout",
    "fp8-e5m2": "TensorCoreFP8E5M2Layout",
    "int8-tensor": "TensorWiseINT8Layout",
    "int8-row": "TensorWiseINT8Layout",
    "int8-block": "BlockWiseINT8Layout",
}

# ComfyUI's table, keyed by the ``format`` string in ``.comfy_quant``, derived from formats.py.
QUANT_ALGOS: dict[str, dict] = {}
for _spec in FORMATS.values():
    _entry = QUANT_ALGOS.setdefault(_spec.comfy_format, {
        "storage_t": _spec.weight_dtype,
        "parameters": {"weight_scale", "input_scale"} if _spec.writes_input_scale else {"weight_scale"},
        "comfy_tensor_layout": LAYOUT_FOR_FORMAT[_spec.name],
    })
    if _spec.granularity == "block":
        _entry["group_size"] = DEFAULT_BLOCK_SIZE
