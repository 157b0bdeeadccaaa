"""How fast can a thread pull a file into the page cache? (the start-up readahead, quantkit.readahead)

Each method starts with the file evicted from the page cache and ends when every page is cached
(checked: a buffered read of the whole file afterwards, timed separately, must be memory speed).
Same run, same file, methods interleaved over ``--repeat`` rounds; prints GB/s per method.

    python benchmarks/bench_readahead.py FILE [--repeat 2]

* ``cat``: a buffered sequential read, 128 KiB at a time (the kernel's own readahead).
* ``populate``: 32 MB mmap windows faulted in with madvise(MADV_POPULATE_READ), one after another.
* ``fadvise``: posix_fadvise(WILLNEED) on 32 MB ranges (queues the reads, does not wait), then a
  buffered read of the file to wait for them.
* ``pread``: 32 MB preads into one buffer.

With ``--with-import`` it measures the case that matters: the readahead runs while the same
process imports torch (and initialises CUDA where there is a GPU), as at the start of
``quantkit convert``. Rows: how many GB the disk read by the time the import finished, and when
the whole file was cached, for a reading thread (32 MB or 512 MB windows; between windows it
needs the GIL, which the import holds through long stretches such as loading torch's libraries),
a thread queueing posix_fadvise(WILLNEED) (32 MB or 512 MB ranges), and a forked child process (no
GIL shared).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert_gpu import evict  # noqa: E402

from quantkit import readahead  # noqa: E402

CHUNK = 32 << 20


def m_cat(path: Path) -> None:
    subprocess.run(f"cat '{path}' > /dev/null", shell=True, check=True)


def m_populate(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        for pos in range(0, end, CHUNK):
            assert readahead._populate_read(fd, pos, min(CHUNK, end - pos))
    finally:
        os.close(fd)


def m_fadvise(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        for pos in range(0, end, CHUNK):
            os.posix_fadvise(fd, pos, min(CHUNK, end - pos), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    m_cat(path)  # waits for the queued reads


def m_pread(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(CHUNK)
    try:
        end = os.fstat(fd).st_size
        for pos in range(0, end, CHUNK):
            os.preadv(fd, [memoryview(buf)[:min(CHUNK, end - pos)]], pos)
    finally:
        os.close(fd)


IMPORT_CHILD = r"""
import os, sys, threading, time
t0 = time.time()
method, path = sys.argv[1], sys.argv[2]
import ctypes, mmap
def _sectors(want):  # sectors read so far by the disk that holds ``path``
    for line in open("/proc/diskstats"):
        f = line.split()
        if (int(f[0]), int(f[1])) == want:
            return (int(f[5]),)
dev = os.stat(path).st_dev
disk = (os.major(dev), os.minor(dev))
libc = ctypes.CDLL("libc.so.6", use_errno=True)  # not quantkit.readahead: its package imports torch
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
def populate_read(fd, pos, n):
    addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, pos)
    libc.madvise(addr, n, 22)  # MADV_POPULATE_READ
    libc.munmap(addr, n)
r0 = _sectors(disk)[0]
fd = os.open(path, os.O_RDONLY)
end = os.fstat(fd).st_size
def populate(chunk):
    for pos in range(0, end, chunk):
        populate_read(fd, pos, min(chunk, end - pos))
def sendfile(chunk):  # the kernel reads the file into the page cache and /dev/null drops it
    null = os.open("/dev/null", os.O_WRONLY)
    pos = 0
    while pos < end:
        pos += os.sendfile(null, fd, pos, min(chunk, end - pos)) or end
    os.close(null)
def fadvise(chunk):
    for pos in range(0, end, chunk):
        os.posix_fadvise(fd, pos, min(chunk, end - pos), os.POSIX_FADV_WILLNEED)
    populate(32 << 20)  # waits for the queued reads
if method == "fork":
    pid = os.fork()
    if pid == 0:
        populate(32 << 20)
        os._exit(0)
    wait = lambda: os.waitpid(pid, 0)
else:
    target = {"thread32": lambda: populate(32 << 20), "thread512": lambda: populate(512 << 20),
              "fadvise": lambda: fadvise(32 << 20), "fadvise512": lambda: fadvise(512 << 20),
              "sendfile512": lambda: sendfile(512 << 20)}[method]
    th = threading.Thread(target=target, daemon=True)
    th.start()
    wait = th.join
assert "torch" not in sys.modules
import torch
if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
t_import = time.time() - t0
gb_import = (_sectors(disk)[0] - r0) * 512 / 1e9
wait()
print(f"{t_import:.3f} {gb_import:.3f} {time.time() - t0:.3f}")
"""


def with_import(path: Path, repeat: int) -> None:
    size = path.stat().st_size
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(repeat):
        for m in ("thread32", "thread512", "fadvise", "fadvise512", "sendfile512", "fork"):
            evict(path)
            r = subprocess.run([sys.executable, "-c", IMPORT_CHILD, m, str(path)],
                               capture_output=True, text=True, check=True)
            t_imp, gb, t_all = map(float, r.stdout.split())
            rows.setdefault(m, []).append((t_imp, gb, t_all))
            print(f"{m:9s} import+CUDA {t_imp:5.2f} s, read by then {gb:5.2f} GB ({gb / t_imp:4.2f} GB/s); "
                  f"all {size / 1e9:.2f} GB cached at {t_all:5.2f} s ({size / t_all / 1e9:4.2f} GB/s)", flush=True)


METHODS = {"cat": m_cat, "populate": m_populate, "fadvise": m_fadvise, "pread": m_pread}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--with-import", action="store_true")
    a = ap.parse_args()
    if a.with_import:
        with_import(a.file, a.repeat)
        return
    size = a.file.stat().st_size
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(a.repeat):
        for name, fn in METHODS.items():
            evict(a.file)
            t = time.perf_counter()
            fn(a.file)
            times[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            m_cat(a.file)
            cached = time.perf_counter() - t
            print(f"{name:9s} {size / times[name][-1] / 1e9:5.2f} GB/s  (then cached re-read "
                  f"{size / cached / 1e9:5.1f} GB/s)", flush=True)
    print(f"\n{size / 1e9:.2f} GB file, best of {a.repeat}:")
    for name, ts in times.items():
        print(f"  {name:9s} {size / min(ts) / 1e9:5.2f} GB/s")


if __name__ == "__main__":
    main()
