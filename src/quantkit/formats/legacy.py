"""The legacy ``scaled_fp8`` layout (files written before ``.comfy_quant`` markers) and how ComfyUI
reads it: ``comfy.utils.convert_old_quants`` (Comfy-Org/ComfyUI, utils.py at 09708eae) rewrites such
a state dict at load, before the loader (``comfy/ops.py`` ``_load_quantized_module``, 0271a469) sees it.

A legacy file has one marker tensor ``<prefix>scaled_fp8`` (an empty or 2-element tensor whose dtype
was meant to name the fp8 type) and, per quantized layer ``L`` under that prefix:

=================  ==========================================  ======================================
legacy tensor      ComfyUI's converted state dict              notes
=================  ==========================================  ======================================
``L.weight``       ``L.weight`` (unchanged)                    fp8 values
``L.scale_weight`` ``L.weight_scale`` + ``L.comfy_quant``      marker ``{"format": "float8_e4m3fn"}``
``L.scale_input``  ``L.input_scale``, dropped when it is 1.0   (absent: dynamic input scaling)
``scaled_fp8``     dropped                                     2 elements: every layer's marker gets
                                                               ``"full_precision_matrix_mult": true``
=================  ==========================================  ======================================

Only a file without ``_quantization_metadata`` in its header is converted; tensors outside the
prefix are left as they are. The loader then reads the layer as its fp8 format: the scale goes
through comfy-kitchen's ``TensorCoreFP8Layout.Params``, which casts it to fp32, and the weight is
``q.to(D) * scale.to(D)``.

Where quantkit departs from that: ComfyUI names every layer ``float8_e4m3fn`` whatever its weight's
dtype (its own TODO), and the loader then casts an E5M2 weight to E4M3 by value (values beyond
+-448 are lost). quantkit names the registered fp8 format whose weight dtype the layer has, so an
E5M2 layer is read and written as ``float8_e5m2`` with its values intact; for E4M3 layers, the
usual case, the result is exactly ComfyUI's. A ``scale_weight`` that is not one number (numel 1)
is no layout ComfyUI's loader reads; such a layer is refused.
"""

from __future__ import annotations

MARKER = "scaled_fp8"  # the file-wide marker tensor's name after the model prefix
SCALE_WEIGHT = "scale_weight"
SCALE_INPUT = "scale_input"
# legacy suffix -> the suffix ComfyUI renames it to
RENAMES = {SCALE_WEIGHT: "weight_scale", SCALE_INPUT: "input_scale"}
LEGACY_SUFFIXES = tuple(f".{s}" for s in RENAMES)
FULL_PRECISION_NUMEL = 2  # a marker tensor of 2 elements turns on full_precision_matrix_mult
SCALE_DTYPES = ("F32", "BF16", "F16")  # scale dtypes read (cast to fp32 as comfy-kitchen does)


def prefix_of(name: str) -> str | None:
    """The model prefix of a tensor name that is a legacy marker (``scaled_fp8`` -> ``""``,
    ``model.diffusion_model.scaled_fp8`` -> ``model.diffusion_model.``), else None."""
    if name == MARKER:
        return ""
    if name.endswith("." + MARKER):
        return name[: -len(MARKER)]
    return None


def full_precision(marker_numel: int) -> bool:
    return marker_numel == FULL_PRECISION_NUMEL


def format_for(weight_dtype_name: str):
    """The registered per-tensor fp8 format storing ``weight_dtype_name`` (``F8_E4M3`` -> fp8), or
    None when the weight is no fp8 type a legacy layer may hold."""
    from .scaled import grid
    try:
        fmt = grid(weight_dtype_name, "tensor")
    except KeyError:
        return None
    return None if fmt.is_int else fmt


def marker(fmt, fpmm: bool) -> dict:
    """The ``.comfy_quant`` object ComfyUI gives a converted legacy layer (its loader ignores every
    other key, so none is added)."""
    m = {"format": fmt.comfy_format}
    if fpmm:
        m["full_precision_matrix_mult"] = True
    return m


def drops_input_scale(value: float) -> bool:
    """ComfyUI drops a ``scale_input`` of exactly 1.0."""
    return value == 1.0
