"""``quantkit inspect``: what a .safetensors file holds, and every way it breaks the on-disk
contract ComfyUI expects (../shared/comfy-contract.md). Works on files from any tool: it reads the
header and only the small ``.comfy_quant`` marker tensors, never a weight."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import families
from .formats import (COMFY_READ_KEYS, QUANT_SUFFIXES, SCALE_SUFFIXES, STOCK_COMFY_FORMATS, Violation, check_layer,
                      decode_comfy_quant, legacy, shapes_by_layer)
from .plan import QUANT_METADATA_KEY
from .safetensors_io import SafetensorsReader, TensorInfo

@dataclass
class Inspection:
    path: str
    file_size: int
    header_bytes: int
    tensors: int
    dtypes: dict[str, tuple[int, int]]  # dtype -> (count, bytes)
    metadata: dict[str, str] | None
    markers: dict[str, dict] = field(default_factory=dict)  # layer -> decoded .comfy_quant
    float_weights: int = 0  # 2-D float .weight tensors without a marker
    families: list[families.Detected] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    notes: list[Violation] = field(default_factory=list)  # worth knowing, but ComfyUI loads it right
    legacy_layers: int = 0  # scale_weight layers of a legacy scaled_fp8 file (formats/legacy.py)

    @property
    def formats(self) -> dict[str, int]:
        return dict(sorted(Counter(str(m.get("format")) for m in self.markers.values()).items()))

    @property
    def needs_node(self) -> list[str]:
        return sorted(f for f in self.formats if f not in STOCK_COMFY_FORMATS)

    @property
    def loads(self) -> str:
        if self.violations:
            return f"no: {len(self.violations)} contract violation(s)"
        if not self.markers and self.legacy_layers:
            return (f"yes: a legacy scaled fp8 file ({self.legacy_layers} scaled layers) that ComfyUI converts "
                    "at load; 'quantkit upgrade' writes its .comfy_quant markers")
        if not self.markers:
            return "yes: a plain checkpoint (no quantized layers)"
        if self.needs_node:
            return f"only with a node that registers {', '.join(self.needs_node)}"
        return "yes: stock ComfyUI"

    def to_dict(self) -> dict:
        meta = dict(self.metadata or {})
        if QUANT_METADATA_KEY in meta:
            meta[QUANT_METADATA_KEY] = f"<{len(meta[QUANT_METADATA_KEY])} bytes of JSON>"
        return {"path": self.path, "file_bytes": self.file_size, "header_bytes": self.header_bytes,
                "tensors": self.tensors,
                "dtypes": {k: {"count": c, "bytes": b} for k, (c, b) in self.dtypes.items()},
                "metadata": meta, "quantized_layers": len(self.markers), "formats": self.formats,
                "unquantized_float_weights": self.float_weights, "legacy_scaled_layers": self.legacy_layers,
                "families": [{"family": d.family.name, "prefix": d.prefix} for d in self.families],
                "comfyui_loads": self.loads, "needs_node_for": self.needs_node,
                "violations": [{"rule": v.rule, "tensor": v.tensor, "message": v.message} for v in self.violations],
                "notes": [{"rule": v.rule, "tensor": v.tensor, "message": v.message} for v in self.notes]}


def inspect_file(path: str | Path) -> Inspection:
    with SafetensorsReader(path) as r:
        return inspect_reader(r)


def inspect_reader(r: SafetensorsReader) -> Inspection:
    dtypes: dict[str, list[int]] = {}
    for t in r.tensors_in_order:
        d = dtypes.setdefault(t.dtype, [0, 0])
        d[0] += 1
        d[1] += t.nbytes
    ins = Inspection(str(r.path), r.file_size, r.header_bytes, len(r.tensors),
                     {k: (c, b) for k, (c, b) in sorted(dtypes.items())}, r.metadata)
    v = ins.violations.append
    T = r.tensors
    for t in r.tensors_in_order:
        if t.name.endswith(".comfy_quant"):
            marker = _decode_marker(r, t, v)
            if marker is not None:
                ins.markers[t.name.removesuffix(".comfy_quant")] = marker
    for t in r.tensors_in_order:
        for suf in SCALE_SUFFIXES:
            if t.name.endswith(suf):
                layer = t.name.removesuffix(suf)
                if f"{layer}.comfy_quant" not in T:
                    v(Violation("scale-without-marker", t.name,
                                f"{suf[1:]} without {layer}.comfy_quant: newest ComfyUI refuses to load the file"))
        if (t.name.endswith(".weight") and len(t.shape) == 2 and t.dtype in ("F32", "F16", "BF16")
                and f"{t.name.removesuffix('.weight')}.comfy_quant" not in T):
            ins.float_weights += 1
    if not (r.metadata and QUANT_METADATA_KEY in r.metadata):  # else ComfyUI never reads the legacy layout
        for t in r.tensors_in_order:
            prefix = legacy.prefix_of(t.name)
            if prefix is not None:
                ins.legacy_layers = sum(n.startswith(prefix) and n.endswith(f".{legacy.SCALE_WEIGHT}") for n in T)
                ins.notes.append(Violation("legacy-scaled-fp8", t.name, "a legacy scaled fp8 file: ComfyUI converts "
                                           "it at load; 'quantkit upgrade' rewrites it with .comfy_quant markers "
                                           "losslessly, 'quantkit convert' re-quantizes its layers"))
                break
    by_layer = shapes_by_layer(T)
    for layer, m in ins.markers.items():
        _check_layer(layer, m, T, by_layer.get(layer, {}), v)
    _check_header(r.metadata, ins.markers, v, ins.notes.append)
    names = {n: t.shape for n, t in T.items() if not n.endswith(QUANT_SUFFIXES)}
    ins.families = families.detect(names)
    return ins


def _decode_marker(r: SafetensorsReader, t: TensorInfo, v) -> dict | None:
    if t.dtype != "U8" or len(t.shape) != 1:
        v(Violation("bad-marker", t.name, f"marker is {t.dtype} {list(t.shape)}; it must be 1-D U8 (UTF-8 JSON bytes)"))
        return None
    raw = bytes(r.buffer(t.name))
    try:
        m = decode_comfy_quant(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        hint = " (NUL padding)" if b"\x00" in raw else ""
        v(Violation("bad-marker", t.name, f"marker bytes are not UTF-8 JSON{hint}; ComfyUI's json.loads fails"))
        return None
    except ValueError:  # JSON, but not an object
        m = None
    if not isinstance(m, dict) or not isinstance(m.get("format"), str):
        v(Violation("bad-marker", t.name, "marker JSON must be an object with a string 'format'"))
        return None
    return m


def _check_layer(layer: str, m: dict, T: dict[str, TensorInfo], shapes: dict, v) -> None:
    if f"{layer}.weight" not in T:
        v(Violation("marker-without-weight", f"{layer}.comfy_quant", f"marks a layer with no {layer}.weight"))
        return
    for x in check_layer(layer, m, T, shapes):
        v(x)


def _check_header(metadata: dict[str, str] | None, markers: dict[str, dict], v, note) -> None:
    if not metadata or QUANT_METADATA_KEY not in metadata:
        return
    where = f"__metadata__.{QUANT_METADATA_KEY}"
    try:
        doc = json.loads(metadata[QUANT_METADATA_KEY])
    except json.JSONDecodeError:
        v(Violation("bad-header-metadata", None, f"{where} is not JSON"))
        return
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, dict):
        v(Violation("bad-header-metadata", None, f"{where} has no 'layers' object"))
        return
    for layer, entry in sorted(layers.items()):
        if layer not in markers:
            v(Violation("header-marker-mismatch", f"{layer}.comfy_quant",
                        f"{where} lists this layer but the file has no (valid) marker tensor for it"))
        elif entry != markers[layer]:
            read = [k for k in COMFY_READ_KEYS if (entry.get(k) if isinstance(entry, dict) else None) != markers[layer].get(k)]
            msg = (f"{where} says {json.dumps(entry, sort_keys=True)} but the marker says "
                   f"{json.dumps(markers[layer], sort_keys=True)}")
            if read or not isinstance(entry, dict):
                v(Violation("header-marker-mismatch", f"{layer}.comfy_quant", f"{msg}; ComfyUI uses the header's"))
            else:
                note(Violation("header-marker-mismatch", f"{layer}.comfy_quant",
                               f"{msg}; they differ only in keys ComfyUI ignores"))
    for layer in sorted(set(markers) - set(layers)):
        v(Violation("header-marker-mismatch", f"{layer}.comfy_quant", f"marker not listed in {where}"))


__all__ = ["Inspection", "Violation", "inspect_file", "inspect_reader"]
