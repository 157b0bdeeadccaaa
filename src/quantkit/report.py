"""What a conversion did, per tensor and in total. Plain data; the CLI renders it.

Counting: a *layer* is a module whose ``.weight`` is in the file (``blocks.0.attn.qkv`` for
``blocks.0.attn.qkv.weight``); it is quantized, written in the fallback format, or kept as it is.
Its bias, norm scales and other tensors are not layers: they are copied with it and counted only
as *tensors*. :func:`layer_counts` is the one definition, shared by the plan and the report.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

ACTIONS = ("quantized", "fallback", "kept")


def is_layer(tensor_name: str) -> bool:
    """True for the tensor that makes a layer: its ``.weight``."""
    return tensor_name.endswith(".weight")


def layer_counts(actions: Iterable[tuple[str, str]], tensors_out: int) -> dict[str, int]:
    """``{"layers", "quantized", "fallback", "kept", "tensors_in", "tensors_out"}`` from (tensor
    name, action) pairs, one per input tensor; quantized + fallback + kept == layers."""
    c = {"layers": 0, **{a: 0 for a in ACTIONS}, "tensors_in": 0, "tensors_out": tensors_out}
    for name, action in actions:
        c["tensors_in"] += 1
        if is_layer(name):
            c["layers"] += 1
            c[action] += 1
    return c


@dataclass
class TensorReport:
    """One input tensor. Its ``action`` is "quantized", "fallback" (written in the fallback format)
    or "kept" (copied unchanged, or a bias rewritten by bias correction)."""

    name: str  # input tensor name
    shape: tuple[int, ...]
    dtype: str  # input dtype
    action: str  # "quantized" | "fallback" | "kept"
    format: str | None  # quantkit format name actually written, None when kept
    comfy_format: str | None
    reason: str = ""
    sqnr_db: float | None = None
    seconds: float = 0.0  # main-thread wall time on this tensor (read, quantize, queue for the writer)

    @property
    def is_layer(self) -> bool:
        return is_layer(self.name)


LayerReport = TensorReport  # the earlier name, kept for callers of the library


@dataclass
class ConvertReport:
    input: str
    output: str
    format: str
    block_size: int
    tensors: list[TensorReport] = field(default_factory=list)  # every input tensor, in file order
    tensors_out: int = 0  # tensors in the written file
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0  # wall time of convert(), entry to return
    # where `seconds` went, in order: disjoint parts that sum to it ("plan", "prepare",
    # "read+quantize", "waiting for the writer", "fsync", "verify", "rename", "other"; see convert.py)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # durations that overlap the parts or lie inside one ("writer thread busy", learned workers):
    # not added to the total
    detail_seconds: dict[str, float] = field(default_factory=dict)
    # set by the command line for its first input: process start to convert() entry (imports)
    startup_seconds: float = 0.0

    # one line each, for the user: what the run did besides converting (stale temporary files removed)
    notes: list[str] = field(default_factory=list)
    # --format auto: the per-layer choice, budget and expected errors (quantkit.autoplan.AutoResult.to_dict)
    auto: dict | None = None

    @property
    def total_seconds(self) -> float:
        """Start-up plus convert(): what the parts of :meth:`time_parts` add up to."""
        return self.startup_seconds + self.seconds

    def time_parts(self) -> dict[str, float]:
        """"start-up" (when measured) then every part of ``stage_seconds``: they sum to
        :attr:`total_seconds`."""
        return ({"start-up": self.startup_seconds} if self.startup_seconds else {}) | self.stage_seconds

    @property
    def layers(self) -> list[TensorReport]:
        """The layers' entries (their ``.weight`` tensors); :attr:`tensors` holds every tensor."""
        return [t for t in self.tensors if t.is_layer]

    def counts(self) -> dict[str, int]:
        return layer_counts(((t.name, t.action) for t in self.tensors), self.tensors_out)

    def count(self, action: str) -> int:
        """Layers with this action."""
        return self.counts()[action]

    def sqnr_by_format(self) -> dict[str, tuple[float, float, int]]:
        """format -> (min, median, count) of per-layer SQNR in dB."""
        by: dict[str, list[float]] = {}
        for t in self.tensors:
            if t.format is not None and t.sqnr_db is not None:
                by.setdefault(t.format, []).append(t.sqnr_db)
        return {f: (min(v), statistics.median(v), len(v)) for f, v in sorted(by.items())}

    def to_dict(self) -> dict:
        d = asdict(self)
        for t in d["tensors"]:
            s = t["sqnr_db"]
            if s is not None and not math.isfinite(s):
                t["sqnr_db"] = str(s)
        d["counts"] = self.counts()
        d["total_seconds"] = self.total_seconds
        return d
