"""``int8-convrot``: INT8 per-row weights of W rotated along K by a regular Hadamard matrix (ConvRot).

On disk (ComfyUI's ``int8_tensorwise`` loader with ``"convrot": true``; comfy-kitchen
``TensorWiseINT8Layout`` with ``convrot=True, convrot_groupsize=G``):

* ``weight``: I8 [N, K] = round(R / scale), R = W rotated in groups of G (:func:`hadamard.rotate`)
* ``weight_scale``: fp32 [N, 1] = amax(|R row|) / 127 (an all-zero row gets 1.0)
* ``.comfy_quant``: ``{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": G, ...}``

Quantization (the spec): upcast W to fp32, rotate with the fp32 butterfly, per-row
``scale = amax / 127`` (fp32 division), ``q = clamp(round_half_even(R / scale), -127, 127)``.

Dequantization (ComfyUI / comfy-kitchen eager): ``((q.float() * scale) viewed [N, K/G, G] @ H^T)``
by ``torch.matmul`` in fp32, then cast to the compute dtype. It is a BLAS matmul, so it is
bit-identical to kitchen's only on the same machine and BLAS (the butterfly gives different last
bits; the tests show it); on CUDA kitchen runs its own kernel for G in {64, 256}.

Group size: a power of 4 that divides K. comfy-kitchen accepts any power of 4 >= 4 (its eager path
builds any such matrix); its CUDA dequantization kernel covers G in {64, 256} and its fused
activation-rotation kernel only G = 256, other sizes run its eager torch code. We use
G >= :data:`MIN_GROUP` (16): the largest power of 4 <= the requested size that divides K.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

from . import hadamard
from ._common import as_fp32, base_marker, orig_shape_of, shape_reason

NAME = "int8-convrot"
COMFY_FORMAT = "int8_tensorwise"
LAYOUT = "TensorWiseINT8Layout"
DEFAULT_GROUP = 256
MIN_GROUP = 16
QMAX = 127.0


def choose_group_size(k: int, requested: int = DEFAULT_GROUP) -> int | None:
    """Largest power of 4 in [MIN_GROUP, requested] dividing K, or None if there is none."""
    if not (isinstance(requested, int) and hadamard.is_power_of_4(requested) and requested >= MIN_GROUP):
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


def marker(shape: tuple[int, ...], orig_dtype: torch.dtype, group_size: int = DEFAULT_GROUP) -> dict:
    d = base_marker(COMFY_FORMAT, shape, orig_dtype)
    d["convrot"] = True
    d["convrot_groupsize"] = _group(shape, group_size)
    return {k: d[k] for k in ("format", "convrot", "convrot_groupsize", "orig_dtype", "orig_shape")}


def quantize(w: torch.Tensor, group_size: int = DEFAULT_GROUP) -> dict[str, torch.Tensor]:
    wf = as_fp32(w, NAME)
    g = _group(tuple(wf.shape), group_size)
    r = hadamard.rotate(wf, g)
    amax = r.abs().amax(dim=1, keepdim=True)
    scale = amax / torch.full_like(amax, QMAX)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    q = (r / scale).round().clamp(-QMAX, QMAX).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def dequantize(tensors: dict[str, torch.Tensor], marker: dict, dtype: torch.dtype) -> torch.Tensor:
    n, k = orig_shape_of(marker, NAME)
    g = marker.get("convrot_groupsize")
    if not marker.get("convrot") or not isinstance(g, int) or not hadamard.is_power_of_4(g) or k % g:
        raise QuantkitError(f"{NAME}: .comfy_quant convrot/convrot_groupsize {marker.get('convrot')!r}/"
                            f"{g!r} do not describe a rotation of K={k}", fix="re-convert the layer")
    q, scale = tensors["weight"], tensors["weight_scale"]
    if q.dtype != torch.int8 or tuple(q.shape) != (n, k) or tuple(scale.shape) != (n, 1):
        raise QuantkitError(f"{NAME}: weight {q.dtype} {tuple(q.shape)} / scale {tuple(scale.shape)} "
                            f"do not match I8 [{n},{k}] / [{n},1]", fix="re-convert the layer")
    x = q.float() * scale.float()
    return hadamard.rotate_like_kitchen(x, g).to(dtype)
