"""Check a quantized model against the original on real inputs, and the image metrics the ComfyUI
Compare Models node reports.

``compare(model, qmodel, inputs)`` runs both ``torch.nn.Module`` s on the same inputs and returns a
:class:`CompareReport`:

* per layer (every ``nn.Linear`` name of ``model`` whose module in ``qmodel`` is a different object):
  the layer's own error, its quantized output against the original layer run on *the same input*
  (relative L2 ``||y_q - y|| / ||y||`` and cosine, over all rows of all inputs), so a broken layer
  shows up where it is, not only downstream;
* the final output error (relative L2 over all inputs, worst per-input cosine);
* seconds per call of each model (median; CUDA synchronised) and peak memory of each (CUDA's
  ``max_memory_allocated`` during its calls; None on a CPU, where torch keeps no such counter).

An input is a tensor (``model(x)``), a tuple or list (``model(*x)``) or a dict (``model(**x)``); an
output may be a tensor or a tuple / list / dict of tensors (all are compared, flattened).

The metrics: :func:`psnr` and :func:`ssim` (Wang et al. 2004: Gaussian window 11, sigma 1.5,
K1 = 0.01, K2 = 0.03, on images in [0, 1], per channel, averaged) on ComfyUI IMAGE tensors
``[B, H, W, C]``; :func:`verdict` turns them into one of three words (thresholds in
:data:`THRESHOLDS`, derived in ``tests/test_comfyui_capture_compare.py``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuantkitError

# Verdict thresholds. Indistinguishable: PSNR >= 35 dB and SSIM >= 0.98 between the two decoded
# images. Broken: the final latents differ by more than half their norm (relative L2 > 0.5) or the
# images share almost no structure (SSIM < 0.3). Anything between: minor differences.
THRESHOLDS = {"indistinguishable_psnr_db": 35.0, "indistinguishable_ssim": 0.98,
              "broken_latent_rel_l2": 0.5, "broken_ssim": 0.3}
VERDICTS = ("indistinguishable", "minor differences", "broken: the quantized model's output is noise")


def rel_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in fp64 (inf when ref is zero and got is not)."""
    ref, got = ref.detach().double().reshape(-1), got.detach().double().reshape(-1)
    n = float(ref.norm())
    d = float((got - ref).norm())
    return d / n if n > 0 else (0.0 if d == 0 else math.inf)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def _nchw(img: torch.Tensor) -> torch.Tensor:
    if img.dim() == 3:
        img = img[None]
    if img.dim() != 4:
        raise QuantkitError(f"an image must be [B, H, W, C], not {list(img.shape)}")
    return img.detach().double().permute(0, 3, 1, 2)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, peak] (inf when identical)."""
    if a.shape != b.shape:
        raise QuantkitError(f"images differ in shape: {list(a.shape)} vs {list(b.shape)}")
    mse = float(((a.detach().double() - b.detach().double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two ComfyUI images ``[B, H, W, C]`` in [0, peak]."""
    if a.shape != b.shape:
        raise QuantkitError(f"images differ in shape: {list(a.shape)} vs {list(b.shape)}")
    x, y = _nchw(a), _nchw(b)
    c = x.shape[1]
    w = min(window, x.shape[2], x.shape[3])
    w -= (w + 1) % 2  # odd
    g = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    g = torch.exp(-(g ** 2) / (2 * sigma * sigma))
    g = (g / g.sum())
    kern = (g[:, None] * g[None, :]).expand(c, 1, w, w).contiguous()

    def blur(t):
        return F.conv2d(t, kern, groups=c)

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m.mean())


def verdict(psnr_db: float, ssim_value: float, latent_rel_l2: float) -> str:
    t = THRESHOLDS
    if latent_rel_l2 > t["broken_latent_rel_l2"] or ssim_value < t["broken_ssim"]:
        return VERDICTS[2]
    if psnr_db >= t["indistinguishable_psnr_db"] and ssim_value >= t["indistinguishable_ssim"]:
        return VERDICTS[0]
    return VERDICTS[1]


@dataclass
class LayerError:
    name: str
    rel_l2: float
    cosine: float
    calls: int


