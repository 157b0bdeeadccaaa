"""The CPU fast path: the reference math, applied in cache-sized row chunks.

Same bits as :mod:`quantkit.reference` (elementwise ops and an exact max, so chunking cannot
change a result), but it never materialises an fp32 copy of a whole tensor, and it yields the
quantized bytes chunk by chunk so the writer can stream them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import reference
from .formats import FormatSpec

# ~1 MiB of fp32 per chunk: stays in L2 on the machines we target.
CHUNK_ELEMS = 1 << 18


def rows_per_chunk(shape: tuple[int, int], spec: FormatSpec, block_size: int) -> int:
    n, k = shape
    rows = max(1, CHUNK_ELEMS // max(k, 1))
    if spec.granularity == "block":
        rows = max(block_size, rows - rows % block_size)
    return min(rows, max(n, 1))


def compute_scale(w: torch.Tensor, spec: FormatSpec, block_size: int) -> torch.Tensor:
    """Same result as reference.compute_scale, chunked."""
    n, k = w.shape
    rows = rows_per_chunk((n, k), spec, block_size)
    parts = []
    for i in range(0, n, rows):
        parts.append(reference.region_amax(w[i:i + rows], spec, block_size))
    if spec.granularity == "tensor":
        amax = torch.stack(parts).amax() if parts else torch.zeros((), dtype=torch.float32)
    else:
        amax = torch.cat(parts, 0)
    return reference.scale_from_amax(amax, spec)


@dataclass
class ErrorStats:
    """Running sums for SQNR: sum w^2 and sum (w - dequant(q))^2, both in fp64."""

    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return reference.sqnr_db(self.signal, self.noise)


def quantize_chunks(w: torch.Tensor, scale: torch.Tensor, spec: FormatSpec, block_size: int,
                    stats: ErrorStats | None = None) -> Iterator[torch.Tensor]:
    """Yield q in row chunks (each a contiguous tensor of spec.weight_dtype; valid until the next
    chunk is requested). Accumulates the dequantization error into ``stats`` if given."""
    n, k = w.shape
    rows = rows_per_chunk((n, k), spec, block_size)
    w32 = torch.empty((rows, k), dtype=torch.float32)
    x = torch.empty((rows, k), dtype=torch.float32)
    q = torch.empty((rows, k), dtype=spec.weight_dtype)
    qmax = spec.qmax
    if stats is not None and not spec.is_int:
        # torch's fp8 -> fp32 cast is slow on CPU; a 256-entry table gives the same values 3x faster.
        lut = torch.arange(256, dtype=torch.uint8).view(spec.weight_dtype).float()
        idx = torch.empty(rows * k, dtype=torch.int32)
    for i in range(0, n, rows):
        r = min(rows, n - i)
        wc, xc, qc = w32[:r], x[:r], q[:r]
        wc.copy_(w[i:i + r])
        if spec.granularity == "tensor":
            s, wv, xv = scale, wc, xc
        elif spec.granularity == "row":
            s, wv, xv = scale[i:i + r], wc, xc
        else:
            # r is a multiple of the block size; view the chunk as tiles [r/b, b, K/b, b].
            b = block_size
            s = scale[i // b:(i + r) // b][:, None, :, None]
            wv, xv = wc.view(r // b, b, k // b, b), xc.view(r // b, b, k // b, b)
        torch.div(wv, s, out=xv)
        if spec.is_int:
            xc.round_()
        xc.clamp_(-qmax, qmax)
        qc.copy_(xc)
        if stats is not None:
            # Dequantize as ComfyUI does in fp32: q.float() * scale (xc holds exactly q for int8).
            if not spec.is_int:
                ic = idx[:r * k]
                ic.copy_(qc.view(torch.uint8).view(-1))
                torch.index_select(lut, 0, ic, out=xc.view(-1))
            xv.mul_(s)
            stats.signal += float(torch.dot(wc.view(-1), wc.view(-1)))
            xc.sub_(wc)
            stats.noise += float(torch.dot(xc.view(-1), xc.view(-1)))
        yield qc


def quantize_tensor(w: torch.Tensor, spec: FormatSpec, block_size: int, scale: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, ErrorStats]:
    """Quantize a whole 2-D tensor on the CPU: returns (q, scale, error stats). Bit-identical to
    ``reference.quantize``; peak extra memory is q plus two cache-sized fp32 chunks. ``out``: a
    uint8 buffer of at least ``w.numel()`` bytes to hold q (reused buffers keep RSS flat)."""
    if scale is None:
        scale = compute_scale(w, spec, block_size)
    n, k = w.shape
    if out is None:
        q = torch.empty((n, k), dtype=spec.weight_dtype)
    else:
        q = out[:n * k].view(spec.weight_dtype).view(n, k)
    stats = ErrorStats()
    if not bool(torch.isfinite(scale).all()):
        return q, scale, stats  # the caller refuses the layer; nothing to quantize
    rows = rows_per_chunk((n, k), spec, block_size)
    for i, chunk in enumerate(quantize_chunks(w, scale, spec, block_size, stats)):
        q[i * rows:i * rows + chunk.shape[0]].copy_(chunk)
    return q, scale, stats
