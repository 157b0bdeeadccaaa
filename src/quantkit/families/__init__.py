"""Model families: how to recognise each one from its tensor names (and a few shapes), and which
of its layers stay in high precision, with one short reason each. Data only: every family is one
:class:`Family` table in its own module; this file holds the registry and the one detection
function.

Patterns are anchored regexes (``^...$``, matched with ``re.fullmatch``) on names *relative to the
family's prefix*, so a Flux file saved bare (``double_blocks.0...``) and one inside a full
checkpoint (``model.diffusion_model.double_blocks.0...``) are the same family. ``detect`` patterns
match tensor names (with ``.weight``); ``keep`` patterns match layer names (without ``.weight``).
Block indices are always ``\\d+``: nothing depends on how many blocks a model size has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

Shape = tuple[int | None, ...]  # None = any size in that dimension


@dataclass(frozen=True)
class Family:
    name: str  # the --preset value
    title: str
    # Every entry must match at least one tensor (at the same prefix). A (pattern, shape) entry
    # also requires that tensor's shape (None = any).
    detect: tuple[str | tuple[str, Shape], ...]
    keep: tuple[tuple[str, str], ...]  # (anchored regex on the layer name, reason)
    aliases: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Detected:
    family: Family
    prefix: str  # "" or e.g. "model.diffusion_model."


def _families() -> tuple[Family, ...]:
    from . import (chroma, clip, flux1, flux2, gemma, hunyuan_video, llama, ltxv, lumina2, qwen,
                   qwen_image, sd3, sdxl, t5, wan, z_image)
    # Order matters only where one family's detect set is a subset of another's: the more specific
    # family comes first (Llama/Mistral last among the text encoders).
    return (flux2.FAMILY, chroma.FAMILY, flux1.FAMILY, sd3.FAMILY, sdxl.FAMILY, wan.FAMILY,
            hunyuan_video.FAMILY, qwen_image.FAMILY, z_image.FAMILY, lumina2.FAMILY, ltxv.FAMILY,
            t5.FAMILY, clip.CLIP_G, clip.CLIP_L, gemma.FAMILY, qwen.QWEN3, qwen.QWEN2, llama.FAMILY)


FAMILIES: tuple[Family, ...] = _families()
BY_NAME: dict[str, Family] = {}
for _f in FAMILIES:
    for _n in (_f.name, *_f.aliases):
        assert _n not in BY_NAME, _n
        BY_NAME[_n] = _f

PRESET_CHOICES = ("auto", "none", *sorted(BY_NAME))


def _pattern(entry: str | tuple[str, Shape]) -> str:
    return entry if isinstance(entry, str) else entry[0]


_COMPILED: dict[str, re.Pattern] = {}


def compiled(pattern: str) -> re.Pattern:
    p = _COMPILED.get(pattern)
    if p is None:
        if not (pattern.startswith("^") and pattern.endswith("$")):
            raise ValueError(f"family pattern {pattern!r} is not anchored with ^...$")
        p = _COMPILED[pattern] = re.compile(pattern)
    return p


def _shape_ok(want: Shape, got: tuple[int, ...]) -> bool:
    return len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got))


def _prefixes(name: str) -> list[str]:
    """Every prefix of ``name`` that ends at a dot, shortest first ("" included)."""
    out = [""]
    i = name.find(".")
    while i != -1:
        out.append(name[: i + 1])
        i = name.find(".", i + 1)
    return out


def _matches_at(family: Family, prefix: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    for entry in family.detect:
        pat = compiled(_pattern(entry))
        want = None if isinstance(entry, str) else entry[1]
        ok = False
        for name, shape in shapes.items():
            if name.startswith(prefix) and pat.fullmatch(name[len(prefix):]) and (
                    want is None or _shape_ok(want, shape)):
                ok = True
                break
        if not ok:
            return False
    return True


def _candidate_prefixes(family: Family, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    first = compiled(_pattern(family.detect[0]))
    found: list[str] = []
    for name in shapes:
        for p in _prefixes(name):
            if first.fullmatch(name[len(p):]) and p not in found:
                found.append(p)
    return found


def detect(shapes: dict[str, tuple[int, ...]]) -> list[Detected]:
    """Every family found in a file (tensor name -> shape), one per prefix, the first family in
    registry order winning at a prefix; sorted by prefix."""
    by_prefix: dict[str, Family] = {}
    for fam in FAMILIES:
        for p in _candidate_prefixes(fam, shapes):
            if p not in by_prefix and _matches_at(fam, p, shapes):
                by_prefix[p] = fam
    return [Detected(f, p) for p, f in sorted(by_prefix.items())]


def resolve(preset: str, shapes: dict[str, tuple[int, ...]], file: object = None) -> list[Detected]:
    """The families whose keep rules apply: ``auto`` = every detected one, ``none`` = none, a family
    name = that family at the prefix where its detect patterns match (an error if they don't)."""
    if preset == "none":
        return []
    if preset == "auto":
        return detect(shapes)
    fam = BY_NAME.get(preset)
    if fam is None:
        raise UsageError(f"unknown --preset '{preset}'", fix=f"use one of: {', '.join(PRESET_CHOICES)}")
    found = [Detected(fam, p) for p in _candidate_prefixes(fam, shapes) if _matches_at(fam, p, shapes)]
    if not found:
        need = ", ".join(repr(_pattern(e)) for e in fam.detect)
        raise UsageError(f"--preset {preset}: this file does not look like {fam.title} (it needs tensors "
                         f"matching {need})", file=file,
                         fix="use --preset auto to detect the family, or --preset none for the generic rules")
    return found


def keep_reason(detected: list[Detected], layer: str) -> str | None:
    """Why a family keeps ``layer`` in high precision, or None. The longest matching prefix decides."""
    for d in sorted(detected, key=lambda d: -len(d.prefix)):
        if layer.startswith(d.prefix):
            rel = layer[len(d.prefix):]
            for pat, why in d.family.keep:
                if compiled(pat).fullmatch(rel):
                    return f"{d.family.title}: {why}"
            return None
    return None


__all__ = ["Family", "Detected", "FAMILIES", "BY_NAME", "PRESET_CHOICES", "detect", "resolve", "keep_reason"]
