"""Whole-buffer positional reads and writes (loops over short ``preadv`` / ``pwrite``). No torch
import: :mod:`quantkit.readahead` uses it before torch is loaded."""

from __future__ import annotations

import errno
import mmap
import os
import queue
import stat
import threading


def pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """Read ``len(buf)`` bytes at ``offset`` into ``buf``; returns the bytes read (fewer only at
    the end of the file)."""
    buf = buf.cast("B")
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class NotRegularFile(OSError):
    """``path`` is no regular file: ``kind`` says what it is ("a FIFO (named pipe)", ...)."""

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        super().__init__(f"{os.fspath(path)} is {kind}, not a regular file")
        self.kind = kind


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor on ``path``, which must be a regular file or a symlink to one. Anything
    else raises :class:`NotRegularFile` before it is opened for reading (a FIFO with no writer
    blocks ``open()`` for ever, a device can stream without end); the open itself is non-blocking
    and checked again, so a path swapped in between cannot hang it either."""
    st = os.stat(path)  # follows symlinks
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, file_kind(st.st_mode))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, file_kind(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


BLOCK = 4096  # O_DIRECT alignment: offsets, lengths and buffer addresses (the largest logical block in use)
BOUNCE = 32 << 20  # H100 machine: 8 MiB writes left the disk idle between them (13.1-13.8 s vs 11.2 s, DEVELOPMENT.md)
BUFFERS = 4  # bounce buffers: one being filled, the rest queued for or under the I/O thread


def open_direct(fd: int) -> int | None:
    """A second, O_DIRECT descriptor on the file open as ``fd`` (Linux), or None where the
    platform or file system has none (e.g. tmpfs) or ``QUANTKIT_DIRECT_IO=0``."""
    if os.environ.get("QUANTKIT_DIRECT_IO", "1") == "0" or not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


class DirectWriter:
    """Positional writes that bypass the page cache (O_DIRECT), for output files written once.

    Buffered writes cost more CPU than the quantizer on small virtual machines (the kernel copies
    every byte into the page cache and then writes it back; 2 GB took 2-6 s of system time on the
    dev box, against 0.1 s with O_DIRECT), and they compete with it for the same cores. O_DIRECT
    needs aligned offsets, lengths and buffers, and a write's ends rarely align: the aligned interior
    is copied into page-aligned bounce buffers, and each edge is kept in a 4 KiB block until every
    byte of that block has been written (each byte of the file is written exactly once), then that
    block goes out whole. A direct write blocks until the disk has the data, so one I/O thread
    writes the filled buffers in order while the caller fills the next (``BUFFERS`` of ``BOUNCE``
    bytes). ``flush`` writes what is left (the file's last block, padded: truncate after it), waits
    for the I/O thread and raises its first error. If the kernel refuses a direct write, that write
    and all later ones go through ``fd`` (buffered) instead."""

    def __init__(self, fd: int, dfd: int) -> None:
        self._fd, self._dfd = fd, dfd
        self._refused = dfd < 0
        self._size = BOUNCE
        self._bufs = [mmap.mmap(-1, self._size) for _ in range(BUFFERS)]
        self._free: queue.Queue = queue.Queue()
        for b in self._bufs:
            self._free.put(b)
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._partial: dict[int, list] = {}  # block index -> [bytearray(BLOCK), bytes filled]
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._io_loop, name="quantkit-direct-io", daemon=True)
        self._thread.start()

    @property
    def direct(self) -> bool:
        return not self._refused

    # -- the I/O thread --------------------------------------------------------------------------
    def _io_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            buf, n, pos = job
            try:
                if self._error is None:
                    self._out(memoryview(buf)[:n], pos)
            except BaseException as e:  # raised to the caller at its next write or flush
                self._error = e
            finally:
                self._free.put(buf)
                self._jobs.task_done()
        self._jobs.task_done()

    def _out(self, mv: memoryview, pos: int) -> None:
        if not self._refused:
            try:
                pwrite_all(self._dfd, mv, pos)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._refused = True  # this write and every later one: buffered
        pwrite_all(self._fd, mv, pos)

    # -- the caller's side -----------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:  # sticky: nothing more is written after a failed write
            raise self._error

    def _submit(self, fill, n: int, pos: int) -> None:
        """Fill a free bounce buffer (``fill(view)``) with ``n`` bytes and queue its write at ``pos``."""
        buf = self._free.get()
        try:
            fill(memoryview(buf)[:n])
        except BaseException:
            self._free.put(buf)
            raise
        self._jobs.put((buf, n, pos))

    def write(self, data: memoryview | bytes, pos: int) -> None:
        mv = memoryview(data).cast("B")

        def fill(off: int, k: int, out: memoryview) -> None:
            out[:] = mv[off:off + k]
        with self._lock:
            self._check()
            self._write_range(pos, len(mv), fill)

    def write_from_fd(self, src_fd: int, src_pos: int, n: int, pos: int) -> None:
        """Copy ``n`` bytes of another file (at ``src_pos``) to ``pos``, read straight into the
        bounce buffers (no copy of the data held by the process)."""
        def fill(off: int, k: int, out: memoryview) -> None:
            if pread_full(src_fd, out, src_pos + off) != k:
                raise OSError(f"unexpected end of input at byte {src_pos + off + k}")
        with self._lock:
            self._check()
            self._write_range(pos, n, fill)

    def _write_range(self, pos: int, n: int, fill) -> None:
        """``fill(off, k, out)`` puts bytes [off, off+k) of the data into ``out`` (a bounce buffer,
        or a small buffer for the unaligned edges)."""
        def piece(off: int, k: int) -> bytearray:
            b = bytearray(k)
            fill(off, k, memoryview(b))
            return b
        end = pos + n
        lo, hi = -(-pos // BLOCK) * BLOCK, end // BLOCK * BLOCK  # the aligned interior [lo, hi)
        if lo >= hi:
            self._edge(pos, piece(0, n))
            return
        if pos < lo:
            self._edge(pos, piece(0, lo - pos))
        for off in range(lo - pos, hi - pos, self._size):
            k = min(self._size, hi - pos - off)
            self._submit(lambda out, off=off, k=k: fill(off, k, out), k, pos + off)
        if end > hi:
            self._edge(hi, piece(hi - pos, end - hi))

    def _edge(self, pos: int, data) -> None:
        mv = memoryview(data).cast("B")
        while mv:
            b, o = divmod(pos, BLOCK)
            k = min(BLOCK - o, len(mv))
            slot = self._partial.setdefault(b, [bytearray(BLOCK), 0])
            slot[0][o:o + k] = mv[:k]
            slot[1] += k
            if slot[1] == BLOCK:
                del self._partial[b]
                self._submit(lambda out, blk=slot[0]: out.__setitem__(slice(None), blk), BLOCK, b * BLOCK)
            pos, mv = pos + k, mv[k:]

    def flush(self) -> None:
        """Queue the blocks still waiting for bytes (the file's last one, padded with zeros), wait
        until everything queued is written, and raise the I/O thread's first error."""
        with self._lock:
            self._check()
            for b, (blk, _) in sorted(self._partial.items()):
                self._submit(lambda out, blk=blk: out.__setitem__(slice(None), blk), BLOCK, b * BLOCK)
            self._partial.clear()
            self._jobs.join()
            self._check()

    def close(self) -> None:
        """Stop the I/O thread (after the writes already queued) and release the buffers."""
        with self._lock:
            if self._thread.is_alive():
                self._jobs.put(None)
                self._thread.join()
            if self._dfd >= 0:
                os.close(self._dfd)
                self._dfd = -1
            for b in self._bufs:
                try:
                    b.close()
                except BufferError:  # a failed write's traceback still holds a view; freed with it
                    pass
