"""Calibration: per-layer input statistics captured from real activations, saved as .safetensors.

Usage (any ``torch.nn.Module``; the user runs their own batches)::

    with capture(model) as cal:
        for batch in batches:
            model(batch)
    cal.save("stats.safetensors")

Every ``nn.Linear`` is hooked (optionally only names matching ``layers``, a regex). Its input is
flattened to rows ``[M, K]`` (all leading dims are rows); rows where ``cal.row_mask`` is False are
skipped (set it to a padding mask before each forward, or feed unpadded batches). Per layer, one pass:

============  ==========  =================================================================
key           shape       meaning
============  ==========  =================================================================
``count``     ``[]`` F64  rows seen (0: the layer never ran; only this key is written then)
``mean``      ``[K]``     E[x] per input channel (bias correction uses it)
``mean_sq``   ``[K]``     E[x^2] per input channel (the diagonal of ``hessian``)
``absmax``    ``[K]``     max |x| per input channel (static fp8 ``input_scale``)
``hessian``   ``[K, K]``  E[x x^T] (the output-error objective; only with ``second_order="full"``)
============  ==========  =================================================================

stored as ``"<layer>.<key>"`` in fp32 (count in fp64), with ``__metadata__`` naming the format
(``quantkit_calibration = "1"``), the number of layers and ``second_order``.

Second-order memory: the full ``E[x x^T]`` is K*K*4 bytes per layer. For Flux.1 (12B DiT:
19 double blocks with ten linears each, K = 3072 except the two MLP down-projections at K = 12288;
38 single blocks with K = 3072, 3072 and 15360) that is 4*(19*(8*3072^2 + 2*12288^2) +
38*(2*3072^2 + 15360^2)) bytes = 67.4 GB (smaller top-level linears aside) on disk; :meth:`Calibration.load`
reads each layer's matrix only when that layer asks for it. Ways to bound the file:
capture a subset at a time (``layers=r"double_blocks\\.(0|1)\\."``), or ``second_order="diag"``, which keeps only
the K-float keys (about 21 MB in all for Flux); with a diagonal H, error feedback has nothing to feed
(it reduces to round-to-nearest), so only the int8 clipping search can still act (not measured).

Accumulation is in fp64 on the activations' device when it supports fp64 (CPU, CUDA), so long
captures do not lose small contributions; that doubles the memory above while capturing (the file is
fp32), so on a GPU capture a subset of layers per pass. Names are ``model.named_modules()`` names; see
:func:`match_layers` for how they are matched to checkpoint tensor names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import QuantkitError

FORMAT_KEY = "quantkit_calibration"
FORMAT_VERSION = "1"
KEYS = ("count", "mean", "mean_sq", "absmax", "hessian")


@dataclass
class LayerStats:
    """Running sums for one layer's inputs (or, after :meth:`Calibration.load`, the finished means)."""

    k: int
    count: int = 0
    sum: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    xtx: torch.Tensor | None = None  # sum x x^T, or None for second_order="diag"

    def add(self, x: torch.Tensor, full: bool) -> None:
        x = x.detach().reshape(-1, self.k)
        acc = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
        x = x.to(acc)
        if self.sum is None:
            self.sum = torch.zeros(self.k, dtype=acc, device=x.device)
            self.sum_sq = torch.zeros_like(self.sum)
            self.absmax = torch.zeros_like(self.sum)
            if full:
                self.xtx = torch.zeros((self.k, self.k), dtype=acc, device=x.device)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_sq += (x * x).sum(0)
        torch.maximum(self.absmax, x.abs().amax(0) if x.shape[0] else self.absmax, out=self.absmax)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"count": torch.tensor(float(self.count), dtype=torch.float64)}
        if self.count == 0:
            return out
        n = float(self.count)
        out["mean"] = (self.sum / n).float().cpu()
        out["mean_sq"] = (self.sum_sq / n).float().cpu()
        out["absmax"] = self.absmax.float().cpu()
        if self.xtx is not None:
            out["hessian"] = (self.xtx / n).float().cpu()
        return out


