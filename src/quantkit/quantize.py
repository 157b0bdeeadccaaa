"""The CPU fast path: the reference math, applied in cache-sized row chunks.

Same bits as :mod:`quantkit.reference` (elementwise ops and an exact max, so chunking cannot
change a result), but it never materialises an fp32 copy of a whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import scaled
from .formats.scaled import ScaledFormat

# ~1 MiB of fp32 per chunk: stays in L2 on the machines we target.
CHUNK_ELEMS = 1 << 18


def rows_per_chunk(shape: tuple[int, int], spec: ScaledFormat, block_size: int) -> int:
    n, k = shape
    rows = max(1, CHUNK_ELEMS // max(k, 1))
    if spec.granularity == "block":
        rows = max(block_size, rows - rows % block_size)
    return min(rows, max(n, 1))


def tensor_scale(w: torch.Tensor, spec: ScaledFormat) -> torch.Tensor:
    """The per-tensor scale, equal to ``reference.compute_scale``: one reduction pass over ``w`` and no
    |w| temporary, since max(|min|, |max|) is the amax (NaN and inf carry through as they do in
    ``reference.region_amax``). Row and block scales come from each chunk in :func:`quantize_tensor`."""
    if not w.numel():
        return scaled.scale_from_amax(torch.zeros((), dtype=torch.float32), spec)
    lo, hi = torch.aminmax(w)
    return scaled.scale_from_amax(torch.maximum(hi.abs(), lo.abs()).float(), spec)


@dataclass
class ErrorStats:
    """Running sums for SQNR: sum w^2 and sum (w - dequant(q))^2, both in fp64."""

    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return scaled.sqnr_db(self.signal, self.noise)


def quantize_tensor(w: torch.Tensor, spec: ScaledFormat, block_size: int,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, ErrorStats]:
    """Quantize a whole 2-D tensor on the CPU: returns (q, scale, error stats). Bit-identical to
    ``reference.quantize``; peak extra memory is q plus two cache-sized fp32 chunks. ``out``: a
    uint8 buffer of at least ``w.numel()`` bytes to hold q (reused buffers keep RSS flat).

    One read of ``w`` for row and block scales (each chunk holds whole rows / block rows, so its
    scales come from the fp32 chunk just loaded); a per-tensor scale needs one amax pass first.
    The error stats are ComfyUI's dequantization in fp32 (``q.float() * scale``) against ``w``."""
    n, k = w.shape
    q = torch.empty((n, k), dtype=spec.weight_dtype) if out is None else \
        out[:n * k].view(spec.weight_dtype).view(n, k)
    stats = ErrorStats()
    chunk_scales = spec.granularity != "tensor"
    scale = None if chunk_scales else tensor_scale(w, spec)
    if scale is not None and not bool(torch.isfinite(scale).all()):
        return q, scale, stats  # the caller refuses the layer; nothing to quantize
    rows = rows_per_chunk((n, k), spec, block_size)
    w32 = torch.empty((rows, k), dtype=torch.float32)
    x = torch.empty((rows, k), dtype=torch.float32)
    qmax = spec.qmax
    if not spec.is_int:
        # torch's fp8 -> fp32 cast is slow on CPU; a 256-entry table gives the same values 3x faster.
        lut = torch.arange(256, dtype=torch.uint8).view(spec.weight_dtype).float()
        idx = torch.empty(rows * k, dtype=torch.int32)
    parts = []
    for i in range(0, n, rows):
        r = min(rows, n - i)
        wc, xc, qc = w32[:r], x[:r], q[i:i + r]
        wc.copy_(w[i:i + r])
        if chunk_scales:
            parts.append(scaled.compute_scale(wc, spec, block_size))  # exact: abs and max in fp32
            s = parts[-1]
        else:
            s = scale
        if spec.granularity == "block":
            # r is a multiple of the block size; view the chunk as tiles [r/b, b, K/b, b].
            b = block_size
            s = s[:, None, :, None]
            wv, xv = wc.view(r // b, b, k // b, b), xc.view(r // b, b, k // b, b)
        else:
            wv, xv = wc, xc
        torch.div(wv, s, out=xv)
        if spec.is_int:
            xc.round_()
        xc.clamp_(-qmax, qmax)
        qc.copy_(xc)
        # Dequantize as ComfyUI does in fp32: q.float() * scale (xc holds exactly q for int8).
        if not spec.is_int:
            ic = idx[:r * k]
            ic.copy_(qc.view(torch.uint8).view(-1))
            torch.index_select(lut, 0, ic, out=xc.view(-1))
        stats.signal += float(torch.dot(wc.view(-1), wc.view(-1)))
        torch.addcmul(wv, xv, s, value=-1, out=xv)  # w - q * scale in one pass
        stats.noise += float(torch.dot(xc.view(-1), xc.view(-1)))
    if chunk_scales:
        scale = torch.cat(parts) if parts else scaled.compute_scale(w, spec, block_size)
    return q, scale, stats
