"""Plan a conversion from the input header alone: per layer what happens and why, and the exact
list of output tensors. Nothing is read or written here beyond the header."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


from . import families, policy
from .dtypes import torch_dtype
from .errors import QuantkitError, UsageError
from .formats import (DEFAULT_FALLBACK, DEFAULT_FORMAT, FALLBACK_CHOICES, FORMATS, LAYER_OPTIONS, QUANT_SUFFIXES,
                      Format, LayerOpts, formats_with_option, get_format)
from .layerconfig import LayerConfig, LayerRule
from .report import layer_counts
from .safetensors_io import PlannedTensor, SafetensorsReader, TensorInfo, build_header

QUANT_METADATA_KEY = "_quantization_metadata"


@dataclass(frozen=True)
class Options:
    format: str = DEFAULT_FORMAT
    block_size: int = 128
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fallback: str = DEFAULT_FALLBACK
    preset: str = "auto"  # a family name (quantkit.families), "auto" or "none"
    config: LayerConfig | None = None  # per-layer overrides (quantkit.layerconfig)
    comfy_options: tuple[tuple[str, object], ...] = ()  # extra .comfy_quant keys for every layer
    format_options: tuple[tuple[str, object], ...] = ()  # LayerOpts fields besides block_size

    def validate(self) -> None:
        get_format(self.format)
        if self.preset not in families.PRESET_CHOICES:
            raise UsageError(f"unknown --preset '{self.preset}'",
                             fix=f"use one of: {', '.join(families.PRESET_CHOICES)}")
        policy.Selection.from_patterns(self.include, self.exclude)  # bad regexes fail here, up front
        for k, v in self.comfy_options:
            if k not in LAYER_OPTIONS or type(v) is not LAYER_OPTIONS[k]:
                raise UsageError(f"unknown .comfy_quant option {k}={v!r}", fix=f"known: {', '.join(LAYER_OPTIONS)}")
        if self.fallback not in FALLBACK_CHOICES:
            raise UsageError(f"unknown --fallback '{self.fallback}'", fix=f"use one of: {', '.join(FALLBACK_CHOICES)}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise UsageError(f"--block-size {self.block_size} must be a positive integer", fix="use 128 or 64")
        fields = set(LayerOpts.__dataclass_fields__) - {"block_size"}
        for k, _ in self.format_options:
            if k not in fields:
                raise UsageError(f"unknown format option '{k}'", fix=f"known: {', '.join(sorted(fields)) or 'none'}")
        takers = {self.format, *(f for k, _ in self.format_options for f in formats_with_option(k))}
        for name in sorted(takers, key=list(FORMATS).index):  # a set option is checked by every format reading it
            bad = FORMATS[name].option_error(self.layer_opts(self.block_size))
            if bad is not None:
                raise UsageError(bad[0], fix=bad[1])


    def layer_opts(self, block_size: int) -> LayerOpts:
        return LayerOpts(block_size, **dict(self.format_options))


@dataclass(frozen=True)
class LayerPlan:
    """One input tensor's fate. ``spec`` is None when it is copied through unchanged."""

    tensor: str
    shape: tuple[int, ...]
    dtype: str
    spec: Format | None
    reason: str = ""  # why kept, or why it fell back
    fallback: bool = False
    block_size: int = 128
    options: tuple[tuple[str, object], ...] = ()  # extra .comfy_quant keys
    rule: str = ""  # the per-layer config pattern that decided this layer, if any
    format_options: tuple[tuple[str, object], ...] = ()  # LayerOpts fields besides block_size

    @property
    def layer(self) -> str:
        return policy.layer_name(self.tensor)

    @property
    def quantized(self) -> bool:
        return self.spec is not None

    @property
    def action(self) -> str:
        return "fallback" if self.fallback and self.spec else ("quantized" if self.spec else "kept")

    @property
    def opts(self) -> LayerOpts:
        return LayerOpts(self.block_size, **dict(self.format_options))

    def comfy_quant(self) -> dict:
        assert self.spec is not None
        d = self.spec.marker(self.shape, torch_dtype(self.dtype), self.opts)
        d.update(self.options)
        return d

    def outputs(self) -> list[PlannedTensor]:
        if self.spec is None:
            return [PlannedTensor(self.tensor, self.dtype, self.shape)]
        return [PlannedTensor(name, dtype, shape) for name, dtype, shape in
                self.spec.layer_tensors(self.layer, self.shape, torch_dtype(self.dtype), self.opts, dict(self.options))]

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "shape": list(self.shape), "dtype": self.dtype,
                "action": self.action,
                "format": self.spec.name if self.spec else None,
                "comfy_format": self.spec.comfy_format if self.spec else None,
                "block_size": self.block_size if self.spec and "block_size" in self.spec.option_names else None,
                "options": dict(self.options), "reason": self.reason, "rule": self.rule or None}


