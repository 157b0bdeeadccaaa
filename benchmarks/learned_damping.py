"""Choose the GPTQ damping without touching the evaluation sentences (issue 5): calibrate on the
first half of sentences.CALIBRATION, measure held-out output error on the second half.

    PYTHONPATH=src python benchmarks/learned_damping.py
"""

from __future__ import annotations

import statistics

import torch

from quantkit import calibration, learned, reference
from quantkit.formats import FORMATS
from quantkit.models import heldout
from quantkit.models.bert import load_bert, tokenize
from quantkit.models.sentences import CALIBRATION

DAMPINGS = (0.01, 0.1, 1.0, 10.0)


def main() -> None:
    torch.set_num_threads(1)
    ref = load_bert()
    half = len(CALIBRATION) // 2
    with torch.no_grad(), calibration.capture(ref) as cap:
        for s in CALIBRATION[:half]:
            ref(*tokenize([s]))
    stats = cap.result.layers
    xs = heldout.layer_inputs(ref, CALIBRATION[half:])
    mods = dict(ref.named_modules())
    print("| format | damping | median ratio | max ratio | down-proj max |")
    print("|---|---|---|---|---|")
    for fmt in ("fp8", "int8-row"):
        spec = FORMATS[fmt]
        for damp in DAMPINGS:
            ratios = {}
            for n, x in xs.items():
                w = mods[n].weight.detach()
                q0, s0 = reference.quantize(w, spec, 128)
                e0 = ((x @ (w - reference.dequantize(q0, s0, spec, 128)).T) ** 2).sum()
                r = learned.learn(w, learned.objective_matrix(stats[n], False), spec, 128,
                                  learned.LearnedOptions(damping=damp, device="cpu"))
                ratios[n] = float(((x @ (w - r.dequantize(spec, 128)).T) ** 2).sum() / e0)
            down = [v for k, v in ratios.items() if k.endswith("output.dense") and "attention" not in k]
            print(f"| {fmt} | {damp} | {statistics.median(ratios.values()):.3f} | {max(ratios.values()):.3f} "
                  f"| {max(down):.3f} |", flush=True)


if __name__ == "__main__":
    main()
