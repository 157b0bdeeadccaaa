"""The fused 4-bit Triton GEMMs (quantkit.runtime.triton_w4) against dequantize + F.linear and bf16.

Run on a CUDA machine from the repository root: ``python3 benchmarks/bench_w4_linear.py`` (src/ is put
on the path). For awq4 and w4a8 (4-bit), Flux-like weights [N, K] in {(3072, 3072), (12288, 3072),
(3072, 12288)} and M in {1, 16, 256, 4096} tokens (bf16 activations), median CUDA-event times
(triton.testing.do_bench) of:

* ``bf16``: F.linear with a plain bf16 weight (the floor);
* ``deq``: F.linear on the QuantizedTensor with the kernels switched off: dequantize + F.linear
  (what the runtime runs today);
* ``kernel``: the Triton GEMM called directly (w4a8: activation rotation + INT8 quantization
  included; ``actq`` is that part alone), autotuned per (M bucket, N, K) over the module's configs;
* ``rt``: F.linear on the QuantizedTensor with the switch on (the kernel plus the dispatch's Python
  cost, which matters at M = 1).

Each layer's weights are cycled over enough copies that they do not stay in the 50 MB L2 between
calls. Correctness in the same run: the kernel's output against dequantize + F.linear (``max rel``:
max |diff| / max |ref|; ``rms rel``: ||diff|| / ||ref||) and, for w4a8 where comfy-kitchen is
importable, against kitchen's eager ``w4a8_int8_linear`` (the numerics the kernel follows). The
last lines suggest a ``QUANTKIT_W4_TRITON`` setting: per format the largest measured M up to which
``rt`` beat ``deq`` at every shape. Writes bench_w4_linear.json to $OUT when set.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from quantkit.runtime import QuantizedTensor, linear  # noqa: E402
from quantkit.runtime import triton_w4 as tw  # noqa: E402

MS = (1, 16, 256, 4096)
SHAPES = ((3072, 3072), (12288, 3072), (3072, 12288))  # (N, K): weight [N, K]
LAYOUTS = (("awq4", "TensorCoreAWQW4A16Layout"), ("w4a8", "AsymW4A8Int8Layout"))
L2_BYTES = 50 << 20


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def cycler(items):
    state = {"i": 0}

    def nxt():
        state["i"] += 1
        return items[state["i"] % len(items)]
    return nxt


def copies_for(nbytes: int) -> int:
    return min(32, max(2, -(-2 * L2_BYTES // max(nbytes, 1))))  # together at least twice the L2


def kernel_call(fmt: str, qt: QuantizedTensor):
    p, t = qt._layout_params, qt._layout_params.tensors
    if fmt == "awq4":
        return lambda x: tw.awq4_linear(x, qt._qdata, p.scale, t["weight_zeros"], None, p.marker["group_size"])
    return lambda x: tw.w4a8_linear(x, qt._qdata, p.scale, t["weight_s_channel"], t.get("weight_codebook"), None,
                                    p.marker["group_size"], p.marker["convrot_groupsize"])


def kitchen_w4a8(x, qt):
    try:
        from comfy_kitchen.backends.eager.w4a8_int8 import w4a8_int8_linear
    except Exception:  # noqa: BLE001 -- kitchen is optional here
        return None
    p, t = qt._layout_params, qt._layout_params.tensors
    return w4a8_int8_linear(x, qt._qdata, p.scale, t["weight_s_channel"], codebook=t.get("weight_codebook"),
                            group_size=p.marker["group_size"], convrot_groupsize=p.marker["convrot_groupsize"],
                            out_dtype=x.dtype)


def best_config(fmt: str) -> str:
    fn = tw._awq_tuned if fmt == "awq4" else tw._w4a8_tuned
    cfg = getattr(fn, "best_config", None)
    if cfg is None:
        return "-"
    kw = cfg.kwargs
    bk = f"x{kw['BLOCK_K']}" if "BLOCK_K" in kw else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}{bk} w{cfg.num_warps} s{cfg.num_stages}"


def rel(a, b):
    d = (a.float() - b.float())
    return float(d.abs().max() / b.float().abs().max()), float(d.norm() / b.float().norm())


def main() -> None:
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for fmt, layout in LAYOUTS:
        for n, k in SHAPES:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            t0 = time.time()
            qt = QuantizedTensor.from_float(w, layout)
            t_quant = time.time() - t0
            qbytes = qt._qdata.nbytes + sum(v.nbytes for v in (qt._layout_params.tensors or {}).values()) \
                + qt._layout_params.scale.nbytes
            qts = [qt] + [QuantizedTensor(qt._qdata.clone(), layout, qt._layout_params.moved(torch.clone))
                          for _ in range(copies_for(qbytes) - 1)]
            ws = [w] + [w.clone() for _ in range(copies_for(w.nbytes) - 1)]
            print(f"{fmt} N={n} K={k}: quantized in {t_quant:.1f} s; {len(qts)} weight copies, {len(ws)} bf16 copies")
            for m in MS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"format": fmt, "M": m, "N": n, "K": k}
                nw, nq = cycler(ws), cycler(qts)
                row["bf16_ms"] = median_ms(lambda: F.linear(x, nw()))
                linear.W4_TRITON_MAX_M[fmt] = 0
                ref = F.linear(x, qt)
                row["deq_ms"] = median_ms(lambda: F.linear(x, nq()))
                calls = [kernel_call(fmt, q) for q in qts]
                nc = cycler(calls)
                try:
                    y = calls[0](x)
                    row["max_rel"], row["rms_rel"] = rel(y, ref)
                    row["kernel_ms"] = median_ms(lambda: nc()(x))
                    row["config"] = best_config(fmt)
                    if fmt == "w4a8":
                        cr = qt._layout_params.marker["convrot_groupsize"]
                        row["actq_ms"] = median_ms(lambda: tw.rotate_quantize(x, cr))
                        kref = kitchen_w4a8(x, qt)
                        if kref is not None:
                            row["kitchen_max_rel"] = rel(y, kref)[0]
                    linear.W4_TRITON_MAX_M[fmt] = m
                    y2 = F.linear(x, qt)
                    assert torch.equal(y2, y), "the runtime's dispatch did not take the kernel"
                    row["rt_ms"] = median_ms(lambda: F.linear(x, nq()))
                except Exception as e:  # noqa: BLE001 -- report and keep measuring the rest
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"  M={m}: kernel failed: {row['error']}")
                finally:
                    linear.W4_TRITON_MAX_M[fmt] = 0
                rows.append(row)
                print("  " + json.dumps(row))
            qts.clear()
            ws.clear()
            torch.cuda.empty_cache()
    table(rows)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_w4_linear.json"), "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f,
                      indent=1)


def table(rows) -> None:
    print("\nbf16 activations; medians of CUDA events (ms); ratios: deq / kernel and deq / rt (> 1: the kernel "
          "is faster than today's runtime), kernel / bf16 (vs the plain bf16 floor)\n")
    print("| format | M | N | K | bf16 | deq | kernel | rt | actq | deq/kernel | deq/rt | kernel/bf16 | max rel "
          "| rms rel | vs kitchen | config |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        def f(key, fmt="{:.4f}"):
            return fmt.format(r[key]) if key in r else "-"
        ratio = (lambda a, b: f"{r[a] / r[b]:.2f}" if a in r and b in r else "-")
        print(f"| {r['format']} | {r['M']} | {r['N']} | {r['K']} | {f('bf16_ms')} | {f('deq_ms')} | {f('kernel_ms')} "
              f"| {f('rt_ms')} | {f('actq_ms')} | {ratio('deq_ms', 'kernel_ms')} | {ratio('deq_ms', 'rt_ms')} "
              f"| {ratio('kernel_ms', 'bf16_ms')} | {f('max_rel', '{:.2e}')} | {f('rms_rel', '{:.2e}')} "
              f"| {f('kitchen_max_rel', '{:.2e}')} | {r.get('config', r.get('error', '-'))} |")
    rule = {}
    for fmt, _ in LAYOUTS:
        best = 0
        for m in MS:
            sel = [r for r in rows if r["format"] == fmt and r["M"] == m]
            if sel and all("rt_ms" in r and r["rt_ms"] < r["deq_ms"] for r in sel):
                best = m
            else:
                break
        rule[fmt] = best
    print("\nsuggested (largest measured M where rt beat deq at every shape, all smaller M too): "
          f"QUANTKIT_W4_TRITON={','.join(f'{k}={v}' for k, v in rule.items())}")
    print("(w4a8 through the kernel computes comfy-kitchen's INT8-activation numbers, not dequantize + F.linear's)")


if __name__ == "__main__":
    main()
