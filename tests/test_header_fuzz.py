"""Mutated headers of a small valid file: the reader's verdict against safetensors 0.8's own.

Every case is a file made from one deterministic mutation (seeded by its number) of the length
field, the JSON structure, a dtype, a shape, data_offsets, a name, the metadata or the data section.
safetensors' verdict: ``safe_open(path, "pt")`` and ``get_tensor`` of every tensor succeed. The
reader must agree: the same tensors (dtype, shape, bytes) and metadata where safetensors loads the
file, a QuantkitError naming the file where it does not (any other exception fails the test). There
are no deliberate refusals at the reader (README "Refused inputs"). Files the reader accepts are
also converted: success must leave an output safetensors loads, with kept tensors byte-identical;
failure a QuantkitError and nothing in the output folder.

Default suite: 300 cases; ``-m slow``: 3000 more.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from st_oracle import quantkit_view, safetensors_view
from quantkit.convert import convert
from quantkit.dtypes import DTYPES
from quantkit.errors import QuantkitError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Raw:
    """JSON text written as it is (5000-digit numbers, NaN, broken escapes)."""
    text: str


class Pairs(list):
    """A JSON object written pair by pair (so a key may repeat)."""


def enc(v) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Pairs):
        return "{" + ",".join(f"{enc(k)}:{enc(x)}" for k, x in v) + "}"
    if isinstance(v, dict):
        return enc(Pairs(v.items()))
    if isinstance(v, list | tuple):
        return "[" + ",".join(enc(x) for x in v) + "]"
    return json.dumps(v)  # str (a lone surrogate becomes its \\u escape), int, float, bool, None


def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.attn.weight": (torch.randn(16, 32, generator=g)).to(torch.bfloat16),
        "blocks.0.attn.bias": torch.randn(16, generator=g),
        "blocks.0.norm.scale": torch.randn(8, generator=g).to(torch.float16),
        "embed.ids": torch.arange(3, dtype=torch.int64),
        "mask": torch.tensor([[True, False], [False, True]]),
        "codes": torch.arange(5, dtype=torch.uint8),
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    p = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file(base_tensors(), str(p), metadata={"format": "pt", "note": "fuzz base"})
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


SIZE_BITS = {name: bits for name, (_, bits) in DTYPES.items()}


def relayout(entries: list[tuple[str, dict]], rng: random.Random) -> bytes:
    """Offsets made contiguous for whatever dtype and shape each entry now has (where computable),
    and data of exactly that length: the mutation alone decides the verdict."""
    pos, out = 0, []
    for _, e in entries:
        dt, shape = e.get("dtype"), e.get("shape")
        n = None
        if isinstance(dt, str) and dt in SIZE_BITS and isinstance(shape, list) and all(
                type(d) is int and d >= 0 for d in shape):
            n = SIZE_BITS[dt]
            for d in shape:
                n *= d
            n = n // 8 if n < 1 << 30 else None
        if n is None:
            continue
        e["data_offsets"] = [pos, pos + n]
        pos += n
    # bytes under 0x70: every float is finite, so the weights can be quantized
    return bytes(rng.randrange(0x70) for _ in range(pos)) if pos < 1 << 16 else b""


def huge_int(rng) -> Raw | int:
    return rng.choice([2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 10 ** 30, Raw("9" * 5000), Raw("1" + "0" * 400),
                       Raw("-0"), Raw("1e3"), Raw("2.0"), -1, Raw("-" + "9" * 30)])


def nested(depth: int, rng) -> Raw:
    o, c = rng.choice([("[", "]"), ('{"k":', "}")])
    return Raw(o * depth + ("1" if o == "[" else "1") + c * depth)


DTYPE_CHOICES = [*DTYPES, "f32", "Q4", "", "F8_E4M3FN", ["F32"], {"F32": None}, {"F16": 1}, {}, 0, None,
                 Pairs([("F32", None), ("F32", None)])]


def mutate(case: int, header: dict, data: bytes):
    """(header bytes, data, length override, family) for case number ``case``."""
    rng = random.Random(case)
    meta = dict(header["__metadata__"])
    entries = [(k, dict(v)) for k, v in header.items() if k != "__metadata__"]
    rng.shuffle(entries)
    top: list = [("__metadata__", meta), *entries]
    length = None
    family = rng.choice(["length", "json", "dtype", "shape", "offsets", "name", "metadata", "data", "valid"])
    k = rng.randrange(len(entries))
    name, e = entries[k]
    if family == "length":
        text = enc(Pairs(top)).encode()
        n = len(text)
        length = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, 2 ** 63, 2 ** 64 - 1, 100_000_001, n + rng.randrange(-8, 9)])
        return text, data, length, family
    if family == "json":
        how = rng.randrange(9)
        if how == 0:  # truncated
            text = enc(Pairs(top)).encode()
            return text[:rng.randrange(len(text))], data, None, family
        if how == 1:  # one byte changed
            text = bytearray(enc(Pairs(top)).encode())
            text[rng.randrange(len(text))] = rng.choice(b'{}[],:" \x00\x0c\\9-eE.tnfa\xff')
            return bytes(text), data, None, family
        if how == 2:  # nesting around serde's limit, in an extra field or the metadata
            d = rng.choice([124, 125, 126, 127, 200, 1100, 100_000])
            if rng.random() < 0.5:
                e["x"] = nested(d, rng)
            else:
                meta["deep"] = nested(d, rng)
        elif how == 3:  # a tensor given twice: identical, or the first one elsewhere
            dup = dict(e)
            if rng.random() < 0.5:
                dup["data_offsets"] = [0, rng.randrange(64)]
            top.insert(rng.randrange(1, len(top) + 1), (name, dup))
        elif how == 4:  # a field given twice, or the metadata twice
            if rng.random() < 0.5:
                f = rng.choice(["dtype", "shape", "data_offsets", "x"])
                entries[k] = (name, Pairs([*e.items(), (f, e.get(f, 1))]))
                top[top.index((name, e))] = entries[k]
            else:
                top.append(("__metadata__", rng.choice([None, {}, meta])))
        elif how == 5:  # another top-level value
            return rng.choice([b"[]", b'"x"', b"1", b"null", b"", b"[" * 100_000]), data, None, family
        elif how == 6:  # whitespace and padding
            text = enc(Pairs(top)).encode()
            text = rng.choice([b"", b" ", b"\n", b"\t\r"]) + text + rng.choice([b"", b" " * 100, b"\n", b"\x00", b"\x0c"])
            return text, data, None, family
        elif how == 7:  # an extra field of some value
            e["x"] = rng.choice([1, 1.5, "s", None, [], {}, Raw("NaN"), Raw("1e400"), Raw("-1e400"), Raw("1e-400"),
                                 Raw("9" * 300), Raw("9" * 400), "\ud800", Raw('"\\ud83d\\ude00"'), True])
        else:  # an entry as a sequence of its fields
            seq = [e["dtype"], e["shape"], e["data_offsets"]] + ([0] if rng.random() < 0.3 else [])
            top[top.index((name, e))] = (name, seq)
        return enc(Pairs(top)).encode(), data, None, family
    if family == "dtype":
        e["dtype"] = rng.choice(DTYPE_CHOICES)
        if rng.random() < 0.5 and isinstance(e["dtype"], str) and e["dtype"] in SIZE_BITS and e["dtype"].startswith(("F4", "F6")):
            e["shape"] = rng.choice([[2, 4], [4], [3], [2, 3], [3, 2], [0], [0, 3]])
        if rng.random() < 0.8:
            data = relayout(entries, rng)
    elif family == "shape":
        how = rng.randrange(6)
        if how == 0:
            e["shape"] = [huge_int(rng)] + ([0] if rng.random() < 0.5 else [])
        elif how == 1:
            e["shape"] = rng.choice([[0, 2 ** 64 - 1], [0, 2 ** 63 - 1], [0, 2 ** 63], [2 ** 32, 2 ** 32, 0],
                                     [0, 2 ** 32, 2 ** 32], [0, 2 ** 62, 4], [2 ** 61], [2 ** 40, 0, 2 ** 40],
                                     [0, 2 ** 64]])
        elif how == 2:
            e["shape"] = rng.choice([[], [0], [1], [-1], [2.0], ["2"], [None], [True], "2", None, {}, [[2]]])
        elif how == 3:
            e["shape"] = [rng.randrange(0, 6) for _ in range(rng.randrange(0, 4))]
        elif how == 4:
            e["shape"] = [*e["shape"], 1]
        else:
            e.pop("shape")
        if rng.random() < 0.8:
            data = relayout(entries, rng)
    elif family == "offsets":
        s, t = e["data_offsets"]
        e["data_offsets"] = rng.choice([[t, s], [s, t + 1], [s + 1, t + 1], [s, t, t], [s], [], [s - 1, t - 1],
                                        [s, 2 ** 64 - 1], [s, 2 ** 64], [float(s), t], [s, Raw("9" * 5000)],
                                        {"0": s}, None, [0, t - s], [s, s]])
        if rng.random() < 0.2:
            e.pop("data_offsets")
    elif family == "name":
        new = rng.choice(["", "buf\ud800", "\udc00", "a\ud83d\ud83d", "\U0001f600", "x" * 10_000, "a\nb", "a\rb",
                          "\u2028", "__metadata__ ", "é.weight", "a\x00b", "\\", '"'])
        top[top.index((name, e))] = (new, e)
    elif family == "metadata":
        how = rng.randrange(6)
        if how == 0:
            meta[rng.choice(["a", "format"])] = rng.choice([1, None, [], {}, True, 1.5, ["x"]])
        elif how == 1:
            meta[rng.choice(["a", "\ud800"])] = rng.choice(["v\ud800", "\udfff", "ok \U0001f600", "x" * 100_000])
        elif how == 2:
            top[0] = ("__metadata__", rng.choice([None, [], "s", 1, {}, [["a", "b"]]]))
        elif how == 3:
            top[0] = ("__metadata__", Pairs([("k", "1"), ("k", "2"), *meta.items()]))
        elif how == 4:
            top.pop(0)
        else:
            meta["deep"] = nested(rng.choice([10, 126, 1100]), rng)
    elif family == "data":
        data = rng.choice([data[:-1], data + b"\0", data[: len(data) // 2], b"", data + b"\0" * 8])
    else:  # valid variations: reordered, metadata-free, zero-size extras
        if rng.random() < 0.5:
            top.pop(0)
        if rng.random() < 0.5:
            top.append(("zero", {"dtype": rng.choice(list(DTYPES)), "shape": [0, 3], "data_offsets": [0, 0]}))
            entries.append(top[-1])
            data = relayout(entries, rng)
    return enc(Pairs(top)).encode(), data, length, family


def write_case(path: Path, header: bytes, data: bytes, length: int | None) -> Path:
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + header + data)
    return path


def check_convert(src: Path, out_dir: Path, view: dict) -> str:
    """Convert an input the reader accepted: an output safetensors loads with kept tensors
    byte-identical, or a QuantkitError and nothing left in ``out_dir``."""
    out_dir.mkdir()
    dst = out_dir / "out.safetensors"
    try:
        report = convert(src, dst, format="int8-row", device="cpu", preset="none")
    except QuantkitError as e:
        assert str(src) in e.one_line() or str(dst) in e.one_line(), e.one_line()
        assert not list(out_dir.iterdir())
        return "refused"
    got = safetensors_view(dst)
    assert got is not None, "converted into a file safetensors cannot load"
    for layer in report.layers:
        if layer.action == "kept":
            assert got["tensors"][layer.name] == view["tensors"][layer.name], layer.name
    assert [p.name for p in out_dir.iterdir()] == ["out.safetensors"]
    return "converted"


def run_cases(cases, base, tmp_path) -> dict:
    header, data = base
    counts = {"cases": 0, "agree": 0, "st_loads": 0, "st_refuses": 0, "converted": 0, "convert_refused": 0}
    families: dict[str, list[int]] = {}
    bad = []
    for i in cases:
        hb, d, length, family = mutate(i, header, data)
        p = write_case(tmp_path / f"c{i}.safetensors", hb, d, length)
        want, got = safetensors_view(p), quantkit_view(p)
        counts["cases"] += 1
        fam = families.setdefault(family, [0, 0])
        fam[want is None] += 1
        if want is None:
            counts["st_refuses"] += 1
            ok = isinstance(got, QuantkitError) and got.one_line().startswith(f"{p}: ") \
                and len(got.one_line().splitlines()) == 1 and "fix:" in got.one_line()
        else:
            counts["st_loads"] += 1
            ok = got == want
        if not ok:
            bad.append((i, family, hb[:160], want is not None, got if isinstance(got, QuantkitError) else "loaded"))
            continue
        counts["agree"] += 1
        if want is not None:
            counts[{"converted": "converted", "refused": "convert_refused"}[
                check_convert(p, tmp_path / f"o{i}", want)]] += 1
        p.unlink()
    assert not bad, f"{len(bad)} of {counts['cases']} verdicts differ from safetensors': {bad[:5]}"
    counts["families"] = families
    print(counts)
    return counts


def test_fuzz_verdicts_match_safetensors(base, tmp_path):
    counts = run_cases(range(300), base, tmp_path)
    # the generator must exercise both verdicts in every family that can have both
    assert counts["st_loads"] >= 45 and counts["st_refuses"] >= 150, counts
    for fam in ("json", "dtype", "shape", "name", "metadata"):
        loads, refuses = counts["families"][fam]
        assert loads and refuses, (fam, counts["families"])
    assert counts["converted"] >= 40, counts


@pytest.mark.slow
def test_fuzz_verdicts_match_safetensors_long(base, tmp_path):
    run_cases(range(300, 3300), base, tmp_path)


HOSTILE_FOR_CLI = {
    "deep": (b"[" * 100_000, b""),
    "digits": (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', b"\0" * 8),
    "surrogate": (b'{"buf\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "dtype-object": (b'{"a":{"dtype":{"x":[1]},"shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "shape-2**64": (b'{"a":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}', b""),
    "name-with-line-break": (b'{"a\\nb\\u2028":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8),
}


def test_cli_hostile_headers_are_one_line_each(tmp_path):
    srcs = [write_case(tmp_path / f"{name}.safetensors", *case, None) for name, case in HOSTILE_FOR_CLI.items()]
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("QUANTKIT_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", *map(str, srcs), "-O", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    # one line per input, then the count (the multi-input summary)
    assert len(lines) == len(srcs) + 1 and lines[-1] == f"{len(srcs)} of {len(srcs)} inputs failed", r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    for src in srcs:
        assert sum(f"{src}: " in line and "fix:" in line for line in lines) == 1, (src, r.stderr)
    assert not list(out.iterdir())
