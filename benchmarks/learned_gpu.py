"""Learned rounding speed and quality vs convert_to_quant on Flux.1 linear shapes (issue 5).

Writes one synthetic bf16 checkpoint holding the distinct linear shapes of one Flux.1 double block
and one single block (low rank + noise + a few outlier input columns), then, in the same run:

* ``quantkit convert --format fp8`` (round-to-nearest, the baseline),
* ``quantkit convert --format fp8 --learned-rounding --calibration`` with statistics from synthetic activations (low rank + noise + outlier channels; 4096
  rows, a second 4096 rows of the same distribution held out for the output error),
* ``quantkit convert --format fp8 --learned-rounding --learned-objective subspace`` (data-free, on
  convert_to_quant's own objective, no calibration),
* ``convert_to_quant -i ... --comfy_quant`` (its default: FP8 per-tensor with learned rounding), and
  ``convert_to_quant ... --simple`` (no learned rounding: its start-up and I/O cost),

each as a subprocess timed on the wall clock (the learned-rounding cost of a tool is its learned run
minus its plain run), and evaluates every output the same way: weight SQNR
and convert_to_quant's own objective, the error projected on W's top-k singular subspace
||U_k^T (W - Wq) V_k||_F^2 with k = clamp(0.2 * min(N, K), 256, 1280) (its documented defaults
top_p / min_k / max_k), both relative to ||W||_F^2 as dB. Then, in-process on the same weights:
per-layer seconds of quantkit's learned rounding alone (CUDA-synchronised; calibrated GPTQ with
the Triton column-block kernel, the same with the PyTorch column loop on two layers, and the
subspace method), and the subspace method's trade-off for several ``subspace_target_db`` values.
Run on the device machine:

    python3 -m pip install --no-deps --no-index wheels/*.whl   # convert_to_quant, prodigy-plus-schedule-free, tqdm
    PYTHONPATH=src python3 benchmarks/learned_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHAPES = {  # layer: (N, K), the distinct linear shapes of Flux.1 (dev/schnell) blocks
    "double_blocks.0.img_mod.lin": (18432, 3072),
    "double_blocks.0.img_attn.qkv": (9216, 3072),
    "double_blocks.0.img_attn.proj": (3072, 3072),
    "double_blocks.0.img_mlp.0": (12288, 3072),
    "double_blocks.0.img_mlp.2": (3072, 12288),
    "single_blocks.0.linear1": (21504, 3072),
    "single_blocks.0.linear2": (3072, 15360),
    "single_blocks.0.modulation.lin": (9216, 3072),
}


def synthetic(n: int, k: int, g: torch.Generator, device: str) -> torch.Tensor:
    r = 64
    a = torch.randn(n, r, generator=g, device=device) / math.sqrt(r)
    b = torch.randn(r, k, generator=g, device=device) * torch.logspace(0, -1.5, r, device=device)[:, None]
    w = (a @ b) * 0.02 + 0.004 * torch.randn(n, k, generator=g, device=device)
    cols = torch.randperm(k, generator=g, device=device)[:8]
    w[:, cols] *= 12  # outlier input channels
    return w.to(torch.bfloat16)


def activations(k: int, g: torch.Generator, device: str, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and held-out input rows from one distribution: low rank + noise + outlier channels."""
    r = 48
    mix = torch.randn(r, k, generator=g, device=device) * torch.logspace(0, -1, r, device=device)[:, None]
    x = torch.randn(2 * rows, r, generator=g, device=device) @ mix + 0.2 * torch.randn(2 * rows, k, generator=g, device=device)
    x[:, torch.randperm(k, generator=g, device=device)[:8]] *= 20
    x += 0.1
    return x[:rows], x[rows:]


def stats_of(x: torch.Tensor) -> dict[str, torch.Tensor]:
    x64 = x.double()
    n = x.shape[0]
    return {"count": torch.tensor(float(n), dtype=torch.float64), "mean": x64.mean(0).float().cpu(),
            "mean_sq": (x64 ** 2).mean(0).float().cpu(), "absmax": x.abs().amax(0).float().cpu(),
            "hessian": (x64.T @ x64 / n).float().cpu()}


