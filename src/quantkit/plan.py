"""Plan a conversion from the input header alone: per layer what happens and why, and the exact
list of output tensors. Nothing is read or written here beyond the header."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace


from . import families, policy, qinput
from .dtypes import torch_dtype
from .errors import QuantkitError, UsageError
from .formats import (DEFAULT_FALLBACK, DEFAULT_FORMAT, FALLBACK_CHOICES, FORMATS, LAYER_OPTIONS, STOCK_COMFY_FORMATS,
                      Format, LayerOpts, formats_with_option, get_format, legacy)
from .layerconfig import LayerConfig, LayerRule
from .report import layer_counts
from .safetensors_io import PlannedTensor, SafetensorsReader, TensorInfo, build_header

QUANT_METADATA_KEY = qinput.QUANT_METADATA_KEY
AUTO = "auto"  # --format auto: a measured format per layer (quantkit.autoplan)


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
    keep_quantized: bool = False  # copy an input's quantized layers through instead of re-quantizing them
    upgrade: bool = False  # `quantkit upgrade`: rewrite a legacy scaled_fp8 file's layers, copy the rest
    # format "auto": the budget and candidates (quantkit.autoplan.AutoSpec); the plan then reads weights
    auto: object | None = None
    # per-layer formats chosen by quantkit.autoplan: (layer, format); a config rule's format wins
    layer_formats: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        if self.format == AUTO:
            if self.auto is None:
                raise UsageError("--format auto needs a budget: --bits B or --max-error X",
                                 fix="e.g. --format auto --bits 5")
            self.auto.validate()
            replace(self, format=DEFAULT_FALLBACK, auto=None).validate()
            return
        if self.auto is not None:
            raise UsageError(f"--bits and --max-error are budgets of --format auto, not of --format {self.format}",
                             fix="add --format auto, or drop --bits / --max-error")
        get_format(self.format)
        for _, f in self.layer_formats:
            get_format(f)
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
        fields = set(LayerOpts.__dataclass_fields__) - {"block_size", "static_input_scale"}
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
    # A layer of a quantized input (:mod:`quantkit.qinput`), on its weight's entry: re-quantized to
    # ``spec`` from its dequantized weight, or (spec None) copied through as it is quantized.
    source: qinput.Source | None = None
    drop: bool = False  # not written (a re-quantized layer's old scales, the legacy scaled_fp8 marker)
    out_name: str = ""  # written under this name (a legacy scale: ComfyUI's name for it)
    out_dtype: str = ""  # written cast to this dtype (a legacy scale: fp32, as ComfyUI reads it)

    @property
    def layer(self) -> str:
        return policy.layer_name(self.tensor)

    @property
    def quantized(self) -> bool:
        return self.spec is not None

    @property
    def requantized(self) -> bool:
        return self.source is not None and self.spec is not None

    @property
    def kept_quantized(self) -> bool:
        return self.source is not None and self.spec is None

    @property
    def value_dtype(self) -> str:
        """The dtype recorded as the layer's orig_dtype (the input's, or that of a quantized input's
        weight before it was quantized)."""
        return self.source.orig_dtype if self.source is not None else self.dtype

    @property
    def action(self) -> str:
        if self.drop:
            return "dropped"
        return "fallback" if self.fallback and self.spec else ("quantized" if self.spec else "kept")

    @property
    def opts(self) -> LayerOpts:
        return LayerOpts(self.block_size, **dict(self.format_options))

    def comfy_quant(self) -> dict:
        assert self.spec is not None
        d = self.spec.marker(self.shape, torch_dtype(self.value_dtype), self.opts)
        d.update(self.options)
        return d

    def outputs(self) -> list[PlannedTensor]:
        if self.drop:
            return []
        if self.spec is None:
            out = [PlannedTensor(self.out_name or self.tensor, self.out_dtype or self.dtype, self.shape)]
            if self.source is not None and self.source.new_marker:
                out.append(PlannedTensor(f"{self.source.layer}{qinput.MARKER_SUFFIX}", "U8",
                                         (len(qinput.marker_bytes(self.source)),)))
            return out
        return [PlannedTensor(name, dtype, shape) for name, dtype, shape in
                self.spec.layer_tensors(self.layer, self.shape, torch_dtype(self.value_dtype), self.opts,
                                        dict(self.options))]

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "shape": list(self.shape), "dtype": self.dtype,
                "action": self.action,
                "format": self.spec.name if self.spec else None,
                "comfy_format": self.spec.comfy_format if self.spec else None,
                "block_size": self.block_size if self.spec and "block_size" in self.spec.option_names else None,
                "options": dict(self.options), "reason": self.reason, "rule": self.rule or None,
                "from_quantized": self.source.to_dict() if self.source is not None else None,
                "kept_quantized": self.kept_quantized, "output_name": self.out_name or None}


@dataclass
class Plan:
    options: Options
    layers: list[LayerPlan]  # every input tensor (not only layers), in input file order
    outputs: list[PlannedTensor] = field(default_factory=list)
    metadata: dict[str, str] | None = None
    families: list[families.Detected] = field(default_factory=list)
    input_size: int = 0
    notes: list[str] = field(default_factory=list)  # one line each, for the user (the run's report carries them)
    auto: object | None = None  # --format auto: the choice (quantkit.autoplan.AutoResult)

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.quantized]

    @property
    def requantized(self) -> list[LayerPlan]:
        """Layers of a quantized input written in a new format from their dequantized weights."""
        return [p for p in self.layers if p.requantized]

    @property
    def kept_quantized(self) -> list[LayerPlan]:
        """Layers of a quantized input copied through quantized (a legacy one with ComfyUI's marker)."""
        return [p for p in self.layers if p.kept_quantized]

    @property
    def output_size(self) -> int:
        """Exact size of the file this plan writes, header included."""
        header, _ = build_header(self.outputs, self.metadata)
        return len(header) + sum(t.nbytes for t in self.outputs)

    @property
    def needs_node(self) -> list[str]:
        """The .comfy_quant formats in this plan that stock ComfyUI cannot load (empty: it loads)."""
        return sorted({lp.spec.comfy_format for lp in self.quantized if not lp.spec.stock_comfy}
                      | {str(lp.source.marker.get("format")) for lp in self.kept_quantized
                         if lp.source.marker.get("format") not in STOCK_COMFY_FORMATS})

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
                "quantized_input": {"requantized": len(self.requantized), "kept_quantized": len(self.kept_quantized),
                                    "keep_quantized": self.options.keep_quantized},
                "notes": list(self.notes),
                **({"auto": self.auto.to_dict()} if self.auto is not None else {}),
                "tensors": [lp.to_dict() for lp in self.layers]}


