"""Held-out quality of learned rounding and bias correction on all-MiniLM-L6-v2 (issue 5).

Calibrates on ``sentences.CALIBRATION``, converts the fp32 checkpoint with ``quantkit.convert`` for
each format and mode, and measures on ``sentences.EVALUATION``: per-layer output error relative to
round-to-nearest (RTN) and the sentence-embedding cosine vs fp32. Prints markdown tables.

    PYTHONPATH=src python benchmarks/learned_minilm.py [--formats fp8,int8-row,int8-block] [--proxy] [--subspace]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import quantkit
from quantkit import learned
from quantkit.formats import FORMATS
from quantkit.models import heldout
from quantkit.models.bert import load_bert, minilm_dir
from quantkit.models.sentences import CALIBRATION, EVALUATION

MODES = {  # name: convert() keywords beyond format
    "rtn": {},
    "learned": {"learned_rounding": True, "calibration": True},
    "learned+bc": {"learned_rounding": True, "calibration": True, "bias_correction": True},
}


def proxy_state_dict(sd: dict, ref, fmt: str) -> dict:
    """The RTN file's state dict with every quantized linear re-rounded on the data-free proxy objective."""
    spec = FORMATS[fmt]
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and not torch.equal(sd[f"{name}.weight"], mod.weight.detach()):
            w = mod.weight.detach()
            sd[f"{name}.weight"] = learned.learn(w, learned.proxy_hessian(w), spec, 128).dequantize(spec, 128)
    return sd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="fp8,int8-row,int8-block")
    ap.add_argument("--proxy", action="store_true", help="also the data-free proxy (no calibration)")
    ap.add_argument("--subspace", action="store_true",
                    help="also --learned-objective subspace (data-free, W's top singular subspace)")
    args = ap.parse_args()
    modes = dict(MODES)
    if args.subspace:
        modes["subspace"] = {"learned_rounding": True, "learned_objective": "subspace"}
    if args.proxy:
        modes["proxy"] = None  # learned rounding with learned.proxy_hessian; convert() refuses it, so in-process
    torch.manual_seed(0)
    ref = load_bert()
    src = minilm_dir() / "model.safetensors"
    with tempfile.TemporaryDirectory() as d:
        stats = Path(d) / "stats.safetensors"
        cal = heldout.calibrate(ref, CALIBRATION, stats)
        xs = heldout.layer_inputs(ref, EVALUATION)
        rows = int(cal.layers["encoder.layer.0.output.dense"]["count"])
        print(f"calibration: {rows} tokens from {len(CALIBRATION)} sentences; held-out: "
              f"{next(iter(xs.values())).shape[0]} tokens from {len(EVALUATION)} sentences\n")
        for fmt in args.formats.split(","):
            errs, cos, secs = {}, {}, {}
            for mode, kw in modes.items():
                t0 = time.perf_counter()
                if kw is None:
                    sd = proxy_state_dict(heldout.load_converted(Path(d) / f"{fmt}-rtn.safetensors"), ref, fmt)
                else:
                    kw = {k: (stats if k == "calibration" else v) for k, v in kw.items()}
                    out = Path(d) / f"{fmt}-{mode}.safetensors"
                    quantkit.convert(src, out, format=fmt, overwrite=True, **kw)
                    sd = heldout.load_converted(out)
                secs[mode] = time.perf_counter() - t0
                errs[mode] = heldout.output_errors(ref, sd, xs)
                cos[mode] = heldout.embedding_cosine(ref, heldout.model_from(sd), EVALUATION)
            names = [n for n in errs["rtn"] if n in errs["learned"]]
            print(f"### {fmt}\n")
            others = [m for m in modes if m != "rtn"]
            print("| layer | " + " | ".join(f"{m} / rtn" for m in others) + " |")
            print("|---|" + "---|" * len(others))
            for n in names:
                print(f"| {n} | " + " | ".join(f"{errs[m][n] / errs['rtn'][n]:.3f}" for m in others) + " |")
            print()
            print("| mode | embedding cosine vs fp32 (1 - cos) | down-proj ratio max | all layers ratio max | "
                  "median | convert s |")
            print("|---|---|---|---|---|---|")
            for m in modes:
                r = [errs[m][n] / errs["rtn"][n] for n in names]
                down = [errs[m][n] / errs["rtn"][n] for n in names if n.endswith("output.dense")
                        and "attention" not in n]
                print(f"| {m} | {1 - cos[m]:.3e} | {max(down):.3f} | {max(r):.3f} | {statistics.median(r):.3f} "
                      f"| {secs[m]:.1f} |")
            print(flush=True)


if __name__ == "__main__":
    main()