@dataclass
class Plan:
    options: Options
    layers: list[LayerPlan]  # every input tensor (not only layers), in input file order
    outputs: list[PlannedTensor] = field(default_factory=list)
    metadata: dict[str, str] | None = None
    families: list[families.Detected] = field(default_factory=list)
    input_size: int = 0

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.quantized]

    @property
    def output_size(self) -> int:
        """Exact size of the file this plan writes, header included."""
        header, _ = build_header(self.outputs, self.metadata)
        return len(header) + sum(t.nbytes for t in self.outputs)

    @property
    def needs_node(self) -> list[str]:
        """The .comfy_quant formats in this plan that stock ComfyUI cannot load (empty: it loads)."""
        return sorted({lp.spec.comfy_format for lp in self.quantized if not lp.spec.stock_comfy})

    def counts(self) -> dict[str, int]:
        """Layers (modules with a ``.weight``) by action, and tensors in and to write
        (:func:`quantkit.report.layer_counts`)."""
        return layer_counts(((lp.tensor, lp.action) for lp in self.layers), len(self.outputs))

    def to_dict(self) -> dict:
        return {"format": self.options.format, "block_size": self.options.block_size,
                "fallback": self.options.fallback, "preset": self.options.preset,
                "families": [{"family": d.family.name, "title": d.family.title, "prefix": d.prefix}
                             for d in self.families],
                "counts": self.counts(), "input_bytes": self.input_size, "output_bytes": self.output_size,
                "stock_comfyui": not self.needs_node, "needs_node_for": self.needs_node,
                "tensors": [lp.to_dict() for lp in self.layers]}


def plan_conversion(reader: SafetensorsReader, options: Options) -> Plan:
    options.validate()
    spec = FORMATS[options.format]
    sel = policy.Selection.from_patterns(options.include, options.exclude)
    for t in reader.tensors_in_order:
        if t.name.endswith(QUANT_SUFFIXES):
            raise QuantkitError("input already holds quantized layers", file=reader.path, tensor=t.name,
                                fix="convert the original bf16/fp16/fp32 checkpoint")
    if reader.metadata and QUANT_METADATA_KEY in reader.metadata:
        raise QuantkitError(f"input metadata already has {QUANT_METADATA_KEY}", file=reader.path,
                            fix="convert the original bf16/fp16/fp32 checkpoint")
    detected = families.resolve(options.preset, {t.name: t.shape for t in reader.tensors_in_order},
                                file=reader.path)
    sel = policy.Selection(sel.include, sel.exclude, tuple(detected))
    layers = [_plan_one(t, spec, sel, options) for t in reader.tensors_in_order]
    plan = Plan(options, layers, families=detected, input_size=reader.file_size)
    names: dict[str, str] = {}
    for lp in layers:
        for out in lp.outputs():
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
    try:
        build_header(plan.outputs, metadata)  # what the writer will refuse, refused before any work
    except QuantkitError as e:
        raise QuantkitError(e.message, file=reader.path, tensor=e.tensor, fix=e.fix) from None
    return plan


def plan_file(src, options: Options) -> Plan:
    """Open ``src`` (header only) and plan its conversion."""
    with SafetensorsReader(src) as reader:
        return plan_conversion(reader, options)


def quantization_metadata(plan: Plan) -> str:
    layers = {lp.layer: lp.comfy_quant()
              for lp in sorted(plan.quantized, key=lambda p: p.layer)}
    return json.dumps({"format_version": "1.0", "layers": layers}, separators=(",", ":"))


def _plan_one(t: TensorInfo, spec: Format, sel: policy.Selection, options: Options) -> LayerPlan:
    why = policy.is_candidate(t)
    rule: LayerRule | None = None
    name = policy.layer_name(t.name)
    if why is None and options.config is not None and not policy.excluded(name, sel):
        rule = options.config.lookup(name)
    if rule is not None and rule.skip:
        return LayerPlan(t.name, t.shape, t.dtype, None, f"config {rule.pattern!r}: skip", rule=rule.pattern)
    if why is None and rule is None:
        why = policy.decide(t, sel)
    if why is not None:
        return LayerPlan(t.name, t.shape, t.dtype, None, why)
    block_size, opts, how = options.block_size, dict(options.comfy_options), ""
    fopts = dict(options.format_options)
    if rule is not None:
        how = f"config {rule.pattern!r}"
        if rule.format is not None:
            spec = FORMATS[rule.format]
        if rule.block_size is not None:
            if "block_size" not in spec.option_names:
                with_block = " or ".join(f'format = "{f}"' for f in formats_with_option("block_size"))
                raise UsageError(f"config {rule.pattern!r} sets block_size but this layer's format is {spec.name}",
                                 file=options.config.path, tensor=t.name,
                                 fix=f"drop block_size or set {with_block} in the entry")
            block_size = rule.block_size
        opts.update(rule.options)
        fopts.update(rule.format_options)
    options_t = tuple(sorted(opts.items()))
    format_t = tuple(sorted(fopts.items()))
    lopts = LayerOpts(block_size, **fopts)
    cannot = spec.cannot_take(t.shape, lopts)
    if cannot is None:
        how = "; ".join(x for x in (how, spec.plan_note(t.shape, lopts)) if x)
        return LayerPlan(t.name, t.shape, t.dtype, spec, how, block_size=block_size, options=options_t,
                         rule=rule.pattern if rule else "", format_options=format_t)
    if options.fallback == "keep":
        return LayerPlan(t.name, t.shape, t.dtype, None, f"{cannot}; --fallback keep", fallback=True,
                         rule=rule.pattern if rule else "")
    fb = FORMATS[options.fallback]
    note = fb.plan_note(t.shape, lopts)
    return LayerPlan(t.name, t.shape, t.dtype, fb,
                     "; ".join(x for x in (f"{cannot}; fell back to {options.fallback}", note) if x), fallback=True, block_size=block_size,
                     options=options_t, rule=rule.pattern if rule else "", format_options=format_t)


def default_output_name(src_name: str, fmt: str) -> str:
    stem = src_name[: -len(".safetensors")] if src_name.endswith(".safetensors") else src_name
    return f"{stem}-{fmt}.safetensors"


__all__ = ["Options", "Plan", "LayerPlan", "plan_conversion", "plan_file", "default_output_name"]
