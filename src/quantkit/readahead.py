"""Reading the input from disk while the process is still starting.

A conversion is bound by the disk, but a fresh process spends seconds before it can use one byte
(``import torch`` alone took 3.7 s on the benchmark's GPU machine, then CUDA initialisation and the
kernels' load). :class:`Readahead` pulls the input's tensor data into the page cache in a
background thread from the first moment, so that by the time the quantizer runs, its reads are
memory copies, and the disk works through the start-up instead of after it.

It imports nothing heavy (no torch), so the command line can start it before the rest of quantkit
is imported (:func:`start_for_cli`). The thread hands the kernel up to 512 MB of the file at a time
with ``sendfile`` to ``/dev/null``: the kernel reads the range into the page cache (with its usual
sequential readahead) and drops the copy, so nothing is mapped into or copied to this process and
its resident memory does not grow. Where ``sendfile`` cannot write to ``/dev/null`` it preads into
one 32 MB buffer instead. It stays at most ``ahead`` bytes in front of the position the converter
reports with :meth:`advance` (default: a quarter of the available memory, at most 8 GB), so a
checkpoint larger than memory does not evict its own beginning before it is used. Best effort
throughout: any OS error ends the thread quietly, and the converter's own reads report problems as
usual.

Why 512 MB per call: between two calls the thread needs the GIL, which ``import torch`` holds for
long stretches. With 32 MB per call the disk read 1.2 GB/s during the import on the benchmark's
GPU machine; with 512 MB 1.6-1.9 GB/s, as fast as a forked reader process
(``benchmarks/bench_readahead.py --with-import``, DEVELOPMENT.md). The first 512 MB version mapped
each window and faulted it in with ``madvise(MADV_POPULATE_READ)``, which put the window into the
resident set (up to +500 MB of peak RSS); ``sendfile`` reads as fast on the dev box (1.73-1.79 GB/s
during the import, against 1.81-1.82) without that.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import threading

from .fileio import pread_full

CHUNK = 32 << 20  # the pread fallback's buffer, and the smallest window
WINDOW = 512 << 20  # the most one sendfile call reads
MAX_AHEAD = 8 << 30

# `quantkit convert` options that take a value (so the token after them is not an input path).
# tests/test_readahead.py checks this against the command's declared options.
CONVERT_VALUE_OPTIONS = frozenset({
    "-o", "--output", "-O", "--output-dir", "-f", "--format", "--block-size", "--include", "--exclude",
    "--fallback", "--preset", "--config", "--report", "--device", "--calibration", "--learned-objective",
    "--devices", "--convrot-group-size", "--bits", "--max-error", "--auto-candidates",
})


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_ahead() -> int:
    avail = _mem_available()
    return MAX_AHEAD if avail is None else max(256 << 20, min(MAX_AHEAD, avail // 4))


class Readahead:
    """Pull ``path``'s tensor data (after the safetensors header) into the page cache in a daemon
    thread, at most ``ahead`` bytes beyond the last :meth:`advance` position."""

    def __init__(self, path: str | os.PathLike, ahead: int | None = None) -> None:
        self.path = os.fspath(path)
        # O_NONBLOCK: opening a FIFO must not hang (anything but a regular file is left alone)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise OSError(f"{self.path} is not a regular file")
        self.key = (st.st_dev, st.st_ino)
        self.end = st.st_size
        self.ahead = default_ahead() if ahead is None else ahead
        self.window = min(WINDOW, max(CHUNK, self.ahead // 4))
        self.position = 0  # bytes [0, position) have been waited for
        self._consumed = 0
        self._stop = False
        self._buf: bytearray | None = None  # pread fallback's buffer
        try:
            self._null: int | None = os.open(os.devnull, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self._null = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="quantkit-readahead", daemon=True)
        self._thread.start()

    def _data_start(self) -> int:
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            return self.end
        n = struct.unpack("<Q", head)[0]
        return min(self.end, 8 + n)

    def _fill(self, pos: int, n: int) -> None:
        """Bring [pos, pos + n) into the page cache and wait for it."""
        if self._null is not None:
            try:
                done = 0
                while done < n:
                    got = os.sendfile(self._null, self._fd, pos + done, n - done)
                    if got == 0:  # end of file (it shrank)
                        return
                    done += got
                return
            except OSError:  # /dev/null refused (not Linux): read instead
                os.close(self._null)
                self._null = None
        if self._buf is None:
            self._buf = bytearray(CHUNK)
        for at in range(pos, pos + n, CHUNK):
            pread_full(self._fd, memoryview(self._buf)[:min(CHUNK, pos + n - at)], at)

    def _run(self) -> None:
        try:
            pos = self._data_start()
            with self._cv:
                self._consumed = max(self._consumed, pos)
            while pos < self.end:
                with self._cv:
                    while not self._stop and pos - self._consumed >= self.ahead:
                        self._cv.wait()
                    if self._stop:
                        return
                n = min(self.window, self.end - pos)
                self._fill(pos, n)
                pos += n
                self.position = pos
        except OSError:
            return
        finally:
            self._buf = None
            for fd in (self._fd, self._null):
                try:
                    if fd is not None:
                        os.close(fd)
                except OSError:
                    pass

    def advance(self, offset: int) -> None:
        """The converter has used the file up to byte ``offset``."""
        with self._cv:
            if offset > self._consumed:
                self._consumed = offset
                self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Stop reading ahead. With ``timeout``, wait at most that long: a window already being read
        (up to 512 MB, seconds on a slow disk) finishes in the background, and the thread then ends
        and closes its descriptors by itself."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    def same_file(self, path: str | os.PathLike) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.key


_started: Readahead | None = None


def start(path: str | os.PathLike) -> Readahead | None:
    """Start reading ``path`` ahead (None when it cannot be opened or the platform lacks fadvise)."""
    if os.environ.get("QUANTKIT_READAHEAD") == "0":
        return None
    try:
        return Readahead(path)
    except OSError:
        return None


def adopt(path: str | os.PathLike) -> Readahead | None:
    """The readahead the command line started for ``path``, handed over once; else a new one."""
    global _started
    ra, _started = _started, None
    if ra is not None and not ra.same_file(path):
        ra.stop()
        ra = None
    return ra if ra is not None else start(path)


def first_convert_input(argv: list[str]) -> str | None:
    """The first input path of ``quantkit convert ...`` in ``argv`` (arguments after the program
    name), or None for any other command, ``--dry-run``, or no input."""
    if not argv or argv[0] != "convert" or "--dry-run" in argv:
        return None
    args = iter(argv[1:])
    for tok in args:
        if tok == "--":
            return next(args, None)
        if tok.startswith("-"):
            if tok in CONVERT_VALUE_OPTIONS:
                next(args, None)
            continue
        return tok
    return None


def start_for_cli(argv: list[str] | None = None) -> None:
    """Called by the command line before anything heavy is imported."""
    global _started
    mp = sys.modules.get("multiprocessing")  # a spawned worker has it; importing it here costs the CLI 20 ms
    if mp is not None and mp.parent_process() is not None:  # a --devices worker: spawn hands it our argv
        return
    path = first_convert_input(sys.argv[1:] if argv is None else argv)
    if path is not None and _started is None and os.path.isfile(path):
        _started = start(path)
