"""DirectWriter: O_DIRECT writes of unaligned pieces, in any order, land byte for byte; a kernel
that refuses direct I/O mid-file gets the rest through the buffered descriptor."""

from __future__ import annotations

import errno
import os
import random

import pytest

from quantkit import fileio
from quantkit.fileio import BLOCK, DirectWriter, open_direct


def _pieces(total: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts, pos = [], 0
    while pos < total:  # sizes from 1 byte (inside one block) to several blocks (aligned interior)
        n = min(total - pos, rng.choice([1, 7, 100, BLOCK - 3, BLOCK, BLOCK + 5, 3 * BLOCK + 11, 20000]))
        cuts.append((pos, n))
        pos += n
    rng.shuffle(cuts)
    return cuts


def _writer(path, monkeypatch, direct: bool):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if not direct:
        monkeypatch.setenv("QUANTKIT_DIRECT_IO", "0")
    dfd = open_direct(fd)
    if direct and dfd is None:
        pytest.skip("this file system refuses O_DIRECT")
    assert (dfd is None) == (not direct)
    return fd, DirectWriter(fd, -1 if dfd is None else dfd)


@pytest.mark.parametrize("mode", ["direct", "buffered", "refused-midway"])
def test_pieces_in_any_order_land_exactly(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(fileio, "BOUNCE", 3 * BLOCK)  # several bounce rounds per large piece
    rng = random.Random(0)
    total = 37 * BLOCK + 1234  # the last block is partial: padded, then truncated
    want = rng.randbytes(total)
    path = tmp_path / "f.bin"
    fd, w = _writer(path, monkeypatch, mode != "buffered")
    calls = {"n": 0}
    if mode == "refused-midway":
        real = os.pwrite

        def pwrite(f, data, pos):
            if f != fd:
                calls["n"] += 1
                if calls["n"] > 4:
                    raise OSError(errno.EINVAL, "Invalid argument")
            return real(f, data, pos)
        monkeypatch.setattr(os, "pwrite", pwrite)
    for pos, n in _pieces(total, rng):
        w.write(want[pos:pos + n], pos)
    w.flush()
    assert w.direct == (mode == "direct")
    w.close()
    os.ftruncate(fd, total)
    os.close(fd)
    assert path.read_bytes() == want
    if mode == "refused-midway":
        assert calls["n"] == 5  # four direct writes, the refused one, then none


def test_copy_from_another_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "BOUNCE", 2 * BLOCK)
    rng = random.Random(1)
    src = tmp_path / "src.bin"
    data = rng.randbytes(20 * BLOCK)
    src.write_bytes(data)
    total = 9 * BLOCK + 77
    want = bytearray(total)
    fd, w = _writer(tmp_path / "dst.bin", monkeypatch, True)
    sfd = os.open(src, os.O_RDONLY)
    try:
        for pos, n in _pieces(total, rng):
            s = rng.randrange(0, len(data) - n)
            w.write_from_fd(sfd, s, n, pos)
            want[pos:pos + n] = data[s:s + n]
        with pytest.raises(OSError, match="end of input"):
            w.write_from_fd(sfd, len(data) - 10, 3 * BLOCK, 0)
    finally:
        os.close(sfd)
    w.flush()
    w.close()
    os.ftruncate(fd, total)
    os.close(fd)
    assert (tmp_path / "dst.bin").read_bytes() == bytes(want)
