"""What a conversion did, per layer and in total. Plain data; the CLI renders it."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str  # input tensor name
    shape: tuple[int, ...]
    dtype: str  # input dtype
    action: str  # "quantized" | "fallback" | "kept"
    format: str | None  # quantkit format name actually written, None when kept
    comfy_format: str | None
    reason: str = ""
    sqnr_db: float | None = None
    seconds: float = 0.0  # wall time spent on this tensor (read, quantize, write)


@dataclass
class ConvertReport:
    input: str
    output: str
    format: str
    block_size: int
    layers: list[LayerReport] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    # where the time went: "read+quantize" (main thread), "write" (writer thread busy), "fsync", "verify"
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # one line each, for the user: what the run did besides converting (stale temporary files removed)
    notes: list[str] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for layer in self.layers if layer.action == action)

    def sqnr_by_format(self) -> dict[str, tuple[float, float, int]]:
        """format -> (min, median, count) of per-layer SQNR in dB."""
        by: dict[str, list[float]] = {}
        for layer in self.layers:
            if layer.format is not None and layer.sqnr_db is not None:
                by.setdefault(layer.format, []).append(layer.sqnr_db)
        return {f: (min(v), statistics.median(v), len(v)) for f, v in sorted(by.items())}

    def to_dict(self) -> dict:
        d = asdict(self)
        for layer in d["layers"]:
            s = layer["sqnr_db"]
            if s is not None and not math.isfinite(s):
                layer["sqnr_db"] = str(s)
        return d
