"""``int8-convrot``: INT8 per-row weights of W rotated along K by a regular Hadamard matrix (ConvRot).

On disk (ComfyUI's ``int8_tensorwise`` loader with ``"convrot": true``; comfy-kitchen
``TensorWiseINT8Layout`` with ``convrot=True, convrot_groupsize=G``):

* ``weight``: I8 [N, K] = round(R / scale), R = W rotated in groups of G (:func:`._hadamard.rotate`)
* ``weight_scale``: fp32 [N, 1] = amax(|R row|) / 127 (an all-zero row gets 1.0)
* ``.comfy_quant``: ``{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": G, ...}``

Quantization (the spec): upcast W to fp32, rotate with the fp32 butterfly, per-row
``scale = amax / 127`` (fp32 division), ``q = clamp(round_half_even(R / scale), -127, 127)``.

Dequantization (ComfyUI / comfy-kitchen eager): ``((q.float() * scale) viewed [N, K/G, G] @ H^T)``
by ``torch.matmul`` in fp32, then cast to the compute dtype. It is a BLAS matmul, so it is
bit-identical to kitchen's only on the same machine and BLAS (the butterfly gives different last
bits; the tests show it); on CUDA kitchen runs its own kernel for G in {64, 256}.

Group size (``--convrot-group-size``, default 256): a power of 4 that divides K. comfy-kitchen
accepts any power of 4 >= 4 (its eager path builds any such matrix); its CUDA dequantization kernel
covers G in {64, 256} and its fused activation-rotation kernel only G = 256, other sizes run its
eager torch code. A layer gets the largest power of 4 in [:data:`MIN_GROUP`, requested] dividing
its K (all-MiniLM-L6-v2's K = 384 takes 64), written in that layer's marker and said in the plan.

torch is imported inside the functions: the registry stays importable without it.
"""

from __future__ import annotations

from ..errors import QuantkitError
from .base import Format, LayerOpts, Stored, Violation, dtype_str, register, shape_reason
from .int8 import convrot_keys, tensorwise_checks

NAME = "int8-convrot"
COMFY_FORMAT = "int8_tensorwise"
LAYOUT = "TensorWiseINT8Layout"
DEFAULT_GROUP = 256
MIN_GROUP = 16
QMAX = 127.0


def is_power_of_4(g) -> bool:
    return isinstance(g, int) and not isinstance(g, bool) and g >= 4 and (g & (g - 1)) == 0 \
        and (g.bit_length() - 1) % 2 == 0


def choose_group_size(k: int, requested: int = DEFAULT_GROUP) -> int | None:
    """Largest power of 4 in [MIN_GROUP, requested] dividing K, or None if there is none."""
    if not (is_power_of_4(requested) and requested >= MIN_GROUP):
        raise QuantkitError(f"{NAME}: convrot group size {requested!r} is not a power of 4 >= {MIN_GROUP}",
                            fix="use 16, 64, 256 or 1024")
    g = requested
    while g >= MIN_GROUP:
        if k % g == 0:
            return g
        g //= 4
    return None


def cannot_take(shape: tuple[int, ...], group_size: int = DEFAULT_GROUP) -> str | None:
    reason = shape_reason(shape)
    if reason:
        return reason
    if choose_group_size(shape[1], group_size) is None:
        return (f"in_features {shape[1]} is not a multiple of {MIN_GROUP} (no ConvRot group size "
                f"{MIN_GROUP}..{group_size} divides it)")
    return None


def _group(shape: tuple[int, ...], group_size: int) -> int:
    reason = cannot_take(shape, group_size)
    if reason:
        raise QuantkitError(f"{NAME}: {reason}", fix="keep this layer in another format")
    return choose_group_size(shape[1], group_size)


def marker(shape: tuple[int, ...], orig_dtype, group_size: int = DEFAULT_GROUP) -> dict:
    return {"format": COMFY_FORMAT, "convrot": True, "convrot_groupsize": _group(shape, group_size),
            "orig_dtype": dtype_str(orig_dtype), "orig_shape": [int(s) for s in shape]}


def quantize(w, group_size: int = DEFAULT_GROUP) -> dict:
    """The stored tensors of W (the numerical spec)."""
    import torch

    from . import _hadamard
    from ._common import as_fp32, div
    wf = as_fp32(w, NAME)
    g = _group(tuple(wf.shape), group_size)
    r = _hadamard.rotate(wf, g)
    amax = r.abs().amax(dim=1, keepdim=True)
    scale = div(amax, QMAX)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    q = (r / scale).round().clamp(-QMAX, QMAX).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def dequantize(tensors: dict, marker: dict, dtype) -> object:
    """What ComfyUI computes (comfy-kitchen eager), in compute dtype ``dtype``."""
    import torch

    from . import _hadamard
    from ._common import orig_shape_of
    n, k = orig_shape_of(marker, NAME)
    on, g = convrot_keys(marker)
    if not on or not is_power_of_4(g) or k % g:
        raise QuantkitError(f"{NAME}: .comfy_quant convrot/convrot_groupsize {on!r}/{g!r} do not describe a "
                            f"rotation of K={k}", fix="re-convert the layer")
    q, scale = tensors["weight"], tensors["weight_scale"]
    if q.dtype != torch.int8 or tuple(q.shape) != (n, k) or tuple(scale.shape) != (n, 1):
        raise QuantkitError(f"{NAME}: weight {q.dtype} {tuple(q.shape)} / scale {tuple(scale.shape)} "
                            f"do not match I8 [{n},{k}] / [{n},1]", fix="re-convert the layer")
    x = q.float() * scale.float()
    return _hadamard.rotate_like_kitchen(x, g).to(dtype)


