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
TensorWiseINT8Layout        int8_tensorwise     fp32 ``[N,1]`` + ``convrot``  int8-convrot
TensorCoreMXFP8Layout       mxfp8               U8 E8M0, swizzled             mxfp8
TensorCoreNVFP4Layout       nvfp4               F8_E4M3 swizzled + fp32 ``[]`` nvfp4
AsymW4A8Int8Layout          asym_w4a8_int8      fp8 ``weight_s_rel`` [N,K/16]  w4a8, w4a8-6bit
                                                + fp32 ``weight_s_channel``
TensorCoreConvRotW4A4Layout convrot_w4a4        fp32 ``[N]``                  int4-convrot
TensorCoreAWQW4A16Layout    awq_w4a16           bf16 ``[K/64,N]`` + zeros     awq4
==========================  ==================  ============================  =================

``TensorCoreFP8Layout`` is a second name for the E4M3 layout, as in ComfyUI and comfy-kitchen. The
names are comfy-kitchen's but for block-wise INT8, which kitchen lacks. Each format says which layout
holds it (``runtime_layout``); a layout finds its formats there, and tells formats sharing it apart
by the tensor's marker and scale shape (:func:`quantkit.formats.format_of_marker`).

The formats without a fast quantizer (``kernel`` None: int8-convrot, mxfp8, nvfp4 and the 4-bit
ones) keep every stored tensor as written: ``qdata`` is the stored weight (padded / packed),
``params.scale`` its first scale tensor (``params.scale_suffix``: ``weight_scale``, or w4a8's
``weight_s_rel``), ``params.tensors`` the others (nvfp4's ``weight_scale_2``, w4a8's
``weight_s_channel`` and ``weight_codebook``, awq4's ``weight_zeros``), ``params.marker`` the layer's
marker; ``dequantize`` is the format's own (bit for bit what comfy-kitchen's layout computes, on every
device, in plain PyTorch), and ``F.linear`` is dequantize + matmul (:mod:`.linear`), so a 4-bit
layer's output is ``F.linear(x, dequantize(W), bias)``; on CUDA, awq4 and 4-bit w4a8 take the fused
Triton GEMMs of :mod:`.triton_w4` up to a token count per format (``linear.W4_TRITON_MAX_M``, measured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import scaled
from ..errors import QuantkitError
from ..formats import DEFAULT_BLOCK_SIZE, FORMATS, LayerOpts, format_of_marker
from ..formats.base import Format
from ..formats.scaled import ScaledFormat


@dataclass(frozen=True)
class LayoutParams:
    """What a layout needs beside ``qdata``. ``scale`` is the multiplier (``W ~= q * scale``) in the
    format's scale shape; ``block_size`` is set for block layouts only (0 otherwise)."""

    scale: torch.Tensor
    orig_dtype: torch.dtype
    orig_shape: tuple[int, ...]
    block_size: int = 0
    tensors: dict | None = None  # formats without a scaled kernel: the other stored tensors by suffix
    marker: dict | None = None  # ... and the layer's marker (convrot keys, orig_shape)
    scale_suffix: str = "weight_scale"  # ... and the suffix ``scale`` is stored under (w4a8: weight_s_rel)

    def moved(self, fn) -> LayoutParams:
        """These params with ``fn`` applied to every tensor (scale and ``tensors``)."""
        return self.replace(scale=fn(self.scale),
                            tensors=None if self.tensors is None else {k: fn(v) for k, v in self.tensors.items()})

    def replace(self, **changes) -> LayoutParams:
        return dataclasses.replace(self, **changes)


def _formats_of(layout: str) -> list[Format]:
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
    def spec_for(cls, params: LayoutParams, qdata: torch.Tensor | None = None) -> Format:
        """The format of a tensor held in this layout, told apart by its marker and the shapes of
        its stored tensors (``qdata``'s too where given: w4a8 tells 4 from 6 bits by row width)."""
        marker = params.marker if params.marker is not None else {"format": cls.spec.comfy_format}
        shapes = {params.scale_suffix: tuple(params.scale.shape),
                  **{k: tuple(v.shape) for k, v in (params.tensors or {}).items()}}
        if qdata is not None:
            shapes["weight"] = tuple(qdata.shape)
        return format_of_marker(marker, shapes) or cls.spec

    @staticmethod
    def stored_tensors(qdata: torch.Tensor, params: LayoutParams) -> dict[str, torch.Tensor]:
        """The layer's tensors as the file stores them (suffix -> tensor)."""
        return {"weight": qdata, params.scale_suffix: params.scale, **(params.tensors or {})}

    @classmethod
    def _quantize_stored(cls, tensor: torch.Tensor, spec: Format, opts: LayerOpts) -> tuple[torch.Tensor, LayoutParams]:
        """A format without a scaled kernel: its own torch quantize, every stored tensor kept."""
        why = spec.cannot_take(tuple(tensor.shape), opts)
        if why:
            raise QuantkitError(f"cannot quantize to {cls.__name__} ({spec.name}): {why}",
                                fix="quantize a 2-D weight whose shape the format accepts")
        stored = spec.quantize(tensor, opts)
        suffix = spec.stored(tuple(tensor.shape), tensor.dtype, opts)[1].suffix
        q, scale = stored.pop("weight"), stored.pop(suffix)
        marker = spec.marker(tuple(tensor.shape), tensor.dtype, opts)
        return q, LayoutParams(scale, tensor.dtype, tuple(tensor.shape), 0, stored, marker, suffix)

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
        spec = cls.spec_for(params, qdata)
        if spec.kernel is None:
            marker = {**(params.marker or {"format": spec.comfy_format}), "orig_shape": list(params.orig_shape)}
            return spec.dequantize(cls.stored_tensors(qdata, params), marker, dtype or params.orig_dtype)
        return scaled.dequantize(qdata, params.scale, spec, params.block_size, dtype or params.orig_dtype)

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: LayoutParams) -> dict[str, torch.Tensor]:
        """Suffixes to append to a weight's key (``""`` is the weight itself) for saving."""
        return {("_" + k.removeprefix("weight_") if k != "weight" else ""): v
                for k, v in cls.stored_tensors(qdata, params).items()}


