"""Learned rounding speed and quality vs convert_to_quant on Flux.1 linear shapes (issue 5).

Writes one synthetic bf16 checkpoint holding the distinct linear shapes of one Flux.1 double block
and one single block (low rank + noise + a few outlier input columns), then, in the same run:

* ``quantkit convert --format fp8`` (round-to-nearest, the baseline),
* ``quantkit convert --format fp8 --learned-rounding --calibration`` with statistics from synthetic activations (low rank + noise + outlier channels; 4096
  rows, a second 4096 rows of the same distribution held out for the output error),
* ``convert_to_quant -i ... --comfy_quant`` (its default: FP8 per-tensor with learned rounding),

each as a subprocess timed on the wall clock, and evaluates every output the same way: weight SQNR
and convert_to_quant's own objective, the error projected on W's top-k singular subspace
||U_k^T (W - Wq) V_k||_F^2 with k = clamp(0.2 * min(N, K), 256, 1280) (its documented defaults
top_p / min_k / max_k), both relative to ||W||_F^2 as dB. Run on the device machine:

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


def evaluate(w: torch.Tensor, deq: torch.Tensor) -> tuple[float, float]:
    w, e = w.float(), w.float() - deq.float()
    sig = float((w.double() ** 2).sum())
    n, k = w.shape
    kk = min(max(int(0.2 * min(n, k)), 256), 1280, min(n, k))
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    proj = u[:, :kk].T @ e @ vh[:kk].T
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
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    q = [sys.executable, "-m", "quantkit", "convert", str(src), "--format", "fp8", "--overwrite", "-q", "-o"]
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "runs": {}}
    ctq_extra = ["--num_iter", "20"] if args.quick else []
    for name, cmd in {
        "rtn": q + [str(out / "rtn.safetensors")],
        "quantkit-calibrated": q + [str(out / "qc.safetensors"), "--learned-rounding", "--calibration", str(stats)],
        "convert_to_quant": [sys.executable, "-c", "import sys; from convert_to_quant.convert_to_quant import main; "
                             "sys.argv[0] = 'convert_to_quant'; sys.exit(main())", "-i", str(src), "-o", str(out / "ctq.safetensors"),
                             "--comfy_quant"] + ctq_extra,
    }.items():
        secs, rc, log = run(cmd, args.ctq_timeout if name == "convert_to_quant" else 600, env, out.resolve())
        results["runs"][name] = {"seconds": secs, "rc": rc, "log_tail": log}
        print(f"{name}: {secs:.1f} s, rc {rc}", flush=True)
    files = {"rtn": out / "rtn.safetensors",
             "quantkit-calibrated": out / "qc.safetensors",
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
    (out / "learned_gpu.json").write_text(json.dumps(results, indent=1))
    for f in list(files.values()) + [src, stats]:
        f.unlink(missing_ok=True)  # keep $OUT small
    print(f"\ndevice: {results['device']}")
    print("cells: weight SQNR dB / projected-error dB (convert_to_quant's objective) / held-out output error vs RTN")
    print("| layer | N x K | " + " | ".join(files) + " |")
    print("|---|---|" + "---|" * len(files))
    for layer, row in table.items():
        cells = [("-" if row.get(n) is None else f"{row[n][0]:.2f} / {row[n][1]:.2f} / {row[n][2] / row['rtn'][2]:.3f}")
                 for n in files]
        print(f"| {layer} | {shapes[layer][0]}x{shapes[layer][1]} | " + " | ".join(cells) + " |")
    print("| wall s | | " + " | ".join(f"{results['runs'][n]['seconds']:.1f} (rc {results['runs'][n]['rc']})"
                                       for n in files) + " |")


if __name__ == "__main__":
    main()