class Int8ConvRotFormat(Format):
    name = NAME
    comfy_format = COMFY_FORMAT
    summary = "INT8 of W rotated along K by a Hadamard matrix (ConvRot), one fp32 scale per row [N,1]"
    stock_comfy = True
    option_names = ("convrot_group_size",)
    fallback = False  # K must be a multiple of 16
    kernel = None
    native = "convrot"
    runtime_layout = LAYOUT
    weight_dtype_name = "I8"

    def option_error(self, opts: LayerOpts) -> tuple[str, str] | None:
        g = opts.convrot_group_size
        if not (is_power_of_4(g) and g >= MIN_GROUP):
            return f"--convrot-group-size {g!r} is not a power of 4 >= {MIN_GROUP}", "use 256, 64 or 16"
        return None

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        return cannot_take(shape, opts.convrot_group_size)

    def plan_note(self, shape: tuple[int, ...], opts: LayerOpts) -> str:
        g = choose_group_size(shape[1], opts.convrot_group_size)
        return "" if g == opts.convrot_group_size else \
            f"convrot group {g}: {opts.convrot_group_size} does not divide K={shape[1]}"

    def stored(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> list[Stored]:
        n, k = shape
        return [Stored("weight", "I8", (n, k)), Stored("weight_scale", "F32", (n, 1))]

    def marker(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> dict:
        return marker(shape, orig_dtype, opts.convrot_group_size)

    def describe(self) -> tuple[str, str]:
        return "I8, W rotated", "fp32 [N,1]"

    def quantize(self, w, opts: LayerOpts) -> dict:
        return quantize(w, opts.convrot_group_size)

    def quantize_native(self, w, opts: LayerOpts, out=None):
        from ..kernels import native_blocks
        return native_blocks.convrot(w, _group(tuple(w.shape), opts.convrot_group_size), out=out)

    def learn_grid(self, w, h, opts: LayerOpts, rtn: dict | None = None):
        return learn_grid(w, h, opts.convrot_group_size)

    def dequantize(self, tensors: dict, marker: dict, dtype, layer: str = "") -> object:
        from ._common import layer_dequantize
        return layer_dequantize(dequantize, tensors, marker, dtype, layer, tuple(tensors["weight"].shape))

    def recognizes(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> bool:
        return marker.get("format") == self.comfy_format and bool(convrot_keys(marker)[0])

    def check(self, layer: str, m: dict, T: dict) -> list[Violation]:
        out, nk, s = tensorwise_checks(layer, m, T)
        if nk is None:
            return out
        n, k = nk
        name_s = f"{layer}.weight_scale"
        g = convrot_keys(m)[1]
        if not is_power_of_4(g):
            out.append(Violation("bad-convrot", f"{layer}.comfy_quant", f"convrot_groupsize {g!r} is not a power of 4"))
        elif k % g:
            out.append(Violation("bad-convrot", f"{layer}.comfy_quant", f"K={k} is not a multiple of convrot_groupsize {g}"))
        if list(s.shape) != [n, 1]:
            out.append(Violation("wrong-scale-shape", name_s, f"convrot needs a per-row scale [{n}, 1], not {list(s.shape)}"))
        return out


INT8_CONVROT = register(Int8ConvRotFormat())


# ---- learned rounding's grid (quantkit.learned.learn_format) ----

class ConvRotGrid:
    """INT8 per-row grid of W rotated by the format's butterfly; the objective in the rotated
    basis (H -> B H B). Per-row scales fixed up front: per row, ``alpha * amax / 127`` for alpha in
    the learned-rounding clip grid, the alpha whose round-to-nearest error on J is lowest (rows
    are independent in J, so this is exact; alpha = 1, the format's own scale, always a candidate)."""

    block = 0

    def __init__(self, w, h, group_size: int) -> None:
        import torch
        from ._common import div

        from . import _hadamard
        from ..learned import CLIP_GRID
        wf = w.float().contiguous()
        self.g = _group(tuple(wf.shape), group_size)
        self.w = _hadamard.rotate(wf, self.g)
        self.h = _hadamard.rotate_objective(h, self.g)
        amax = self.w.abs().amax(dim=1, keepdim=True)
        best = best_obj = None
        for alpha in CLIP_GRID:
            a = amax if alpha == 1.0 else amax * alpha
            s = div(a, QMAX)
            s = torch.where(amax == 0, torch.ones_like(s), s)
            e = self.w - (self.w / s).round().clamp(-QMAX, QMAX) * s
            obj = ((e @ self.h) * e).sum(1, keepdim=True, dtype=torch.float64)
            if best is None:
                best, best_obj, clipped = s, obj, torch.zeros_like(obj, dtype=torch.bool)
            else:
                take = obj < best_obj
                best, best_obj, clipped = torch.where(take, s, best), torch.where(take, obj, best_obj), clipped | take
        self.scale = best
        self.method = "gptq+clip" if bool(clipped.any()) else "gptq"
        self.q = torch.zeros(self.w.shape, dtype=torch.int8, device=self.w.device)

    def choose(self, j0, cols) -> None:
        pass

    def round(self, j: int, col):
        import torch
        s = self.scale[:, 0]
        v = (col / s).round().clamp(-QMAX, QMAX)
        self.q[:, j] = v.to(torch.int8)
        return v * s

    def stored(self) -> dict:
        return {"weight": self.q, "weight_scale": self.scale.contiguous()}


def learn_grid(w, h, group_size: int = DEFAULT_GROUP) -> ConvRotGrid:
    return ConvRotGrid(w, h, group_size)
