"""``mxfp8``: FP8 E4M3 elements with one power-of-two (E8M0) scale per 1 x 32 block.

On disk (ComfyUI's ``mxfp8`` loader; comfy-kitchen ``TensorCoreMXFP8Layout``):

* ``weight``: F8_E4M3 [Np, Kp], W zero-padded to Np = roundup(N, 32), Kp = roundup(K, 32)
* ``weight_scale``: U8 raw E8M0 bytes of the [Np, Kp/32] block scales in the cuBLAS blocked layout
  (:mod:`._blocked`), shape [roundup(Np, 128), roundup(Kp/32, 4)]; ComfyUI views it as
  ``float8_e8m0fnu`` (a byte view, so U8 and F8_E8M0 on disk load alike)
* ``.comfy_quant``: ``{"format": "mxfp8", ...}``

Quantization (the spec), per block of 32 in fp32 with amax = max |w|:

* amax = 0: e = 0 (decodes to 0), elements +0.
* otherwise ``e = ceil_exponent(amax / 448)`` (:func:`._e8m0.ceil_exponent`: the smallest power of two
  that holds the block without clipping, read off the fp32 bits, at least 1) and
  ``q = e4m3(clamp(w / 2^(e-127), -448, 448))`` (round to nearest even by the cast).

This is comfy-kitchen's quantizer, byte for byte, except in two kinds of blocks:

* 0 < amax / 448 <= 2^-127: kitchen stores e = 0 there, which decodes to 0 (and its 0/0 turns the
  block's zero elements into NaN); we store e = 1.
* amax / 448 within about 2^-20 (relative) above a power of two: kitchen takes ``ceil(log2(.))`` in
  fp32, whose log2 rounds to the integer, so it picks the power of two below and clips the block's
  largest element to 448 (by ~1e-7 relative); the exact ceiling here does not clip.

Other exponent rules were measured on all-MiniLM-L6-v2 (bf16, 37 linears) and gain nothing: one
exponent lower where that lowers the block's squared error, 0.0000 dB on every layer; the smallest
exponent with amax <= 464 * 2^(e-127) (464 is the rounding boundary above 448, so no element's error
grows), which changes 4.9% of the blocks, 0.0000 dB. Halving a block's scale only refines elements in
E4M3's subnormal range (below 2^-15 of the block maximum), which real weights barely reach.

Dequantization (comfy-kitchen eager): ``q.float() * 2^(e-127)`` per block in fp32 (e = 0 -> 0), cast
to the compute dtype, cut to [N, K].

torch is imported inside the functions: the registry stays importable without it.
"""

from __future__ import annotations

from ..errors import QuantkitError
from .base import (Format, LayerOpts, Stored, Violation, blocked_scale_shape, padded_2d, plain_marker, register,
                   roundup, shape_reason)

NAME = "mxfp8"
COMFY_FORMAT = "mxfp8"
LAYOUT = "TensorCoreMXFP8Layout"
BLOCK = 32
QMAX = 448.0


def padded_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return padded_2d(shape, BLOCK)


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return blocked_scale_shape(padded_shape(shape), BLOCK)


def cannot_take(shape: tuple[int, ...], **_: object) -> str | None:
    return shape_reason(shape)


def marker(shape: tuple[int, ...], orig_dtype, **_: object) -> dict:
    return plain_marker(COMFY_FORMAT, shape, orig_dtype)


def quantize_blocks(x):
    """fp32 [R, B, 32] blocks -> (F8_E4M3 q [R, B, 32], uint8 E8M0 exponents [R, B]): the spec."""
    import torch
    from ._common import div

    from . import _e8m0
    amax = x.abs().amax(dim=-1)
    zero = amax == 0
    e = _e8m0.ceil_exponent(div(torch.where(zero, torch.ones_like(amax), amax), QMAX))
    e = torch.where(zero, torch.zeros_like(e), e).to(torch.uint8)
    s = _e8m0.decode(torch.where(zero, torch.full_like(e, 127), e))[..., None]  # 1.0 for zero blocks
    return (x / s).clamp(-QMAX, QMAX).to(torch.float8_e4m3fn), e


