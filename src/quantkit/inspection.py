"""``quantkit inspect``: what a .safetensors file holds, and every way it breaks the on-disk
contract ComfyUI expects (../shared/comfy-contract.md). Works on files from any tool: it reads the
header and only the small ``.comfy_quant`` marker tensors, never a weight."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import families
from .formats import COMFY_READ_KEYS, QUANT_SUFFIXES, SCALE_SUFFIXES, STOCK_COMFY_FORMATS, decode_comfy_quant
from .plan import QUANT_METADATA_KEY
from .safetensors_io import SafetensorsReader, TensorInfo

_FP8_DTYPE = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


@dataclass(frozen=True)
class Violation:
    rule: str  # short stable id, e.g. "scale-without-marker"
    tensor: str | None
    message: str

    def line(self) -> str:
        return f"{self.tensor}: {self.message} [{self.rule}]" if self.tensor else f"{self.message} [{self.rule}]"


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
                "unquantized_float_weights": self.float_weights,
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
    for layer, m in ins.markers.items():
        _check_layer(layer, m, T, v)
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


def _is_scalar(t: TensorInfo) -> bool:
    return t.numel == 1 and len(t.shape) <= 1


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_layer(layer: str, m: dict, T: dict[str, TensorInfo], v) -> None:
    fmt = m["format"]
    w = T.get(f"{layer}.weight")
    s = T.get(f"{layer}.weight_scale")
    name_w, name_s = f"{layer}.weight", f"{layer}.weight_scale"
    if w is None:
        v(Violation("marker-without-weight", f"{layer}.comfy_quant", f"marks a layer with no {name_w}"))
        return
    if fmt in _FP8_DTYPE or fmt == "mxfp8":
        want = _FP8_DTYPE.get(fmt, "F8_E4M3")
        if w.dtype == "U8":
            v(Violation("uint8-stored-fp8", name_w, f"{fmt} weight stored as U8: the loader converts by value, "
                        f"so every weight becomes garbage (store it as {want})"))
        elif w.dtype != want:
            v(Violation("wrong-weight-dtype", name_w, f"{fmt} weight is {w.dtype}, must be {want}"))
    elif fmt in ("int8_tensorwise", "int8_blockwise") and w.dtype != "I8":
        v(Violation("wrong-weight-dtype", name_w, f"{fmt} weight is {w.dtype}, must be I8"))
    elif fmt == "nvfp4" and w.dtype != "U8":
        v(Violation("wrong-weight-dtype", name_w, f"nvfp4 weight is {w.dtype}, must be U8 (two E2M1 per byte)"))
    if len(w.shape) != 2:
        v(Violation("wrong-weight-shape", name_w, f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D"))
        return
    n, k = w.shape
    orig = m.get("orig_shape")
    if fmt in (*_FP8_DTYPE, "int8_tensorwise", "int8_blockwise") and orig is not None and list(orig) != [n, k]:
        v(Violation("orig-shape-mismatch", f"{layer}.comfy_quant", f"orig_shape {orig} but the weight is {[n, k]}"))
    if fmt in (*_FP8_DTYPE, "int8_tensorwise", "int8_blockwise", "mxfp8", "nvfp4") and s is None:
        v(Violation("missing-scale", name_w, f"{fmt} needs {name_s}; ComfyUI crashes at the layer's first use"))
        return
    if s is None:
        return
    if fmt in _FP8_DTYPE or fmt in ("int8_tensorwise", "int8_blockwise"):
        if s.dtype != "F32":
            v(Violation("wrong-scale-dtype", name_s, f"{fmt} scale is {s.dtype}, must be F32"))
    if fmt in _FP8_DTYPE:
        if not _is_scalar(s):
            v(Violation("wrong-scale-shape", name_s, f"{fmt} takes one scalar scale [], not {list(s.shape)}"))
        i = T.get(f"{layer}.input_scale")
        if i is not None and (i.dtype != "F32" or not _is_scalar(i)):
            v(Violation("wrong-scale-shape", i.name, f"input_scale must be an F32 scalar, not {i.dtype} {list(i.shape)}"))
    elif fmt == "int8_tensorwise":
        if m.get("convrot"):
            g = m.get("convrot_groupsize")
            if not (isinstance(g, int) and g >= 4 and (g & (g - 1)) == 0 and (g.bit_length() - 1) % 2 == 0):
                v(Violation("bad-convrot", f"{layer}.comfy_quant", f"convrot_groupsize {g!r} is not a power of 4"))
            elif k % g:
                v(Violation("bad-convrot", f"{layer}.comfy_quant", f"K={k} is not a multiple of convrot_groupsize {g}"))
            if list(s.shape) != [n, 1]:
                v(Violation("wrong-scale-shape", name_s, f"convrot needs a per-row scale [{n}, 1], not {list(s.shape)}"))
        elif len(s.shape) == 1 and s.shape[0] == n and n > 1:
            v(Violation("int8-scale-1d", name_s, f"1-D [{n}] int8 scale: ComfyUI breaks on it"
                        + (", or, as here with N == K, silently scales columns instead of rows" if n == k else "")
                        + f"; store it as [{n}, 1]"))
        elif not (_is_scalar(s) or list(s.shape) == [n, 1]):
            v(Violation("wrong-scale-shape", name_s, f"int8_tensorwise takes [] or [{n}, 1], not {list(s.shape)}"))
    elif fmt == "int8_blockwise":
        b = m.get("group_size")
        if not (isinstance(b, int) and b > 0):
            v(Violation("bad-marker", f"{layer}.comfy_quant", f"int8_blockwise needs an integer group_size, got {b!r}"))
        elif n % b or k % b:
            v(Violation("wrong-weight-shape", name_w, f"{n}x{k} is not divisible by group_size {b}"))
        elif list(s.shape) != [n // b, k // b]:
            v(Violation("wrong-scale-shape", name_s, f"int8_blockwise scale must be [{n // b}, {k // b}], "
                        f"not {list(s.shape)}"))
    elif fmt == "mxfp8":
        want = [_roundup(n, 128), _roundup(k // 32, 4)]
        if n % 32 or k % 32:
            v(Violation("wrong-weight-shape", name_w, f"mxfp8 weight {n}x{k} must be padded to multiples of 32"))
        if s.dtype != "U8":
            v(Violation("wrong-scale-dtype", name_s, f"mxfp8 scale is {s.dtype}; it must be U8 raw E8M0 "
                        "(ComfyUI's reader has no F8_E8M0)"))
        if list(s.shape) != want:
            v(Violation("wrong-scale-shape", name_s, f"mxfp8 swizzled scale must be {want}, not {list(s.shape)}"))
    elif fmt == "nvfp4":
        want = [_roundup(n, 128), _roundup(2 * k // 16, 4)]
        if s.dtype != "F8_E4M3":
            v(Violation("wrong-scale-dtype", name_s, f"nvfp4 block scale is {s.dtype}, must be F8_E4M3"))
        if list(s.shape) != want:
            v(Violation("wrong-scale-shape", name_s, f"nvfp4 swizzled scale must be {want}, not {list(s.shape)}"))
        s2 = T.get(f"{layer}.weight_scale_2")
        if s2 is None or s2.dtype != "F32" or not _is_scalar(s2):
            v(Violation("missing-scale", f"{layer}.weight_scale_2", "nvfp4 needs an F32 scalar weight_scale_2"))


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
