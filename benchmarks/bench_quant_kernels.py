"""Micro-benchmark of the quantizer kernels on one CUDA GPU (the device machine).

For each format and Flux-like bf16 shape: the Triton kernels (``backend.quantize_triton``, SQNR
sums included; fp8 also with the other cast path) vs the torch reference on the same GPU
(``reference.quantize``, q and scale only, no SQNR). Medians of CUDA-event timings over several
input sets (rotated so that no run reads its input from L2). Throughput is GB/s of bf16 input;
"of copy" compares the minimum traffic (2 B read + 1 B written per weight) with a device-to-device
copy measured in the same run. Every timed kernel's output is checked bit for bit against the
reference first; a mismatch exits non-zero.

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
                [(4096, 4, 8), (2048, 4, 8), (8192, 4, 8), (4096, 2, 8), (4096, 8, 8), (4096, 4, 4), (8192, 8, 16)]],
        "int8-row": [dict(row_tile=rt, num_warps=nw) for rt, nw in
                     [(4096, 8), (2048, 4), (8192, 8), (16384, 16), (4096, 4), (2048, 8)]],
        "int8-block": [dict(block_tile=bt, num_warps=nw) for bt, nw in [(16384, 8), (4096, 8), (16384, 4), (16384, 16)]],
    }
    bad = 0
    table += ["", "Tile sweep (default first):", "",
              "| shape | format | params | median us | GB/s bf16 in | of copy bw | bit-exact |", "|---|---|---|---|---|---|---|"]
    for n, k in SHAPES[1:] if DEVICE == "cuda" else SHAPES:
        inputs = [(torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16) for _ in range(SETS)]
        for fmt, vs in variants.items():
            spec = FORMATS[fmt]
            qr, sr = reference.quantize(inputs[0], spec, 128)
            for hw in ([False, True] if fmt == "fp8" and DEVICE == "cuda" else [False]):
                for v in vs:
                    fn = lambda w: triton_quant.quantize(w, spec, 128, fp8_hw=hw, **v)  # noqa: E731
                    q, sc, *_ = fn(inputs[0])
                    ok = same_bits(q, qr) and same_bits(sc, sr)
                    bad += not ok
                    t = time_ms(fn, inputs, reps)
                    params = " ".join(f"{a}={b}" for a, b in v.items()) + (" hw-cast" if hw else "")
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
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET (checks the script)")
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
            f"{copy_gbs:.0f} GB/s (read + write); default fp8 cast: "
            f"{'hardware' if triton_quant.FP8_HW_ON_CUDA else 'emulated'}")
    print(head, flush=True)
    rows = []
    failures = 0
    for n, k in SHAPES:
        inputs = [(torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16) for _ in range(SETS)]
        for w in inputs:
            w[:, 7] *= 30  # an outlier channel, as real weights have
        for fmt, b in CASES:
            spec = FORMATS[fmt]
            label = fmt if spec.granularity != "block" else f"{fmt} b={b}"
            variants = [("triton", lambda w: backend.quantize_triton(w, spec, b))]
            if not spec.is_int and DEVICE == "cuda":
                other = not triton_quant.FP8_HW_ON_CUDA
                variants.append((f"triton {'hw' if other else 'emulated'} cast",
                                 lambda w, o=other: backend.quantize_triton(w, spec, b, fp8_hw=o)))
            qr, sr = reference.quantize(inputs[0], spec, b)
            t_ref = time_ms(lambda w: reference.quantize(w, spec, b), inputs, args.reps)
            for vname, fn in variants:
                r = fn(inputs[0])
                ok = same_bits(r.q, qr) and same_bits(r.scale, sr)
                if n == k:  # and against the CPU reference once per format
                    qc, sc = reference.quantize(inputs[0].cpu(), spec, b)
                    ok = ok and same_bits(r.q.cpu(), qc) and same_bits(r.scale.cpu(), sc)
                failures += not ok
                t = time_ms(fn, inputs, args.reps)
                gbs = 2 * n * k / t / 1e6
                of_copy = 3 * n * k / t / 1e6 / copy_gbs
                rows.append((f"{n}x{k}", label, vname, t, gbs, of_copy, 2 * n * k / t_ref / 1e6, t_ref / t,
                             "yes" if ok else "NO"))
                print(f"{n}x{k:<6} {label:<16} {vname:<20} {t * 1e3:8.1f} us {gbs:7.0f} GB/s "
                      f"({of_copy:4.0%} of copy)  torch ref {2 * n * k / t_ref / 1e6:6.0f} GB/s  "
                      f"x{t_ref / t:5.1f}  bit-exact {'yes' if ok else 'NO'}", flush=True)
        del inputs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    table = [head, "",
             "| shape | format | kernel | median us | GB/s bf16 in | of copy bw | torch ref GB/s | speedup | bit-exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s, f, v, t, g, oc, gr, sp, ok in rows:
        table.append(f"| {s} | {f} | {v} | {t * 1e3:.1f} | {g:.0f} | {oc:.0%} | {gr:.0f} | {sp:.1f}x | {ok} |")
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
