"""Kernel-variant sweep for the W8A8 paths on the GPU (issue 3 speed work), one call's worth.

Run on the device machine: ``PYTHONPATH=src python3 benchmarks/sweep_w8a8.py``. M = 4096 and the
three Flux-sized (K, N) shapes of ``bench_linear.py``. Prints, per shape:

* ceilings: bf16 ``F.linear``, cuBLAS int8 ``torch._int_mm`` (one int32 accumulation over all of
  K), ``torch._scaled_mm`` FP8 with row-wise scales with and without fast accumulation;
* int8-block GEMM variants of ``triton_w8a8._w8a8_kernel`` (tile, warps, stages, PAIR, MAGIC), each
  checked against the torch reference on the same operands;
* activation quantization: the per-token two-pass kernel's (rows, chunk, warps) against the
  register-tile kernel, bit-identical outputs required.

Medians of CUDA events (``triton.testing.do_bench``). Full rows go to $OUT/sweep_w8a8.json.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from quantkit import reference
from quantkit.formats import FORMATS
from quantkit.runtime import activations
from quantkit.runtime import triton_w8a8 as tk

SMOKE = os.environ.get("SWEEP_SMOKE") == "1"  # CPU dry run of the script's logic (TRITON_INTERPRET=1)
M = 64 if SMOKE else 4096
SHAPES = [(256, 256)] if SMOKE else [(3072, 3072), (3072, 12288), (12288, 3072)]
DEV = "cpu" if SMOKE else "cuda"
BUDGET_S = float(os.environ.get("SWEEP_BUDGET_S", "150"))

GEMM_VARIANTS = [  # (BLOCK_M, BLOCK_N, warps, stages, PAIR, MAGIC, GROUP_M)
    (128, 128, 8, 3, 0, 0, 8),  # the first implementation's kernel
    (64, 128, 4, 4, 0, 1, 8),  # best of the first sweep
    (64, 128, 4, 3, 0, 1, 8),
    (64, 128, 4, 5, 0, 1, 8),
    (64, 128, 4, 2, 0, 1, 8),
    (64, 128, 4, 3, 1, 1, 8),
    (64, 128, 4, 4, 1, 1, 8),
    (64, 64, 4, 4, 0, 1, 8),
    (64, 64, 4, 3, 1, 1, 8),
    (128, 128, 8, 3, 1, 1, 8),
    (64, 128, 4, 4, 0, 1, 16),
    (64, 128, 4, 4, 0, 0, 8),
]
ROWS_VARIANTS = [(1, 1024, 4), (1, 2048, 8), (1, 4096, 16), (1, 2048, 4), (1, 4096, 8)]


def ms(fn, rep=100) -> float:
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def host_probe() -> list[dict]:
    """Host (CPU) time per eager call at 3072 x 3072, launches only: 20 calls without a sync, the
    GPU work queued behind them. Where it exceeds the GPU time, eager timings measure the host."""
    from quantkit.runtime import QuantizedTensor
    k = n = 256 if SMOKE else 3072
    x = torch.randn(M, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    out = []
    cases = [("bf16", lambda: F.linear(x, w))]
    for fmt, layout, kw in (("fp8", "TensorCoreFP8Layout", {}), ("int8-block", "BlockWiseINT8Layout", {"block_size": 128}),
                            ("int8-row", "TensorWiseINT8Layout", {"per_channel": True})):
        qt = QuantizedTensor.from_float(w, layout, **kw)
        cases.append((fmt + " F.linear", lambda qt=qt: F.linear(x, qt)))
        dtype = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
        group = 128 if fmt == "int8-block" else k
        cases.append((fmt + " actq only", lambda dtype=dtype, group=group: tk.quantize_activations(x, dtype, group)))
        if fmt == "int8-block":
            xq, xs = tk.quantize_activations(x, torch.int8, 128)
            cases.append((fmt + " gemm only", lambda qt=qt, xq=xq, xs=xs: tk.w8a8_block_matmul(
                xq, xs, qt._qdata, qt.params.scale, 128, None, torch.bfloat16)))
    for name, fn in cases:
        for _ in range(3):
            fn()
        if not SMOKE:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        host_us = (time.perf_counter() - t) / 20 * 1e6
        if not SMOKE:
            torch.cuda.synchronize()
        print(f"host per call {name:<24} {host_us:7.1f} us", flush=True)
        out.append({"kind": "host", "name": name, "us": host_us})
    return out


def main() -> None:
    t0 = time.time()
    torch.manual_seed(0)
    dev = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows, table = [], []
    for k, n in SHAPES:
        flops = 2 * M * n * k
        x = torch.randn(M, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02

        def add(kind, name, t, err=float("nan")):
            r = {"K": k, "N": n, "kind": kind, "name": name, "ms": t, "tops": flops / t / 1e9, "rel_err": err}
            rows.append(r)
            print(f"{k:>5}x{n:<5} {kind:>6} {name:<34} {t:8.4f} ms {r['tops']:7.0f} T  err {err:.1e}", flush=True)
            return r

        t_bf16 = add("ceil", "bf16 F.linear", ms(lambda: F.linear(x, w)))["ms"]
        # cuBLAS int8 and fp8 ceilings on the same operand sizes
        xi = torch.randint(-127, 128, (M, k), device=DEV, dtype=torch.int8)
        wi = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8)
        add("ceil", "torch._int_mm int8", ms(lambda: torch._int_mm(xi, wi.t())))
        x8 = (x.float() * 10).clamp(-448, 448).to(torch.float8_e4m3fn)
        w8 = (w.float() * 500).clamp(-448, 448).to(torch.float8_e4m3fn)
        sa = torch.rand(M, 1, device=DEV) + 0.5
        sb = torch.rand(1, n, device=DEV) + 0.5
        want8 = (x8.double() * sa.double()) @ (w8.double() * sb.double().t()).t()
        for fast in (False, True):
            f = lambda: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,  # noqa: E731
                                         use_fast_accum=fast)
            add("ceil", f"_scaled_mm rowwise fast={int(fast)}", ms(f), rel(f(), want8))
        del want8, x8, w8
        # int8-block GEMM variants on real quantized operands
        xq, xs = tk.quantize_activations(x, torch.int8, 128)
        wq, ws = reference.quantize(w, FORMATS["int8-block"], 128)
        ref = activations.w8a8_block_matmul(xq, xs, wq, ws, 128, None, torch.float32)
        best = None
        for bm, bn, nw, ns, pair, magic, gm in GEMM_VARIANTS:
            if time.time() - t0 > BUDGET_S:
                print("budget reached: skipping the remaining GEMM variants", flush=True)
                break
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": gm, "PAIR": pair,
                   "MAGIC": magic, "num_warps": nw, "num_stages": ns}
            name = f"blk {bm}x{bn} w{nw} s{ns} " + f"pair{pair}" + f" magic{magic} g{gm}"
            try:
                y = tk.w8a8_block_matmul(xq, xs, wq, ws, 128, None, torch.float32, config=cfg)
                err = rel(y, ref)
                t = ms(lambda: tk.w8a8_block_matmul(xq, xs, wq, ws, 128, None, torch.bfloat16, config=cfg))
            except Exception as e:  # an out-of-resources config: report and go on
                print(f"{name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            r = add("gemm", name, t, err)
            if err < 1e-6 and (best is None or t < best["ms"]):
                best = r
        t_auto = ms(lambda: tk.w8a8_block_matmul(xq, xs, wq, ws, 128, None, torch.bfloat16))
        add("gemm", "autotuned BLOCK_CONFIGS", t_auto,
            rel(tk.w8a8_block_matmul(xq, xs, wq, ws, 128, None, torch.float32), ref))
        del ref
        # activation quantization: per-token variants vs the register-tile kernel; group-128 kernel
        aq = {}
        aq["int8 g128 tile"] = ms(lambda: tk.quantize_activations(x, torch.int8, 128))
        for dtype, tag in ((torch.int8, "int8"), (torch.float8_e4m3fn, "fp8")):
            q0, s0 = tk.quantize_activations(x, dtype, k, per_token_kernel="tile")
            aq[f"{tag} tok tile"] = ms(lambda: tk.quantize_activations(x, dtype, k, per_token_kernel="tile"))
            for r_, c_, w_ in ROWS_VARIANTS:
                cfg = {"rows": r_, "chunk": c_, "warps": w_}
                q1, s1 = tk.quantize_activations(x, dtype, k, rows_cfg=cfg)
                same = torch.equal(q1.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s1, s0)
                t = ms(lambda: tk.quantize_activations(x, dtype, k, rows_cfg=cfg))
                aq[f"{tag} tok rows{r_} c{c_} w{w_}" + ("" if same else " MISMATCH")] = t
        floor_ms = M * k * 3 / 3.0e12 * 1e3
        for name, t in aq.items():
            rows.append({"K": k, "N": n, "kind": "actq", "name": name, "ms": t})
            print(f"{k:>5}x{n:<5} {'actq':>6} {name:<34} {t:8.4f} ms  (3 B/elem at 3 TB/s: {floor_ms:.4f})",
                  flush=True)
        table.append((k, n, t_bf16, best, t_auto, min((t for nm, t in aq.items() if nm.startswith("fp8 tok rows")
                                                           and "MISMATCH" not in nm), default=float("nan"))))
        del x, w, xq, xs, wq, ws
        if not SMOKE:
            torch.cuda.empty_cache()
    rows += host_probe()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "sweep_w8a8.json"), "w") as f:
            json.dump({"device": dev, "rows": rows}, f, indent=1)
    print(f"\nsweep summary ({dev}), {time.time() - t0:.0f} s")
    for k, n, tb, best, ta, fq in table:
        b = f"{best['name']} {best['ms']:.4f} ms ({tb / best['ms']:.2f}x bf16)" if best else "none"
        print(f"{k}x{n}: bf16 {tb:.4f} | best int8-block gemm {b} | autotuned {ta:.4f} | best fp8 tok actq {fq:.4f}")


if __name__ == "__main__":
    main()
