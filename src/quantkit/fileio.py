"""Whole-buffer positional reads and writes (loops over short ``preadv`` / ``pwrite``). No torch
import: :mod:`quantkit.readahead` uses it before torch is loaded."""

from __future__ import annotations

import os


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


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n