def plan_conversion(reader: SafetensorsReader, options: Options) -> Plan:
    """The plan of ``options`` for ``reader``'s file: from its header alone, except with format
    ``auto``, which reads every quantizable weight once to measure the candidates (quantkit.autoplan)."""
    options.validate()
    if options.format == AUTO:
        from .autoplan import plan_auto
        return plan_auto(reader, options)
    spec = FORMATS[options.format]
    sel = policy.Selection.from_patterns(options.include, options.exclude)
    qs = qinput.scan(reader)
    if options.upgrade:
        _check_upgradable(reader, qs)
    detected = families.resolve(options.preset, {t.name: t.shape for t in reader.tensors_in_order},
                                file=reader.path)
    sel = policy.Selection(sel.include, sel.exclude, tuple(detected))
    decided = {layer: _plan_source(reader, src, spec, sel, options) for layer, src in qs.layers.items()}
    layers = []
    for t in reader.tensors_in_order:
        layer = qs.member_of.get(t.name)
        if layer is not None:
            layers.append(_plan_member(t, decided[layer], qs))
        elif t.name == qs.legacy_marker:
            layers.append(LayerPlan(t.name, t.shape, t.dtype, None, f"legacy {legacy.MARKER} marker: dropped (its "
                                    "layers get .comfy_quant markers, as ComfyUI converts them at load)", drop=True))
        elif options.upgrade:
            layers.append(LayerPlan(t.name, t.shape, t.dtype, None, "copied (upgrade rewrites the scaled layers only)"))
        else:
            layers.append(_plan_one(t, spec, sel, options))
    plan = Plan(options, layers, families=detected, input_size=reader.file_size)
    if plan.requantized:
        kinds = ", ".join(dict.fromkeys(lp.source.label for lp in plan.requantized))
        plan.notes.append(f"{len(plan.requantized)} layers were re-quantized from an already quantized input "
                          f"({kinds}): their quality is bounded by the input's; the original bf16/fp16/fp32 "
                          "checkpoint gives better results (--keep-quantized copies them instead)")
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
    if metadata is not None:
        metadata.pop(QUANT_METADATA_KEY, None)  # the input's layers; rebuilt below for the output's
    if plan.quantized or plan.kept_quantized:
        metadata = metadata or {}
        metadata[QUANT_METADATA_KEY] = quantization_metadata(plan)
    plan.metadata = metadata
    try:
        build_header(plan.outputs, metadata)  # what the writer will refuse, refused before any work
    except QuantkitError as e:
        raise QuantkitError(e.message, file=reader.path, tensor=e.tensor, fix=e.fix) from None
    return plan


def with_static_input_scales(plan: Plan, layers: set[str], file=None) -> Plan:
    """``plan`` with the quantized ``layers`` marked ``static_input_scale`` (calibration gives them
    one): a format that stores an input_scale only then lists it, and the outputs are re-listed."""
    opt = "static_input_scale"
    new = [replace(lp, format_options=tuple(sorted({**dict(lp.format_options), opt: True}.items())))
           if lp.quantized and lp.layer in layers else lp for lp in plan.layers]
    out = replace(plan, layers=new, outputs=[])
    names: dict[str, str] = {}
    for lp in new:
        for t in lp.outputs():
            if t.name in names:
                raise QuantkitError(f"output name '{t.name}' would be written twice (also from '{names[t.name]}')",
                                    file=file, tensor=lp.tensor,
                                    fix=f"--exclude '^{lp.layer}$' to keep this layer as it is")
            names[t.name] = lp.tensor
            out.outputs.append(t)
    build_header(out.outputs, out.metadata)
    return out


