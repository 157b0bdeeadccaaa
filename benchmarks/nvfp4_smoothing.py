"""Does AWQ-style smoothing (nvfp4 ``pre_quant_scale``) pay on all-MiniLM-L6-v2 under ComfyUI's W4A4
nvfp4 path? The measurement behind nvfp4's decision not to write ``pre_quant_scale``.

    PYTHONPATH=src python benchmarks/nvfp4_smoothing.py

Per linear, with calibration statistics and inputs from models.sentences.CALIBRATION: candidate
s = rms(x)^a / max|W[:, k]|^b (normalised to geometric mean 1) over a small (a, b) grid; W / s is
quantized with quantkit's nvfp4 quantizer; the activation x * s with comfy-kitchen's (dynamic
per-tensor scale, no search: what ComfyUI runs). A layer keeps the s of smallest calibration output
error ||x W^T - Q(x s) Q(W / s)^T||^2, or none where no s beats plain. Then the mean 1-cos of
sentence embeddings on EVALUATION against fp32, plain and smoothed, both W4A4.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from quantkit.formats import FORMATS, LayerOpts, nvfp4
from quantkit.models import heldout
from quantkit.models.bert import load_bert, tokenize
from quantkit.models.sentences import CALIBRATION, EVALUATION

F = FORMATS["nvfp4"]
GRID = [(0.1, 0), (0.2, 0), (0.35, 0), (0.5, 0), (0, 0.1), (0, 0.25), (0.1, 0.1), (0.2, 0.2), (0.25, 0.75),
        (0.5, 0.5), (0.75, 0.25)]


def deq_weight(w):
    return F.dequantize(nvfp4.quantize(w), F.marker(tuple(w.shape), torch.float32, LayerOpts()), torch.float32)


def deq_act(x):
    x2 = x.reshape(-1, x.shape[-1]).float()
    st = nvfp4.quantize_reference(x2, scale_search=False)  # comfy-kitchen's bytes
    return F.dequantize(st, F.marker(tuple(x2.shape), torch.float32, LayerOpts()), torch.float32).reshape(x.shape)


def main() -> None:
    torch.set_num_threads(1)
    ref = load_bert().eval()
    with tempfile.TemporaryDirectory() as d:
        cal = heldout.calibrate(ref, CALIBRATION, Path(d) / "s.safetensors")
    rows = heldout.layer_inputs(ref, CALIBRATION)
    lins = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    plain = {n: deq_weight(m.weight.detach().float()) for n, m in lins.items()}
    chosen, gains = {}, []
    for name, lin in lins.items():
        w, x = lin.weight.detach().float(), rows.get(name)
        if x is None:
            continue
        y = x @ w.T
        base = float(((y - deq_act(x) @ plain[name].T) ** 2).sum())
        best = base
        rms, wmax = cal.layers[name]["mean_sq"].float().sqrt(), w.abs().amax(0)
        for a, b in GRID:
            s = rms.clamp(min=1e-6) ** a / wmax.clamp(min=1e-8) ** b
            s = s / s.log().mean().exp()
            wq = deq_weight(w / s)
            e = float(((y - deq_act(x * s) @ wq.T) ** 2).sum())
            if e < best:
                best, chosen[name] = e, (s, wq)
        gains.append(best / base)
    ids, mask = tokenize(EVALUATION)
    with torch.no_grad():
        want = ref.sentence_embeddings(ids, mask).double()
    out = {}
    for smooth in (False, True):
        hooks = []
        for name, lin in lins.items():
            s, wq = chosen[name] if smooth and name in chosen else (None, plain[name])

            def hook(mod, args, _out, s=s, wq=wq):
                x = args[0] if s is None else args[0] * s
                return deq_act(x) @ wq.T + mod.bias
            hooks.append(lin.register_forward_hook(hook))
        with torch.no_grad():
            got = ref.sentence_embeddings(ids, mask).double()
        for h in hooks:
            h.remove()
        out[smooth] = float((1 - torch.nn.functional.cosine_similarity(got, want, dim=1)).mean())
    print(f"layers smoothed: {len(chosen)}/{len(gains)}; calibration output error, smoothed / plain: "
          f"min {min(gains):.3f}, mean {sum(gains) / len(gains):.3f}")
    print(f"held-out mean 1-cos, W4A4: plain {out[False]:.4e}, smoothed {out[True]:.4e}")


if __name__ == "__main__":
    main()
