"""Which tensors get quantized, and why the others are kept. Data first, then one small function.

A tensor is a candidate only if it is the 2-D floating-point ``.weight`` of a layer (a Linear, in
the checkpoints we convert): norms, biases and other 1-D tensors, convolutions (4-D/5-D) and
integer buffers never are. Among candidates, ``DEFAULT_KEEP`` lists what stays in high precision
unless ``--include`` names it, and so does every keep rule of the detected model family
(``quantkit.families``; ``--preset``). ``--include``/``--exclude`` patterns are Python regexes searched
(``re.search``) in the layer name, i.e. the tensor name without ``.weight``; exclude wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .dtypes import FLOAT_WEIGHT_DTYPES
from .errors import UsageError
from .families import Detected, keep_reason
from .safetensors_io import TensorInfo

# (anchored regex on the layer name, reason shown in the plan/report)
DEFAULT_KEEP: tuple[tuple[str, str], ...] = (
    (r"^(.*\.)?[^.]*embed[^.]*(\..*)?$", "embedding / embedder (kept by default; --include to quantize)"),
    (r"^(.*\.)?(wte|wpe)$", "token/position embedding table"),
)

# Tensor suffixes that mean the input is already quantized.


@dataclass(frozen=True)
class Selection:
    include: tuple[re.Pattern, ...] = ()
    exclude: tuple[re.Pattern, ...] = ()
    families: tuple[Detected, ...] = ()  # whose keep rules apply (see quantkit.families)

    @classmethod
    def from_patterns(cls, include: list[str] | tuple[str, ...] = (),
                      exclude: list[str] | tuple[str, ...] = (),
                      families: list[Detected] | tuple[Detected, ...] = ()) -> Selection:
        return cls(tuple(_compile(p, "--include") for p in include),
                   tuple(_compile(p, "--exclude") for p in exclude), tuple(families))


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{flag} {pattern!r} is not a valid regular expression ({e})",
                         fix="escape dots and brackets, e.g. 'double_blocks\\.0\\.'") from None


_DEFAULT_KEEP = tuple((re.compile(p), why) for p, why in DEFAULT_KEEP)


def layer_name(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


def excluded(name: str, sel: Selection) -> bool:
    return any(p.search(name) for p in sel.exclude)


def decide(t: TensorInfo, sel: Selection) -> str | None:
    """None if ``t`` should be quantized, else the reason it is kept (None for non-weights too,
    use :func:`is_candidate` first). Order: --exclude, --include, the family's keep rules, then
    the generic DEFAULT_KEEP. (A per-layer config entry, handled in plan.py, sits between
    --exclude and --include.)"""
    name = layer_name(t.name)
    if excluded(name, sel):
        return "excluded by --exclude"
    if any(p.search(name) for p in sel.include):
        return None
    why = keep_reason(list(sel.families), name)
    if why is not None:
        return why
    for pat, why in _DEFAULT_KEEP:
        if pat.match(name):
            return why
    return None


def is_candidate(t: TensorInfo) -> str | None:
    """None if ``t`` is a 2-D float weight of a layer, else why it is not (for the report)."""
    if not t.name.endswith(".weight"):
        return "not a layer weight"
    if len(t.shape) != 2:
        return f"{len(t.shape)}-D tensor (only 2-D linear weights are quantized)"
    if t.dtype not in FLOAT_WEIGHT_DTYPES:
        return f"{t.dtype} is not a float weight"
    if t.numel == 0:
        return "empty tensor"
    return None