def plan_file(src, options: Options) -> Plan:
    """Open ``src`` (header only) and plan its conversion."""
    with SafetensorsReader(src) as reader:
        return plan_conversion(reader, options)


def quantization_metadata(plan: Plan) -> str:
    markers = {lp.layer: lp.comfy_quant() for lp in plan.quantized}
    markers.update({lp.source.layer: lp.source.marker for lp in plan.kept_quantized})
    layers = {k: markers[k] for k in sorted(markers)}
    return json.dumps({"format_version": "1.0", "layers": layers}, separators=(",", ":"))


def _check_upgradable(reader: SafetensorsReader, qs: qinput.Scan) -> None:
    """`quantkit upgrade` takes a legacy scaled_fp8 file with at least one scaled layer."""
    fix = "only legacy scaled fp8 files need upgrading; 'quantkit inspect' shows what this file holds"
    if qs.legacy_marker is None:
        if reader.metadata and QUANT_METADATA_KEY in reader.metadata:
            raise QuantkitError(f"not a legacy scaled fp8 file: its header has {QUANT_METADATA_KEY}, so ComfyUI "
                                "reads its .comfy_quant markers as they are", file=reader.path, fix=fix)
        raise QuantkitError(f"not a legacy scaled fp8 file: no {legacy.MARKER} marker tensor", file=reader.path, fix=fix)
    if not any(src.legacy for src in qs.layers.values()):
        raise QuantkitError(f"legacy {legacy.MARKER} file without any {legacy.SCALE_WEIGHT} layer", file=reader.path,
                            tensor=qs.legacy_marker, fix="nothing to upgrade: the file loads as plain weights")


def _plan_source(reader: SafetensorsReader, src: qinput.Source, spec: Format, sel: policy.Selection,
                 options: Options) -> LayerPlan:
    """The weight entry of one quantized input layer: re-quantized to the target (through the usual
    rules, as if it were a float weight of its original shape) or kept as it is."""
    if src.legacy and src.problem:  # copied as it is, ComfyUI would read garbage beside the new markers
        raise QuantkitError(src.problem, file=reader.path,
                            tensor=src.weight if src.weight in reader.tensors else src.reads[1][1],
                            fix=f"convert the original checkpoint; a legacy layer must be an fp8 weight with one "
                                f"{legacy.SCALE_WEIGHT} number")
    w = reader.tensors[src.weight]
    keep = "--keep-quantized" if options.keep_quantized else ("upgrade" if options.upgrade else None)
    lp = None
    if keep is None:
        as_float = TensorInfo(src.weight, src.orig_dtype, src.orig_shape, 0, 0)
        lp = _plan_one(as_float, spec, sel, options)
        if lp.spec is None:
            keep = lp.reason
    if keep is not None:
        return LayerPlan(w.name, w.shape, w.dtype, None, f"already quantized ({src.label}), copied: {keep}",
                         source=src, rule=lp.rule if lp is not None else "")
    if not src.readable:
        raise QuantkitError(f"layer is quantized ({src.label}) in a way quantkit cannot read: {src.problem}",
                            file=reader.path, tensor=src.weight,
                            fix=f"pass --keep-quantized to copy it as it is, or --exclude '^{src.layer}$'")
    why = f"re-quantized from {src.label}" + (f"; {lp.reason}" if lp.reason else "")
    return replace(lp, dtype=w.dtype, reason=why, source=src)


def _plan_member(t: TensorInfo, owner: LayerPlan, qs: qinput.Scan) -> LayerPlan:
    """An input tensor of a quantized layer: its weight's entry, or a scale / marker that goes with
    the re-quantized layer (dropped) or is copied with the kept one (a legacy one under its ComfyUI
    name, in fp32; a legacy input scale of 1.0 dropped, as ComfyUI does)."""
    src = owner.source
    if t.name == src.weight:
        return owner
    if owner.spec is not None:
        return LayerPlan(t.name, t.shape, t.dtype, None, f"part of {src.layer} ({src.label}), which is re-quantized",
                         drop=True)
    if not src.legacy:
        return LayerPlan(t.name, t.shape, t.dtype, None, f"part of {src.layer} ({src.label}), copied")
    suffix = t.name.rpartition(".")[2]
    if t.name in qs.input_scales and legacy.drops_input_scale(qs.input_scales[t.name]):
        return LayerPlan(t.name, t.shape, t.dtype, None, f"legacy {suffix} of 1.0: dropped, as ComfyUI does", drop=True)
    new = f"{src.layer}.{legacy.RENAMES[suffix]}"
    return LayerPlan(t.name, t.shape, t.dtype, None, f"legacy {suffix} of {src.layer}, written as {new}",
                     out_name=new, out_dtype="F32")


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
    if options.layer_formats:
        chosen = dict(options.layer_formats).get(name)
        if chosen is not None:
            spec = FORMATS[chosen]
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
