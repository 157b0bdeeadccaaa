"""Micro-benchmark of the quantizer kernels on one CUDA GPU (the device machine).

For each format and Flux-like bf16 shape: the Triton path (``backend.quantize_triton``) vs the
torch path on the same GPU (``backend.quantize_torch``: the reference math, whole tensor), both
with the SQNR sums. Two timings each, medians of CUDA events over input sets rotated so that no
run reads its input from L2: per call (what the converter sees: allocations, launches, Python)
and kernels only (the calls captured in a CUDA graph and replayed). Throughput is GB/s of bf16
input; "of copy" compares the minimum traffic (2 B read + 1 B written per weight) with a
device-to-device copy measured in the same run. Every output is checked bit for bit against the
CPU reference (``reference.quantize`` on the CPU copy); a mismatch exits non-zero.

    PYTHONPATH=src python3 benchmarks/bench_quant_kernels.py [--reps 30] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from quantkit import backend, reference
from quantkit.formats import FORMATS
from quantkit.kernels import triton_quant

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]
CASES = [("fp8", 128), ("fp8-e5m2", 128), ("int8-tensor", 128), ("int8-row", 128),
         ("int8-block", 128), ("int8-block", 64)]
SETS = 4  # input sets rotated per timing
DEVICE = "cuda"


def time_ms(fn, inputs, reps: int) -> float:
    for w in inputs:  # warm-up (and compile)
        fn(w)
    if DEVICE != "cuda":  # --smoke: the script's logic on CPU under the Triton interpreter
        t0 = time.perf_counter()
        fn(inputs[0])
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        w = inputs[i % len(inputs)]
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(w)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, inputs, reps: int) -> float | None:
    """GPU time of one call: the calls over all input sets captured in one CUDA graph, replayed
    (no Python or launch overhead). None if the call cannot be captured."""
    if DEVICE != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for w in inputs:
                fn(w)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for w in inputs:
                fn(w)
        g.replay()
        torch.cuda.synchronize()
    except Exception as e:  # report, keep measuring the rest
        print(f"  (graph capture failed: {type(e).__name__}: {e})", flush=True)
        return None
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(inputs))
    del g
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    n = 1 << 30 if DEVICE == "cuda" else 1 << 20
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda s: dst.copy_(s), [src], reps)
    return 2 * n / ms / 1e6


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    elif a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return a.shape == b.shape and torch.equal(a, b)


def sweep(reps: int, copy_gbs: float, table: list[str]) -> int:
    """Tile-size variants per kernel on the two large shapes; bit-exactness checked for each."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 1
    variants = {
        "fp8": [dict(flat_block=fb, programs=p * sms, num_warps=nw) for fb, p, nw in
                [(4096, 4, 8), (2048, 4, 4), (8192, 4, 8), (4096, 2, 8), (4096, 8, 8), (4096, 4, 4)]],
        "int8-row": [dict(row_tile=rt, num_warps=nw) for rt, nw in
                     [(4096, 8), (2048, 4), (2048, 8), (8192, 8), (16384, 16), (4096, 4)]],
        "int8-block": [dict(block_tile=bt, num_warps=nw) for bt, nw in
                       [(16384, 8), (4096, 8), (16384, 4), (16384, 16)]],
    }
    bad = 0
    table += ["", "Tile sweep, kernels only (CUDA graph replay; default first):", "",
              "| shape | format | params | median us | GB/s bf16 in | of copy bw | bit-exact |",
              "|---|---|---|---|---|---|---|"]
    for n, k in SHAPES[1:] if DEVICE == "cuda" else SHAPES:
        inputs = [(torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16) for _ in range(SETS)]
        for fmt, vs in variants.items():
            spec = FORMATS[fmt]
            qr, sr = reference.quantize(inputs[0].cpu(), spec, 128)
            for v in vs:
                fn = lambda w: triton_quant.quantize(w, spec, 128, **v)  # noqa: E731
                q, sc, *_ = fn(inputs[0])
                ok = same_bits(q.cpu(), qr) and same_bits(sc.cpu(), sr)
                bad += not ok
                t = graph_ms(fn, inputs, reps) or time_ms(fn, inputs, reps)
                params = " ".join(f"{a}={b}" for a, b in v.items())
                line = (f"| {n}x{k} | {fmt} | {params} | {t * 1e3:.1f} | {2 * n * k / t / 1e6:.0f} | "
                        f"{3 * n * k / t / 1e6 / copy_gbs:.0%} | {'yes' if ok else 'NO'} |")
                print(line, flush=True)
                table.append(line)
        del inputs
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time tile-size variants (tuning)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET (checks the script)")
    args = ap.parse_args()
    global DEVICE, SHAPES, SETS
    if args.smoke:
        DEVICE, SHAPES, SETS = "cpu", [(128, 128), (128, 256)], 1
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (interpreter smoke run, timings meaningless)"
    import triton
    copy_gbs = copy_bandwidth(args.reps)
    head = (f"{name}, torch {torch.__version__}, triton {triton.__version__}; device-to-device copy "
            f"{copy_gbs:.0f} GB/s (read + write); GB/s = bf16 input bytes / time; 'of copy' = "
            f"(2 B read + 1 B written per weight) / time / copy bandwidth")
    print(head, flush=True)
    rows = []
    failures = 0
    for n, k in SHAPES:
        inputs = [(torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16) for _ in range(SETS)]
        for w in inputs:
            w[:, 7] *= 30  # an outlier channel, as real weights have
        w_cpu = inputs[0].cpu()
        for fmt, b in CASES:
            spec = FORMATS[fmt]
            label = fmt if spec.granularity != "block" else f"{fmt} b={b}"
            qc, sc = reference.quantize(w_cpu, spec, b)  # the spec, on CPU
            res = {}
            for name, fn in (("triton", lambda w: backend.quantize_triton(w, spec, b)),
                             ("torch", lambda w: backend.quantize_torch(w, spec, b))):
                r = fn(inputs[0])
                ok = same_bits(r.q.cpu(), qc) and same_bits(r.scale.cpu(), sc)
                failures += not ok
                res[name] = (time_ms(fn, inputs, args.reps), graph_ms(fn, inputs, args.reps), ok)
            (tc, tg, ok), (rc, rg, rok) = res["triton"], res["torch"]
            gb = 2 * n * k / 1e6  # bf16 input, in GB * 1e3 (so GB/s = gb / ms)
            row = (f"{n}x{k}", label, gb / tc, None if tg is None else gb / tg,
                   None if tg is None else 1.5 * gb / tg / copy_gbs, gb / rc, None if rg is None else gb / rg,
                   rc / tc, "yes" if ok else "NO", "yes" if rok else "NO")
            rows.append(row)
            f = lambda v, fmt="{:.0f}": "n/a" if v is None else fmt.format(v)  # noqa: E731
            print(f"{n}x{k:<6} {label:<16} triton {f(row[2]):>5} GB/s per call, {f(row[3]):>5} GB/s graph "
                  f"({f(row[4], '{:.0%}')} of copy) | torch {f(row[5]):>5} / {f(row[6]):>5} GB/s | "
                  f"x{row[7]:.1f} per call | bit-exact triton {row[8]} torch {row[9]}", flush=True)
        del inputs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    f = lambda v, fmt="{:.0f}": "n/a" if v is None else fmt.format(v)  # noqa: E731
    table = [head, "",
             "| shape | format | triton GB/s per call | triton GB/s kernels (graph) | of copy bw | "
             "torch GB/s per call | torch GB/s (graph) | triton/torch per call | bit-exact triton | bit-exact torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r[0]} | {r[1]} | {f(r[2])} | {f(r[3])} | {f(r[4], '{:.0%}')} | {f(r[5])} | {f(r[6])} | "
                     f"{r[7]:.1f}x | {r[8]} | {r[9]} |")
    if args.sweep:
        failures += sweep(args.reps, copy_gbs, table)
    text = "\n".join(table)
    print("\n" + text)
    out = args.out or (os.path.join(os.environ["OUT"], "bench_quant_kernels.md") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    if failures:
        print(f"{failures} kernel outputs differ from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