class _FileStats(dict):
    """One layer's statistics from a stats file: the K-float keys held in memory, the K x K
    ``hessian`` read from the file each time it is asked for (a whole Flux.1 file holds 67 GB of
    them; the converter needs one layer's at a time)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        self._deferred: dict[str, str] = {}

    def defer(self, key: str, tensor: str) -> None:
        self._deferred[key] = tensor
        super().__setitem__(key, None)

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._deferred.get(key)
        if tensor is None:
            return super().__getitem__(key)
        from .safetensors_io import SafetensorsReader
        with SafetensorsReader(self._path) as r:
            return r.read(tensor)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return [(k, self[k]) for k in self]

    def values(self):
        return [self[k] for k in self]


@dataclass
class Calibration:
    """Statistics per layer name: ``{"count": float, "mean": [K], ...}`` (see the module table)."""

    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    second_order: str = "full"

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        flat = {f"{name}.{k}": v.contiguous() for name, d in self.layers.items() for k, v in d.items()}
        meta = {FORMAT_KEY: FORMAT_VERSION, "layers": str(len(self.layers)), "second_order": self.second_order}
        save_file(flat, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        from .safetensors_io import SafetensorsReader
        path = Path(path)
        with SafetensorsReader(path) as r:
            meta = r.metadata or {}
            if meta.get(FORMAT_KEY) != FORMAT_VERSION:
                raise QuantkitError(f"not a quantkit calibration file (metadata {FORMAT_KEY} is "
                                    f"{meta.get(FORMAT_KEY)!r}, expected {FORMAT_VERSION!r})", file=path,
                                    fix="make one with quantkit.calibration.capture(model) ... .save(path)")
            layers: dict[str, dict[str, torch.Tensor]] = {}
            for t in r.tensors_in_order:
                name, _, key = t.name.rpartition(".")
                if key not in KEYS or not name:
                    raise QuantkitError(f"unexpected tensor in a calibration file (keys end in one of "
                                        f"{', '.join(KEYS)})", file=path, tensor=t.name,
                                        fix="recreate the file with quantkit.calibration.capture")
                d = layers.setdefault(name, _FileStats(path))
                if key == "hessian":  # K x K: read when a layer asks for it, not all at once
                    d.defer(key, t.name)
                else:
                    d[key] = r.read(t.name)
        for name, d in layers.items():
            if "count" not in d:
                raise QuantkitError("layer has statistics but no count", file=path, tensor=f"{name}.count",
                                    fix="recreate the file with quantkit.calibration.capture")
            if float(d["count"]) > 0 and not {"mean", "mean_sq", "absmax"} <= set(d):
                raise QuantkitError("layer lacks mean, mean_sq or absmax", file=path, tensor=name,
                                    fix="recreate the file with quantkit.calibration.capture")
        return cls(layers, meta.get("second_order", "full"))


class capture:
    """Context manager hooking every ``nn.Linear`` of ``model`` (names matching ``layers``, a regex
    searched in the module name, if given). ``second_order``: ``"full"`` (E[x x^T]) or ``"diag"``."""

    def __init__(self, model: nn.Module, layers: str | None = None, second_order: str = "full") -> None:
        if second_order not in ("full", "diag"):
            raise QuantkitError(f"second_order {second_order!r} is not 'full' or 'diag'",
                                fix="use 'full' (needed by learned rounding) or 'diag'")
        pat = re.compile(layers) if layers else None
        self.model = model
        self.full = second_order == "full"
        self.row_mask: torch.Tensor | None = None
        self._linears = {n: m for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and (pat is None or pat.search(n))}
        if not self._linears:
            raise QuantkitError("the model has no nn.Linear to calibrate" + (f" matching {layers!r}" if layers else ""),
                                fix="pass the model whose linear layers you will quantize")
        self._stats = {n: LayerStats(m.in_features) for n, m in self._linears.items()}
        self._handles: list = []
        self.result: Calibration | None = None

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self.row_mask is not None:
                mask = self.row_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
                rows = x.reshape(-1, x.shape[-1])
                if rows.shape[0] != mask.shape[0]:
                    raise QuantkitError(f"row_mask has {mask.shape[0]} rows but layer input has {rows.shape[0]}",
                                        tensor=name, fix="set row_mask to the [batch, tokens] padding mask")
                x = rows[mask]
            self._stats[name].add(x, self.full)
        return hook

    def __enter__(self) -> capture:
        for n, m in self._linears.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(n)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.result = self.calibration()

    def calibration(self) -> Calibration:
        return Calibration({n: s.tensors() for n, s in self._stats.items()},
                           "full" if self.full else "diag")

    def save(self, path: str | Path) -> None:
        (self.result or self.calibration()).save(path)


def match_layers(checkpoint_layers: Iterable[str], cal: Calibration, file: object = None) -> dict[str, str]:
    """Map checkpoint layer names to calibration layer names.

    Rule: a calibration name S matches checkpoint layer L when L == P + S for one prefix P shared by
    every calibration layer (P may be empty; e.g. ``model.diffusion_model.`` when the checkpoint was
    saved from a wrapper), or when S == P + L (the module was captured inside a wrapper). P is the
    prefix under which the most calibration layers are found; every calibration layer must then be
    found, otherwise this is an error naming the first one that is not. Checkpoint layers without
    statistics are left out of the map (the caller decides what that means).
    """
    ck = list(checkpoint_layers)
    ck_set = set(ck)
    names = list(cal.layers)
    if not names:
        raise QuantkitError("calibration file holds no layers", file=file, fix="capture again over real batches")
    votes: dict[tuple[str, str], int] = {}
    for s in names:
        for L in ck:
            if L.endswith(s) and (len(L) == len(s) or L[-len(s) - 1] == "."):
                key = ("ck", L[: len(L) - len(s)])
            elif s.endswith(L) and s[-len(L) - 1] == ".":
                key = ("cal", s[: len(s) - len(L)])
            else:
                continue
            votes[key] = votes.get(key, 0) + 1
    if not votes:
        raise QuantkitError(f"no calibration layer matches a checkpoint layer (e.g. calibration has "
                            f"'{names[0]}', checkpoint has '{ck[0] if ck else '-'}')", file=file,
                            fix="capture statistics on the model that this checkpoint belongs to")
    (side, prefix), _ = max(votes.items(), key=lambda kv: (kv[1], -len(kv[0][1])))
    out: dict[str, str] = {}
    for s in names:
        L = prefix + s if side == "ck" else (s[len(prefix):] if s.startswith(prefix) else None)
        if L is None or L not in ck_set:
            where = f"'{prefix}' + " if side == "ck" and prefix else ""
            raise QuantkitError(f"calibration layer '{s}' has no checkpoint layer {where}'{s}'"
                                + (f" (prefix rule: {side} side '{prefix}')" if prefix else ""), file=file,
                                fix="capture with the model this checkpoint was saved from, or restrict "
                                    "the capture to its layers with capture(model, layers=...)")
        out[L] = s
    return out
