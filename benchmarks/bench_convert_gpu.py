"""GPU conversion benchmark (issue 4): `quantkit convert --device cuda` against the disk floor and
the old converter, in one run on one synthetic Flux-shaped bf16 checkpoint on the local disk.

Disk floor = read of the input with O_DIRECT (`dd iflag=direct`) + write of an output-sized file
with O_DIRECT and a final sync: the least time any converter that reads the input and writes the
output can take. Before each timed conversion the input's pages are evicted from the page cache
(posix_fadvise DONTNEED after sync); whether that worked is measured and printed (a buffered read
after eviction must take over twice as long as one from the page cache). Python's and torch's own files stay cached, as on
any machine that has run Python lately; one extra row drops the whole page cache (drop_caches,
where permitted) to show a first run after boot. Every conversion writes a fresh output file, as
the floor does. The timed runs go in interleaved rounds (the floor, then each format), and each
format's ratio is the median over rounds of its wall time over its own round's floor: this disk's
speed drifts by 10-20% within minutes. Each format also gets one run under `start_timeline.py
--disk`: process milestones plus the disk's read/write GB/s in 0.5 s bins.

    python benchmarks/bench_convert_gpu.py --dir /tmp/qk --gb 8.5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402


def evict(path: Path, everything: bool = False) -> None:
    """Drop ``path`` from the page cache; with ``everything``, the whole page cache (Python's and
    torch's own files too: a first run after boot)."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if everything:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            pass


def wall(cmd: list[str] | str, shell: bool = False) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, shell=shell, capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"})
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({r.returncode}): {(r.stderr or r.stdout)[-3000:]}")
    for line in r.stdout.splitlines():  # quantkit's summary: where the time went
        if line.lstrip().startswith(("time", "read+quantize", "fsync")) or "verify" in line:
            print("   ", line.strip(), flush=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qk-bench"))
    ap.add_argument("--gb", type=float, default=8.5)
    ap.add_argument("--formats", default="fp8,int8-row,int8-block")
    ap.add_argument("--no-ctq", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu only to try the script out on a machine without a GPU")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per format (the table shows the median)")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    src = a.dir / "flux-synth.safetensors"
    t = time.perf_counter()
    if not src.exists():
        synth.build(src, a.gb)
    print(f"built {src.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s", flush=True)
    out = a.dir / "out.safetensors"
    size = src.stat().st_size
    out_size = size // 2 + (1 << 20)

    def disk_floor() -> tuple[float, bool]:
        # Only the input is evicted: dropping the whole page cache here made the next conversion load
        # torch and CUDA from disk too (the "all caches dropped" row), 4-6 s slower.
        evict(src)
        t_read = wall(f"dd if='{src}' of=/dev/null bs=64M iflag=direct status=none", shell=True)
        evict(src)
        t_cold = wall(f"cat '{src}' > /dev/null", shell=True)
        t_cached = wall(f"cat '{src}' > /dev/null", shell=True)
        t_write = wall(f"dd if=/dev/zero of='{out}' bs=64M count={out_size >> 26} oflag=direct status=none "
                       f"&& sync '{out}'", shell=True)
        out.unlink()
        print(f"read direct {size / t_read / 1e9:.2f} GB/s, cold buffered {size / t_cold / 1e9:.2f} GB/s, "
              f"write direct {out_size / t_write / 1e9:.2f} GB/s, floor {t_read + t_write:.2f} s", flush=True)
        return t_read + t_write, t_cold > 2 * t_cached  # eviction worked: a cold read is disk-speed

    rows: list[tuple[str, float, float]] = []  # label, wall s, x floor
    qk = [sys.executable, "-m", "quantkit", "convert", str(src), "-o", str(out), "--overwrite",
          "--device", a.device, "--preset", "none"]
    fmts = a.formats.split(",")

    def convert(fmt: str, *, everything: bool = False) -> float:
        out.unlink(missing_ok=True)  # a fresh output file, like the floor's (replacing one costs its unlink)
        evict(src, everything)
        return wall(qk + ["--format", fmt])

    sample = Path(__file__).resolve().parents[1] / "samples" / "flux-mini.safetensors"
    for fmt in fmts:
        # First use of a format compiles its Triton kernels (cached on disk afterwards, as on a
        # user's machine after the first run): time that once, on the tiny bundled sample.
        tiny = a.dir / "tiny.safetensors"
        t_first = wall([sys.executable, "-m", "quantkit", "convert", str(sample), "-o", str(tiny), "--overwrite",
                        "--quiet", "--device", a.device, "--format", fmt])
        t_again = wall([sys.executable, "-m", "quantkit", "convert", str(sample), "-o", str(tiny), "--overwrite",
                        "--quiet", "--device", a.device, "--format", fmt])
        print(f"{fmt}: 3.7 MB sample, first run {t_first:.2f} s (Triton compile), second {t_again:.2f} s "
              "(process start + CUDA init)", flush=True)

    # Interleaved rounds: the floor, then each format; a run's ratio is over its own round's floor
    # (this disk's speed drifts by 10-20% within minutes), and the table gives the median ratio.
    floors: list[float] = []
    walls: dict[str, list[float]] = {f: [] for f in fmts}
    evict_ok = True
    for rnd in range(a.repeat):
        fl, ok = disk_floor()
        floors.append(fl)
        evict_ok &= ok
        for fmt in fmts:
            walls[fmt].append(convert(fmt))
        print(f"round {rnd + 1}: floor {fl:.2f} s, " + ", ".join(f"{f} {walls[f][-1]:.2f} s" for f in fmts), flush=True)
    floor = statistics.mean(floors)
    for fmt in fmts:
        ratio = statistics.median(w / fl for w, fl in zip(walls[fmt], floors))
        runs = ", ".join(f"{w:.2f}" for w in walls[fmt])
        rows.append((f"quantkit {fmt} --device {a.device} (median of {a.repeat}: {runs})", statistics.median(walls[fmt]),
                     ratio))

    # the first format without the start-up readahead (quantkit.readahead), with buffered writes,
    # and with the whole page cache dropped (Python, torch and CUDA libraries load from disk too)
    fmt = fmts[0]
    for var in ("QUANTKIT_READAHEAD", "QUANTKIT_DIRECT_IO"):
        os.environ[var] = "0"
        try:
            w = convert(fmt)
        finally:
            del os.environ[var]
        rows.append((f"quantkit {fmt} --device {a.device}, {var}=0", w, w / floor))
        print(rows[-1], flush=True)
    w = convert(fmt, everything=True)
    rows.append((f"quantkit {fmt} --device {a.device}, all caches dropped", w, w / floor))
    print(rows[-1], flush=True)
    for fmt in fmts:
        # where the wall time goes, and when the disk idles (benchmarks/start_timeline.py)
        out.unlink(missing_ok=True)
        evict(src)
        tl = subprocess.run([sys.executable, str(Path(__file__).with_name("start_timeline.py")), "--disk", str(src),
                             "--", *qk[3:], "--format", fmt], capture_output=True, text=True)
        print(f"timeline {fmt}:", tl.stdout.strip(), tl.stderr[-500:], flush=True)
    if not a.no_ctq and shutil.which("convert_to_quant"):
        ctq = ["convert_to_quant", "-i", str(src), "-o", str(out), "--simple", "--comfy_quant", "--device", "cuda"]
        for label, extra in (("fp8", []), ("int8-block", ["--int8", "--scaling_mode", "block", "--block_size", "128",
                                                           "--exclude-layers", "img_in"])):
            out.unlink(missing_ok=True)
            evict(src)
            try:
                w = wall(ctq + extra)
                rows.append((f"convert_to_quant {label} --simple", w, w / floor))
            except RuntimeError as e:
                print(f"convert_to_quant {label} failed: {str(e)[-300:]}", flush=True)
            print(rows[-1], flush=True)
    out.unlink(missing_ok=True)
    ctq_t = {r[0].split()[1]: r[1] for r in rows if r[0].startswith("convert_to_quant")}
    print(f"\ninput {size / 1e9:.2f} GB; page-cache eviction {'worked' if evict_ok else 'did NOT work'}\n")
    print("| command | wall s | x disk floor | convert_to_quant s / quantkit s |")
    print("|---|---|---|---|")
    print(f"| disk floor (dd direct read + write; rounds: {', '.join(f'{f:.2f}' for f in floors)}) "
          f"| {floor:.2f} | 1.00 | |")
    for label, w, ratio in rows:
        fmt = label.split()[1]
        vs = f"{ctq_t[fmt] / w:.1f}x" if label.startswith("quantkit") and fmt in ctq_t else ""
        print(f"| {label} | {w:.2f} | {ratio:.2f} | {vs} |")


if __name__ == "__main__":
    main()
