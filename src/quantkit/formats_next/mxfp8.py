"""``mxfp8``: FP8 E4M3 elements with one power-of-two (E8M0) scale per 1 x 32 block.

On disk (ComfyUI's ``mxfp8`` loader; comfy-kitchen ``TensorCoreMXFP8Layout``):

* ``weight``: F8_E4M3 [Np, Kp], W zero-padded to Np = roundup(N, 32), Kp = roundup(K, 32)
* ``weight_scale``: U8 raw E8M0 bytes of the [Np, Kp/32] block scales in the cuBLAS blocked layout
  (:mod:`.blocked`), shape [roundup(Np, 128), roundup(Kp/32, 4)]; ComfyUI views it as
  ``float8_e8m0fnu`` (a byte view, so U8 and F8_E8M0 on disk load alike)
* ``.comfy_quant``: ``{"format": "mxfp8", ...}``

Quantization (the spec), per block of 32 in fp32 with amax = max |w|:

* amax = 0: e = 0 (decodes to 0), elements +0.
* otherwise ``e = ceil_exponent(amax / 448)`` (:func:`e8m0.ceil_exponent`: the smallest power of two
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
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

from . import blocked, e8m0
from ._common import as_fp32, base_marker, orig_shape_of, pad_to, roundup, shape_reason

NAME = "mxfp8"
COMFY_FORMAT = "mxfp8"
LAYOUT = "TensorCoreMXFP8Layout"
BLOCK = 32
QMAX = 448.0


def cannot_take(shape: tuple[int, ...], **_: object) -> str | None:
    return shape_reason(shape)


def marker(shape: tuple[int, ...], orig_dtype: torch.dtype, **_: object) -> dict:
    return base_marker(COMFY_FORMAT, shape, orig_dtype)


def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    wf = pad_to(as_fp32(w, NAME), BLOCK)
    rows, cols = wf.shape
    x = wf.reshape(rows, cols // BLOCK, BLOCK)
    amax = x.abs().amax(dim=-1)
    zero = amax == 0
    e = e8m0.ceil_exponent(torch.where(zero, torch.ones_like(amax), amax) / torch.full_like(amax, QMAX))
    e = torch.where(zero, torch.zeros_like(e), e).to(torch.uint8)
    s = e8m0.decode(torch.where(zero, torch.full_like(e, 127), e))[..., None]  # 1.0 for zero blocks
    q = (x / s).clamp(-QMAX, QMAX).to(torch.float8_e4m3fn)
    return {"weight": q.reshape(rows, cols), "weight_scale": blocked.swizzle(e)}


def dequantize(tensors: dict[str, torch.Tensor], marker: dict, dtype: torch.dtype) -> torch.Tensor:
    n, k = orig_shape_of(marker, NAME)
    q, s = tensors["weight"], tensors["weight_scale"]
    rows, cols = roundup(n, BLOCK), roundup(k, BLOCK)
    if q.dtype != torch.float8_e4m3fn or tuple(q.shape) != (rows, cols):
        raise QuantkitError(f"{NAME}: weight {q.dtype} {tuple(q.shape)} is not F8_E4M3 [{rows},{cols}] "
                            f"for a {n}x{k} layer", fix="re-convert the layer")
    if s.dtype not in (torch.uint8, torch.float8_e8m0fnu) or tuple(s.shape) != blocked.blocked_shape(rows, cols // BLOCK):
        raise QuantkitError(f"{NAME}: weight_scale {s.dtype} {tuple(s.shape)} is not U8 "
                            f"{list(blocked.blocked_shape(rows, cols // BLOCK))}", fix="re-convert the layer")
    e = blocked.unswizzle(s.view(torch.uint8), rows, cols // BLOCK)
    x = q.float().reshape(rows, cols // BLOCK, BLOCK) * e8m0.decode(e)[..., None]
    return x.reshape(rows, cols).to(dtype)[:n, :k]
