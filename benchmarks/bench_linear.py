"""F.linear on QuantizedTensor weights vs bf16 F.linear on the GPU (M = 4096, Flux-sized K x N).

Run on the device machine: ``PYTHONPATH=src python3 benchmarks/bench_linear.py``. Medians of CUDA
event timings (triton.testing.do_bench), each format's correctness checked in the same run against
an fp64 product of the same quantized operands. Writes bench_linear.json to $OUT when set.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
import triton.testing

from quantkit.formats import FORMATS
from quantkit.runtime import QuantizedTensor, activations
from quantkit.runtime.layouts import LayoutParams
from quantkit.runtime.linear import quantize_input_static
from quantkit.runtime import triton_w8a8 as tk

M = 4096
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N): weight is [N, K]
FORMATS_RUN = [("fp8", "TensorCoreFP8Layout", {}), ("int8-block", "BlockWiseINT8Layout", {"block_size": 128}),
               ("int8-row", "TensorWiseINT8Layout", {"per_channel": True})]
N_INPUTS = 4  # rotate inputs so repeated calls do not hit L2 with the same activations


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def graph_ms(fn) -> float:
    """GPU time alone: the call captured in a CUDA graph, so host-side launch cost drops out."""
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            return triton.testing.do_bench_cudagraph(fn, rep=300, return_mode="median")
    except Exception as e:  # report, keep the eager numbers
        print(f"graph capture failed: {type(e).__name__}: {e}")
        return float("nan")


def expected(fmt: str, x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """fp64 product of the operands the fast path sees (quantized activations, quantized weight)."""
    spec = FORMATS["int8-block" if fmt == "int8-block" else ("fp8" if fmt == "fp8" else "int8-row")]
    group = qt.params.block_size or x.shape[1]
    xq, xs = activations.quantize_activations(x, spec, group)
    xd = (xq.double().reshape(x.shape[0], -1, group) * xs.double()[..., None]).reshape(x.shape)
    return xd @ qt.dequantize(torch.float32).double().t()


def main() -> None:
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for k, n in SHAPES:
        xs = [torch.randn(M, k, device="cuda", dtype=torch.bfloat16) for _ in range(N_INPUTS)]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        flops = 2 * M * n * k
        it = iter(range(10**9))
        t_bf16 = median_ms(lambda: F.linear(xs[next(it) % N_INPUTS], w))
        g_bf16 = graph_ms(lambda: F.linear(xs[1], w))
        rows.append({"K": k, "N": n, "format": "bf16", "ms": t_bf16, "tflops": flops / t_bf16 / 1e9,
                     "speedup": 1.0, "rel_err": 0.0, "graph_ms": g_bf16, "graph_speedup": 1.0})
        for fmt, layout, kw in FORMATS_RUN:
            qt = QuantizedTensor.from_float(w, layout, **kw)
            y = F.linear(xs[0], qt)
            want = expected(fmt, xs[0], qt)
            err = float((y.double() - want).norm() / want.norm())
            del want
            t = median_ms(lambda: F.linear(xs[next(it) % N_INPUTS], qt))
            g = graph_ms(lambda: F.linear(xs[1], qt))
            row = {"K": k, "N": n, "format": fmt, "ms": t, "tflops": flops / t / 1e9, "speedup": t_bf16 / t,
                   "rel_err": err, "graph_ms": g, "graph_speedup": g_bf16 / g}
            # where the time goes: activation quantization alone
            dtype = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
            row["act_quant_ms"] = median_ms(lambda: tk.quantize_activations(xs[next(it) % N_INPUTS], dtype,
                                                                            qt.params.block_size or k))
            if fmt == "int8-block":
                xq, xsc = tk.quantize_activations(xs[0], torch.int8, 128)
                row["gemm_ms"] = median_ms(lambda: tk.w8a8_block_matmul(xq, xsc, qt._qdata, qt.params.scale, 128,
                                                                        None, torch.bfloat16))
            rows.append(row)
            if fmt == "fp8":  # a static input_scale (the layer's calibrated one), as ComfyUI runs fp8
                s_in = (xs[0].float().abs().amax() / 448).reshape(())

                def static(x):
                    xq = quantize_input_static(x, s_in, FORMATS["fp8"])
                    return F.linear(QuantizedTensor(xq, layout, LayoutParams(s_in, x.dtype, tuple(x.shape))), qt)
                y = static(xs[0])
                xd = quantize_input_static(xs[0], s_in, FORMATS["fp8"]).double() * float(s_in)
                want = xd @ qt.dequantize(torch.float32).double().t()
                err = float((y.double() - want).norm() / want.norm())
                del want, xd
                t = median_ms(lambda: static(xs[next(it) % N_INPUTS]))
                g = graph_ms(lambda: static(xs[1]))
                rows.append({"K": k, "N": n, "format": "fp8-static", "ms": t, "tflops": flops / t / 1e9,
                             "speedup": t_bf16 / t, "rel_err": err, "graph_ms": g, "graph_speedup": g_bf16 / g,
                             "act_quant_ms": median_ms(lambda: quantize_input_static(xs[next(it) % N_INPUTS], s_in,
                                                                                     FORMATS["fp8"]))})
            del qt
    print(f"\nM={M}; medians of CUDA events; speedup = bf16 ms / format ms; rel_err vs fp64 of the same operands")
    print("graph = the same call captured in a CUDA graph (GPU time without host launch overhead)")
    print(f"{'K x N':>12} {'format':>10} {'ms':>8} {'TFLOP/s':>8} {'speedup':>8} {'graph ms':>8} {'g.speedup':>9} "
          f"{'actq ms':>8} {'gemm ms':>8} {'rel_err':>9}")
    for r in rows:
        print(f"{r['K']:>5} x {r['N']:<5} {r['format']:>10} {r['ms']:8.4f} {r['tflops']:8.1f} {r['speedup']:8.2f} "
              f"{r['graph_ms']:8.4f} {r['graph_speedup']:9.2f} {r.get('act_quant_ms', 0):8.4f} "
              f"{r.get('gemm_ms', 0):8.4f} {r['rel_err']:9.2e}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_linear.json"), "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
