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

Bounding it while capturing: ``hessian_layers`` (a regex) keeps the full ``E[x x^T]`` only for the
layers it matches and the diagonal keys for every other one (the file's ``second_order`` is then
``"mixed"``). :class:`Accumulator` (used by :class:`capture` and by the ComfyUI capture node, so both
give the same numbers) knows its byte count before the first batch (:meth:`Accumulator.nbytes`) and
checks it against the free memory of the device it is about to allocate on, raising
:class:`QuantkitError` (never a torch out-of-memory crash) when it does not fit; inputs are folded in
row chunks of at most 64 MiB of fp64, and the finished means are moved to the CPU.

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
SECOND_ORDER = ("full", "diag", "mixed")  # every layer has a hessian / none has / some have
CHUNK_BYTES = 64 << 20  # rows folded in at once: at most this much fp64 input copy


def stats_bytes(k: int, full: bool) -> int:
    """Accumulator bytes of one layer with ``k`` input features (fp64 sums; K*K more with ``full``)."""
    return 8 * (3 * k + (k * k if full else 0))


def available_bytes(device: torch.device) -> int | None:
    """Free memory where statistics would be allocated: CUDA's free bytes, or the CPU's
    ``MemAvailable`` (/proc/meminfo); None where it cannot be known (no check then)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class LayerStats:
    """Running sums for one layer's inputs (or, after :meth:`Calibration.load`, the finished means)."""

    k: int
    count: int = 0
    sum: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    xtx: torch.Tensor | None = None  # sum x x^T, or None for second_order="diag"

    device: torch.device | None = None  # accumulate here (default: where the inputs are)

    def add(self, x: torch.Tensor, full: bool) -> None:
        x = x.detach().reshape(-1, self.k)
        dev = x.device if self.device is None else self.device
        acc = torch.float64 if dev.type in ("cpu", "cuda") else torch.float32
        if self.sum is None:
            self.sum = torch.zeros(self.k, dtype=acc, device=dev)
            self.sum_sq = torch.zeros_like(self.sum)
            self.absmax = torch.zeros_like(self.sum)
            if full:
                self.xtx = torch.zeros((self.k, self.k), dtype=acc, device=dev)
        self.count += x.shape[0]
        rows = max(1, CHUNK_BYTES // (self.k * 8))
        for i in range(0, x.shape[0], rows):  # bounded fp64 copies of the input
            c = x[i:i + rows].to(device=dev, dtype=acc)
            self.sum += c.sum(0)
            self.sum_sq += (c * c).sum(0)
            torch.maximum(self.absmax, c.abs().amax(0), out=self.absmax)
            if self.xtx is not None:
                self.xtx.addmm_(c.T, c)

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


class Accumulator:
    """Input statistics of named layers, with the full ``E[x x^T]`` for the names in ``full``.

    ``layers``: name -> input features K. ``device``: where to accumulate (None: the inputs' device).
    The byte count (:meth:`nbytes`) is known up front; the first :meth:`add` on a device checks that
    every accumulator not yet allocated fits in that device's free memory (``headroom`` bytes kept
    free besides), and raises :class:`QuantkitError` naming the sizes and the fix if not."""

    def __init__(self, layers: dict[str, int], full: Iterable[str] = (), device: torch.device | str | None = None,
                 headroom: int = 0) -> None:
        self.full = set(full)
        unknown = self.full - set(layers)
        if unknown:
            raise QuantkitError(f"hessian requested for unknown layer '{sorted(unknown)[0]}'")
        self.device = torch.device(device) if device is not None else None
        self.headroom = headroom
        self.stats = {n: LayerStats(k, device=self.device) for n, k in layers.items()}
        self._checked: set[str] = set()

    @classmethod
    def for_model(cls, model: nn.Module, layers: str | None = None, hessian_layers: str | None = None,
                  full: bool = True, device: torch.device | str | None = None, headroom: int = 0,
                  prefix: str = "") -> Accumulator:
        """Every ``nn.Linear`` of ``model`` (names searched by the ``layers`` regex, if given); the
        full E[x x^T] for all of them when ``full`` and no ``hessian_layers``, else for the names the
        ``hessian_layers`` regex finds. ``prefix`` is removed from the names searched by both regexes."""
        pat = _compile(layers, "layers")
        hpat = _compile(hessian_layers, "hessian_layers")
        lin = {n: m.in_features for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (pat is None or pat.search(n.removeprefix(prefix)))}
        if not lin:
            raise QuantkitError("the model has no nn.Linear to calibrate" + (f" matching {layers!r}" if layers else ""),
                                fix="pass the model whose linear layers you will quantize")
        if hpat is not None:
            chosen = {n for n in lin if hpat.search(n.removeprefix(prefix))}
            if not chosen:
                raise QuantkitError(f"hessian_layers {hessian_layers!r} matches none of the {len(lin)} linear layers "
                                    f"(e.g. '{next(iter(lin)).removeprefix(prefix)}')",
                                    fix="use a regex searched in the layer names, or leave it empty for diagonal "
                                        "statistics only")
        else:
            chosen = set(lin) if full else set()
        return cls(lin, chosen, device, headroom)

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        names = self.stats if names is None else names
        return sum(stats_bytes(self.stats[n].k, n in self.full) for n in names)

    @property
    def second_order(self) -> str:
        return "full" if self.full == set(self.stats) else ("diag" if not self.full else "mixed")

    def _check(self, device: torch.device, name: str) -> None:
        key = str(device)
        if key in self._checked:
            return
        self._checked.add(key)
        pending = [n for n, s in self.stats.items() if s.sum is None]
        need = self.nbytes(pending)
        free = available_bytes(device)
        if free is not None and need + self.headroom > free:
            nfull = sum(1 for n in pending if n in self.full)
            raise QuantkitError(f"calibration statistics need {_gib(need)} on {device} ({len(pending)} layers, "
                                f"{nfull} with the full E[x x^T]) but {_gib(max(free - self.headroom, 0))} "
                                f"are free", tensor=name,
                                fix="select fewer layers for the full E[x x^T] (hessian_layers), use diagonal "
                                    "statistics only, or accumulate on the CPU")

    def add(self, name: str, x: torch.Tensor, row_mask: torch.Tensor | None = None) -> None:
        if row_mask is not None:
            mask = row_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
            rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] != mask.shape[0]:
                raise QuantkitError(f"row_mask has {mask.shape[0]} rows but layer input has {rows.shape[0]}",
                                    tensor=name, fix="set row_mask to the [batch, tokens] padding mask")
            x = rows[mask]
        st = self.stats[name]
        if st.sum is None:
            dev = self.device or x.device
            self._check(dev, name)
            try:
                st.add(x, name in self.full)
            except torch.OutOfMemoryError as e:
                st.sum = st.sum_sq = st.absmax = st.xtx = None
                st.count = 0
                raise QuantkitError(f"out of memory allocating {_gib(stats_bytes(st.k, name in self.full))} of "
                                    f"statistics on {dev}", tensor=name,
                                    fix="select fewer layers for the full E[x x^T] (hessian_layers), or "
                                        "accumulate on the CPU") from e
        else:
            st.add(x, name in self.full)

    def calibration(self, rename: dict[str, str] | None = None, meta: dict[str, str] | None = None) -> Calibration:
        """The finished means (on the CPU), under ``rename[name]`` where given."""
        rename = rename or {}
        return Calibration({rename.get(n, n): s.tensors() for n, s in self.stats.items()}, self.second_order,
                           dict(meta or {}))


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise QuantkitError(f"{what} regex {pattern!r} is invalid: {e}", fix="write a Python regular expression") from e


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
    meta: dict[str, str] = field(default_factory=dict)  # extra header entries (e.g. which steps contributed)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        flat = {f"{name}.{k}": v.contiguous() for name, d in self.layers.items() for k, v in d.items()}
        meta = {**self.meta, FORMAT_KEY: FORMAT_VERSION, "layers": str(len(self.layers)),
                "second_order": self.second_order}
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
        extra = {k: v for k, v in meta.items() if k not in (FORMAT_KEY, "layers", "second_order")}
        return cls(layers, meta.get("second_order", "full"), extra)


