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
import threading
from collections.abc import Callable

import torch

from . import backend
from .formats import FormatSpec
from .quantize import ErrorStats


def device_quantize(w: torch.Tensor, spec: FormatSpec, block_size: int) -> tuple[torch.Tensor, torch.Tensor, ErrorStats]:
    """Quantize a tensor already on the device with its backend (Triton kernels on CUDA, see
    :mod:`quantkit.backend`): (q, scale, error stats), bit-identical to the reference."""
    r = backend.quantize_tensor(w, spec, block_size, w.device)
    st = torch.stack([r.signal, r.noise]).cpu()
    return r.q, r.scale, ErrorStats(float(st[0]), float(st[1]))


def pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    """Fill the uint8 tensor ``buf`` from ``fd`` at ``offset`` (looping over short reads)."""
    mv = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


class _Prefetcher:
    """A reader thread that preads the planned weights, in order, into a small pool of pinned
    buffers, so the disk reads back to back while the GPU and the writer work."""

    def __init__(self, fd: int, jobs: list[tuple[str, int, int]], buffers: list[torch.Tensor]) -> None:
        self._fd = fd
        self._jobs = jobs
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for b in buffers:
            self._free.put(b)
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="quantkit-reader", daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            for name, offset, nbytes in self._jobs:
                buf = self._free.get()
                if self._stop.is_set():
                    return
                host = buf[:nbytes]
                pread_into(self._fd, host, offset)
                self._ready.put((name, host, buf))
        except BaseException as e:  # handed to the consumer
            self._ready.put((None, e, None))

    def next(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        got, host, buf = self._ready.get()
        if got is None:
            raise host
        if got != name:
            raise RuntimeError(f"reader order broken: expected {name!r}, read {got!r}")
        return host, buf

    def give_back(self, buf: torch.Tensor) -> None:
        self._free.put(buf)

    def close(self) -> None:
        self._stop.set()
        self._free.put(torch.empty(0, dtype=torch.uint8))  # wake the thread if it waits for a buffer
        self._t.join()


class DeviceQuantizer:
    """Quantizes weights on ``device`` (CUDA in practice; any torch device works, which is how the
    buffer logic is tested on CPU-only machines). ``jobs``: (name, file offset, nbytes) of every
    weight to quantize, in the order :meth:`quantize` will ask for them."""

    def __init__(self, device: torch.device, fd: int, jobs: list[tuple[str, int, int]], max_out_bytes: int,
                 n_in: int = 2, n_out: int = 3) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        max_in = max((n for _, _, n in jobs), default=1)
        self._reader = _Prefetcher(fd, jobs, [torch.empty(max_in, dtype=torch.uint8, pin_memory=cuda)
                                              for _ in range(n_in)])
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(n_out):
            self._free.put(torch.empty(max(max_out_bytes, 1), dtype=torch.uint8, pin_memory=cuda))

    def close(self) -> None:
        self._reader.close()

    def quantize(self, name: str, dtype: torch.dtype, shape: tuple[int, int], spec: FormatSpec,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor, ErrorStats, Callable[[], None]]:
        """Quantize the next planned weight. Returns (q in pinned host memory, scale on the CPU,
        stats, give_back); call ``give_back`` once q's bytes are written, to return its pinned
        buffer to the pool."""
        host, inbuf = self._reader.next(name)  # read by the prefetch thread
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                wd = host.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self.copy_stream.synchronize()
        else:
            wd = host.to(self.device, copy=True)
        self._reader.give_back(inbuf)  # the copy is complete: the reader may refill it
        wd = wd.view(dtype).view(shape)
        q, scale, stats = device_quantize(wd, spec, block_size)
        out = self._free.get()  # blocks while the writer still holds every buffer
        qh = out[:q.numel() * q.element_size()].view(q.dtype).view(q.shape)
        qh.copy_(q, non_blocking=True)
        scale_h = scale.cpu()  # synchronizes the stream, so qh is complete
        return qh, scale_h, stats, lambda: self._free.put(out)