class TensorCoreFP8E4M3Layout(QuantizedLayout):
    pass


class TensorCoreFP8E5M2Layout(QuantizedLayout):
    pass


class TensorWiseINT8Layout(QuantizedLayout):
    """INT8 with one scale per tensor (``[]``) or per output row (``[N,1]``, ``per_channel=True``);
    ``convrot=True``: per-row INT8 of W rotated along K (``convrot_groupsize``, default 256; a K it
    does not divide takes the largest power of 4 that does)."""

    @classmethod
    def quantize(cls, tensor: torch.Tensor, per_channel: bool = False, convrot: bool = False,
                 convrot_groupsize: int | None = None) -> tuple[torch.Tensor, LayoutParams]:
        if convrot:
            spec = format_of_marker({"format": cls.spec.comfy_format, "convrot": True}, {})
            g = convrot_groupsize or LayerOpts.convrot_group_size
            return cls._quantize_stored(tensor, spec, LayerOpts(convrot_group_size=g))
        n = tensor.shape[0] if tensor.dim() else 1
        spec = format_of_marker({"format": cls.spec.comfy_format}, {"weight_scale": (n, 1) if per_channel else ()})
        return cls._quantize(tensor, spec, 0)


class StoredLayout(QuantizedLayout):
    """Base of the layouts of formats without a scaled kernel: quantize is the format's own."""

    @classmethod
    def quantize(cls, tensor: torch.Tensor) -> tuple[torch.Tensor, LayoutParams]:
        return cls._quantize_stored(tensor, cls.spec, LayerOpts())


class TensorCoreMXFP8Layout(StoredLayout):
    """FP8 E4M3 padded to 32 with E8M0 block-32 scales (swizzled, uint8)."""


class TensorCoreNVFP4Layout(StoredLayout):
    """Packed E2M1 padded to 16, swizzled E4M3 block-16 scales and the fp32 ``weight_scale_2``."""


class AsymW4A8Int8Layout(StoredLayout):
    """W4A8 (``asym_w4a8_int8``): 4-bit codebook codes (``I8 [N,K/2]``, w4a8) or 6-bit uniform codes
    (``I8 [N,3K/4]``, w4a8-6bit) of W rotated by ConvRot, fp8 group scales ``weight_s_rel`` (the
    ``scale``), fp32 row scales ``weight_s_channel``, the 4-bit codebook ``weight_codebook``. Runs as
    dequantize + ``F.linear``; on CUDA, where switched on, 4-bit layers run the Triton W4A8 GEMM of
    :mod:`.triton_w4` (kitchen's numerics: INT8 activations)."""

    @classmethod
    def quantize(cls, tensor: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, LayoutParams]:
        spec = next((f for f in _formats_of(cls.__name__) if getattr(f, "bits", None) == bits), None)
        if spec is None:
            raise QuantkitError(f"{cls.__name__} stores 4 or 6 bits, not {bits!r}", fix="pass bits=4 or bits=6")
        return cls._quantize_stored(tensor, spec, LayerOpts())


class TensorCoreConvRotW4A4Layout(StoredLayout):
    """INT4 (``convrot_w4a4``): signed 4-bit codes of W rotated by ConvRot (``I8 [N,K/2]``), one fp32
    scale per row; the marker's ``convrot_groupsize``. Runs as dequantize + ``F.linear`` on every
    device (comfy-kitchen's W4A4 kernel is not used)."""


class TensorCoreAWQW4A16Layout(StoredLayout):
    """AWQ W4A16 (``awq_w4a16``): unsigned 4-bit codes (``I8 [N,K/2]``), bf16 scale and ``weight_zeros``
    per 64 input channels (``[K/64,N]``). Runs as dequantize + ``F.linear``; on CUDA, where switched
    on, the fused Triton W4A16 GEMM of :mod:`.triton_w4` (the same math)."""


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


for _cls in (TensorCoreFP8E4M3Layout, TensorCoreFP8E5M2Layout, TensorWiseINT8Layout, BlockWiseINT8Layout,
             TensorCoreMXFP8Layout, TensorCoreNVFP4Layout, AsymW4A8Int8Layout, TensorCoreConvRotW4A4Layout,
             TensorCoreAWQW4A16Layout):
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
