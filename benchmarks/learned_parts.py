"""Seconds of the dense linear algebra inside calibrated learned rounding (quantkit.learned.gptq and
learn_batch), per Flux.1 input width K, on the GPU: the three factorizations of the K x K objective
matrix in fp64 (what gptq does) and fp32, and one objective evaluation tr(E H E^T) for an N x K
error in fp32 and TF32. Medians of CUDA-synchronised repeats.

    python3 benchmarks/learned_parts.py
"""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    print("| N x K | factorize fp64 s | factorize fp32 s | objective fp32 s | objective tf32 s |")
    print("|---|---|---|---|---|")
    for n, k in ((3072, 3072), (21504, 3072), (3072, 12288), (3072, 15360)):
        x = torch.randn(4 * k, k, device=dev)
        h = (x.T @ x) / x.shape[0] + 0.01 * torch.eye(k, device=dev)
        e = torch.randn(n, k, device=dev) * 1e-2

        def fact(dtype):
            def run():
                c, _ = torch.linalg.cholesky_ex(h.to(dtype))
                torch.linalg.cholesky(torch.cholesky_inverse(c), upper=True)
            return run

        def obj():
            return ((e @ h) * e).sum(dtype=torch.float64)
        f64, f32 = timed(fact(torch.float64)), timed(fact(torch.float32))
        torch.backends.cuda.matmul.allow_tf32 = False
        o32 = timed(obj)
        torch.backends.cuda.matmul.allow_tf32 = True
        otf = timed(obj)
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"| {n} x {k} | {f64:.4f} | {f32:.4f} | {o32:.4f} | {otf:.4f} |", flush=True)


if __name__ == "__main__":
    main()
