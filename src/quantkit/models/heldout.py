"""Held-out measurement of a converted all-MiniLM-L6-v2: calibrate on one sentence set, measure on
another. Used by the learned-rounding tests and ``benchmarks/learned_minilm.py``.

* :func:`calibrate` writes a stats file from real sentences (one sentence per forward, so no
  padding rows reach the statistics).
* :func:`layer_inputs` records every linear's real input rows on held-out sentences (fp32 model).
* :func:`load_converted` reads a converted file back into float weights with
  :func:`quantkit.reference.dequantize` (what ComfyUI computes) and the file's (maybe corrected) biases.
* :func:`output_errors` is the per-layer held-out output error sum ||(W x + b) - (Wq x + b')||^2,
  each layer fed the fp32 model's own inputs, so layers are compared in isolation.
* :func:`embedding_cosine` is the mean cosine of sentence embeddings against the fp32 model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import calibration
from ..errors import QuantkitError
from ..formats import decode_comfy_quant, format_of_marker
from .bert import BertModel, load_bert, tokenize


def calibrate(model: BertModel, sentences: list[str], path: str | Path) -> calibration.Calibration:
    with torch.no_grad(), calibration.capture(model) as cap:
        for s in sentences:
            model(*tokenize([s]))
    cap.save(path)
    return cap.result


def layer_inputs(model: BertModel, sentences: list[str]) -> dict[str, torch.Tensor]:
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: rows.setdefault(n, []).append(
                 a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            for s in sentences:
                model(*tokenize([s]))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def load_converted(path: str | Path) -> dict[str, torch.Tensor]:
    """Float state dict of a converted file: quantized layers dequantized in fp32, others as stored."""
    from safetensors.torch import load_file
    sd = load_file(str(path))
    out = {}
    for name, t in sd.items():
        layer, _, suffix = name.rpartition(".")
        marker = sd.get(f"{layer}.comfy_quant")
        if marker is not None and suffix not in ("weight", "bias"):
            continue  # the layer's scales and marker
        if suffix == "weight" and marker is not None:
            m = decode_comfy_quant(marker.numpy().tobytes())
            stored = {k[len(layer) + 1:]: v for k, v in sd.items()
                      if k.startswith(layer + ".") and "." not in k[len(layer) + 1:]}
            fmt = format_of_marker(m, {k: tuple(v.shape) for k, v in stored.items()})
            if fmt is None:
                raise QuantkitError(f"no registered format reads a {m.get('format')} layer", file=path,
                                    tensor=name, fix="convert the original checkpoint with quantkit")
            t = fmt.dequantize(stored, m, torch.float32, layer)
        out[name] = t.float() if t.is_floating_point() else t
    return out


def model_from(sd: dict[str, torch.Tensor], model_dir: str | Path | None = None) -> BertModel:
    m = load_bert(model_dir)
    m.load_state_dict({k: v for k, v in sd.items() if k != "embeddings.position_ids"})
    return m.eval()


def output_errors(ref: BertModel, sd: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    mods = dict(ref.named_modules())
    out = {}
    for name, x in inputs.items():
        lin = mods[name]
        w, b = lin.weight.detach().double(), lin.bias.detach().double()
        wq, bq = sd[f"{name}.weight"].double(), sd[f"{name}.bias"].double()
        x = x.double()
        out[name] = float(((x @ (w - wq).T + (b - bq)) ** 2).sum())
    return out


def embedding_cosine(ref: BertModel, model: BertModel, sentences: list[str]) -> float:
    ids, mask = tokenize(sentences)
    with torch.no_grad():
        a, b = ref.sentence_embeddings(ids, mask), model.sentence_embeddings(ids, mask)
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean())
