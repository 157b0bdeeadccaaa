"""Plan a conversion from the input header alone: per layer what happens and why, and the exact
list of output tensors. Nothing is read or written here beyond the header."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


from . import policy
from .dtypes import torch_dtype
from .errors import QuantkitError, UsageError
from .formats import FALLBACK_CHOICES, FORMATS, FormatSpec, encode_comfy_quant, get_format
from .safetensors_io import PlannedTensor, SafetensorsReader, TensorInfo

QUANT_METADATA_KEY = "_quantization_metadata"


@dataclass(frozen=True)
class Options:
    format: str = "fp8"
    block_size: int = 128
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fallback: str = "int8-row"

    def validate(self) -> None:
        get_format(self.format)
        if self.fallback not in FALLBACK_CHOICES:
            raise UsageError(f"unknown --fallback '{self.fallback}'", fix=f"use one of: {', '.join(FALLBACK_CHOICES)}")
        if self.fallback != "keep" and FORMATS[self.fallback].granularity == "block":
            raise UsageError("--fallback cannot be a block format", fix="use int8-row, int8-tensor, fp8 or keep")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise UsageError(f"--block-size {self.block_size} must be a positive integer", fix="use 128 or 64")
        if FORMATS[self.format].granularity == "block" and self.block_size & (self.block_size - 1):
            raise UsageError(f"--block-size {self.block_size} is not a power of two", fix="use 128 or 64")


@dataclass(frozen=True)
class LayerPlan:
    """One input tensor's fate. ``spec`` is None when it is copied through unchanged."""

    tensor: str
    shape: tuple[int, ...]
    dtype: str
    spec: FormatSpec | None
    reason: str = ""  # why kept, or why it fell back
    fallback: bool = False

    @property
    def layer(self) -> str:
        return policy.layer_name(self.tensor)

    @property
    def quantized(self) -> bool:
        return self.spec is not None

    def comfy_quant(self, block_size: int) -> dict:
        assert self.spec is not None
        return self.spec.comfy_quant(self.shape, torch_dtype(self.dtype), block_size)

    def outputs(self, block_size: int) -> list[PlannedTensor]:
        if self.spec is None:
            return [PlannedTensor(self.tensor, self.dtype, self.shape)]
        s, L = self.spec, self.layer
        out = [PlannedTensor(f"{L}.weight", s.weight_dtype_name, self.shape),
               PlannedTensor(f"{L}.weight_scale", "F32", s.scale_shape(self.shape, block_size))]
        if s.writes_input_scale:
            out.append(PlannedTensor(f"{L}.input_scale", "F32", ()))
        out.append(PlannedTensor(f"{L}.comfy_quant", "U8", (len(encode_comfy_quant(self.comfy_quant(block_size))),)))
        return out


@dataclass
class Plan:
    options: Options
    layers: list[LayerPlan]  # every input tensor, in input file order
    outputs: list[PlannedTensor] = field(default_factory=list)
    metadata: dict[str, str] | None = None

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.quantized]


def plan_conversion(reader: SafetensorsReader, options: Options) -> Plan:
    options.validate()
    spec = FORMATS[options.format]
    sel = policy.Selection.from_patterns(options.include, options.exclude)
    for t in reader.tensors_in_order:
        if t.name.endswith(policy.QUANT_SUFFIXES):
            raise QuantkitError("input already holds quantized layers", file=reader.path, tensor=t.name,
                                fix="convert the original bf16/fp16/fp32 checkpoint")
    if reader.metadata and QUANT_METADATA_KEY in reader.metadata:
        raise QuantkitError(f"input metadata already has {QUANT_METADATA_KEY}", file=reader.path,
                            fix="convert the original bf16/fp16/fp32 checkpoint")
    layers = [_plan_one(t, spec, sel, options) for t in reader.tensors_in_order]
    plan = Plan(options, layers)
    names: dict[str, str] = {}
    for lp in layers:
        for out in lp.outputs(options.block_size):
            if out.name in names:
                raise QuantkitError(f"output name '{out.name}' would be written twice (also from "
                                    f"'{names[out.name]}')", file=reader.path, tensor=lp.tensor,
                                    fix=f"--exclude '^{lp.layer}$' to keep this layer as it is")
            names[out.name] = lp.tensor
            plan.outputs.append(out)
    metadata = dict(reader.metadata) if reader.metadata is not None else None
    if plan.quantized:
        metadata = metadata or {}
        metadata[QUANT_METADATA_KEY] = quantization_metadata(plan)
    plan.metadata = metadata
    return plan


def quantization_metadata(plan: Plan) -> str:
    layers = {lp.layer: lp.comfy_quant(plan.options.block_size)
              for lp in sorted(plan.quantized, key=lambda p: p.layer)}
    return json.dumps({"format_version": "1.0", "layers": layers}, separators=(",", ":"))


def _plan_one(t: TensorInfo, spec: FormatSpec, sel: policy.Selection, options: Options) -> LayerPlan:
    why = policy.is_candidate(t)
    if why is None:
        why = policy.decide(t, sel)
    if why is not None:
        return LayerPlan(t.name, t.shape, t.dtype, None, why)
    cannot = spec.cannot_take(t.shape, options.block_size)
    if cannot is None:
        return LayerPlan(t.name, t.shape, t.dtype, spec)
    if options.fallback == "keep":
        return LayerPlan(t.name, t.shape, t.dtype, None, f"{cannot}; --fallback keep", fallback=True)
    return LayerPlan(t.name, t.shape, t.dtype, FORMATS[options.fallback],
                     f"{cannot}; fell back to {options.fallback}", fallback=True)


def default_output_name(src_name: str, fmt: str) -> str:
    stem = src_name[: -len(".safetensors")] if src_name.endswith(".safetensors") else src_name
    return f"{stem}-{fmt}.safetensors"


__all__ = ["Options", "Plan", "LayerPlan", "plan_conversion", "default_output_name"]