_SVD: dict = {}


def evaluate(w: torch.Tensor, deq: torch.Tensor) -> tuple[float, float]:
    w, e = w.float(), w.float() - deq.float()
    sig = float((w.double() ** 2).sum())
    n, k = w.shape
    kk = min(max(int(0.2 * min(n, k)), 256), 1280, min(n, k))
    key = (n, k, float(w.double().sum()), float(w.double().pow(2).sum()))
    if key not in _SVD:
        _SVD.clear()  # one layer at a time
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        _SVD[key] = (u[:, :kk].contiguous(), vh[:kk].contiguous())
    u, vh = _SVD[key]
    proj = u.T @ e @ vh.T
    return 10 * math.log10(sig / float((e.double() ** 2).sum())), 10 * math.log10(sig / float((proj.double() ** 2).sum()))


def dequant_file(path: Path, layer: str) -> torch.Tensor | None:
    sd = load_file(str(path))
    q = sd.get(f"{layer}.weight")
    if q is None or q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):
        return None
    s = sd[f"{layer}.weight_scale"].float()
    return q.float() * (s if s.dim() == 2 else s.reshape(()))


def run(cmd: list[str], timeout: float, env: dict | None, cwd: Path) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        return time.perf_counter() - t0, p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        return time.perf_counter() - t0, 124, f"timed out after {timeout:.0f} s: {str(e.stdout)[-1500:]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--ctq-timeout", type=float, default=200)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 20 ctq iterations (CPU smoke test)")
    args = ap.parse_args()
    out = Path(args.out).resolve()  # subprocesses run there, away from any repo-root module shadowing a package
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {k: (n // 24, kk // 24) for k, (n, kk) in SHAPES.items()} if args.quick else SHAPES
    g = torch.Generator(device=dev).manual_seed(0)
    ws = {f"{k}.weight": synthetic(n, kk, g, dev).cpu() for k, (n, kk) in shapes.items()}
    src = out / "flux-blocks.safetensors"
    save_file(ws, str(src))
    from quantkit.calibration import Calibration
    held = {}
    cal = Calibration()
    for k_, (n, kk) in shapes.items():
        xc, held[k_] = activations(kk, g, dev)
        cal.layers[k_] = stats_of(xc)
        del xc
    stats = out / "stats.safetensors"
    cal.save(stats)
    del cal
    src_dir = str(Path(__file__).resolve().parents[1] / "src")  # before, not instead of, PYTHONPATH (wheels)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src_dir, os.environ.get("PYTHONPATH")])))
    q = [sys.executable, "-m", "quantkit", "convert", str(src), "--format", "fp8", "--preset", "none", "--overwrite", "-q", "-o"]
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "runs": {}}
    ctq_extra = ["--num_iter", "20"] if args.quick else []
    ctq = [sys.executable, "-c", "import sys; from convert_to_quant.convert_to_quant import main; "
           "sys.argv[0] = 'convert_to_quant'; sys.exit(main())", "-i", str(src), "--comfy_quant"]
    # untimed warm-up of both tools: Python's bytecode and Triton's kernel caches, as on any machine
    # that has converted once (otherwise the first timed run pays them and its tool's net times shrink)
    for cmd in (q + [str(out / "warm.safetensors")], ctq + ["-o", str(out / "warm.safetensors"), "--simple"]):
        run(cmd, 600, env, out.resolve())
    (out / "warm.safetensors").unlink(missing_ok=True)
    for name, cmd in {
        "rtn": q + [str(out / "rtn.safetensors")],
        "quantkit-calibrated": q + [str(out / "qc.safetensors"), "--learned-rounding", "--calibration", str(stats)],
        "quantkit-subspace": q + [str(out / "qs.safetensors"), "--learned-rounding", "--learned-objective", "subspace"],
        "convert_to_quant": ctq + ["-o", str(out / "ctq.safetensors")] + ctq_extra,
        "convert_to_quant-simple": ctq + ["-o", str(out / "ctq-simple.safetensors"), "--simple"],
    }.items():
        secs, rc, log = run(cmd, args.ctq_timeout if name.startswith("convert_to_quant") else 600, env, out.resolve())
        results["runs"][name] = {"seconds": secs, "rc": rc, "log_tail": log}
        print(f"{name}: {secs:.1f} s, rc {rc}", flush=True)
    files = {"rtn": out / "rtn.safetensors",
             "quantkit-calibrated": out / "qc.safetensors",
             "quantkit-subspace": out / "qs.safetensors",
             "convert_to_quant": out / "ctq.safetensors"}
    table = {}
    for layer in shapes:
        w = ws[f"{layer}.weight"].to(dev)
        row = {}
        for name, f in files.items():
            if f.exists():
                d = dequant_file(f, layer)
                if d is not None:
                    d = d.to(dev)
                    xe = held[layer]
                    row[name] = evaluate(w, d) + (float(((xe @ (w.float() - d).T) ** 2).sum(dtype=torch.float64)),)
        table[layer] = row
    results["layers"] = table
    results["inprocess"] = inprocess(ws, shapes, stats, dev)
    (out / "learned_gpu.json").write_text(json.dumps(results, indent=1))
    for f in list(files.values()) + [src, stats, out / "ctq-simple.safetensors"]:
        f.unlink(missing_ok=True)  # keep $OUT small
    print(f"\ndevice: {results['device']}")
    print("cells: weight SQNR dB / projected-error dB (convert_to_quant's objective) / held-out output error vs RTN")
    print("| layer | N x K | " + " | ".join(files) + " |")
    print("|---|---|" + "---|" * len(files))
    for layer, row in table.items():
        cells = [("-" if row.get(n) is None else f"{row[n][0]:.2f} / {row[n][1]:.2f} / "
                  + (f"{row[n][2] / row['rtn'][2]:.3f}" if "rtn" in row else "-"))
                 for n in files]
        print(f"| {layer} | {shapes[layer][0]}x{shapes[layer][1]} | " + " | ".join(cells) + " |")
    print("| wall s | | " + " | ".join(f"{results['runs'][n]['seconds']:.1f} (rc {results['runs'][n]['rc']})"
                                       for n in files) + " |")
    r = results["runs"]
    print(f"\nconvert_to_quant --simple (no learned rounding): {r['convert_to_quant-simple']['seconds']:.1f} s "
          f"(rc {r['convert_to_quant-simple']['rc']})")
    net = {n: r[n]["seconds"] - r[base]["seconds"] for n, base in
           (("quantkit-calibrated", "rtn"), ("quantkit-subspace", "rtn"), ("convert_to_quant", "convert_to_quant-simple"))}
    ratio = lambda a, b: f"{a / b:.1f}x" if b > 0.05 else "n/a (below timing noise)"  # noqa: E731
    ipt = results["inprocess"]
    print("learned rounding, wall net of its tool's plain run: " + ", ".join(f"{n} {v:.1f} s" for n, v in net.items())
          + f"\nconvert_to_quant net / quantkit net: calibrated {ratio(net['convert_to_quant'], net['quantkit-calibrated'])}, "
          f"subspace {ratio(net['convert_to_quant'], net['quantkit-subspace'])}"
          f"\nconvert_to_quant net / quantkit in-process learned rounding: calibrated "
          f"{ratio(net['convert_to_quant'], ipt['calibrated_total_s'])}, subspace {ratio(net['convert_to_quant'], ipt['subspace_total_s'])}"
          f"\nwhole wall convert_to_quant / quantkit: calibrated {ratio(r['convert_to_quant']['seconds'], r['quantkit-calibrated']['seconds'])}, "
          f"subspace {ratio(r['convert_to_quant']['seconds'], r['quantkit-subspace']['seconds'])}")
    ip = results["inprocess"]
    print("\nin-process, seconds (CUDA-synchronised), quantkit learned rounding alone:")
    print("| layer | calibrated (Triton block kernel) | calibrated (PyTorch column loop) | same q | subspace | subspace method |")
    print("|---|---|---|---|---|---|")
    for layer, row in ip["layers"].items():
        print(f"| {layer} | {row['calibrated_s']:.3f} | {row.get('loop_s', float('nan')):.3f} | "
              f"{row.get('loop_same_q', '-')} | {row['subspace_s']:.3f} | {row['subspace_method']} |")
    print(f"| total | {ip['calibrated_total_s']:.2f} | | | {ip['subspace_total_s']:.2f} | |")
    print("Triton GPTQ kernel: " + ("FAILED, loop used: " + ip["kernel_broken"] if ip["kernel_broken"] else
                                    "used" if results["device"] != "cpu" else "not used (CPU: both columns are the loop)"))
    print("\nsubspace target sweep (weight SQNR dB / projected dB per layer):")
    for target, row in ip["sweep"].items():
        print(f"target {target} dB: " + "  ".join(f"{a:.2f}/{b:.2f}" for a, b in row))


def inprocess(ws: dict, shapes: dict, stats: Path, dev: str) -> dict:
    from quantkit import learned
    from quantkit.calibration import Calibration
    from quantkit.formats import FORMATS

    spec = FORMATS["fp8"]
    cal = Calibration.load(stats)

    def timed(fn):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    rows, sweep = {}, {}
    # warm-up: Triton compile, cuSOLVER/cuBLAS handles
    wu = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    learned.learn(wu, wu.T @ wu / 256 + torch.eye(256), spec, 128, learned.LearnedOptions(device=dev))
    learned.learn_subspace(wu, spec, 128, learned.LearnedOptions(device=dev))
    loop_layers = {"double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.qkv"}
    for layer in shapes:
        w = ws[f"{layer}.weight"]
        h = learned.objective_matrix(cal.layers[layer], False).to(dev)
        r, sec = timed(lambda: learned.learn(w, h, spec, 128, learned.LearnedOptions(device=dev)))
        row = {"calibrated_s": sec, "calibrated_method": r.method, "objective": [r.objective_rtn, r.objective]}
        if layer in loop_layers or (dev == "cpu"):
            w32 = w.to(dev, torch.float32)[None]
            s = learned.element_scale(learned.reference.compute_scale(w32[0], spec, 128), tuple(w.shape), spec,
                                      128)[None].contiguous()
            ga, ta = timed(lambda: learned.gptq(w32, s, h[None], spec, kernel=False))
            gb, _ = timed(lambda: learned.gptq(w32, s, h[None], spec, kernel=dev == "cuda"))
            row["loop_s"] = ta
            row["loop_same_q"] = f"{float((ga == gb).float().mean()):.6f}"
            ja, jb = learned.objective(w32, ga * s, h[None]), learned.objective(w32, gb * s, h[None])
            row["loop_vs_kernel_objective"] = [float(ja), float(jb)]
        r, sec = timed(lambda: learned.learn_subspace(w, spec, 128, learned.LearnedOptions(device=dev)))
        row["subspace_s"], row["subspace_method"] = sec, r.method
        rows[layer] = row
        wd = w.to(dev)
        for target in (1.5, 3.0, 4.5, 6.0):
            rg = learned.learn_subspace(w, spec, 128, learned.LearnedOptions(device=dev, subspace_target_db=target))
            sweep.setdefault(target, []).append(evaluate(wd, rg.dequantize(spec, 128).to(dev)))
    return {"layers": rows, "sweep": sweep, "kernel_broken": learned._KERNEL_BROKEN,
            "calibrated_total_s": sum(r["calibrated_s"] for r in rows.values()),
            "subspace_total_s": sum(r["subspace_s"] for r in rows.values())}


if __name__ == "__main__":
    main()