@dataclass
class CompareReport:
    layers: list[LayerError] = field(default_factory=list)
    output_rel_l2: float = 0.0
    output_cosine_min: float = 1.0
    seconds_per_call: tuple[float, float] = (0.0, 0.0)  # original, quantized
    peak_memory: tuple[int | None, int | None] = (None, None)  # bytes; None where not measurable

    def worst(self, n: int = 5) -> list[LayerError]:
        return sorted(self.layers, key=lambda e: -e.rel_l2)[:n]

    def text(self) -> str:
        s0, s1 = self.seconds_per_call
        lines = [f"output: relative L2 {self.output_rel_l2:.4g}, worst cosine {self.output_cosine_min:.6f}",
                 f"seconds per call: original {s0:.4g}, quantized {s1:.4g}"]
        if self.peak_memory[0] is not None:
            lines.append(f"peak memory: original {self.peak_memory[0] / 2**20:.1f} MiB, "
                         f"quantized {self.peak_memory[1] / 2**20:.1f} MiB")
        for e in self.worst():
            lines.append(f"  {e.name}: relative L2 {e.rel_l2:.4g}, cosine {e.cosine:.6f}")
        return "\n".join(lines)


def _call(model: nn.Module, inp):
    if isinstance(inp, dict):
        return model(**inp)
    if isinstance(inp, (tuple, list)):
        return model(*inp)
    return model(inp)


def flatten_output(out) -> torch.Tensor:
    """Every tensor of a model output, as one flat fp64 CPU vector."""
    if isinstance(out, torch.Tensor):
        return out.detach().double().reshape(-1).cpu()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [flatten_output(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict))]
        if parts:
            return torch.cat(parts)
    raise QuantkitError(f"cannot compare a model output of type {type(out).__name__}",
                        fix="compare a model whose forward returns tensors")


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _timed_outputs(model: nn.Module, inputs: list) -> tuple[list[torch.Tensor], float, int | None]:
    dev = _device(model)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    outs, times = [], []
    for inp in inputs:
        t0 = time.perf_counter()
        out = _call(model, inp)
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        outs.append(flatten_output(out))
    peak = int(torch.cuda.max_memory_allocated(dev)) if cuda else None
    return outs, statistics.median(times), peak


def compare(model: nn.Module, qmodel: nn.Module, inputs: Iterable, *, layers: str | None = None) -> CompareReport:
    """Run ``model`` and ``qmodel`` on ``inputs``; see the module docstring for what is measured.
    ``layers``: a regex; only linear layers whose name it finds get the per-layer check."""
    import re
    inputs = list(inputs)
    if not inputs:
        raise QuantkitError("compare() needs at least one input", fix="pass a list of model inputs")
    pat = re.compile(layers) if layers else None
    orig = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (pat is None or pat.search(n))}
    qmods = dict(qmodel.named_modules())
    pairs = {n: (m, qmods[n]) for n, m in orig.items() if n in qmods and qmods[n] is not m}

    with torch.inference_mode():
        ref, t_ref, peak_ref = _timed_outputs(model, inputs)
        got, t_q, peak_q = _timed_outputs(qmodel, inputs)
        sums = {n: [0.0, 0.0, 0.0, 0.0, 0] for n in pairs}  # ||d||^2, ||y||^2, y.yq, ||yq||^2, calls

        def hook(name, o_mod):
            def fn(module, args, output):
                y = o_mod(*args).double()
                yq = output.double()
                s = sums[name]
                s[0] += float(((yq - y) ** 2).sum())
                s[1] += float((y * y).sum())
                s[2] += float((y * yq).sum())
                s[3] += float((yq * yq).sum())
                s[4] += 1
            return fn

        handles = [q.register_forward_hook(hook(n, o)) for n, (o, q) in pairs.items()]
        try:
            for inp in inputs:
                _call(qmodel, inp)
        finally:
            for h in handles:
                h.remove()

    errs = []
    for n, (dd, yy, yq, qq, calls) in sums.items():
        r = math.sqrt(dd / yy) if yy > 0 else (0.0 if dd == 0 else math.inf)
        c = yq / math.sqrt(yy * qq) if yy > 0 and qq > 0 else (1.0 if yy == qq else 0.0)
        errs.append(LayerError(n, r, c, calls))
    num = sum(float(((g - r) ** 2).sum()) for r, g in zip(ref, got))
    den = sum(float((r ** 2).sum()) for r in ref)
    out_rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return CompareReport(errs, out_rel, min(cosine(r, g) for r, g in zip(ref, got)), (t_ref, t_q), (peak_ref, peak_q))
