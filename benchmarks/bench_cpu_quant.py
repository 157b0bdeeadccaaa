"""Per-tensor CPU quantizer times of the scaled-grid formats (fp8, int8 tensor / row / block): the native C
kernels (``kernels/cpu_quant.c``) vs the torch chunked path, same run.

For each format, one Flux-shaped bf16 weight (fresh in memory, as a tensor read from the page cache
is): milliseconds per call with the SQNR sums, as the converter calls it (into a reused output
buffer), medians of --reps. Both results are checked bit for bit against ``reference.quantize``; a
mismatch exits non-zero.

    PYTHONPATH=src python benchmarks/bench_cpu_quant.py [--reps 5] [--shape 12288x3072]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from quantkit import backend, quantize, reference
from quantkit.formats import FORMATS
from quantkit.kernels import native


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shape", default="12288x3072")
    a = ap.parse_args()
    why = native.available()
    if why is not None:
        sys.exit(f"native kernels unavailable: {why}")
    n, k = (int(x) for x in a.shape.split("x"))
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    buf = torch.empty(n * k, dtype=torch.uint8)
    print(f"{n} x {k} bf16, {torch.get_num_threads()} threads, median of {a.reps}\n")
    print("| format | native ms | torch ms | torch / native | native ns per weight per thread |")
    print("|---|---|---|---|---|")
    bad = False
    for name, spec in FORMATS.items():
        if not backend.has_kernel(spec):  # the scaled grids only: the others have their own kernels
            continue
        qr, sr = reference.quantize(w, spec, 128)
        for fn in (native.quantize_tensor, quantize.quantize_tensor):
            q, s, _ = fn(w, spec, 128, out=buf)
            if not (torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)):
                print(f"MISMATCH: {fn.__module__} {name}", file=sys.stderr)
                bad = True
        tn = median_ms(lambda: native.quantize_tensor(w, spec, 128, out=buf), a.reps)
        tt = median_ms(lambda: quantize.quantize_tensor(w, spec, 128, out=buf), a.reps)
        per = tn * 1e6 * torch.get_num_threads() / (n * k)
        print(f"| {name} | {tn:.1f} | {tt:.1f} | {tt / tn:.2f} | {per:.2f} |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
