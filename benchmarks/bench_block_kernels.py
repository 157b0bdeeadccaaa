"""Per-call times of the C kernels of int8-convrot, mxfp8 and nvfp4 (``quantkit.kernels.native_blocks``)
on one bf16 weight, as the converter calls them (with the SQNR sums). Thread CPU time (min and median
of --reps), so a shared machine's other load shows less than in wall time; ``--threads`` sets torch's
thread count (the kernels split rows over it). ``--check`` compares each result with its format's
torch ``quantize`` (nvfp4: ``quantize_reference``), byte for byte; a mismatch exits non-zero.

    PYTHONPATH=src python benchmarks/bench_block_kernels.py [--shape 3072x3072] [--reps 7] [--threads 1] [--check]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from quantkit.formats import FORMATS, LayerOpts, nvfp4
from quantkit.kernels import native_blocks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="3072x3072")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--formats", default="int8-convrot,mxfp8,nvfp4")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    why = native_blocks.available()
    if why is not None:
        sys.exit(f"native kernels unavailable: {why}")
    torch.set_num_threads(a.threads)
    n, k = (int(s) for s in a.shape.split("x"))
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * k ** -0.5).bfloat16()
    bad = 0
    for name in a.formats.split(","):
        f = FORMATS[name]
        got, _ = f.quantize_native(w, LayerOpts())
        times = []
        for _ in range(a.reps):
            t0 = time.thread_time() if a.threads == 1 else time.process_time()
            f.quantize_native(w, LayerOpts())
            times.append((time.thread_time() if a.threads == 1 else time.process_time()) - t0)
        line = f"{name:13s} {n}x{k} bf16, {a.threads} thread(s): min {1e3 * min(times):7.1f} ms, " \
               f"median {1e3 * statistics.median(times):7.1f} ms CPU"
        if a.check:
            ref = nvfp4.quantize_reference(w) if name == "nvfp4" else f.quantize(w, LayerOpts())
            same = sorted(ref) == sorted(got) and all(
                torch.equal(ref[t].reshape(-1).view(torch.uint8), got[t].reshape(-1).view(torch.uint8)) for t in ref)
            line += ", bytes " + ("= torch" if same else "DIFFER from torch")
            bad += not same
        print(line)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
