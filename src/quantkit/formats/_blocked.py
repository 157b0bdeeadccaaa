"""The cuBLAS "blocked" layout of block-scale factors (MXFP8 and NVFP4 ``weight_scale``).

A scale matrix S of R x C (R = padded weight rows, C = blocks per row) is zero-padded to
Rp = roundup(R, 128) by Cp = roundup(C, 4) and cut into 128 x 4 tiles, stored one after the other in
row-major tile order (tile (i, j) is number i * (Cp/4) + j). Inside a tile, the entry at tile row
r = 32 * r_hi + r_lo (r_lo < 32) and column c (< 4) sits at offset 16 * r_lo + 4 * r_hi + c of the
tile's 512. The stored tensor is that flat sequence viewed as [Rp, Cp]. (cuBLAS documentation,
"1D block scaling factors layout"; comfy-kitchen's ``to_blocked``/``from_blocked``.)
"""

from __future__ import annotations

import torch

from .base import roundup


def blocked_shape(rows: int, cols: int) -> tuple[int, int]:
    return roundup(rows, 128), roundup(cols, 4)


def swizzle(s: torch.Tensor) -> torch.Tensor:
    """[R, C] scales (any dtype) -> blocked [roundup(R,128), roundup(C,4)], padding with zeros."""
    r, c = s.shape
    rp, cp = blocked_shape(r, c)
    padded = s
    if (rp, cp) != (r, c):
        # zeros of the scale dtype: a new_zeros/slice-assign keeps fp8/uint8 bytes untouched
        padded = s.new_zeros((rp, cp))
        padded[:r, :c] = s
    # [i, r_hi, r_lo, j, c] -> [i, j, r_lo, r_hi, c]
    t = padded.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return t.reshape(rp, cp).contiguous()


def unswizzle(b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle`: the [rows, cols] scales held in a blocked tensor."""
    rp, cp = blocked_shape(rows, cols)
    if b.numel() != rp * cp:
        raise ValueError(f"blocked scales hold {b.numel()} entries, expected {rp}x{cp} for {rows}x{cols}")
    t = b.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)  # -> [i, r_hi, r_lo, j, c]
    return t.reshape(rp, cp)[:rows, :cols]
