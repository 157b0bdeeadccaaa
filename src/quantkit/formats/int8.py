"""INT8 symmetric with fp32 scales under ComfyUI's ``int8_tensorwise``: ``int8-tensor`` (one scale
``[]``) and ``int8-row`` (one per output row, ``[N, 1]``). Stock ComfyUI loads both and reads no
input_scale. The two share a comfy string; a file's layer is one or the other by its scale's shape.
ConvRot layers (``convrot`` marker keys) are :mod:`.int8_convrot`'s."""

from __future__ import annotations

from .base import Violation, register
from .fp8 import is_scalar
from .scaled import ScaledFormat


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def convrot_keys(m: dict) -> tuple[object, object]:
    """(convrot, convrot_groupsize) of a marker; ComfyUI also reads them from a nested ``params``."""
    p = m.get("params") if isinstance(m.get("params"), dict) else {}
    return m.get("convrot", p.get("convrot")), m.get("convrot_groupsize", p.get("convrot_groupsize"))


def tensorwise_checks(layer: str, m: dict, T: dict) -> tuple[list[Violation], tuple[int, int] | None, object]:
    """The checks every ``int8_tensorwise`` layer shares (plain and ConvRot): I8 2-D weight, its
    ``orig_shape``, an F32 scale. Returns the violations, the weight's [N, K] (None where the layer's
    own checks cannot go on) and the scale's info."""
    out = []
    w, s = T[f"{layer}.weight"], T.get(f"{layer}.weight_scale")
    if w.dtype != "I8":
        out.append(Violation("wrong-weight-dtype", w.name, f"int8_tensorwise weight is {w.dtype}, must be I8"))
    if len(w.shape) != 2:
        return out + [Violation("wrong-weight-shape", w.name,
                                f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")], None, s
    n, k = w.shape
    orig = m.get("orig_shape")
    if orig is not None and list(orig) != [n, k]:
        out.append(Violation("orig-shape-mismatch", f"{layer}.comfy_quant", f"orig_shape {orig} but the weight is {[n, k]}"))
    if s is None:
        return out + [Violation("missing-scale", w.name, f"int8_tensorwise needs {layer}.weight_scale; ComfyUI "
                                "crashes at the layer's first use")], None, s
    if s.dtype != "F32":
        out.append(Violation("wrong-scale-dtype", f"{layer}.weight_scale", f"int8_tensorwise scale is {s.dtype}, must be F32"))
    return out, (n, k), s


class Int8TensorwiseFormat(ScaledFormat):
    fallback = True

    def __init__(self, name: str, granularity: str, summary: str, node_target: str):
        super().__init__(name, "int8_tensorwise", "I8", 127.0, summary, stock_comfy=True,
                         writes_input_scale=False, runtime_layout="TensorWiseINT8Layout", node_target=node_target)
        self.granularity = granularity

    def recognizes(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> bool:
        if marker.get("format") != self.comfy_format or convrot_keys(marker)[0]:
            return False
        s = tuple(shapes.get("weight_scale", ()))
        if self.granularity == "tensor":
            return _numel(s) == 1
        return len(s) == 2 and s[1] == 1

    def check(self, layer: str, m: dict, T: dict) -> list[Violation]:
        out, nk, s = tensorwise_checks(layer, m, T)
        if nk is None:
            return out
        n, k = nk
        name_s = f"{layer}.weight_scale"
        if len(s.shape) == 1 and s.shape[0] == n and n > 1:
            out.append(Violation("int8-scale-1d", name_s, f"1-D [{n}] int8 scale: ComfyUI breaks on it"
                                 + (", or, as here with N == K, silently scales columns instead of rows" if n == k else "")
                                 + f"; store it as [{n}, 1]"))
        elif not (is_scalar(s) or list(s.shape) == [n, 1]):
            out.append(Violation("wrong-scale-shape", name_s, f"int8_tensorwise takes [] or [{n}, 1], not {list(s.shape)}"))
        return out


INT8_TENSOR = register(Int8TensorwiseFormat("int8-tensor", "tensor", "INT8 symmetric, one fp32 scale per tensor",
                                            "int8_tensorwise"))
INT8_ROW = register(Int8TensorwiseFormat("int8-row", "row", "INT8 symmetric, one fp32 scale per output row [N,1]",
                                         "int8_rowwise"))
