"""The GPU side of the conversion pipeline: pinned host buffers, asynchronous copies, and the
quantizer on the device. Each weight is read from the input file straight into a pinned buffer with
``preadv`` (one large read per tensor; no mmap page faults, which are slow under some hypervisors),
copied to the GPU, quantized there, and copied back into one of a small pool of pinned output
buffers that the writer thread hands back once the bytes are on their way to disk.
So reading the next tensor overlaps writing the previous one; the GPU work in between is ~100x
faster than either disk stage.

Memory: one pinned input buffer of the largest quantized weight and ``n_out`` pinned output
buffers of its quantized size, plus the device copies of one weight.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable

import torch

from . import reference
from .formats import FormatSpec
from .quantize import ErrorStats


def device_quantize(w: torch.Tensor, spec: FormatSpec, block_size: int) -> tuple[torch.Tensor, torch.Tensor, ErrorStats]:
    """Quantize a tensor already on the GPU: (q, scale, error stats). The torch reference ops run
    on the device (IEEE division, round-half-even and RNE casts are the same there as on the CPU)."""
    q, scale = reference.quantize(w, spec, block_size)
    w32 = w.float()
    deq = reference.dequantize(q, scale, spec, block_size, torch.float32)
    signal = torch.dot(w32.view(-1), w32.view(-1))
    noise = (w32 - deq).pow_(2).sum()
    st = torch.stack([signal.double(), noise.double()]).cpu()
    return q, scale, ErrorStats(float(st[0]), float(st[1]))


def pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    """Fill the uint8 tensor ``buf`` from ``fd`` at ``offset`` (looping over short reads)."""
    mv = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


class DeviceQuantizer:
    """Quantizes weights on ``device`` (CUDA in practice; any torch device works, which is how the
    buffer logic is tested on CPU-only machines)."""

    def __init__(self, device: torch.device, max_in_bytes: int, max_out_bytes: int, n_out: int = 3) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self._pin_in = torch.empty(max(max_in_bytes, 1), dtype=torch.uint8, pin_memory=cuda)
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(n_out):
            self._free.put(torch.empty(max(max_out_bytes, 1), dtype=torch.uint8, pin_memory=cuda))

    def quantize(self, fd: int, offset: int, dtype: torch.dtype, shape: tuple[int, int], spec: FormatSpec,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor, ErrorStats, Callable[[], None]]:
        """Quantize the weight stored at ``offset`` of ``fd``. Returns (q in pinned host memory,
        scale on the CPU, stats, give_back); call ``give_back`` once q's bytes are written, to return
        its pinned buffer to the pool."""
        nbytes = shape[0] * shape[1] * dtype.itemsize
        host = self._pin_in[:nbytes]
        pread_into(fd, host, offset)  # the disk read
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                wd = host.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        else:
            wd = host.to(self.device, copy=True)
        wd = wd.view(dtype).view(shape)
        q, scale, stats = device_quantize(wd, spec, block_size)
        out = self._free.get()  # blocks while the writer still holds every buffer
        qh = out[:q.numel() * q.element_size()].view(q.dtype).view(q.shape)
        qh.copy_(q, non_blocking=True)
        scale_h = scale.cpu()  # synchronizes the stream, so qh is complete
        return qh, scale_h, stats, lambda: self._free.put(out)
