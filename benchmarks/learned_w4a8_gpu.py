"""Learned rounding of a Flux.1-dev-sized set of linear shapes to a 4-bit format on one GPU (issue 18):
calibrated GPTQ on the format's own grid (:func:`quantkit.learned.learn_format`, what ``quantkit
convert --learned-rounding --calibration`` runs per layer), seconds per distinct shape
(CUDA-synchronised, RTN included), summed over the 304 block linears of Flux.1-dev (19 double blocks
x 10, 38 single blocks x 3) as count x the shape's median; and, on small layers, whether the learned
tensors on CUDA are the CPU's, byte for byte.

Weights: low rank + noise + a few outlier input columns; statistics H = X^T X / rows from synthetic
activations (low rank + noise + outlier channels), generated on the GPU.

    PYTHONPATH=src python3 benchmarks/learned_w4a8_gpu.py [--format w4a8] [--reps 1] [--rows 2048]

Exit status 1 if any CPU/CUDA byte comparison differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from quantkit.backend import quantize_stored
from quantkit.formats import FORMATS, LayerOpts
from quantkit.learned import LearnedOptions, learn_format

# Flux.1-dev block linears: shape -> count (double: img/txt x (mod 18432, qkv 9216, proj, mlp.0, mlp.2);
# single: linear1 21504, linear2 3072x15360, modulation 9216)
FLUX = {(18432, 3072): 38, (9216, 3072): 76, (3072, 3072): 38, (12288, 3072): 38, (3072, 12288): 38,
        (21504, 3072): 38, (3072, 15360): 38}
SMALL = [(128, 256), (192, 384), (256, 1024), (96, 3072)]


def weight(n: int, k: int, g: torch.Generator, dev) -> torch.Tensor:
    r = 32
    a = torch.randn(n, r, generator=g, device=dev)
    b = torch.randn(r, k, generator=g, device=dev)
    w = (a @ b) * (0.5 / r ** 0.5) / k ** 0.5 + torch.randn(n, k, generator=g, device=dev) * (0.5 / k ** 0.5)
    w[:, torch.randint(0, k, (4,), generator=g, device=dev)] *= 8.0
    return w.bfloat16()


def stats(k: int, rows: int, g: torch.Generator, dev) -> torch.Tensor:
    x = torch.randn(rows, 16, generator=g, device=dev) @ torch.randn(16, k, generator=g, device=dev) * 0.3
    x += torch.randn(rows, k, generator=g, device=dev)
    x[:, torch.randint(0, k, (8,), generator=g, device=dev)] *= 20.0
    return (x.T @ x / rows).float()


def same_bytes(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        a[s].dtype == b[s].dtype and a[s].shape == b[s].shape
        and torch.equal(a[s].cpu().reshape(-1).view(torch.uint8), b[s].cpu().reshape(-1).view(torch.uint8)) for s in a)


def both(w: torch.Tensor, h: torch.Tensor, fmt):
    """Learned rounding of one layer on the CPU and on CUDA: (cpu, cuda results, seconds each, same bytes)."""
    t0 = time.perf_counter()
    cpu = learn_format(w.cpu(), h.cpu(), fmt, LayerOpts(), LearnedOptions(device="cpu"))
    t1 = time.perf_counter()
    gpu = learn_format(w, h, fmt, LayerOpts(), LearnedOptions(device="cuda"))
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return cpu, gpu, t1 - t0, t2 - t1, same_bytes(cpu.stored, gpu.stored)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="w4a8")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--skip-flux", action="store_true")
    ap.add_argument("--cpu-check", default="3072x3072",
                    help="also compare CPU and CUDA bytes on these Flux shapes (NxK,NxK,...; 'none' to skip)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    fmt, dev = FORMATS[a.format], torch.device("cuda")
    print(f"format {fmt.name}, {torch.cuda.get_device_name()}", flush=True)
    bad = 0
    print("| shape | CPU s | CUDA s | learned J / RTN J (CUDA) | bytes CUDA = CPU |\n|---|---|---|---|---|")
    for n, k in SMALL:
        g = torch.Generator(device=dev).manual_seed(n * 7 + k)
        w, h = weight(n, k, g, dev), stats(k, a.rows, g, dev)
        cpu, gpu, t_cpu, t_gpu, same = both(w, h, fmt)
        bad += not same
        print(f"| {n}x{k} | {t_cpu:.2f} | {t_gpu:.2f} | {gpu.objective / gpu.objective_rtn:.3f} "
              f"({gpu.method}) | {'yes' if same else 'NO'} |", flush=True)
    for shape in ([] if a.cpu_check == "none" else a.cpu_check.split(",")):
        n, k = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=dev).manual_seed(n + k)
        h = stats(k, a.rows, g, dev)
        cpu, gpu, t_cpu, t_gpu, same = both(weight(n, k, g, dev), h, fmt)
        bad += not same
        diff = {s: float((cpu.stored[s].cpu().reshape(-1).view(torch.uint8) != gpu.stored[s].cpu().reshape(-1).view(torch.uint8)).float().mean())
                for s in cpu.stored if cpu.stored[s].shape == gpu.stored[s].shape}
        print(f"\nFlux shape {n}x{k}: CPU {t_cpu:.2f} s ({torch.get_num_threads()} threads), CUDA {t_gpu:.2f} s; "
              f"bytes CUDA = CPU: {'yes' if same else 'NO'} (fraction of differing bytes per tensor: {diff}); "
              f"J / RTN J CPU {cpu.objective / cpu.objective_rtn:.4f}, CUDA {gpu.objective / gpu.objective_rtn:.4f}",
              flush=True)
    if not a.skip_flux:
        total = 0.0
        print("\n| Flux.1 shape | count | CUDA s per layer (median of reps) | J / RTN J |\n|---|---|---|---|")
        for (n, k), count in FLUX.items():
            times, ratio = [], None
            g = torch.Generator(device=dev).manual_seed(n + k)
            h = stats(k, a.rows, g, dev)
            for _ in range(a.reps):
                w = weight(n, k, g, dev)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                r = learn_format(w, h, fmt, LayerOpts(), LearnedOptions(device="cuda"))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                ratio = r.objective / r.objective_rtn
                del w, r
            med = statistics.median(times)
            total += count * med
            w = weight(n, k, g, dev)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            quantize_stored(w, fmt, LayerOpts())
            torch.cuda.synchronize()
            rtn_s = time.perf_counter() - t0
            del w
            print(f"| {n}x{k} | {count} | {med:.2f} (RTN alone {rtn_s:.2f}) | {ratio:.3f} |", flush=True)
        print(f"\n304 Flux.1-dev block linears, learned rounding to {fmt.name}: {total:.0f} s "
              f"({total / 60:.1f} min; count x median per shape)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
