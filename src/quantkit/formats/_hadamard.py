"""The normalised regular Hadamard matrix ConvRot rotates with, and its butterfly.

``H_G`` (G = 4^d) is the d-th Kronecker power of the regular 4x4 Hadamard matrix
``H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]``, divided by sqrt(G) = 2^d. It is symmetric and
orthogonal, so rotating twice is the identity: the stored weight is ``W_g @ H^T`` per group g of G
consecutive input channels, and dequantization rotates the same way again.

* :func:`matrix` is the matrix itself (entries exactly +-2^-d in fp32). comfy-kitchen's
  dequantization multiplies by it with a BLAS ``matmul``; :func:`rotate_like_kitchen` makes exactly
  that call, so our dequantization is bit-identical to ComfyUI's on the same machine.
* :func:`rotate` is the quantizer's rotation: a fast Walsh-Hadamard butterfly in fp32 with a fixed
  order of operations (elementwise only, each rounding well defined), so a C or Triton fast path can
  reproduce it bit for bit on any CPU or thread count. A BLAS matmul's summation order is not
  specified and is not used by the quantizer.

Butterfly (the spec): view each group as d axes of length 4 (index digits, most significant first)
and apply ``H4`` along the axes from the last (least significant digit) to the first. For one
4-vector (a, b, c, e): ``s = (a + b) + (c + e)`` and the output is ``(s - 2e, s - 2c, s - 2b, s - 2a)``
(each row of H4 is all ones with one -1 on the anti-diagonal; ``2x`` is exact). Finally multiply by
2^-d (exact, a power of two, unless the result is subnormal).
"""

from __future__ import annotations

import torch

H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def is_power_of_4(g: int) -> bool:
    return g >= 4 and (g & (g - 1)) == 0 and (g.bit_length() - 1) % 2 == 0


def _check(g: int) -> int:
    if not (isinstance(g, int) and is_power_of_4(g)):
        raise ValueError(f"Hadamard size {g!r} is not a power of 4 (>= 4)")
    return (g.bit_length() - 1) // 2


def matrix(g: int) -> torch.Tensor:
    """Normalised regular Hadamard matrix [G, G] in fp32 (contiguous)."""
    d = _check(g)
    h4 = torch.tensor(H4, dtype=torch.float32)
    h = h4
    for _ in range(d - 1):
        # kron(h, h4)[i*4 + k, j*4 + l] = h[i, j] * h4[k, l]: the new factor is the lowest digit
        h = (h[:, None, :, None] * h4[None, :, None, :]).reshape(h.shape[0] * 4, h.shape[1] * 4)
    return (h * (2.0 ** -d)).contiguous()


def rotate_like_kitchen(x: torch.Tensor, g: int) -> torch.Tensor:
    """fp32 [N, K] times the block-diagonal H^T, as comfy-kitchen's dequantization computes it:
    one batched ``torch.matmul`` of the [N, K/G, G] view with the transposed view of ``matrix(g)``."""
    n, k = x.shape
    h = matrix(g).to(x.device)
    return torch.matmul(x.reshape(n, k // g, g), h.T).reshape(n, k)


def rotate(x: torch.Tensor, g: int) -> torch.Tensor:
    """fp32 [N, K] rotated along K in groups of G by the butterfly (see the module docstring)."""
    if x.dtype != torch.float32:
        raise ValueError("rotate expects fp32")
    d = _check(g)
    n, k = x.shape
    if k % g:
        raise ValueError(f"K={k} is not a multiple of the group size {g}")
    y = x.reshape(n * (k // g), *([4] * d))
    for axis in range(d, 0, -1):  # tensor axes 1..d are the digits; the last is the lowest
        a, b, c, e = y.unbind(axis)
        s = (a + b) + (c + e)
        y = torch.stack((s - 2 * e, s - 2 * c, s - 2 * b, s - 2 * a), dim=axis)
    return (y * (2.0 ** -d)).reshape(n, k)


def rotate_objective(h: torch.Tensor, g: int) -> torch.Tensor:
    """The objective matrix of the rotated basis, B H B for B the block-diagonal rotation
    (:func:`rotate` is x -> x B, B symmetric and orthogonal): with W = R B the output error
    (W - Wq) x is (R - Rq) (B x), so E[(Bx)(Bx)^T] = B H B. fp32 [K, K] in and out."""
    a = rotate(h.float().contiguous(), g)  # H B
    b = rotate(a.T.contiguous(), g)  # B H B (B H = (H B)^T for symmetric H)
    return ((b + b.T) * 0.5).contiguous()
