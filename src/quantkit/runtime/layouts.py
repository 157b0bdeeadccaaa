"""One ``QuantizedLayout`` per runtime layout the scaled-grid formats name, and the registry of layouts.

A layout says how a :class:`~quantkit.runtime.tensor.QuantizedTensor` stores its data: ``quantize``
returns ``(qdata, params)`` and ``dequantize`` turns them back into a float tensor. The math is
:mod:`quantkit.formats.scaled` (the converter's numerical spec), so a file written by ``quantkit convert``
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
Each format says which layout holds it (``runtime_layout``); a layout finds its formats there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import scaled
from ..errors import QuantkitError
from ..formats import DEFAULT_BLOCK_SIZE, FORMATS, LayerOpts, format_of_marker
from ..formats.scaled import ScaledFormat


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


def _formats_of(layout: str) -> list[ScaledFormat]:
    return [f for f in FORMATS.values() if f.runtime_layout == layout]


class QuantizedLayout:
    """Base class. A subclass runs the math of the registered formats whose ``runtime_layout`` is its
    name (``spec``: the first of them)."""

    Params: ClassVar[type[LayoutParams]] = LayoutParams
    spec: ClassVar[ScaledFormat]

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "spec" not in cls.__dict__ and _formats_of(cls.__name__):
            cls.spec = _formats_of(cls.__name__)[0]

    @classmethod
    def spec_for(cls, params: LayoutParams) -> ScaledFormat:
        """The format of a tensor held in this layout, told apart by its scale's shape."""
        return format_of_marker({"format": cls.spec.comfy_format}, {"weight_scale": tuple(params.scale.shape)}) \
            or cls.spec

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
    pass


class TensorCoreFP8E5M2Layout(QuantizedLayout):
    pass


class TensorWiseINT8Layout(QuantizedLayout):
    """INT8 with one scale per tensor (``[]``) or per output row (``[N,1]``, ``per_channel=True``)."""

    @classmethod
    def quantize(cls, tensor: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, LayoutParams]:
        n = tensor.shape[0] if tensor.dim() else 1
        spec = format_of_marker({"format": cls.spec.comfy_format}, {"weight_scale": (n, 1) if per_channel else ()})
        return cls._quantize(tensor, spec, 0)


class BlockWiseINT8Layout(QuantizedLayout):
    """INT8 with one scale per ``b x b`` tile of W (``group_size`` in ``.comfy_quant``)."""

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

# The layout each quantkit format loads into (formats sharing a comfy string share a layout).
LAYOUT_FOR_FORMAT: dict[str, str] = {f.name: f.runtime_layout for f in FORMATS.values() if f.runtime_layout in LAYOUTS}

# ComfyUI's table, keyed by the ``format`` string in ``.comfy_quant``, derived from the registry.
QUANT_ALGOS: dict[str, dict] = {}
for _spec in FORMATS.values():
    if _spec.name not in LAYOUT_FOR_FORMAT:
        continue  # a format this runtime has no layout for
    _entry = QUANT_ALGOS.setdefault(_spec.comfy_format, {
        "storage_t": _spec.weight_dtype,
        "parameters": {s.suffix for s in _spec.stored((1, 1), torch.float32, LayerOpts(1))} - {"weight"},
        "comfy_tensor_layout": LAYOUT_FOR_FORMAT[_spec.name],
    })
    if "block_size" in _spec.option_names:
        _entry["group_size"] = DEFAULT_BLOCK_SIZE
