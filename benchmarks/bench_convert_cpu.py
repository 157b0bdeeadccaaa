"""CPU conversion benchmark (issue 2/4): wall time and whole-process peak RSS of `quantkit convert`
per format against `cp in out && sync out` and against the old converter, all in one run on the same
file, with the input in the page cache for every command (it is read once before each).

    python benchmarks/bench_convert_cpu.py --dir /work/bench --gb 4.2 [--repeat 3] [--no-ctq] [--torch-too]
        [--formats fp8,int8-row,int8-convrot,mxfp8,nvfp4]

The "x int8-row" column is each run over the int8-row run of the same round.

quantkit runs with the backend it picks (``native`` where a C compiler builds it, built once before the
rounds, as on a user's first conversion); ``--torch-too`` adds the same formats with
``QUANTKIT_BACKEND=torch`` to every round.

Needs /usr/bin/time (GNU). The old converter: `pip install convert-to-quant prodigy-plus-schedule-free`.
Prints a Markdown table. cp and the quantkit formats run in interleaved rounds (--repeat of them);
each quantkit run's ratio is over the cp of its own round, and the table gives the median ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402


def timed(cmd: list[str] | str, shell: bool = False, timeout: float | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command, via GNU time; (inf, 0) past ``timeout``."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = ["/usr/bin/time", "-f", "%e %M", "-o", tf.name]
        full += ["sh", "-c", cmd] if shell else cmd
        try:
            r = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return float("inf"), 0
        if r.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({r.returncode}): {r.stderr[-2000:]}")
        wall, rss = tf.read().split()[-2:]
    return float(wall), int(rss) * 1024


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("bench-data"))
    ap.add_argument("--gb", type=float, default=4.2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--formats", default="fp8,int8-tensor,int8-row,int8-block,int8-convrot,mxfp8,nvfp4")
    ap.add_argument("--no-ctq", action="store_true", help="skip the old converter")
    ap.add_argument("--torch-too", action="store_true", help="also time each format on the torch backend")
    ap.add_argument("--ctq-timeout", type=float, default=900, help="give up on the old converter after this many s")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    src = a.dir / f"flux-synth-{a.gb:g}g.safetensors"
    if not src.exists():
        synth.build(src, a.gb)
    out = a.dir / "out.safetensors"
    rows: list[tuple[str, float, int]] = []
    ratios: dict[str, list[float]] = {}

    def one(cmd, shell=False, timeout=None) -> tuple[float, int]:
        out.unlink(missing_ok=True)
        warm(src)
        return timed(cmd, shell, timeout)

    def run(label: str, cmd, shell=False, timeout=None) -> None:
        walls, rss = [], 0
        for _ in range(a.repeat):
            w, r = one(cmd, shell, timeout)
            walls.append(w)
            rss = max(rss, r)
        rows.append((label, statistics.median(walls), rss))
        print(f"{label}: {statistics.median(walls):.2f} s, peak RSS {rss / 1e6:.0f} MB", file=sys.stderr)

    # --preset none: quantize every linear, as the old converter does by default
    qk = [sys.executable, "-m", "quantkit", "convert", str(src), "-o", str(out), "--overwrite", "--quiet",
          "--preset", "none"]
    cmds = [("cp + sync", f"cp '{src}' '{out}' && sync '{out}'", True)]
    cmds += [(f"quantkit {fmt}", qk + ["--format", fmt], False) for fmt in a.formats.split(",")]
    if a.torch_too:
        cmds += [(f"quantkit {fmt}, torch backend", ["env", "QUANTKIT_BACKEND=torch", *qk, "--format", fmt], False)
                 for fmt in a.formats.split(",")]
    built = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); from quantkit import "
                            "backend; print(backend.backend_for('cpu'), f'{time.perf_counter() - t:.2f}')"],
                           capture_output=True, text=True, check=True).stdout.split()
    print(f"CPU backend: {built[0]} (import and backend choice, any first-use build included: {built[1]} s)", file=sys.stderr)
    # Interleaved rounds: this disk's write speed drifts by 3x over minutes, so each quantkit run is
    # compared with the cp of its own round (the ratio column is the median of those per-round ratios).
    walls: dict[str, list[float]] = {label: [] for label, _, _ in cmds}
    peak: dict[str, int] = {label: 0 for label, _, _ in cmds}
    for rnd in range(a.repeat):
        for label, cmd, shell in cmds:
            w, r = one(cmd, shell)
            walls[label].append(w)
            peak[label] = max(peak[label], r)
            if label != "cp + sync":
                ratios.setdefault(label, []).append(w / walls["cp + sync"][-1])
        print(f"round {rnd + 1}: " + ", ".join(f"{lbl} {walls[lbl][-1]:.2f} s" for lbl, _, _ in cmds), file=sys.stderr)
    for label, _, _ in cmds:
        rows.append((label, statistics.median(walls[label]), peak[label]))
    if not a.no_ctq and shutil.which("convert_to_quant"):
        ctq = ["convert_to_quant", "-i", str(src), "-o", str(out), "--simple", "--low-memory", "--comfy_quant"]
        run("convert_to_quant fp8 --simple --low-memory", ctq, timeout=a.ctq_timeout)
        run("convert_to_quant int8 block --simple --low-memory",
            ctq + ["--int8", "--scaling_mode", "block", "--block_size", "128", "--exclude-layers", "img_in"],
            timeout=a.ctq_timeout)
    out.unlink(missing_ok=True)

    base = rows[0][1]
    ctq_times = {lbl.split()[1]: w for lbl, w, _ in rows if lbl.startswith("convert_to_quant")}
    size = src.stat().st_size
    print(f"\ninput {size / 1e9:.2f} GB, {os.cpu_count()} cores, median of {a.repeat} interleaved rounds\n")
    # each quantkit run over the int8-row run of its own round (the target of the newer formats)
    row_label = "quantkit int8-row"
    vs_row = {lbl: [w / r for w, r in zip(walls[lbl], walls[row_label])] for lbl in walls
              if lbl.startswith("quantkit") and row_label in walls}
    print("| command | wall s (median) | x cp (median of per-round ratios) | per-round x cp, min-max | peak RSS MB "
          "| x int8-row (median of per-round ratios) | x convert_to_quant |")
    print("|---|---|---|---|---|---|---|")
    for label, wall, rss in rows:
        vs = ""
        if label.startswith("quantkit") and ctq_times and "torch backend" not in label:
            ref = ctq_times.get("int8" if "int8-block" in label else "fp8")
            vs = f"{wall / ref:.2f}" if ref else ""
        rr = ratios.get(label)
        x = f"{statistics.median(rr):.2f}" if rr else f"{wall / base:.2f}"
        spread = f"{min(rr):.2f}-{max(rr):.2f}" if rr else ""
        xr = f"{statistics.median(vs_row[label]):.2f}" if vs_row.get(label) else ""
        print(f"| {label} | {wall:.2f} | {x} | {spread} | {rss / 1e6:.0f} | {xr} | {vs} |")


if __name__ == "__main__":
    main()
