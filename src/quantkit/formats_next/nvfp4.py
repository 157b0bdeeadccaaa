"""``nvfp4``: FP4 E2M1 elements, one FP8 E4M3 scale per 1 x 16 block, one fp32 scale per tensor.

On disk (ComfyUI's ``nvfp4`` loader; comfy-kitchen ``TensorCoreNVFP4Layout``):

* ``weight``: U8 [Np, Kp/2], W zero-padded to Np = roundup(N, 16), Kp = roundup(K, 16); two E2M1
  codes a byte, the even column in the HIGH nibble (:mod:`.e2m1`)
* ``weight_scale``: F8_E4M3 [Np, Kp/16] block scales in the cuBLAS blocked layout (:mod:`.blocked`),
  shape [roundup(Np, 128), roundup(Kp/16, 4)]
* ``weight_scale_2``: fp32 scalar ``[]`` = amax(|W|) / (448 * 6) (1.0 for an all-zero W)
* ``input_scale``: fp32 scalar, only when given (a calibration result; ComfyUI quantizes activations
  with it on Blackwell GPUs)
* ``.comfy_quant``: ``{"format": "nvfp4", ...}``

Quantization (the spec), all fp32, per block of 16 with amax_b = max |w| and g = weight_scale_2:

* ``b = clamp((amax_b / 6) / g, max=448)``; comfy-kitchen stores ``c0 = e4m3(b)`` (round to nearest
  even by the cast).
* with ``scale_search`` the candidates are the E4M3 values whose codes are ``code(c0) + o`` for o in
  :data:`SEARCH_OFFSETS` (kept within 1..0x7E, i.e. positive and <= 448); each candidate c quantizes
  ``e2m1(clamp(w / (g * c), -6, 6))``; the candidate with the smallest block squared error
  ``sum (w - v * (g * c))^2`` (v the E2M1 value; fp32 terms squared in fp64, fixed pairwise tree)
  wins, ties to the earlier offset in the list (o = 0 first: comfy-kitchen's choice).
* a block whose stored scale is 0 (amax_b = 0, or b below E4M3's smallest subnormal) stores +0 codes.

The search (default on) is still round-to-nearest for every element, only with a better block scale;
offsets +4..+6 are the scales that put the block's amax on 4 instead of 6. Measured on
all-MiniLM-L6-v2 (bf16, 37 linears): +1.18..+1.37 dB per layer over comfy-kitchen's quantizer (mean
21.80 vs 20.50 dB); held-out sentence embeddings, mean 1-cos 2.015e-2 vs 2.251e-2. The error it
minimises is the fp32 dequantization's; kitchen's quantizer (an all-zero W gives g = 0 and NaN
block scales there) is matched byte for byte with ``scale_search=False`` otherwise.

Dequantization (comfy-kitchen eager), in the compute dtype D: ``LUT_D[code] * (g.to(D) * c.to(D))``
(the scale product rounds in D first), cut to [N, K].
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

from . import blocked, e2m1
from ._common import as_fp32, base_marker, orig_shape_of, pad_to, roundup, shape_reason, tree_sum_fp64

NAME = "nvfp4"
COMFY_FORMAT = "nvfp4"
LAYOUT = "TensorCoreNVFP4Layout"
BLOCK = 16
PAD = 16
FP8_MAX = 448.0
DEFAULT_SEARCH = True
# E4M3 code offsets from comfy-kitchen's block scale tried by the scale search, in tie-break order.
SEARCH_OFFSETS = (0, -1, 1, 2, 3, 4, 5, 6, -2)
_FP8_MAX_CODE = 0x7E


def cannot_take(shape: tuple[int, ...], **_: object) -> str | None:
    return shape_reason(shape)


def marker(shape: tuple[int, ...], orig_dtype: torch.dtype, **_: object) -> dict:
    return base_marker(COMFY_FORMAT, shape, orig_dtype)


def _block_error(x: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared error per block (fp64) of x fp32 [R, B, 16] stored with E4M3 block scales c (fp32
    [R, B]): each element is w - v * (g * c), v its E2M1 value (:func:`e2m1.round_values`)."""
    total = g * c
    safe = torch.where(total == 0, torch.ones_like(total), total)[..., None]
    v = e2m1.round_values((x / safe).clamp(-e2m1.MAX, e2m1.MAX))
    v = torch.where((total == 0)[..., None], torch.zeros_like(v), v)
    return tree_sum_fp64(x - v * total[..., None])


