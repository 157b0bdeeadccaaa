"""Where the wall time of one `quantkit convert` process goes, outside the converter's own timer.

Runs the command line in a child process that stamps the wall clock at: interpreter up, `import
quantkit` done (readahead started, torch imported), `quantkit.cli` imported, `convert()` entered and
returned, Python's atexit, and the parent sees the process end. Prints seconds since launch.
With ``--disk FILE`` it also samples /proc/diskstats for the block device holding FILE and prints
the disk's read and write throughput in 0.5 s bins over the same clock: where the disk sits idle.

    python benchmarks/start_timeline.py [--evict FILE] [--disk FILE] -- convert model.safetensors -o out.safetensors --device cuda

``--startup N [--input FILE]``: instead, the start-up of the light commands (``--version``,
``--help``, ``formats``, ``presets``, ``convert --help``) and, with ``--input``, of ``convert``
up to ``convert()`` (imports, option checks), each the minimum of N runs interleaved with
``python -c pass`` and printed as a ratio to it; and whether each imported torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert_gpu import evict  # noqa: E402  (the input's pages only)

CHILD = r"""
import sys, time
t0 = float(sys.argv[1]); marks = [("python up", time.time() - t0)]
sys.argv = ["quantkit"] + sys.argv[2:]
import atexit, os
def report(last):
    print("TIMELINE " + " | ".join(f"{k} {v:.2f}" for k, v in marks + [(last, time.time() - t0)]),
          file=sys.stderr, flush=True)
atexit.register(report, "atexit")
real_exit = os._exit
def stamped_exit(code):  # the console script ends with os._exit, which skips atexit
    report("os._exit")
    real_exit(code)
os._exit = stamped_exit
import quantkit; marks.append(("import quantkit", time.time() - t0))
import quantkit.cli as cli; marks.append(("import cli", time.time() - t0))
real = cli.convert_file
def stamped(*a, **k):
    marks.append(("convert() in", time.time() - t0))
    try:
        return real(*a, **k)
    finally:
        marks.append(("convert() out", time.time() - t0))
cli.convert_file = stamped
import importlib
def wrap(owner, attr, label):
    real = getattr(owner, attr)
    def inner(*a, **k):
        t = time.time() - t0
        try:
            return real(*a, **k)
        finally:
            marks.append((f"{label} {t:.2f}-", time.time() - t0))
    setattr(owner, attr, inner)
for spec in STAMPS:  # "module:Class.attr" or "module:function"
    mod, _, path = spec.partition(":")
    owner = importlib.import_module(mod)
    *outer, attr = path.split(".")
    for o in outer:
        owner = getattr(owner, o)
    wrap(owner, attr, path.rsplit(".", 2)[-1] if len(outer) == 0 else ".".join(path.split(".")[-2:]))
