"""The GPU side of the conversion pipeline: pinned host buffers, copies to and from the device, and the
quantizer on the device. Each weight is read from the input file straight into a pinned buffer with
``preadv`` (one large read per tensor; no mmap page faults, which are slow under some hypervisors),
copied to the GPU, quantized there, and copied back into one of a small pool of pinned output
buffers that the writer thread hands back once the bytes are on their way to disk.
So reading the next tensor overlaps writing the previous one; the GPU work in between is ~100x
faster than either disk stage.

Memory: ``n_in`` pinned input buffers of the largest quantized weight and ``n_out`` pinned output
buffers of its quantized size, plus the device copies of one weight.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from . import backend
from .fileio import pread_full
from .formats.scaled import ScaledFormat
from .quantize import ErrorStats


def pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    """Fill the uint8 tensor ``buf`` from ``fd`` at ``offset`` (looping over short reads)."""
    got = pread_full(fd, memoryview(buf.numpy()), offset)
    if got < buf.numel():
        raise OSError(f"unexpected end of file at byte {offset + got}")


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
        max_in = max((n for _, _, n in jobs), default=1)
        self._reader = _Prefetcher(fd, jobs, [torch.empty(max_in, dtype=torch.uint8, pin_memory=cuda)
                                              for _ in range(n_in)])
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(n_out):
            self._free.put(torch.empty(max(max_out_bytes, 1), dtype=torch.uint8, pin_memory=cuda))

    def close(self) -> None:
        self._reader.close()

    def quantize(self, name: str, dtype: torch.dtype, shape: tuple[int, int], spec: ScaledFormat,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor, ErrorStats, Callable[[], None]]:
        """Quantize the next planned weight. Returns (q in pinned host memory, scale on the CPU,
        stats, give_back); call ``give_back`` once q's bytes are written, to return its pinned
        buffer to the pool."""
        host, inbuf = self._reader.next(name)  # read by the prefetch thread
        wd = host.to(self.device, copy=True)  # returns once copied, so the reader may refill inbuf
        self._reader.give_back(inbuf)
        r = backend.quantize_tensor(wd.view(dtype).view(shape), spec, block_size, self.device)
        out = self._free.get()  # blocks while the writer still holds every buffer
        qh = out[:r.q.numel() * r.q.element_size()].view(r.q.dtype).view(r.q.shape)
        qh.copy_(r.q, non_blocking=True)
        scale_h = r.scale.cpu()  # waits for the stream, so qh is complete too
        st = torch.stack([r.signal, r.noise]).cpu()
        return qh, scale_h, ErrorStats(float(st[0]), float(st[1])), lambda: self._free.put(out)
