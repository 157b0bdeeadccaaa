"""What the command line shows before the converter (and torch) is imported: the format names and
defaults that ``--help`` and ``quantkit formats`` print, without ``import torch``.

The format facts themselves live in :mod:`quantkit.formats`; this is a copy of the few that
are printed, so that ``quantkit --help`` / ``formats`` / ``presets`` start in a fraction of the
time torch takes to import. ``tests/test_cli.py`` checks that it agrees with ``formats`` entry
for entry, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import NamedTuple


class FormatRow(NamedTuple):
    name: str  # the --format value
    comfy_format: str  # "format" in .comfy_quant
    weight: str  # safetensors dtype of L.weight
    scale: str  # L.weight_scale's dtype and shape
    stock_comfy: bool  # loads in unmodified ComfyUI


FORMAT_ROWS: tuple[FormatRow, ...] = (
    FormatRow("fp8", "float8_e4m3fn", "F8_E4M3", "fp32 []", True),
    FormatRow("fp8-e5m2", "float8_e5m2", "F8_E5M2", "fp32 []", True),
    FormatRow("int8-tensor", "int8_tensorwise", "I8", "fp32 []", True),
    FormatRow("int8-row", "int8_tensorwise", "I8", "fp32 [N,1]", True),
    FormatRow("int8-block", "int8_blockwise", "I8", "fp32 [N/b,K/b]", False),
)
FORMAT_NAMES: tuple[str, ...] = tuple(r.name for r in FORMAT_ROWS)
DEFAULT_FORMAT = "fp8"
DEFAULT_BLOCK_SIZE = 128
FALLBACK_CHOICES = ("int8-row", "int8-tensor", "fp8", "fp8-e5m2", "keep")
DEFAULT_FALLBACK = "int8-row"
SCALE_OF_GRANULARITY = {"tensor": "fp32 []", "row": "fp32 [N,1]", "block": "fp32 [N/b,K/b]"}
