"""``--format auto``: a format per layer, chosen to a budget from measured errors.

Two budgets, exactly one per run:

* ``bits=B``: the average bits per quantized weight, scales included, is at most B. Bits of a layer
  = the bytes of the tensors its format writes besides the marker (``Format.stored``: weight,
  scales, codebooks, padding) * 8 / (N*K); the average is over every quantized weight, layers a
  per-layer config fixes included at their format's size. Among the assignments within it, the one
  with the least total error.
* ``max_error=X``: every layer's error is at most X times its int8-row (round-to-nearest, one scale
  per row) error; each layer takes the smallest candidate that meets it (equal size: less error).

Measurement (the only part that reads weights; the rest of planning stays header-only): each layer
the base plan quantizes is read once in fp32 and quantized with every candidate format that can take
its shape (the format's own quantizer, as ``convert`` runs it), dequantized as ComfyUI does, and
its error is measured:

* without calibration, in weight space: ``e = ||dW||^2 / ||W||^2`` (1 / SQNR);
* with a calibration file (:mod:`quantkit.calibration`): the expected output error relative to the
  output's energy, ``e = tr(dW H dW^T) / tr(W H W^T)`` with ``H = E[x x^T]`` (its diagonal,
  ``mean_sq``, where the file has no full ``hessian`` for the layer); a layer the capture never ran
  (no statistics, e.g. a pooler the embedding does not use) is measured in weight space, and the
  plan's note says how many.

A layer's error is relative to its own signal, so the total (the sum over layers) weighs every layer
alike. Sums are in fp64 over fixed-order reductions of the quantizers' outputs, whose bytes do not
depend on the thread count, so the choice is deterministic.

The budget is a multiple-choice knapsack (one candidate per layer, cost = stored bytes, value =
error), solved exactly by dynamic programming over Pareto frontiers of (bytes, error) in layer-name
order: after each layer only the states not dominated by another (fewer or equal bytes and less or
equal error) are kept, and states over the budget are dropped. Ties (equal bytes and error) keep one
state by a fixed rule (the layer's earlier candidate in ``--auto-candidates`` order, then the
earlier parent state), so the same inputs give the same choice.
Where a frontier grows past :data:`MAX_STATES` the solve falls back to a deterministic greedy on each
layer's lower convex hull (upgrades taken by error saved per byte, ties by layer name) and says so.

Family presets' high-precision layers (kept by the policy) and layers a per-layer config gives a
format stay as they are; the chosen formats reach the normal plan as per-layer overrides
(``Options.layer_formats``), so the writer is unchanged and ``convert`` re-quantizes each layer with
its chosen format (the measurement's tensors are not kept: memory stays one layer's worth).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .errors import QuantkitError, UsageError
from .formats import DEFAULT_FALLBACK, FORMATS, get_format

# The default candidates: the formats stock ComfyUI loads that the budget range needs (4-bit
# to 8-bit), in the order that breaks ties (an earlier one wins at equal bytes and error).
CANDIDATES = ("int4-convrot", "awq4", "w4a8", "nvfp4", "w4a8-6bit", "mxfp8", "int8-convrot", "int8-row")
REFERENCE = DEFAULT_FALLBACK  # int8-row: the unit of --max-error, and the base plan's format
MAX_STATES = 200_000  # Pareto frontier size beyond which the exact solve gives way to the greedy one

_ON_MEASURE: contextvars.ContextVar[Callable[[int, int, str], None] | None] = contextvars.ContextVar(
    "quantkit_auto_on_measure", default=None)


@contextlib.contextmanager
def measuring(callback: Callable[[int, int, str], None]) -> Iterator[None]:
    """Within the block, ``--format auto`` planning (``plan_file`` / ``convert``) calls
    ``callback(done, total, tensor)`` after it has measured each layer's candidates: its one slow step
    (every candidate quantized per layer), which the CLI shows as a progress bar."""
    token = _ON_MEASURE.set(callback)
    try:
        yield
    finally:
        _ON_MEASURE.reset(token)


@dataclass(frozen=True)
class AutoSpec:
    """What ``--format auto`` was asked: one budget, the candidates, the calibration file."""

    bits: float | None = None
    max_error: float | None = None
    candidates: tuple[str, ...] = CANDIDATES
    calibration: str | None = None

    def validate(self) -> None:
        if (self.bits is None) == (self.max_error is None):
            raise UsageError("--format auto needs exactly one budget: --bits B or --max-error X"
                             + (", not both" if self.bits is not None else ""),
                             fix="e.g. --format auto --bits 5")
        if self.bits is not None and not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits)
                                          and self.bits > 0):
            raise UsageError(f"--bits {self.bits} must be a positive number", fix="e.g. --bits 5")
        if self.max_error is not None and not (isinstance(self.max_error, (int, float))
                                               and math.isfinite(self.max_error) and self.max_error > 0):
            raise UsageError(f"--max-error {self.max_error} must be a positive number",
                             fix="e.g. --max-error 4 (four times int8-row's error)")
        if not self.candidates:
            raise UsageError("--auto-candidates lists no format", fix=f"e.g. {','.join(CANDIDATES)}")
        for name in self.candidates:
            get_format(name)
        if len(set(self.candidates)) != len(self.candidates):
            raise UsageError("--auto-candidates names a format twice", fix="list each format once")


@dataclass(frozen=True)
class Candidate:
    format: str
    bytes: int
    bits: float  # bytes * 8 / numel
    error: float | None = None  # relative error (see the module docstring); None until measured


@dataclass
class LayerChoice:
    layer: str
    tensor: str
    numel: int
    candidates: list[Candidate]
    opts: object = None  # the layer's LayerOpts
    reference_error: float = 0.0  # the layer's int8-row error
    chosen: int = 0  # index into candidates

    @property
    def choice(self) -> Candidate:
        return self.candidates[self.chosen]

    def to_dict(self) -> dict:
        c = self.choice
        return {"layer": self.layer, "format": c.format, "bits": c.bits, "bytes": c.bytes, "error": c.error,
                "error_vs_int8_row": _ratio(c.error, self.reference_error),
                "candidates": {x.format: {"bits": x.bits, "error": x.error} for x in self.candidates}}


def _ratio(e: float | None, ref: float) -> float | None:
    if e is None:
        return None
    return e / ref if ref > 0 else (0.0 if e == 0 else math.inf)


@dataclass
class AutoResult:
    """The choice: per layer and in total, as ``plan`` shows it and the report carries it."""

    spec: AutoSpec
    layers: list[LayerChoice]
    fixed_bytes: int = 0  # quantized layers whose format a config fixes
    fixed_numel: int = 0
    solver: str = "exact"  # "exact" (Pareto DP), "greedy-hull", or "per-layer" (--max-error)
    measure: str = "weight"  # "weight" (1/SQNR) or "calibration" (output error on E[x x^T])
    weight_measured: list[str] = field(default_factory=list)  # with calibration: layers without statistics

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + sum(lc.choice.bytes for lc in self.layers)

    @property
    def total_numel(self) -> int:
        return self.fixed_numel + sum(lc.numel for lc in self.layers)

    @property
    def average_bits(self) -> float:
        return self.total_bytes * 8 / self.total_numel if self.total_numel else 0.0

    @property
    def total_error(self) -> float:
        return sum(lc.choice.error or 0.0 for lc in self.layers)

    def formats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lc in self.layers:
            out[lc.choice.format] = out.get(lc.choice.format, 0) + 1
        return {k: out[k] for k in sorted(out, key=lambda f: list(FORMATS).index(f))}

    def to_dict(self) -> dict:
        return {"bits": self.spec.bits, "max_error": self.spec.max_error, "candidates": list(self.spec.candidates),
                "measure": self.measure, "solver": self.solver, "average_bits": self.average_bits,
                "quantized_bytes": self.total_bytes, "quantized_weights": self.total_numel,
                "total_error": self.total_error, "formats": self.formats(),
                "weight_measured": list(self.weight_measured),
                "layers": [lc.to_dict() for lc in self.layers]}

    def summary(self) -> str:
        fm = ", ".join(f"{n} {f}" for f, n in self.formats().items())
        budget = f"--bits {self.spec.bits:g}" if self.spec.bits is not None else f"--max-error {self.spec.max_error:g}"
        no_stats = (f"; {len(self.weight_measured)} layers without calibration statistics measured by weight "
                    f"SQNR (e.g. {self.weight_measured[0]})" if self.weight_measured else "")
        return (f"auto ({budget}, {self.measure} error, {self.solver}): {self.average_bits:.3f} bits per quantized "
                f"weight, total error {self.total_error:.4g} over {len(self.layers)} layers ({fm}){no_stats}")


# ---------------------------------------------------------------- planning


def plan_auto(reader, options):
    """The plan of ``options`` (format ``auto``): the base plan's quantized layers each get the
    measured candidate the budget picks. Returns the :class:`quantkit.plan.Plan` with ``plan.auto``."""
    from .plan import plan_conversion
    spec: AutoSpec = options.auto
    base_opts = replace(options, format=REFERENCE, auto=None, layer_formats=())
    base = plan_conversion(reader, base_opts)
    if base.requantized:
        raise UsageError("--format auto measures float weights, and this input's layers are already quantized",
                         file=reader.path, tensor=base.requantized[0].tensor,
                         fix="convert the original checkpoint, or pass --keep-quantized")
    layers, fixed_bytes, fixed_numel = [], 0, 0
    for lp in base.quantized:
        numel = math.prod(lp.shape)
        fixed_rule = lp.rule and options.config is not None and options.config.lookup(lp.layer).format is not None
        if fixed_rule:
            fixed_bytes += _layer_bytes(lp.spec, lp)
            fixed_numel += numel
            continue
        cands = [Candidate(f, b, b * 8 / numel) for f in spec.candidates
                 if FORMATS[f].cannot_take(lp.shape, lp.opts) is None
                 for b in (_layer_bytes(FORMATS[f], lp),)]
        if not cands:
            raise UsageError(f"no --auto-candidates format takes a {list(lp.shape)} weight", file=reader.path,
                             tensor=lp.tensor, fix=f"add {REFERENCE} to --auto-candidates (it takes every 2-D weight)")
        layers.append(LayerChoice(lp.layer, lp.tensor, numel, cands, lp.opts))
    layers.sort(key=lambda lc: lc.layer)
    result = AutoResult(spec, layers, fixed_bytes, fixed_numel)
    if spec.bits is not None:
        _check_feasible(result, reader.path)
    _measure(reader, result)
    _solve(result)
    final = plan_conversion(reader, replace(base_opts, layer_formats=tuple((lc.layer, lc.choice.format)
                                                                          for lc in layers)))
    by_layer = {lc.layer: lc for lc in layers}
    for i, lp in enumerate(final.layers):
        lc = by_layer.get(lp.layer) if lp.quantized else None
        if lc is not None and lp.tensor == lc.tensor:
            c = lc.choice
            why = f"auto: {c.bits:.3f} bits, error {c.error:.3g} ({_ratio(c.error, lc.reference_error):.3g}x int8-row)"
            final.layers[i] = replace(lp, reason="; ".join(x for x in (why, lp.reason) if x))
    final.options = options
    final.auto = result
    final.notes.append(result.summary())
    return final


def _layer_bytes(fmt, lp) -> int:
    from .dtypes import torch_dtype
    from .safetensors_io import PlannedTensor
    return sum(PlannedTensor("t", s.dtype, tuple(s.shape)).nbytes
               for s in fmt.stored(lp.shape, torch_dtype(lp.value_dtype), lp.opts))


def _check_feasible(result: AutoResult, path) -> None:
    least = result.fixed_bytes + sum(min(c.bytes for c in lc.candidates) for lc in result.layers)
    if result.total_numel and least * 8 > result.spec.bits * result.total_numel:
        lowest = least * 8 / result.total_numel
        raise UsageError(f"--bits {result.spec.bits:g} is below the smallest assignment of these candidates "
                         f"({lowest:.4f} bits per quantized weight)", file=path,
                         fix=f"use --bits {math.ceil(lowest * 1000) / 1000:g} or more, or add smaller formats "
                             "to --auto-candidates")


# ---------------------------------------------------------------- measuring


def _measure(reader, result: AutoResult) -> None:
    from .calibration import Calibration, match_layers
    stats = {}
    if result.spec.calibration is not None:
        cal = Calibration.load(result.spec.calibration)
        m = match_layers([lc.layer for lc in result.layers], cal, file=result.spec.calibration)
        stats = {L: cal.layers[s] for L, s in m.items() if float(cal.layers[s].get("count", 0.0)) > 0}
        if not stats:
            raise QuantkitError(f"no calibration statistics for any of the {len(result.layers)} layers to quantize "
                                f"(e.g. '{result.layers[0].layer}')", file=result.spec.calibration,
                                fix="capture statistics on the model this checkpoint belongs to, or drop --calibration")
        result.measure = "calibration"
        result.weight_measured = [lc.layer for lc in result.layers if lc.layer not in stats]
    ref = FORMATS[REFERENCE]
    report = _ON_MEASURE.get()
    for done, lc in enumerate(result.layers, 1):
        w = reader.read(lc.tensor).float()
        h = None
        if lc.layer in stats:  # a layer the capture never ran (a pooler) is measured in weight space
            st = stats[lc.layer]
            h = st["hessian"].double() if "hessian" in st else st["mean_sq"].double()
        signal = _energy(w.double(), h)
        errors = {}
        for i, c in enumerate(lc.candidates):
            errors[c.format] = _error(FORMATS[c.format], w, h, signal, lc)
            lc.candidates[i] = replace(c, error=errors[c.format])
        lc.reference_error = errors[REFERENCE] if REFERENCE in errors else _error(ref, w, h, signal, lc)
        del w
        if report is not None:
            report(done, len(result.layers), lc.tensor)


def _energy(d, h) -> float:
    """tr(d H d^T) (H: [K, K] or its diagonal [K]; None: identity), in fp64."""
    if h is None:
        return float((d * d).sum())
    if h.ndim == 1:
        return float(((d * d) * h).sum())
    return float(((d @ h) * d).sum())


def _error(fmt, w, h, signal: float, lc: LayerChoice) -> float:
    import torch

    from .backend import quantize_stored
    opts, layer = lc.opts, lc.layer
    stored = fmt.quantize(w, opts) if fmt.kernel is not None else quantize_stored(w, fmt, opts)[0]
    marker = fmt.marker(tuple(w.shape), torch.float32, opts)
    dq = fmt.dequantize(stored, marker, torch.float32, layer).double()
    e = _energy(dq - w.double(), h)
    return e / signal if signal > 0 else (0.0 if e == 0 else math.inf)


# ---------------------------------------------------------------- solving


def _solve(result: AutoResult) -> None:
    if result.spec.max_error is not None:
        for lc in result.layers:
            ok = [i for i, c in enumerate(lc.candidates)
                  if c.error <= result.spec.max_error * lc.reference_error]
            pool = ok or range(len(lc.candidates))  # none meets it: the least error (said in the plan)
            key = (lambda i: (lc.candidates[i].bytes, lc.candidates[i].error, i)) if ok else \
                (lambda i: (lc.candidates[i].error, lc.candidates[i].bytes, i))
            lc.chosen = min(pool, key=key)
        result.solver = "per-layer"
        return
    budget = math.floor(result.spec.bits * result.total_numel / 8 + 1e-9) - result.fixed_bytes
    choice = solve_exact([[(c.bytes, c.error) for c in lc.candidates] for lc in result.layers], budget)
    if choice is None:
        choice = solve_greedy([[(c.bytes, c.error) for c in lc.candidates] for lc in result.layers], budget)
        result.solver = "greedy-hull"
    for lc, i in zip(result.layers, choice):
        lc.chosen = i


def solve_exact(items: list[list[tuple[int, float]]], budget: int,
                max_states: int = MAX_STATES) -> list[int] | None:
    """Multiple-choice knapsack: one (cost, value) option per item, total cost <= budget, least total
    value. Exact Pareto-frontier DP; None when a frontier outgrows ``max_states`` (or nothing fits)."""
    import numpy as np
    costs = np.zeros(1, dtype=np.int64)
    vals = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []  # per item: (parent state, option) of each state
    for opts in items:
        oc = np.array([c for c, _ in opts], dtype=np.int64)
        ov = np.array([v for _, v in opts], dtype=np.float64)
        nc = (costs[None, :] + oc[:, None]).ravel()  # option-major: earlier options first on ties
        nv = (vals[None, :] + ov[:, None]).ravel()
        parent = np.tile(np.arange(costs.size), oc.size)
        option = np.repeat(np.arange(oc.size), costs.size)
        keep = nc <= budget
        nc, nv, parent, option = nc[keep], nv[keep], parent[keep], option[keep]
        if nc.size == 0:
            return None
        # the earlier state wins ties: order by (cost, value, parent's option path rank)
        order = np.lexsort((option, parent, nv, nc))
        nc, nv, parent, option = nc[order], nv[order], parent[order], option[order]
        best_before = np.minimum.accumulate(nv)
        prev_best = np.concatenate(([np.inf], best_before[:-1]))
        pareto = nv < prev_best  # strictly better than every cheaper-or-equal state before it
        costs, vals = nc[pareto], nv[pareto]
        back.append((parent[pareto], option[pareto]))
        if costs.size > max_states:
            return None
    state = int(np.argmin(vals))  # the first minimum: the cheapest among equal values
    out = [0] * len(items)
    for j in range(len(items) - 1, -1, -1):
        parent, option = back[j]
        out[j] = int(option[state])
        state = int(parent[state])
    return out


def solve_greedy(items: list[list[tuple[int, float]]], budget: int) -> list[int]:
    """Deterministic greedy on each item's lower convex hull of (cost, value): start at the cheapest
    option, take upgrades by value saved per cost unit (ties: item order), each when it fits."""
    hulls = []
    for opts in items:
        pts = sorted(range(len(opts)), key=lambda i: (opts[i][0], opts[i][1], i))
        hull: list[int] = []
        for i in pts:
            if hull and opts[i][1] >= opts[hull[-1]][1]:
                continue  # dominated: costs as much or more, no less value
            while len(hull) >= 2:
                (c1, v1), (c2, v2), (c3, v3) = opts[hull[-2]], opts[hull[-1]], opts[i]
                if (v1 - v2) * (c3 - c2) <= (v2 - v3) * (c2 - c1):  # hull[-1] not below the chord
                    hull.pop()
                else:
                    break
            hull.append(i)
        hulls.append(hull)
    out = [h[0] for h in hulls]
    spent = sum(items[j][out[j]][0] for j in range(len(items)))
    ups = []
    for j, h in enumerate(hulls):
        for s in range(1, len(h)):
            (c0, v0), (c1, v1) = items[j][h[s - 1]], items[j][h[s]]
            ups.append(((v0 - v1) / max(c1 - c0, 1), j, s))
    ups.sort(key=lambda u: (-u[0], u[1], u[2]))
    level = [0] * len(items)
    for _, j, s in ups:
        if level[j] != s - 1:
            continue  # an earlier step of this item did not fit
        c0, c1 = items[j][hulls[j][s - 1]][0], items[j][hulls[j][s]][0]
        if spent + c1 - c0 <= budget:
            spent += c1 - c0
            level[j] = s
            out[j] = hulls[j][s]
    return out


__all__ = ["AutoSpec", "AutoResult", "CANDIDATES", "plan_auto", "measuring", "solve_exact", "solve_greedy"]
