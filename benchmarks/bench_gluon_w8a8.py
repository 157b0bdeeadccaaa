"""The int8-block GEMM alone on an sm_90 GPU: the Gluon kernel's configs (quantkit.runtime.gluon_w8a8)
against the Triton kernel and bf16 cuBLAS, M = 4096, Flux-sized K x N, same run.

    PYTHONPATH=src python3 benchmarks/bench_gluon_w8a8.py

Each config's fp32 output is checked against the Triton kernel's (relative error, FMA contraction
only) before it is timed. Medians of CUDA events (triton.testing.do_bench). "call" adds the
activation-quantization pass that every int8-block linear runs first; "x bf16" = bf16 ms / call ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.testing

from quantkit import reference
from quantkit.formats import FORMATS
from quantkit.runtime import gluon_w8a8, triton_w8a8

M = 4096
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N)


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)
    for k, n in SHAPES:
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = reference.quantize(w.float(), FORMATS["int8-block"], 128)
        xq, xs = triton_w8a8.quantize_activations(x, torch.int8, 128)
        flops = 2 * M * n * k
        t_bf16 = ms(lambda: F.linear(x, w))
        t_act = ms(lambda: triton_w8a8.quantize_activations(x, torch.int8, 128))
        ref = triton_w8a8.triton_block_matmul(xq, xs, wq, ws, 128, None, torch.float32)
        rows = [("bf16 cuBLAS", t_bf16, None), ("triton", ms(lambda: triton_w8a8.triton_block_matmul(
            xq, xs, wq, ws, 128, None, torch.bfloat16)), 0.0)]
        for cfg in gluon_w8a8.CONFIGS:
            y = gluon_w8a8.w8a8_block_matmul(xq, xs, wq, ws, None, torch.float32, cfg)
            err = float((y.double() - ref.double()).norm() / ref.double().norm())
            t = ms(lambda cfg=cfg: gluon_w8a8.w8a8_block_matmul(xq, xs, wq, ws, None, torch.bfloat16, cfg))
            rows.append((f"gluon {cfg}", t, err))
        t = ms(lambda: triton_w8a8.w8a8_block_matmul(xq, xs, wq, ws, 128, None, torch.bfloat16))
        choice = next(v for key, v in gluon_w8a8._choice.items() if key[:3] == (M, n, k))
        rows.append((f"dispatch (picked {choice or 'triton'})", t, None))
        print(f"\nK x N = {k} x {n}; activation pass {t_act:.4f} ms")
        print(f"{'kernel':>42} {'gemm ms':>8} {'TOPS':>6} {'call ms':>8} {'x bf16':>6} {'rel err':>8}")
        for name, t, err in rows:
            call = t if name.startswith("bf16") else t + t_act
            print(f"{name:>42} {t:8.4f} {flops / t / 1e9:6.0f} {call:8.4f} {t_bf16 / call:6.2f} "
                  f"{'' if err is None else f'{err:8.1e}'}")


if __name__ == "__main__":
    main()
