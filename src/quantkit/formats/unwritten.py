"""Contract checks for stock ComfyUI formats no registered format writes yet (``inspect`` /
``verify`` check other tools' files too). When a format module for one of these lands, its check
moves into that module and its entry here goes."""

from __future__ import annotations

from .base import Violation


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def _mxfp8(layer: str, m: dict, T: dict) -> list[Violation]:
    out = []
    w, s = T[f"{layer}.weight"], T.get(f"{layer}.weight_scale")
    if w.dtype == "U8":
        out.append(Violation("uint8-stored-fp8", w.name, "mxfp8 weight stored as U8: the loader converts by value, "
                             "so every weight becomes garbage (store it as F8_E4M3)"))
    elif w.dtype != "F8_E4M3":
        out.append(Violation("wrong-weight-dtype", w.name, f"mxfp8 weight is {w.dtype}, must be F8_E4M3"))
    if len(w.shape) != 2:
        return out + [Violation("wrong-weight-shape", w.name,
                                f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")]
    n, k = w.shape
    if s is None:
        return out + [Violation("missing-scale", w.name, f"mxfp8 needs {layer}.weight_scale; ComfyUI crashes "
                                "at the layer's first use")]
    want = [_roundup(n, 128), _roundup(k // 32, 4)]
    if n % 32 or k % 32:
        out.append(Violation("wrong-weight-shape", w.name, f"mxfp8 weight {n}x{k} must be padded to multiples of 32"))
    if s.dtype != "U8":
        out.append(Violation("wrong-scale-dtype", s.name, f"mxfp8 scale is {s.dtype}; it must be U8 raw E8M0 "
                             "(ComfyUI's reader has no F8_E8M0)"))
    if list(s.shape) != want:
        out.append(Violation("wrong-scale-shape", s.name, f"mxfp8 swizzled scale must be {want}, not {list(s.shape)}"))
    return out


def _nvfp4(layer: str, m: dict, T: dict) -> list[Violation]:
    out = []
    w, s = T[f"{layer}.weight"], T.get(f"{layer}.weight_scale")
    if w.dtype != "U8":
        out.append(Violation("wrong-weight-dtype", w.name, f"nvfp4 weight is {w.dtype}, must be U8 (two E2M1 per byte)"))
    if len(w.shape) != 2:
        return out + [Violation("wrong-weight-shape", w.name,
                                f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")]
    n, k = w.shape
    if s is None:
        return out + [Violation("missing-scale", w.name, f"nvfp4 needs {layer}.weight_scale; ComfyUI crashes "
                                "at the layer's first use")]
    want = [_roundup(n, 128), _roundup(2 * k // 16, 4)]
    if s.dtype != "F8_E4M3":
        out.append(Violation("wrong-scale-dtype", s.name, f"nvfp4 block scale is {s.dtype}, must be F8_E4M3"))
    if list(s.shape) != want:
        out.append(Violation("wrong-scale-shape", s.name, f"nvfp4 swizzled scale must be {want}, not {list(s.shape)}"))
    s2 = T.get(f"{layer}.weight_scale_2")
    if s2 is None or s2.dtype != "F32" or not (s2.numel == 1 and len(s2.shape) <= 1):
        out.append(Violation("missing-scale", f"{layer}.weight_scale_2", "nvfp4 needs an F32 scalar weight_scale_2"))
    return out


def _generic(layer: str, m: dict, T: dict) -> list[Violation]:
    w = T[f"{layer}.weight"]
    if len(w.shape) != 2:
        return [Violation("wrong-weight-shape", w.name, f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")]
    return []


# comfy "format" string -> check(layer, marker, T); other unregistered strings get the 2-D check only
CHECKS = {"mxfp8": _mxfp8, "nvfp4": _nvfp4}
GENERIC = _generic
