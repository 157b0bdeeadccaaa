"""Reading inputs whose layers are already quantized: which layers are, in which format, and their
weights as ComfyUI computes them.

A quantized layer ``L`` of an input is either

* marked: ``L.comfy_quant`` (any producer's), or an entry for ``L`` in the header's
  ``_quantization_metadata`` (ComfyUI lets the header's entry replace the tensor's; so does this
  module). Its format is the registry's :func:`~quantkit.formats.format_of_marker` for the marker
  and the shapes of ``L``'s tensors, and its weight is that format's ``dequantize``: comfy-kitchen's
  layout, bit for bit. A format the registry does not know, or a layer that breaks its format's
  contract, cannot be read; it can still be copied through (``--keep-quantized``).
* legacy: a ``scaled_fp8`` file's ``L.scale_weight`` (:mod:`quantkit.formats.legacy`), read as the
  fp8 layer ComfyUI converts it to at load.

Weights are dequantized in fp32: ComfyUI's computation with compute dtype fp32 (its CPU default),
the most exact value it gives. ``scan`` reads the header and the small marker / input-scale tensors,
never a weight; ``read`` dequantizes one layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .dtypes import torch_dtype
from .errors import QuantkitError
from .formats import (SCALE_SUFFIXES, Format, decode_comfy_quant, encode_comfy_quant, format_of_marker, legacy,
                      shapes_by_layer)
from .safetensors_io import SafetensorsReader

QUANT_METADATA_KEY = "_quantization_metadata"
MARKER_SUFFIX = ".comfy_quant"
# orig_dtype of a marker -> safetensors dtype name; a layer whose marker has none is recorded as bf16
# (ComfyUI's usual compute dtype; ComfyUI itself ignores the key)
_ORIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DEFAULT_ORIG_DTYPE = "BF16"


@dataclass(frozen=True)
class Source:
    """One quantized layer of an input."""

    layer: str
    fmt: Format | None  # the registered format it is read as; None: no format quantkit reads
    marker: dict  # its .comfy_quant object (a legacy layer's: the one ComfyUI derives)
    reads: tuple[tuple[str, str], ...]  # (suffix ComfyUI reads it as, input tensor name), weight first
    members: tuple[str, ...]  # the input tensors that belong to the quantized layer (weight first)
    orig_shape: tuple[int, ...]
    orig_dtype: str  # safetensors dtype name recorded as the re-quantized layer's orig_dtype
    legacy: bool = False
    problem: str = ""  # why it cannot be read ("" when it can)
    new_marker: bool = False  # no L.comfy_quant in the input (legacy, or header-only)

    @property
    def weight(self) -> str:
        return self.reads[0][1]

    @property
    def readable(self) -> bool:
        return self.fmt is not None and not self.problem

    @property
    def label(self) -> str:
        """What the plan and report call it: the format name, "scaled_fp8 fp8" for a legacy layer."""
        name = self.fmt.name if self.fmt is not None else str(self.marker.get("format"))
        return f"scaled_fp8 {name}" if self.legacy else name

    def to_dict(self) -> dict:
        return {"format": self.fmt.name if self.fmt else None, "comfy_format": self.marker.get("format"),
                "legacy_scaled_fp8": self.legacy, "readable": self.readable, "problem": self.problem or None}


@dataclass
class Scan:
    """The quantized layers of one input file."""

    layers: dict[str, Source] = field(default_factory=dict)  # by layer name, in weight order
    member_of: dict[str, str] = field(default_factory=dict)  # input tensor -> its quantized layer
    legacy_marker: str | None = None  # the scaled_fp8 tensor, in a legacy file
    legacy_prefix: str = ""
    input_scales: dict[str, float] = field(default_factory=dict)  # legacy scale_input values

    @property
    def any(self) -> bool:
        return bool(self.layers) or self.legacy_marker is not None


def _header_layers(reader: SafetensorsReader) -> dict[str, dict] | None:
    meta = reader.metadata or {}
    if QUANT_METADATA_KEY not in meta:
        return None
    fix = f"remove the {QUANT_METADATA_KEY} header entry (the .comfy_quant tensors carry the same) or re-export the file"
    try:
        d = json.loads(meta[QUANT_METADATA_KEY])
    except ValueError:
        raise QuantkitError(f"header {QUANT_METADATA_KEY} is not JSON", file=reader.path, fix=fix) from None
    layers = d.get("layers") if isinstance(d, dict) else None
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise QuantkitError(f"header {QUANT_METADATA_KEY} has no 'layers' object of per-layer objects",
                            file=reader.path, fix=fix)
    return layers


def _orig_dtype(marker: dict) -> str:
    return _ORIG_DTYPES.get(marker.get("orig_dtype"), DEFAULT_ORIG_DTYPE)


def _scalar(reader: SafetensorsReader, name: str) -> float:
    return float(reader.tensor(name).float().reshape(-1)[0])


def scan(reader: SafetensorsReader) -> Scan:
    """Find every quantized layer of ``reader``'s file (header and marker tensors only). Raises
    QuantkitError on what no reader can make sense of: a marker that is not a JSON object, a scale
    without a marker, two legacy markers."""
    T = reader.tensors
    s = Scan()
    header = _header_layers(reader)
    markers: dict[str, dict] = {}
    for name, t in T.items():
        if name.endswith(MARKER_SUFFIX):
            try:
                markers[name.removesuffix(MARKER_SUFFIX)] = decode_comfy_quant(bytes(reader.buffer(name)))
            except ValueError:
                raise QuantkitError(".comfy_quant marker is not a UTF-8 JSON object", file=reader.path, tensor=name,
                                    fix="re-export the file with its producer") from None
    from_header = set()
    if header is not None:
        for layer, m in header.items():
            if f"{layer}.weight" in T:  # entries for layers this file lacks do nothing in ComfyUI
                from_header.add(layer)
                markers[layer] = m
    by_layer = shapes_by_layer(T)
    found: dict[str, Source] = {}
    for layer, m in markers.items():
        found[layer] = _marked(reader, layer, m, by_layer.get(layer, {}), new_marker=f"{layer}{MARKER_SUFFIX}" not in T)
    if header is None:
        prefixes = [(n, p) for n in T if (p := legacy.prefix_of(n)) is not None]
        if len(prefixes) > 1:
            raise QuantkitError(f"{len(prefixes)} legacy {legacy.MARKER} marker tensors "
                                f"({', '.join(n for n, _ in prefixes[:3])})", file=reader.path, tensor=prefixes[1][0],
                                fix="split the file into one model per file")
        if prefixes:
            s.legacy_marker, s.legacy_prefix = prefixes[0]
            fpmm = legacy.full_precision(T[s.legacy_marker].numel)
            for name in T:
                if name.startswith(s.legacy_prefix) and name.endswith(f".{legacy.SCALE_WEIGHT}"):
                    layer = name[: -len(legacy.SCALE_WEIGHT) - 1]
                    if layer not in found:
                        found[layer] = _legacy(reader, s, layer, fpmm)
    order = {name: i for i, name in enumerate(T)}
    for layer in sorted(found, key=lambda lay: order.get(found[lay].weight, -1)):
        src = found[layer]
        s.layers[layer] = src
        for name in src.members:
            s.member_of[name] = layer
    for name, t in T.items():
        if name in s.member_of:
            continue
        if name.endswith(SCALE_SUFFIXES):
            raise QuantkitError(f"{name.rpartition('.')[2]} without a .comfy_quant marker for its layer: newest "
                                "ComfyUI refuses to load this file", file=reader.path, tensor=name,
                                fix="add the layer's marker with its producer, or delete the stray scale")
        if s.legacy_marker is not None and name.startswith(s.legacy_prefix) and name.endswith(
                f".{legacy.SCALE_INPUT}"):
            raise QuantkitError(f"legacy {legacy.SCALE_INPUT} without {legacy.SCALE_WEIGHT} for its layer",
                                file=reader.path, tensor=name, fix="delete the stray scale")
    return s


def _marked(reader: SafetensorsReader, layer: str, m: dict, shapes: dict, new_marker: bool) -> Source:
    T = reader.tensors
    wname = f"{layer}.weight"
    if wname not in T:  # ComfyUI ignores it (no module loads it); a file that has one is broken
        raise QuantkitError(f".comfy_quant marks a layer with no {wname}", file=reader.path,
                            tensor=f"{layer}{MARKER_SUFFIX}", fix="delete the stray marker (re-export the file)")
    fmt = format_of_marker(m, shapes)
    problem = ""
    if fmt is None:
        problem = f".comfy_quant format {m.get('format')!r} with these tensors is no format quantkit reads"
    else:
        bad = fmt.check(layer, m, T)
        if bad:
            problem = f"{bad[0].tensor}: {bad[0].message}" if bad[0].tensor else bad[0].message
    suffixes = ["weight"] + ([st.suffix for st in fmt.stored(fmt.orig_shape(m, shapes), torch_dtype(_orig_dtype(m)),
                                                             _opts(fmt, m, shapes))
                              if st.suffix != "weight"] if fmt is not None and not problem else [])
    reads = tuple((suf, f"{layer}.{suf}") for suf in dict.fromkeys(suffixes) if f"{layer}.{suf}" in T) or \
        ((("weight", wname),) if wname in T else ())
    smooth = getattr(fmt, "input_smoothing", None) if fmt is not None and not problem else None
    if smooth is not None and f"{layer}.{smooth}" in T:  # part of the layer's weight (Format.dequantize)
        reads += ((smooth, f"{layer}.{smooth}"),)
    extra = [f"{layer}{suf}" for suf in SCALE_SUFFIXES if f"{layer}{suf}" in T]
    members = tuple(dict.fromkeys([n for _, n in reads] + extra + ([] if new_marker else [f"{layer}{MARKER_SUFFIX}"])))
    orig_shape = tuple(fmt.orig_shape(m, shapes)) if fmt is not None and not problem else tuple(shapes.get("weight", ()))
    return Source(layer, fmt, dict(m), reads or (("weight", wname),), members, orig_shape, _orig_dtype(m),
                  problem=problem, new_marker=new_marker)


def _opts(fmt: Format, m: dict, shapes: dict):
    """The LayerOpts a read layer was written with (its tile size, for a block format)."""
    from .formats import LayerOpts
    b = getattr(fmt, "layer_block_size", None)
    if b is None or "block_size" not in fmt.option_names:
        return LayerOpts()
    return LayerOpts(b("", m, shapes))


def _legacy(reader: SafetensorsReader, s: Scan, layer: str, fpmm: bool) -> Source:
    T = reader.tensors
    wname, sname, iname = f"{layer}.weight", f"{layer}.{legacy.SCALE_WEIGHT}", f"{layer}.{legacy.SCALE_INPUT}"
    w, sc = T.get(wname), T[sname]
    fmt = legacy.format_for(w.dtype) if w is not None else None
    problem = ""
    if w is None:
        problem = f"{legacy.SCALE_WEIGHT} of a layer with no {wname}"
    elif fmt is None:
        problem = f"legacy scaled layer's weight is {w.dtype}, not an fp8 type"
    elif len(w.shape) != 2:
        problem = f"legacy scaled weight is {len(w.shape)}-D {list(w.shape)}, not 2-D"
    elif sc.numel != 1 or len(sc.shape) > 1:
        problem = f"{legacy.SCALE_WEIGHT} has shape {list(sc.shape)}; ComfyUI's legacy loader reads one number"
    elif sc.dtype not in legacy.SCALE_DTYPES:
        problem = f"{legacy.SCALE_WEIGHT} is {sc.dtype}, not a float type"
    reads = [("weight", wname), (legacy.RENAMES[legacy.SCALE_WEIGHT], sname)]
    members = [wname, sname]
    if iname in T:
        members.append(iname)
        i = T[iname]
        if not problem and (i.numel != 1 or len(i.shape) > 1 or i.dtype not in legacy.SCALE_DTYPES):
            problem = f"{legacy.SCALE_INPUT} is {i.dtype} {list(i.shape)}; ComfyUI's legacy loader reads one number"
        if not problem:
            s.input_scales[iname] = _scalar(reader, iname)
            if not legacy.drops_input_scale(s.input_scales[iname]):
                reads.append((legacy.RENAMES[legacy.SCALE_INPUT], iname))
    marker = legacy.marker(fmt, fpmm) if fmt is not None else {"format": None}
    return Source(layer, fmt, marker, tuple(reads), tuple(members), tuple(w.shape) if w is not None else (),
                  DEFAULT_ORIG_DTYPE, legacy=True, problem=problem, new_marker=True)


def read(reader: SafetensorsReader, src: Source):
    """The layer's weight as ComfyUI computes it, in fp32 (the format's ``dequantize``; a legacy
    layer's scale cast to fp32 first, as comfy-kitchen's fp8 layout does)."""
    import torch
    tensors = {suf: reader.tensor(name) for suf, name in src.reads}
    if src.legacy:
        tensors["weight_scale"] = tensors["weight_scale"].float()
    w = src.fmt.dequantize(tensors, src.marker, torch.float32, src.layer)
    for _, name in src.reads:
        reader.release(name)
    return w


def marker_bytes(src: Source) -> bytes:
    return encode_comfy_quant(src.marker)


__all__ = ["Source", "Scan", "scan", "read", "marker_bytes", "QUANT_METADATA_KEY"]