def quantize(w) -> dict:
    """The stored tensors of W (the numerical spec)."""
    import torch

    from . import _blocked
    from ._common import as_fp32
    wf = as_fp32(w, NAME)
    n, k = wf.shape
    rows, cols = padded_shape((n, k))
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn, device=wf.device)  # padded rows: +0, scale 0
    e = torch.zeros(rows, cols // BLOCK, dtype=torch.uint8, device=wf.device)
    # in row chunks: each block's math is independent of the others, so the bytes do not depend on
    # the chunking; a chunk's fp32 temporaries stay near the cache
    step = max(1, (1 << 18) // max(cols, 1))
    for i in range(0, n, step):
        j = min(n, i + step)
        x = wf[i:j]
        if cols > k:
            x = torch.nn.functional.pad(x, (0, cols - k))  # zero columns: the tail block's padding
        qi, ei = quantize_blocks(x.reshape(j - i, cols // BLOCK, BLOCK))
        q[i:j] = qi.reshape(j - i, cols)
        e[i:j] = ei
    return {"weight": q, "weight_scale": _blocked.swizzle(e)}


def dequantize(tensors: dict, marker: dict, dtype) -> object:
    """What ComfyUI computes (comfy-kitchen eager), in compute dtype ``dtype``, cut to [N, K]."""
    import torch

    from . import _blocked, _e8m0
    from ._common import orig_shape_of
    n, k = orig_shape_of(marker, NAME)
    q, s = tensors["weight"], tensors["weight_scale"]
    rows, cols = padded_shape((n, k))
    if q.dtype != torch.float8_e4m3fn or tuple(q.shape) != (rows, cols):
        raise QuantkitError(f"{NAME}: weight {q.dtype} {tuple(q.shape)} is not F8_E4M3 [{rows},{cols}] "
                            f"for a {n}x{k} layer", fix="re-convert the layer")
    if s.dtype not in (torch.uint8, torch.float8_e8m0fnu) or tuple(s.shape) != scale_shape((n, k)):
        raise QuantkitError(f"{NAME}: weight_scale {s.dtype} {tuple(s.shape)} is not U8 "
                            f"{list(scale_shape((n, k)))}", fix="re-convert the layer")
    e = _blocked.unswizzle(s.view(torch.uint8), rows, cols // BLOCK)
    x = q.float().reshape(rows, cols // BLOCK, BLOCK) * _e8m0.decode(e)[..., None]
    return x.reshape(rows, cols).to(dtype)[:n, :k]


class MXFP8Format(Format):
    name = NAME
    comfy_format = COMFY_FORMAT
    summary = "FP8 E4M3 padded to 32, one power-of-two (E8M0) scale per 1x32 block"
    stock_comfy = True
    fallback = True  # padding takes every 2-D shape
    kernel = None
    native = "mxfp8"
    triton = "mxfp8"
    runtime_layout = LAYOUT
    weight_dtype_name = "F8_E4M3"

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        return cannot_take(shape)

    def stored(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> list[Stored]:
        return [Stored("weight", "F8_E4M3", padded_shape(shape)), Stored("weight_scale", "U8", scale_shape(shape))]

    def marker(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> dict:
        return marker(shape, orig_dtype)

    def describe(self) -> tuple[str, str]:
        return "F8_E4M3, pad 32", "U8 E8M0 1x32"

    def quantize(self, w, opts: LayerOpts) -> dict:
        return quantize(w)

    def learn_grid(self, w, h, opts: LayerOpts, rtn: dict | None = None):
        return learn_grid(w, h)

    def dequantize(self, tensors: dict, marker: dict, dtype, layer: str = "") -> object:
        from ._common import layer_dequantize
        return layer_dequantize(dequantize, tensors, marker, dtype, layer, tuple(tensors["weight"].shape))

    def orig_shape(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        o = marker.get("orig_shape")
        return tuple(o) if isinstance(o, (list, tuple)) else tuple(shapes["weight"])

    def check(self, layer: str, m: dict, T: dict) -> list[Violation]:
        out = []
        w, s = T[f"{layer}.weight"], T.get(f"{layer}.weight_scale")
        if w.dtype == "U8":
            out.append(Violation("uint8-stored-fp8", w.name, "mxfp8 weight stored as U8: the loader converts by "
                                 "value, so every weight becomes garbage (store it as F8_E4M3)"))
        elif w.dtype != "F8_E4M3":
            out.append(Violation("wrong-weight-dtype", w.name, f"mxfp8 weight is {w.dtype}, must be F8_E4M3"))
        if len(w.shape) != 2:
            return out + [Violation("wrong-weight-shape", w.name,
                                    f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")]
        n, k = w.shape
        if s is None:
            return out + [Violation("missing-scale", w.name, f"mxfp8 needs {layer}.weight_scale; ComfyUI crashes "
                                    "at the layer's first use")]
        if n % BLOCK or k % BLOCK:
            out.append(Violation("wrong-weight-shape", w.name, f"mxfp8 weight {n}x{k} must be padded to multiples of 32"))
        orig = m.get("orig_shape")
        if isinstance(orig, (list, tuple)) and len(orig) == 2 and all(isinstance(x, int) for x in orig) \
                and padded_shape(tuple(orig)) != (n, k):
            out.append(Violation("orig-shape-mismatch", f"{layer}.comfy_quant",
                                 f"orig_shape {list(orig)} pads to {list(padded_shape(tuple(orig)))}, but the weight "
                                 f"is {[n, k]}"))
        if s.dtype != "U8":
            out.append(Violation("wrong-scale-dtype", s.name, f"mxfp8 scale is {s.dtype}; it must be U8 raw E8M0 "
                                 "(ComfyUI's reader has no F8_E8M0)"))
        want = [roundup(n, 128), roundup(k // BLOCK, 4)]
        if list(s.shape) != want:
            out.append(Violation("wrong-scale-shape", s.name, f"mxfp8 swizzled scale must be {want}, not {list(s.shape)}"))
        return out


MXFP8 = register(MXFP8Format())


# ---- learned rounding's grid (quantkit.learned.learn_format) ----

class MXFP8Grid:
    """E4M3 elements with 1 x 32 E8M0 block exponents by the spec's rule (:func:`quantize_blocks`).

    ``with_rounding=False`` (the default): the exponents are the format's own, from W, fixed up
    front, and columns go by decreasing H_kk (act order). ``with_rounding=True``: each block's
    exponent is chosen from the error-updated weights when learned rounding reaches the block's
    first column (natural column order). Measured on all-MiniLM-L6-v2 (held-out mean 1-cos,
    learned + bias correction, RTN 1.607e-3): fixed + act order 7.77e-4 at damping 0.3 (8.14e-4 at
    1.0, 8.13e-4 at 0.1), chosen with the rounding 9.24e-4 at 0.3 (9.42e-4 at 1.0). The exponent
    rule leaves one choice per block that does not clip, and one exponent lower (clipping the block
    maximum) never won on the diagonal-H error, so the column order is what matters here."""

    damping = 0.3  # relative to mean(diag H); see the measurement above

    def __init__(self, w, h, with_rounding: bool = False) -> None:
        import torch

        from . import _e8m0
        self.w, self.h = w.float().contiguous(), h.float()
        self.n, self.k = self.w.shape
        rows, cols = padded_shape((self.n, self.k))
        self.q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn, device=self.w.device)
        self.e = torch.zeros(rows, cols // BLOCK, dtype=torch.uint8, device=self.w.device)
        self.s = None
        self.block = BLOCK if with_rounding else 0
        self.method = "gptq (block scales chosen with the rounding)" if with_rounding else "gptq"
        if not with_rounding:
            x = self.w if cols == self.k else torch.nn.functional.pad(self.w, (0, cols - self.k))
            _, e = quantize_blocks(x.reshape(self.n, cols // BLOCK, BLOCK))
            self.e[:self.n] = e
            self.s_all = _e8m0.decode(e).repeat_interleave(BLOCK, dim=1)[:, :self.k]  # [N, K]

    def choose(self, j0: int, cols) -> None:
        import torch

        from . import _e8m0
        x = cols
        if x.shape[1] < BLOCK:
            x = torch.nn.functional.pad(x, (0, BLOCK - x.shape[1]))
        _, e = quantize_blocks(x.reshape(self.n, 1, BLOCK))
        e = e[:, 0]
        self.e[:self.n, j0 // BLOCK] = e
        self.s = _e8m0.decode(e)  # 0 for a zero block: its elements decode to 0 whatever they are

    def round(self, j: int, col):
        import torch
        s = self.s if self.block else self.s_all[:, j]
        safe = torch.where(s == 0, torch.ones_like(s), s)
        v = (col / safe).clamp(-QMAX, QMAX).to(torch.float8_e4m3fn)
        v = torch.where(s == 0, torch.zeros_like(v), v)
        self.q[:self.n, j] = v
        return v.float() * s

    def stored(self) -> dict:
        from . import _blocked
        return {"weight": self.q, "weight_scale": _blocked.swizzle(self.e)}


def learn_grid(w, h, with_rounding: bool = False) -> MXFP8Grid:
    return MXFP8Grid(w, h, with_rounding)
