"""FP4 E2M1 (NVFP4's element type): grid, round-to-nearest-even, nibble packing.

Codes 0..7 are the magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (1 sign, 2 exponent, 1 mantissa bit, no
Inf/NaN); bit 3 is the sign (code 8 is -0). A byte holds two codes: the element at the even column in
the HIGH nibble, the odd column in the low nibble (comfy-kitchen ``hi_first=True``, as ComfyUI loads).
"""

from __future__ import annotations

import torch

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MAX = 6.0
# Round to nearest, ties to the even code (the even mantissa): the magnitude code is the number of
# these thresholds |x| passes; ">" where the tie goes down to the even code below, ">=" where it goes
# up to the even code above.
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True),
               (5.0, False))


def lut(dtype: torch.dtype) -> torch.Tensor:
    """The 16 code values (sign bit 3) in ``dtype``."""
    return torch.tensor(list(MAGNITUDES) + [-m for m in MAGNITUDES], dtype=dtype)


def encode(x: torch.Tensor) -> torch.Tensor:
    """fp32 values (already scaled to the grid) -> uint8 codes 0..15, round to nearest even,
    saturating at +-6. The sign bit follows fp32's sign (so -0.0 and negatives that round to zero
    give code 8, -0)."""
    if x.dtype != torch.float32:
        raise ValueError("encode expects fp32")
    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t, inclusive in _THRESHOLDS:
        code += (a >= t if inclusive else a > t).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def round_values(x: torch.Tensor) -> torch.Tensor:
    """The E2M1 values :func:`encode` picks for fp32 x in [-6, 6], as fp32 (same rounding, by
    arithmetic: steps of 0.5 below 2, 1 below 4, 2 up to 6; ``torch.round`` is half-to-even, and
    each step's even multiples are exactly the even codes)."""
    a = x.abs()
    v = torch.where(a < 2, (a * 2).round() * 0.5, torch.where(a < 4, a.round(), (a * 0.5).round() * 2))
    return torch.copysign(v, x)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K even) -> bytes [N, K/2], even column in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError("pack needs an even number of columns")
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """bytes [N, K/2] -> codes [N, K]."""
    hi, lo = packed >> 4, packed & 0x0F
    return torch.stack((hi, lo), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
