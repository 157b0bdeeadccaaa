"""E8M0 block scales (MXFP8): a byte e is the power of two 2^(e - 127).

Decoding follows comfy-kitchen (what ComfyUI runs): e = 0 decodes to 0 (not 2^-127) and e = 255 to
+Inf (not NaN). So the smallest usable scale of a non-zero block is e = 1 (2^-126), and a zero block
stores e = 0.
"""

from __future__ import annotations

import torch

BIAS = 127


def ceil_exponent(s: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 byte (int32) of the smallest power of two >= s, for finite fp32 s > 0, clamped
    to [1, 254]. Read off the fp32 bits (exact, no log2): exponent field plus one unless the mantissa
    field is zero; a subnormal s (field 0) gives 1."""
    bits = s.contiguous().view(torch.int32)
    field = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    return (field + (mant != 0).to(torch.int32)).clamp(1, 254)


def decode(e: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 bytes -> fp32 scales, exactly as comfy-kitchen decodes them."""
    bits = e.to(torch.int32) << 23
    return torch.where(e == 0, torch.zeros_like(bits), bits).view(torch.float32)
