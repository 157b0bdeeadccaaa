"""The per-layer config file (TOML or JSON): layer pattern -> format, block size, skip, options.

    # layers.toml
    [layers."final_layer.linear"]                       # an exact layer name
    skip = true
    [layers.'re:^double_blocks\\.\\d+\\.img_mlp\\.\\d+$']     # 're:' = anchored regex (fullmatch)
    format = "int8-row"
    [layers.'re:^single_blocks\\.\\d+\\.linear2$']
    format = "int8-block"
    block_size = 64
    options = { full_precision_matrix_mult = true }
    [layers.'re:^.*\\.attn\\.qkv$']
    format = "int8-convrot"
    convrot_group_size = 64                             # a format option (a LayerOpts field)

JSON: ``{"layers": {"<pattern>": {...}}}``. Names are layer names (tensor name without
``.weight``). When several patterns match a layer the most specific wins: an exact name beats any
regex; among regexes the one with more literal characters wins; a tie is an error. Everything is
validated when the file is loaded: an unknown key, format or option is an error, never ignored.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .fileio import NotRegularFile, open_regular
from .formats import FORMATS, LAYER_OPTIONS, LayerOpts, formats_with_option

# format options an entry may set: the LayerOpts fields besides block_size (which has its own key)
FORMAT_OPTION_KEYS = tuple(k for k in LayerOpts.__dataclass_fields__ if k not in ("block_size", "static_input_scale"))
ENTRY_KEYS = ("format", "block_size", "skip", "options", *FORMAT_OPTION_KEYS)

try:  # the stdlib regex parser, to rank patterns by how much literal text they demand
    from re import _parser as _sre  # Python >= 3.11
except ImportError:  # pragma: no cover
    import sre_parse as _sre  # type: ignore[no-redef]


def _literal_count(seq) -> int:
    n = 0
    for op, av in seq:
        name = str(op)
        if name == "LITERAL":
            n += 1
        elif name == "SUBPATTERN":
            n += _literal_count(av[-1])
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            n += av[0] * _literal_count(av[2]) if av[0] else 0
        elif name == "BRANCH":
            n += min(_literal_count(b) for b in av[1])
    return n


@dataclass(frozen=True)
class LayerRule:
    pattern: str  # as written in the file
    regex: re.Pattern | None  # None for an exact name
    format: str | None = None
    block_size: int | None = None
    skip: bool = False
    options: tuple[tuple[str, object], ...] = ()
    format_options: tuple[tuple[str, object], ...] = ()  # LayerOpts fields besides block_size

    @property
    def specificity(self) -> tuple[int, int]:
        """(1, len) for an exact name; (0, n) for a regex, n = characters every match must contain
        literally (``\\.`` counts, ``\\d``/``.``/classes don't, an alternation counts its
        shortest branch)."""
        if self.regex is None:
            return (1, len(self.pattern))
        return (0, _literal_count(_sre.parse(self.pattern[3:])))

    def matches(self, layer: str) -> bool:
        return layer == self.pattern if self.regex is None else bool(self.regex.fullmatch(layer))


@dataclass(frozen=True)
class LayerConfig:
    path: str
    rules: tuple[LayerRule, ...]

    def lookup(self, layer: str) -> LayerRule | None:
        hits = [r for r in self.rules if r.matches(layer)]
        if not hits:
            return None
        hits.sort(key=lambda r: r.specificity, reverse=True)
        if len(hits) > 1 and hits[0].specificity == hits[1].specificity:
            raise UsageError(f"layer '{layer}' matches {hits[0].pattern!r} and {hits[1].pattern!r} equally "
                             "specifically", file=self.path,
                             fix="make one pattern more specific, or add an entry with the exact layer name")
        return hits[0]


def load_layer_config(path: str | Path) -> LayerConfig:
    path = Path(path)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UsageError("no such per-layer config file", file=path, fix="check the --config path") from None
    except NotRegularFile as e:
        raise UsageError(f"is {e.kind}, not a regular file", file=path,
                         fix="pass the per-layer config file itself") from None
    except OSError as e:
        raise UsageError(f"cannot read the per-layer config ({e.strerror})", file=path, fix="check the path") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"not valid JSON ({e})", file=path, fix="fix the syntax") from None
    elif path.suffix.lower() == ".toml":
        try:
            import tomllib  # Python >= 3.11; no third-party TOML dependency
        except ImportError:  # pragma: no cover
            raise UsageError("TOML configs need Python 3.11 or newer", file=path, fix="write the config as JSON") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"not valid TOML ({e})", file=path, fix="fix the syntax") from None
    else:
        raise UsageError(f"unknown config file type '{path.suffix}'", file=path, fix="name it .toml or .json")
    return parse_layer_config(data, str(path))


def parse_layer_config(data: object, path: str = "<config>") -> LayerConfig:
    def bad(msg: str, fix: str) -> UsageError:
        return UsageError(msg, file=path, fix=fix)

    if not isinstance(data, dict) or set(data) - {"layers"}:
        extra = sorted(set(data) - {"layers"}) if isinstance(data, dict) else []
        raise bad(f"unknown top-level key(s) {extra}" if extra else "the config must be a table/object",
                  "put every entry under [layers.\"<pattern>\"] (TOML) or {\"layers\": {...}} (JSON)")
    layers = data.get("layers", {})
    if not isinstance(layers, dict) or not layers:
        raise bad("'layers' must be a non-empty table of pattern -> settings",
                  "add e.g. [layers.\"final_layer.linear\"] skip = true")
    rules = []
    for pattern, entry in layers.items():
        where = f"layers.{pattern!r}"
        if not isinstance(entry, dict) or not entry:
            raise bad(f"{where} must be a non-empty table", f"set one of: {', '.join(ENTRY_KEYS)}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise bad(f"{where}: unknown key(s) {unknown}", f"use only: {', '.join(ENTRY_KEYS)}")
        regex = None
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as e:
                raise bad(f"{where}: not a valid regular expression ({e})",
                          "escape dots, e.g. 're:^blocks\\.\\d+\\.fc1$'") from None
        fmt = entry.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise bad(f"{where}: unknown format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
        bs = entry.get("block_size")
        if bs is not None:
            if type(bs) is not int or bs < 1 or bs & (bs - 1):
                raise bad(f"{where}: block_size {bs!r} is not a positive power of two", "use 128 or 64")
            if fmt is not None and "block_size" not in FORMATS[fmt].option_names:
                with_block = " or ".join(f'format = "{f}"' for f in formats_with_option("block_size"))
                raise bad(f"{where}: block_size applies only to block formats, not {fmt}",
                          f"drop block_size or use {with_block}")
        fo = {k: entry[k] for k in FORMAT_OPTION_KEYS if k in entry}
        for k, val in fo.items():
            takers = formats_with_option(k)
            if fmt is not None and fmt not in takers:
                raise bad(f"{where}: {k} applies only to {', '.join(takers)}, not {fmt}",
                          f"drop {k} or set " + " or ".join(f'format = "{f}"' for f in takers))
            default = LayerOpts.__dataclass_fields__[k].default
            if type(val) is not type(default):
                raise bad(f"{where}: {k} must be a {type(default).__name__}, not {val!r}", f"e.g. {k} = {default!r}")
            problem = FORMATS[fmt or takers[0]].option_error(LayerOpts(**{k: val}))
            if problem is not None:
                raise bad(f"{where}: {problem[0].replace('--' + k.replace('_', '-'), k)}", problem[1])
        skip = entry.get("skip", False)
        if type(skip) is not bool:
            raise bad(f"{where}: skip must be true or false", "write skip = true")
        if skip and set(entry) - {"skip"}:
            raise bad(f"{where}: skip = true keeps the layer as it is, so other settings would be ignored",
                      "remove the other keys or the skip")
        opts = entry.get("options", {})
        if not isinstance(opts, dict):
            raise bad(f"{where}: options must be a table", "write options = { full_precision_matrix_mult = true }")
        for k, v in opts.items():
            if k not in LAYER_OPTIONS:
                raise bad(f"{where}: unknown option {k!r}", f"known options: {', '.join(LAYER_OPTIONS)}")
            if type(v) is not LAYER_OPTIONS[k]:
                raise bad(f"{where}: option {k} must be a {LAYER_OPTIONS[k].__name__}", f"e.g. {k} = true")
        rules.append(LayerRule(pattern, regex, fmt, bs, skip, tuple(sorted(opts.items())), tuple(sorted(fo.items()))))
    return LayerConfig(path, tuple(rules))


__all__ = ["LayerConfig", "LayerRule", "load_layer_config", "parse_layer_config"]
