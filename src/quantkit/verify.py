"""``quantkit verify``: the contract checks of :mod:`quantkit.inspection`, plus, with
``--against ORIGINAL``, per-layer SQNR of what ComfyUI would compute (dequantized in fp32) against
the original weights, and a floor (``--min-sqnr``). Works on files from other tools.

SQNR is computed for every layer a registered format recognizes (:func:`quantkit.formats.format_of_marker`),
from that format's own ``dequantize``. Other layers (formats no module reads yet) are listed with
"not computed"; that is not a violation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .formats import scaled
from .errors import UsageError
from .formats import QUANT_SUFFIXES, format_of_marker, shapes_by_layer
from .inspection import Inspection, Violation, inspect_reader
from .safetensors_io import SafetensorsReader


@dataclass
class LayerCheck:
    name: str  # tensor name in the output
    format: str | None  # .comfy_quant format, None for a tensor stored unquantized
    sqnr_db: float | None
    note: str = ""
    seconds: float = 0.0


@dataclass
class VerifyReport:
    path: str
    against: str | None
    min_sqnr: float | None
    inspection: Inspection
    layers: list[LayerCheck] = field(default_factory=list)
    identical: int = 0  # unquantized tensors bit-identical to the original
    violations: list[Violation] = field(default_factory=list)  # the inspection's, then verify's own
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"path": self.path, "against": self.against, "min_sqnr_db": self.min_sqnr, "ok": self.ok,
                "identical_tensors": self.identical, "seconds": self.seconds,
                "inspection": self.inspection.to_dict(),
                "layers": [{"name": c.name, "format": c.format, "sqnr_db": c.sqnr_db, "note": c.note,
                            "seconds": c.seconds} for c in self.layers],
                "violations": [{"rule": v.rule, "tensor": v.tensor, "message": v.message} for v in self.violations]}


def verify(path: str | Path, against: str | Path | None = None, min_sqnr: float | None = None) -> VerifyReport:
    if min_sqnr is not None and against is None:
        raise UsageError("--min-sqnr needs --against ORIGINAL to compare with", fix="add --against input.safetensors")
    t0 = time.perf_counter()
    with SafetensorsReader(path) as out:
        ins = inspect_reader(out)
        rep = VerifyReport(str(path), None if against is None else str(against), min_sqnr, ins,
                           violations=list(ins.violations))
        if against is not None:
            with SafetensorsReader(against) as src:
                _compare(out, src, rep)
    rep.seconds = time.perf_counter() - t0
    return rep


def _compare(out: SafetensorsReader, src: SafetensorsReader, rep: VerifyReport) -> None:
    v = rep.violations.append
    bad_layers = {(x.tensor or "").rsplit(".", 1)[0] for x in rep.violations}
    markers = rep.inspection.markers
    by_layer = shapes_by_layer(out.tensors)
    for name in src.tensors:
        if name not in out.tensors:
            v(Violation("missing-tensor", name, f"in the original but not in the output ({src.path})"))
    for name, t in out.tensors.items():
        if name.endswith(QUANT_SUFFIXES):
            continue
        layer = name.removesuffix(".weight")
        o = src.tensors.get(name)
        t0 = time.perf_counter()
        if name.endswith(".weight") and layer in markers:
            fmt = markers[layer]["format"]
            if o is None:
                v(Violation("not-in-original", name, f"quantized layer has no {name} in {src.path}"))
                continue
            shapes = by_layer.get(layer, {})
            how = format_of_marker(markers[layer], shapes)
            if how is not None and tuple(o.shape) != how.orig_shape(markers[layer], shapes):
                v(Violation("shape-mismatch", name, f"{list(how.orig_shape(markers[layer], shapes))} here, "
                            f"{list(o.shape)} in the original"))
                continue
            if how is None or layer in bad_layers:
                why = "contract violation above" if layer in bad_layers else f"quantkit does not dequantize {fmt}" + (
                    " with convrot" if markers[layer].get("convrot") else "")
                rep.layers.append(LayerCheck(name, fmt, None, f"SQNR not computed ({why})"))
                continue
            stored = {suffix: out.tensor(f"{layer}.{suffix}") for suffix in shapes}
            deq = how.dequantize(stored, markers[layer], torch.float32, layer)
            check = LayerCheck(name, fmt, scaled.sqnr(src.tensor(name), deq))
        elif o is None:
            continue  # an extra tensor the output adds (not a violation)
        elif o.dtype == t.dtype and o.shape == t.shape and out.buffer(name) == src.buffer(name):
            rep.identical += 1
            continue
        elif t.dtype in ("F32", "F16", "BF16") and o.dtype in ("F32", "F16", "BF16") and o.shape == t.shape \
                and len(t.shape) >= 1 and t.numel:
            a, b_ = src.tensor(name).reshape(t.shape[0], -1), out.tensor(name).reshape(t.shape[0], -1)
            check = LayerCheck(name, None, scaled.sqnr(a, b_), f"stored unquantized but changed ({o.dtype} -> {t.dtype})")
        else:
            v(Violation("changed-tensor", name, f"differs from the original ({o.dtype} {list(o.shape)} -> "
                        f"{t.dtype} {list(t.shape)})"))
            continue
        check.seconds = time.perf_counter() - t0
        rep.layers.append(check)
        if rep.min_sqnr is not None and check.sqnr_db is not None and check.sqnr_db < rep.min_sqnr:
            v(Violation("below-min-sqnr", name, f"SQNR {check.sqnr_db:.2f} dB is under --min-sqnr {rep.min_sqnr:g} dB"))
        out.release(name)
        src.release(name)


__all__ = ["verify", "VerifyReport", "LayerCheck"]
