"""Held-out quality of learned rounding + bias correction on the registry formats' own grids
(int8-convrot, mxfp8, nvfp4, w4a8, w4a8-6bit, int4-convrot, awq4), all-MiniLM-L6-v2: calibrate on
models.sentences.CALIBRATION, measure mean 1-cos of sentence embeddings on EVALUATION.

    PYTHONPATH=src python benchmarks/learned_newgrids.py [FORMAT ...]

Per format: RTN (the format's quantizer) vs learned rounding + bias correction
(:func:`quantkit.learned.learn_format`), both dequantized by the format (what ComfyUI computes).
The converter (``quantkit convert --calibration S --learned-rounding --bias-correction``) gives the
same figures (tests/test_learned_newgrids.py).

Measured (1 thread, this machine; seconds include RTN, 2 cores shared):

    format          rtn 1-cos learned+bc  ratio kept rtn      s
    int8-convrot   2.0611e-04 6.6405e-05  0.322    0/36     6.1
    mxfp8          1.6074e-03 7.7811e-04  0.484    0/36     4.0
    nvfp4          1.9725e-02 8.1570e-03  0.414    0/36     8.4
    w4a8           1.7122e-02 5.9714e-03  0.349    0/36    21.0
    w4a8-6bit      1.3416e-03 4.4402e-04  0.331    0/36    21.0
    int4-convrot   4.9948e-02 1.5010e-02  0.301    0/36    14.5
    awq4           2.7851e-02 9.9364e-03  0.357    0/36    13.9
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from quantkit import learned
from quantkit.formats import FORMATS
from quantkit.models import heldout
from quantkit.models.bert import load_bert
from quantkit.models.sentences import CALIBRATION, EVALUATION

NEW = ("int8-convrot", "mxfp8", "nvfp4", "w4a8", "w4a8-6bit", "int4-convrot", "awq4")


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def quantized_state(ref, cal, fmt, mode: str, options=learned.LearnedOptions(), notes=None) -> dict:
    """The model's float state dict with every linear stored in ``fmt`` and dequantized by it:
    ``mode`` "rtn" or "learned+bc"."""
    from quantkit.formats.base import LayerOpts
    opts = LayerOpts()
    sd = {k: v.detach().clone().float() for k, v in ref.state_dict().items()}
    for name, lin in linears(ref).items():
        w = lin.weight.detach()
        marker = fmt.marker(tuple(w.shape), w.dtype, opts)
        seen = float(cal.layers.get(name, {}).get("count", 0)) > 0
        if mode == "rtn" or not seen:  # a layer calibration never ran keeps RTN, as the converter does
            stored = fmt.quantize(w, opts)
        else:
            st = cal.layers[name]
            r = learned.learn_format(w, learned.objective_matrix(st, True), fmt, opts, options, name=name)
            stored = r.stored
            if notes is not None:
                notes[name] = r
        deq = fmt.dequantize(stored, marker, torch.float32, name)
        sd[f"{name}.weight"] = deq
        if mode != "rtn" and seen:
            sd[f"{name}.bias"] = learned.corrected_bias(lin.bias.detach().float(), w.float(), deq,
                                                        cal.layers[name]["mean"]).float()
    return sd


def one_minus_cos(ref, sd) -> float:
    return 1.0 - heldout.embedding_cosine(ref, heldout.model_from(sd), EVALUATION)


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(NEW)
    ref = load_bert()
    with tempfile.TemporaryDirectory() as d:
        cal = heldout.calibrate(ref, CALIBRATION, Path(d) / "stats.safetensors")
    print(f"{'format':14s} {'rtn 1-cos':>10s} {'learned+bc':>10s} {'ratio':>6s} {'kept rtn':>8s} {'s':>6s}")
    for n in names:
        fmt = FORMATS[n]
        t0 = time.perf_counter()
        rtn = one_minus_cos(ref, quantized_state(ref, cal, fmt, "rtn"))
        notes = {}
        lr = one_minus_cos(ref, quantized_state(ref, cal, fmt, "learned+bc", notes=notes))
        kept = sum(r.method.startswith("rtn") for r in notes.values())
        print(f"{n:14s} {rtn:10.4e} {lr:10.4e} {lr / rtn:6.3f} {kept:4d}/{len(notes):<3d} "
              f"{time.perf_counter() - t0:6.1f}", flush=True)


if __name__ == "__main__":
    main()
