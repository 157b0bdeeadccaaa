"""The old import path of three formats' torch reference; they are registered formats now
(:mod:`quantkit.formats.int8_convrot`, :mod:`~quantkit.formats.mxfp8`, :mod:`~quantkit.formats.nvfp4`,
helpers ``quantkit.formats._hadamard`` / ``_blocked`` / ``_e2m1`` / ``_e8m0``), and each submodule here
is the moved module itself, so ``quantkit.formats_next.hadamard`` etc. keep working.


| module | ``--format`` | ``.comfy_quant`` ``format`` | layer tensors |
|---|---|---|---|
| :mod:`.int8_convrot` | ``int8-convrot`` | ``int8_tensorwise`` + ``convrot``/``convrot_groupsize`` | I8 ``[N,K]`` of W rotated along K, fp32 ``[N,1]`` |
| :mod:`.mxfp8` | ``mxfp8`` | ``mxfp8`` | F8_E4M3 ``[Np,Kp]`` (32-padded), U8 E8M0 swizzled block-32 scales |
| :mod:`.nvfp4` | ``nvfp4`` | ``nvfp4`` | U8 packed E2M1 ``[Np,Kp/2]`` (16-padded), F8_E4M3 swizzled block-16 scales, fp32 ``weight_scale_2`` |

Every format module has the same interface:

* ``quantize(w, **opts) -> dict[str, Tensor]``: the tensors written to disk, keyed by the suffix after
  the layer name (``"weight"``, ``"weight_scale"``, ...), in their on-disk dtype and shape.
* ``marker(shape, orig_dtype, **opts) -> dict``: the ``.comfy_quant`` JSON object.
* ``cannot_take(shape, **opts) -> str | None``: why a weight of this shape cannot take the format.
* ``dequantize(tensors, marker, dtype) -> Tensor``: what ComfyUI computes (comfy-kitchen's layout
  ``dequantize``), bit for bit, in compute dtype ``dtype``.

Helpers: :mod:`.hadamard` (regular Hadamard matrix and the butterfly rotation), :mod:`.blocked`
(cuBLAS block-scale swizzle), :mod:`.e2m1` (FP4 grid, rounding, nibble packing), :mod:`.e8m0`
(power-of-two block scales). 
"""

from __future__ import annotations

from . import int8_convrot, mxfp8, nvfp4

FORMATS = {"int8-convrot": int8_convrot, "mxfp8": mxfp8, "nvfp4": nvfp4}

__all__ = ["FORMATS", "int8_convrot", "mxfp8", "nvfp4"]