cli.main()
"""

# Steps of a conversion stamped with their start and end ("label start-end"), in the order they end.
STAMPS = ["quantkit.convert:_execute", "quantkit.pipeline:BackgroundWriter.close",
          "quantkit.safetensors_io:SafetensorsWriter.finish", "quantkit.safetensors_io:SafetensorsWriter.close",
          "os:fsync", "quantkit.convert:verify_written", "os:replace", "quantkit.convert:_fsync_dir",
          "quantkit.safetensors_io:SafetensorsReader.close", "quantkit.readahead:Readahead.stop"]


def _disk_name(path: Path) -> str:
    """The /proc/diskstats name of the block device that holds ``path`` (its partition's, if any)."""
    dev = os.stat(path).st_dev
    want = (os.major(dev), os.minor(dev))
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if (int(f[0]), int(f[1])) == want:
            return f[2]
    raise LookupError(f"no /proc/diskstats entry for device {want[0]}:{want[1]} ({path})")


def _sectors(name: str) -> tuple[int, int]:
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == name:
            return int(f[5]), int(f[9])  # sectors read, sectors written (512 B each)
    raise LookupError(name)


class DiskSampler:
    """Samples a block device's read/write sector counters every ``dt`` seconds on a thread."""

    def __init__(self, path: Path, t0: float, dt: float = 0.1) -> None:
        self.name, self.t0, self.dt = _disk_name(path), t0, dt
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            self.samples.append((time.time() - self.t0, *_sectors(self.name)))
            if self._stop.wait(self.dt):
                self.samples.append((time.time() - self.t0, *_sectors(self.name)))
                return

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def profile(self, bin_s: float = 0.5) -> str:
        """Two lines, read and write GB/s per ``bin_s`` bin from launch, and the totals."""
        s = self.samples
        nbins = int(s[-1][0] / bin_s) + 1
        rd, wr = [0.0] * nbins, [0.0] * nbins
        for (ta, ra, wa), (tb, rb, wb) in zip(s, s[1:]):
            b = min(int(ta / bin_s), nbins - 1)
            rd[b] += (rb - ra) * 512
            wr[b] += (wb - wa) * 512
        fmt = lambda xs: " ".join(f"{x / bin_s / 1e9:4.1f}" for x in xs)  # noqa: E731
        return (f"disk {self.name}, GB/s per {bin_s} s from launch\n  read  {fmt(rd)}\n  write {fmt(wr)}\n"
                f"  total read {sum(rd) / 1e9:.2f} GB, written {sum(wr) / 1e9:.2f} GB")


# The light commands' child: run the command line, then say whether torch was imported.
LIGHT = r"""
import os, sys
sys.argv = ["quantkit"] + sys.argv[1:]
real_exit = os._exit
def stamped_exit(code):
    sys.stderr.write(f"TORCH {'torch' in sys.modules}\n"); sys.stderr.flush()
    real_exit(code)
os._exit = stamped_exit
import quantkit.cli
quantkit.cli.main()
"""

# convert up to convert(): the same command line, stopped where the converter would start.
UNTIL_CONVERT = r"""
import os, sys
sys.argv = ["quantkit"] + sys.argv[1:]
import quantkit.cli as cli
def stop(*a, **k):
    sys.stderr.write(f"TORCH {'torch' in sys.modules}\n"); sys.stderr.flush()
    os._exit(0)
cli.convert_file = stop
cli.main()
"""


def startup(runs: int, input_file: Path | None) -> None:
    cases: list[tuple[str, list[str]]] = [("python -c pass", ["-c", "pass"])]
    for args in (["--version"], ["--help"], ["formats"], ["presets"], ["convert", "--help"]):
        cases.append(("quantkit " + " ".join(args), ["-c", LIGHT, *args]))
    if input_file is not None:
        cases.append((f"quantkit convert {input_file.name} (to convert())",
                      ["-c", UNTIL_CONVERT, "convert", str(input_file), "-o", os.devnull + ".never", "-q"]))
    env = {**os.environ, "COLUMNS": "100"}
    best = {name: float("inf") for name, _ in cases}
    torch_in = {}
    for _ in range(runs):  # interleaved: machine load affects every case alike
        for name, args in cases:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
            best[name] = min(best[name], time.perf_counter() - t)
            torch_in[name] = "TORCH True" in r.stderr
    base = best["python -c pass"]
    print(f"start-up, min of {runs} runs ({sys.executable})")
    for name, _ in cases:
        tag = "" if name == "python -c pass" else ("  imports torch" if torch_in[name] else "  no torch")
        print(f"  {best[name]:6.3f} s  {best[name] / base:5.1f}x python -c pass  {name}{tag}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evict", action="append", default=[])
    ap.add_argument("--disk", type=Path, help="sample the disk that holds this file")
    ap.add_argument("--startup", type=int, metavar="N", help="time the light commands' start-up, min of N runs")
    ap.add_argument("--input", type=Path, help="with --startup: also time convert INPUT up to convert()")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.startup:
        startup(a.startup, a.input)
        return
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    for f in a.evict:
        evict(Path(f))
    t0 = time.time()
    disk = DiskSampler(a.disk, t0) if a.disk is not None else None
    r = subprocess.run([sys.executable, "-c", f"STAMPS = {STAMPS!r}\n" + CHILD, repr(t0), *args],
                       capture_output=True, text=True)
    end = time.time() - t0
    if disk is not None:
        disk.stop()
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("TIMELINE")), "TIMELINE (none)")
    summary = [ln.strip() for ln in r.stdout.splitlines() if ln.lstrip().startswith("time")]
    print(f"{line[9:]} | process end {end:.2f}  (rc {r.returncode}) {' '.join(summary)}")
    if disk is not None:
        print(disk.profile())
    if r.returncode:
        print(r.stderr[-2000:])


if __name__ == "__main__":
    main()
