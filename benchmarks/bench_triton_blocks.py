"""Per-call GPU times of the mxfp8 and nvfp4 quantizers: each format's torch ``quantize`` on CUDA
(what ``--device cuda`` runs today) vs the Triton kernels of ``quantkit.kernels.triton_blocks``, on
bf16 weights of the given shapes. CUDA events around each call (the Triton call includes its NaN/Inf
check, a synchronization), --warmup calls first, the median of --reps. Every Triton result is
compared with the torch one, byte for byte (a mismatch exits non-zero). GB/s is the bf16 weight's
bytes over the Triton time (the rate it would have to be read at to keep up). ``--sweep`` also times
a few tile / warp settings of the Triton kernels (same bytes checked) so the defaults can be tuned.

    PYTHONPATH=src python benchmarks/bench_triton_blocks.py [--shapes 3072x3072,12288x3072] [--reps 10] [--sweep]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from quantkit.formats import mxfp8, nvfp4
from quantkit.kernels import triton_blocks

TORCH = {"mxfp8": mxfp8.quantize, "nvfp4": nvfp4.quantize}
TRITON = {"mxfp8": triton_blocks.mxfp8, "nvfp4": triton_blocks.nvfp4}
SWEEP = [((8, 8), 4), ((16, 8), 4), ((16, 8), 8), ((32, 8), 8), ((16, 16), 8), ((32, 4), 4), ((64, 4), 8)]


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def same_bytes(got: dict, want: dict) -> bool:
    return sorted(got) == sorted(want) and all(
        got[t].dtype == want[t].dtype and got[t].shape == want[t].shape
        and torch.equal(got[t].contiguous().reshape(-1).view(torch.uint8),
                        want[t].contiguous().reshape(-1).view(torch.uint8)) for t in want)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="3072x3072,12288x3072")
    ap.add_argument("--formats", default="mxfp8,nvfp4")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}\n")
    print("| format | shape | torch ms | triton ms | speedup | triton GB/s (bf16 in) | bytes |")
    print("|---|---|---:|---:|---:|---:|---|")
    bad = 0
    sweeps = []
    for shape in a.shapes.split(","):
        n, k = (int(s) for s in shape.split("x"))
        w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * k ** -0.5).bfloat16().cuda()
        for name in a.formats.split(","):
            want = TORCH[name](w)
            got, _, _ = TRITON[name](w)
            ok = same_bytes(got, want)
            bad += not ok
            t_torch = time_ms(lambda: TORCH[name](w), 1, max(3, a.reps // 3))
            t_tri = time_ms(lambda: TRITON[name](w), a.warmup, a.reps)
            print(f"| {name} | {n}x{k} | {t_torch:.2f} | {t_tri:.3f} | {t_torch / t_tri:.1f}x | "
                  f"{2 * n * k / t_tri / 1e6:.0f} | {'= torch' if ok else 'DIFFER'} |")
            if a.sweep:
                for tile, warps in SWEEP:
                    got, _, _ = TRITON[name](w, tile=tile, num_warps=warps)
                    ok = same_bytes(got, want)
                    bad += not ok
                    t = time_ms(lambda: TRITON[name](w, tile=tile, num_warps=warps), a.warmup, a.reps)
                    sweeps.append(f"| {name} | {n}x{k} | {tile[0]}x{tile[1]} | {warps} | {t:.3f} | "
                                  f"{2 * n * k / t / 1e6:.0f} | {'= torch' if ok else 'DIFFER'} |")
    if sweeps:
        print("\n| format | shape | tile (rows x blocks) | warps | triton ms | GB/s | bytes |")
        print("|---|---|---|---:|---:|---:|---|")
        print("\n".join(sweeps))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