def _codes(x: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    total = g * c
    zero = total == 0
    safe = torch.where(zero, torch.ones_like(total), total)[..., None]
    codes = e2m1.encode((x / safe).clamp(-e2m1.MAX, e2m1.MAX))
    return torch.where(zero[..., None], torch.zeros_like(codes), codes)


def quantize(w: torch.Tensor, scale_search: bool = DEFAULT_SEARCH,
             input_scale: float | None = None) -> dict[str, torch.Tensor]:
    wf0 = as_fp32(w, NAME)
    amax = wf0.abs().amax()
    g = amax / torch.full_like(amax, FP8_MAX * e2m1.MAX)
    g = torch.where(g == 0, torch.ones_like(g), g)
    wf = pad_to(wf0, PAD)
    rows, cols = wf.shape
    x = wf.reshape(rows, cols // BLOCK, BLOCK)
    amax_b = x.abs().amax(dim=-1)
    b = (amax_b / torch.full_like(amax_b, e2m1.MAX)) / g
    best = b.clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    if scale_search:
        code0 = best.view(torch.uint8).to(torch.int32)
        c0 = best
        best_err = _block_error(x, g, c0.float())
        for o in SEARCH_OFFSETS[1:]:
            cc = (code0 + o).clamp(1, _FP8_MAX_CODE).to(torch.uint8).view(torch.float8_e4m3fn)
            cc = torch.where(code0 == 0, c0, cc)  # a zero-scale block stays zero
            err = _block_error(x, g, cc.float())
            win = err < best_err
            best_err = torch.where(win, err, best_err)
            best = torch.where(win, cc, best)
    out = {"weight": e2m1.pack(_codes(x, g, best.float()).reshape(rows, cols)),
           "weight_scale": blocked.swizzle(best),
           "weight_scale_2": g.reshape(())}
    if input_scale is not None:
        out["input_scale"] = torch.tensor(float(input_scale), dtype=torch.float32)
    return out


def dequantize(tensors: dict[str, torch.Tensor], marker: dict, dtype: torch.dtype) -> torch.Tensor:
    n, k = orig_shape_of(marker, NAME)
    q, s, g = tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"]
    rows, cols = roundup(n, PAD), roundup(k, PAD)
    if q.dtype != torch.uint8 or tuple(q.shape) != (rows, cols // 2):
        raise QuantkitError(f"{NAME}: weight {q.dtype} {tuple(q.shape)} is not U8 [{rows},{cols // 2}] "
                            f"for a {n}x{k} layer", fix="re-convert the layer")
    if s.dtype not in (torch.float8_e4m3fn, torch.uint8) or tuple(s.shape) != blocked.blocked_shape(rows, cols // BLOCK):
        raise QuantkitError(f"{NAME}: weight_scale {s.dtype} {tuple(s.shape)} is not F8_E4M3 "
                            f"{list(blocked.blocked_shape(rows, cols // BLOCK))}", fix="re-convert the layer")
    if g.numel() != 1:
        raise QuantkitError(f"{NAME}: weight_scale_2 has shape {tuple(g.shape)}, expected a scalar",
                            fix="re-convert the layer")
    vals = e2m1.lut(dtype)[e2m1.unpack(q).long()].reshape(rows, cols // BLOCK, BLOCK)
    c = blocked.unswizzle(s.view(torch.float8_e4m3fn), rows, cols // BLOCK)
    total = g.float().to(dtype) * c.to(dtype)
    return (vals * total[..., None]).reshape(rows, cols).to(dtype)[:n, :k]
