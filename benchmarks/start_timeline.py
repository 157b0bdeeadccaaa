"""Where the wall time of one `quantkit convert` process goes, outside the converter's own timer.

Runs the command line in a child process that stamps the wall clock at: interpreter up, `import
quantkit` done (readahead started, torch imported), `quantkit.cli` imported, `convert()` entered and
returned, Python's atexit, and the parent sees the process end. Prints seconds since launch.

    python benchmarks/start_timeline.py [--evict FILE] -- convert model.safetensors -o out.safetensors --device cuda
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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
cli.main()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evict", action="append", default=[])
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    for f in a.evict:
        evict(Path(f))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", CHILD, repr(t0), *args], capture_output=True, text=True)
    end = time.time() - t0
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("TIMELINE")), "TIMELINE (none)")
    summary = [ln.strip() for ln in r.stdout.splitlines() if ln.lstrip().startswith("time")]
    print(f"{line[9:]} | process end {end:.2f}  (rc {r.returncode}) {' '.join(summary)}")
    if r.returncode:
        print(r.stderr[-2000:])


if __name__ == "__main__":
    main()
