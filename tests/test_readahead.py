"""The start-up readahead (quantkit.readahead): argument parsing, pacing, page-cache effect, and its
hand-over to convert()."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
import typer

import quantkit
from quantkit import cli, readahead


def _file(path, data_bytes: int, header: bytes = b'{"__metadata__":{}}   ') -> int:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(os.urandom(data_bytes))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(header)


def _wait(cond, timeout=10.0):
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "readahead did not get there"
        time.sleep(0.01)


def test_value_options_match_the_convert_command():
    cmd = typer.main.get_command(cli.app).commands["convert"]
    taking_value = {o for p in cmd.params if not getattr(p, "is_flag", False) and p.param_type_name == "option"
                    for o in (*p.opts, *p.secondary_opts)}
    assert taking_value == readahead.CONVERT_VALUE_OPTIONS


@pytest.mark.parametrize("argv, first", [
    (["convert", "a.safetensors"], "a.safetensors"),
    (["convert", "-o", "out.safetensors", "--format", "int8-block", "in.safetensors", "b"], "in.safetensors"),
    (["convert", "--calibration", "stats.safetensors", "--overwrite", "-q", "model.safetensors"], "model.safetensors"),
    (["convert", "--format=fp8", "m.safetensors"], "m.safetensors"),
    (["convert", "--", "-odd-name.safetensors"], "-odd-name.safetensors"),
    (["convert", "m.safetensors", "--dry-run"], None),
    (["plan", "m.safetensors"], None),
    (["convert", "--overwrite"], None),
    ([], None),
])
def test_first_convert_input(argv, first):
    assert readahead.first_convert_input(argv) == first


def test_stays_within_its_window_and_follows_advance(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "CHUNK", 1 << 20)
    p = tmp_path / "m.safetensors"
    start = _file(p, 8 << 20)
    end = start + (8 << 20)
    ra = readahead.Readahead(p, ahead=2 << 20)
    try:
        _wait(lambda: ra.position == start + (2 << 20))
        time.sleep(0.1)
        assert ra.position == start + (2 << 20)  # no further without advance
        ra.advance(start + (3 << 20))
        _wait(lambda: ra.position == start + (5 << 20))
        ra.advance(end)
        _wait(lambda: ra.position == end)
    finally:
        ra.stop()
    assert not ra._thread.is_alive()


@pytest.mark.parametrize("fill", ["sendfile", "pread fallback"])
def test_brings_the_data_into_the_page_cache(tmp_path, monkeypatch, fill):
    if fill != "sendfile":
        def refuse(*a):
            raise OSError(22, "Invalid argument")  # as where sendfile cannot write to /dev/null
        monkeypatch.setattr(readahead.os, "sendfile", refuse)
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("needs preadv2(RWF_NOWAIT) to see what is cached")
    monkeypatch.setattr(readahead, "CHUNK", 3 << 20)  # the fallback reads each window in pieces
    p = tmp_path / "m.safetensors"
    start = _file(p, 16 << 20)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        def cached() -> bool:
            buf = bytearray(16 << 20)
            try:
                return os.preadv(fd, [buf], start, os.RWF_NOWAIT) == len(buf)
            except BlockingIOError:
                return False
        if cached():
            pytest.skip("this file system keeps the file in memory (DONTNEED evicts nothing)")
        ra = readahead.Readahead(p, ahead=40 << 20)
        assert ra.window == 10 << 20  # a quarter of ahead, between CHUNK and WINDOW
        _wait(lambda: ra.position == start + (16 << 20))
        ra.stop()
        assert cached()
    finally:
        os.close(fd)


def test_window_sizes(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    _file(p, 1 << 20)
    for ahead, window in ((8 << 30, readahead.WINDOW), (256 << 20, 64 << 20), (2 << 20, readahead.CHUNK)):
        ra = readahead.Readahead(p, ahead=ahead)
        ra.stop()
        assert ra.window == window


def test_not_a_regular_file_is_left_alone(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    t = time.monotonic()
    assert readahead.start(fifo) is None and readahead.start(tmp_path / "missing.safetensors") is None
    assert readahead.start(tmp_path) is None
    assert time.monotonic() - t < 1


def test_cli_start_is_adopted_by_convert_and_stopped(tmp_path, monkeypatch):
    src = tmp_path / "m.safetensors"
    from safetensors.torch import save_file
    import torch
    save_file({"blocks.0.fc.weight": torch.randn(64, 64, dtype=torch.bfloat16)}, str(src))
    readahead.start_for_cli(["convert", "--format", "int8-row", str(src)])
    started = readahead._started
    assert started is not None and started.same_file(src)
    seen = []
    real_adopt = readahead.adopt
    monkeypatch.setattr(readahead, "adopt", lambda path: seen.append(real_adopt(path)) or seen[-1])
    quantkit.convert(src, tmp_path / "out.safetensors", format="int8-row")
    assert seen == [started] and readahead._started is None
    assert not started._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "quantkit-readahead"]


def test_adopt_for_another_file_stops_the_early_one(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _file(a, 1 << 20)
    _file(b, 1 << 20)
    readahead.start_for_cli(["convert", str(a)])
    early = readahead._started
    ra = readahead.adopt(b)
    try:
        assert ra is not early and ra.same_file(b) and not early._thread.is_alive()
    finally:
        ra.stop()


def _child_started(path, q):
    readahead.start_for_cli(["convert", str(path)])
    q.put(readahead._started is not None)


def test_not_started_in_worker_processes(tmp_path):
    """--devices workers are spawned with the parent's argv; they must not read the input again."""
    import multiprocessing as mp
    p = tmp_path / "m.safetensors"
    _file(p, 1 << 20)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_started, args=(p, q))
    proc.start()
    got = q.get(timeout=60)
    proc.join(60)
    assert got is False
    readahead.start_for_cli(["convert", str(p)])  # the main process does start one
    try:
        assert readahead._started is not None
    finally:
        readahead.adopt(p).stop()


def test_stop_with_a_timeout_does_not_wait_for_a_window_in_flight(tmp_path, monkeypatch):
    """convert() stops the readahead with a short timeout: an error (or the end) is reported at once,
    while a window still being read on a slow disk finishes in the background."""
    p = tmp_path / "m.safetensors"
    _file(p, 4 << 20)
    started, release = threading.Event(), threading.Event()

    def slow_fill(self, pos, n):
        started.set()
        release.wait(10)
    monkeypatch.setattr(readahead.Readahead, "_fill", slow_fill)
    monkeypatch.setattr(readahead, "CHUNK", 1 << 20)
    ra = readahead.Readahead(p, ahead=8 << 20)  # 2 MB windows: the file is two of them
    assert started.wait(5)
    t = time.monotonic()
    ra.stop(timeout=0.1)
    assert time.monotonic() - t < 1 and ra._thread.is_alive()
    release.set()
    ra._thread.join(5)
    assert not ra._thread.is_alive() and ra.position < ra.end  # it stopped after that window