class capture:
    """Context manager hooking every ``nn.Linear`` of ``model`` (names matching ``layers``, a regex
    searched in the module name, if given). ``second_order``: ``"full"`` (E[x x^T]) or ``"diag"``;
    ``hessian_layers``: a regex choosing the layers that keep the full E[x x^T] (the others get the
    diagonal keys only). ``device``: accumulate there instead of on the activations' device."""

    def __init__(self, model: nn.Module, layers: str | None = None, second_order: str = "full",
                 hessian_layers: str | None = None, device: torch.device | str | None = None) -> None:
        if second_order not in ("full", "diag"):
            raise QuantkitError(f"second_order {second_order!r} is not 'full' or 'diag'",
                                fix="use 'full' (needed by learned rounding) or 'diag'")
        if hessian_layers and second_order == "diag":
            raise QuantkitError("hessian_layers asks for full E[x x^T] but second_order is 'diag'",
                                fix="drop one of the two")
        self.model = model
        self.full = second_order == "full"
        self.row_mask: torch.Tensor | None = None
        self.accumulator = Accumulator.for_model(model, layers, hessian_layers, full=self.full, device=device)
        self._linears = {n: m for n, m in model.named_modules() if n in self.accumulator.stats}
        self._handles: list = []
        self.result: Calibration | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the accumulators (known before the first batch)."""
        return self.accumulator.nbytes()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.accumulator.add(name, args[0], self.row_mask)
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
        return self.accumulator.calibration()

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
