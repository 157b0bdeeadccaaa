"""``int8-block``: INT8 symmetric with one fp32 scale per b x b tile, ``[N/b, K/b]``, marker
``int8_blockwise`` with ``group_size: b``. Stock ComfyUI lacks it: it loads through quantkit's node
(or another that registers int8_blockwise). L.input_scale 1.0 is written, as the block-wise node's
loader reads it."""

from __future__ import annotations

from ..errors import QuantkitError
from .base import LayerOpts, Violation, register
from .scaled import ScaledFormat


class Int8BlockFormat(ScaledFormat):
    granularity = "block"
    option_names = ("block_size",)

    def option_error(self, opts: LayerOpts) -> tuple[str, str] | None:
        b = opts.block_size
        if b & (b - 1):
            return f"--block-size {b} is not a power of two", "use 128 or 64"
        return None

    def block_size(self, opts: LayerOpts) -> int:
        return opts.block_size

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        if len(shape) != 2:
            return f"{len(shape)}-D weight, format needs 2-D"
        n, k = shape
        b = opts.block_size
        if n % b or k % b:
            return f"shape {n}x{k} not divisible by block size {b}"
        return None

    def marker(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> dict:
        m = super().marker(shape, orig_dtype, opts)
        return {"format": m.pop("format"), "group_size": opts.block_size, **m}

    def layer_block_size(self, layer: str, marker: dict, shapes: dict[str, tuple[int, ...]]) -> int:
        return block_size_of(layer, marker, shapes["weight"], shapes.get("weight_scale", ()))

    def check(self, layer: str, m: dict, T: dict) -> list[Violation]:
        out = []
        w, s = T[f"{layer}.weight"], T.get(f"{layer}.weight_scale")
        name_w, name_s = w.name, f"{layer}.weight_scale"
        if w.dtype != "I8":
            out.append(Violation("wrong-weight-dtype", name_w, f"int8_blockwise weight is {w.dtype}, must be I8"))
        if len(w.shape) != 2:
            return out + [Violation("wrong-weight-shape", name_w,
                                    f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")]
        n, k = w.shape
        orig = m.get("orig_shape")
        if orig is not None and list(orig) != [n, k]:
            out.append(Violation("orig-shape-mismatch", f"{layer}.comfy_quant", f"orig_shape {orig} but the weight is {[n, k]}"))
        if s is None:
            return out + [Violation("missing-scale", name_w, f"int8_blockwise needs {name_s}; ComfyUI crashes "
                                    "at the layer's first use")]
        if s.dtype != "F32":
            out.append(Violation("wrong-scale-dtype", name_s, f"int8_blockwise scale is {s.dtype}, must be F32"))
        b = m.get("group_size")
        if not (isinstance(b, int) and b > 0):
            out.append(Violation("bad-marker", f"{layer}.comfy_quant", f"int8_blockwise needs an integer group_size, got {b!r}"))
        elif n % b or k % b:
            out.append(Violation("wrong-weight-shape", name_w, f"{n}x{k} is not divisible by group_size {b}"))
        elif list(s.shape) != [n // b, k // b]:
            out.append(Violation("wrong-scale-shape", name_s, f"int8_blockwise scale must be [{n // b}, {k // b}], "
                                 f"not {list(s.shape)}"))
        return out


def block_size_of(layer: str, conf: dict, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> int:
    """The tile size b of a block-wise layer read from a file, checked against both shapes: ``group_size``
    of its ``.comfy_quant`` (``conf``), else read off the two shapes (a state dict ComfyUI itself
    saved has none). Raises :class:`QuantkitError` naming the layer's offending tensor. Used by every
    loader of int8-block files (the runtime, the ComfyUI node)."""
    if len(weight_shape) != 2:
        raise QuantkitError(f"int8_blockwise weight is {len(weight_shape)}-D {list(weight_shape)}, needs 2-D [N, K]",
                            tensor=f"{layer}.weight", fix="only linear layers can be stored int8_blockwise")
    n, k = weight_shape
    if len(scale_shape) != 2 or 0 in scale_shape:
        raise QuantkitError(f"weight_scale has shape {list(scale_shape)}, needs a 2-D grid [N/b, K/b]",
                            tensor=f"{layer}.weight_scale", fix="re-convert the layer with quantkit")
    b = conf.get("group_size")
    if b is None:
        if n % scale_shape[0] or k % scale_shape[1] or n // scale_shape[0] != k // scale_shape[1]:
            raise QuantkitError(f"no group_size in .comfy_quant and weight {n}x{k} / scale "
                                f"{scale_shape[0]}x{scale_shape[1]} give no square tile",
                                tensor=f"{layer}.comfy_quant", fix="re-convert the layer with quantkit")
        b = n // scale_shape[0]
    if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
        raise QuantkitError(f"group_size {b!r} is not a positive integer", tensor=f"{layer}.comfy_quant",
                            fix="re-convert the layer with quantkit")
    if n % b or k % b or tuple(scale_shape) != (n // b, k // b):
        raise QuantkitError(f"weight {n}x{k} with group_size {b} needs weight_scale [{n // b}, {k // b}] "
                            f"(N and K divisible by {b}), found {list(scale_shape)}",
                            tensor=f"{layer}.weight_scale", fix="re-convert the layer with quantkit")
    return b


INT8_BLOCK = register(Int8BlockFormat("int8-block", "int8_blockwise", "I8", 127.0,
                                      "INT8 symmetric, one fp32 scale per b x b tile [N/b,K/b]",
                                      stock_comfy=False, writes_input_scale=True, runtime_layout="BlockWiseINT8Layout",
                                      node_target="int8_blockwise"))
