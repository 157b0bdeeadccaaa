"""Contract checks for ComfyUI format strings no registered format writes (``inspect`` / ``verify``
check other tools' files too). Every stock ComfyUI format quantkit reads has its own module now
(mxfp8 and nvfp4 moved out of here); other strings get the 2-D check. A format string that gets a
specific check before it has a module adds an entry to :data:`CHECKS`."""

from __future__ import annotations

from .base import Violation


def _generic(layer: str, m: dict, T: dict) -> list[Violation]:
    w = T[f"{layer}.weight"]
    if len(w.shape) != 2:
        return [Violation("wrong-weight-shape", w.name, f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")]
    return []


# comfy "format" string -> check(layer, marker, T); other unregistered strings get the 2-D check only
CHECKS: dict = {}
GENERIC = _generic
