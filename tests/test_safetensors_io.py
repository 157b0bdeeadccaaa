"""The streaming writer against safetensors' own save_file (golden bytes), and the reader against
hostile files: every malformed header is refused with a message naming the file and the tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_raw
from quantkit.dtypes import DTYPES, RANK, file_shape, name_of
from quantkit.errors import QuantkitError
from quantkit.safetensors_io import PlannedTensor, SafetensorsReader, SafetensorsWriter, build_header, tensor_bytes


def all_torch_dtypes():
    return [dt for dt, _ in DTYPES.values() if dt is not None]


def write_with_ours(path, tensors: dict, metadata=None, order=None):
    plan = [PlannedTensor(k, name_of(v.dtype), file_shape(name_of(v.dtype), tuple(v.shape)))
            for k, v in tensors.items()]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = SafetensorsWriter(fd, plan, metadata)
        for k in order or list(tensors)[::-1]:  # deliberately not in layout order
            w.write(k, tensors[k])
        w.finish()
    finally:
        os.close(fd)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    d = {}
    for i, dt in enumerate(all_torch_dtypes()):
        base = torch.randn(3, 5, generator=g) * 10
        if dt == torch.bool:
            t = base > 0
        elif dt.itemsize == 1 and "float4" in str(dt):  # packed pairs: no casts, any byte is a value
            t = torch.randint(0, 256, (3, 5), generator=g, dtype=torch.uint8).view(dt)
        elif dt.is_complex:
            t = base.to(dt)
        elif dt.is_floating_point:
            t = base.clamp(-100, 100).to(dt)
        else:
            t = base.abs().to(torch.int64).to(dt)
        d[f"t{i:02d}.w"] = t
        d[f"t{i:02d}.a"] = t[0].clone()
    d["scalar"] = torch.tensor(1.5)
    d["empty"] = torch.zeros(0, 4)
    return d


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_bytes_identical_to_save_file(tmp_path, metadata):
    d = sample_tensors()
    save_file(d, str(tmp_path / "ref.st"), metadata=metadata)
    write_with_ours(tmp_path / "ours.st", d, metadata)
    assert (tmp_path / "ours.st").read_bytes() == (tmp_path / "ref.st").read_bytes()


def test_dtype_order_matches_save_file(tmp_path):
    d = {f"x{name}": torch.zeros(8, dtype=torch.uint8).view(dt) for name, (dt, _) in DTYPES.items() if dt is not None}
    save_file(d, str(tmp_path / "ref.st"))
    raw = (tmp_path / "ref.st").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert order == sorted(order, key=lambda k: -RANK[header[k]["dtype"]])


def test_metadata_keys_are_sorted_for_reproducibility():
    h1, _ = build_header([PlannedTensor("a", "F32", (1,))], {"z": "1", "a": "2"})
    h2, _ = build_header([PlannedTensor("a", "F32", (1,))], {"a": "2", "z": "1"})
    assert h1 == h2 and b'{"__metadata__":{"a":"2","z":"1"}' in h1
    assert len(h1) % 8 == 0


def test_reader_roundtrip_and_zero_copy(tmp_path):
    d = sample_tensors()
    save_file(d, str(tmp_path / "f.st"), metadata={"k": "v"})
    with SafetensorsReader(tmp_path / "f.st") as r:
        assert r.metadata == {"k": "v"}
        for k, v in d.items():
            t = r.tensor(k)
            assert t.dtype == v.dtype and t.shape == v.shape
            assert bytes(tensor_bytes(t)) == bytes(tensor_bytes(v))
            r.release(k)


def test_writer_refuses_overrun_and_incomplete(tmp_path):
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT)
    try:
        w = SafetensorsWriter(fd, [PlannedTensor("a", "F32", (2,)), PlannedTensor("b", "U8", (1,))], None)
        with pytest.raises(RuntimeError, match="planned"):
            w.write("a", torch.zeros(3))
        with pytest.raises(RuntimeError, match="unplanned"):
            w.write("c", b"x")
        w.write("a", torch.zeros(1))
        with pytest.raises(RuntimeError, match="incomplete"):
            w.finish()
    finally:
        os.close(fd)


def _entry(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


def _hdr(obj) -> bytes:
    return json.dumps(obj).encode()


BAD_FILES = {
    "too short": (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
    "header beyond file": (lambda p: write_raw(p, b"{}", length=10_000), "beyond the end"),
    "huge header length": (lambda p: write_raw(p, b"{}", length=1 << 40), "over the"),
    "garbage header": (lambda p: write_raw(p, b"\xff\xfe garbage"), "not UTF-8"),
    "invalid json": (lambda p: write_raw(p, b"{not json"), "not valid JSON"),
    "non-object json": (lambda p: write_raw(p, b"[1, 2, 3]"), "not an object"),
    "unknown dtype": (lambda p: write_raw(p, _hdr({"w": _entry("Q4", (2,), (0, 2))}), b"\0" * 2), "unknown dtype"),
    "bad shape": (lambda p: write_raw(p, _hdr({"w": _entry("F32", (-1,), (0, 4))}), b"\0" * 4), "shape"),
    "size mismatch": (lambda p: write_raw(p, _hdr({"w": _entry("F32", (3,), (0, 8))}), b"\0" * 8), "needs 12 bytes"),
    "overlap": (lambda p: write_raw(p, _hdr({"a": _entry(offs=(0, 8)), "b": _entry(offs=(4, 12))}), b"\0" * 12), "overlaps"),
    "gap": (lambda p: write_raw(p, _hdr({"a": _entry(offs=(0, 8)), "b": _entry(offs=(12, 20))}), b"\0" * 20), "gap of 4"),
    "out of range": (lambda p: write_raw(p, _hdr({"a": _entry(offs=(0, 8))}), b"\0" * 4), "truncated"),
    "trailing bytes": (lambda p: write_raw(p, _hdr({"a": _entry(offs=(0, 8))}), b"\0" * 12), "unexplained"),
    "reversed offsets": (lambda p: write_raw(p, _hdr({"a": _entry(offs=(8, 0))}), b"\0" * 8), "data_offsets"),
    # a name given twice keeps its last entry (as in safetensors), so the first one's bytes are a gap
    "duplicate names": (lambda p: write_raw(p, b'{"a":' + _hdr(_entry(offs=(0, 8))) + b',"a":' + _hdr(_entry(offs=(8, 16))) + b"}", b"\0" * 16), "gap of 8"),
    "bad metadata": (lambda p: write_raw(p, _hdr({"__metadata__": {"a": 1}})), "__metadata__"),
    "duplicate metadata": (lambda p: write_raw(p, b'{"__metadata__":{},"__metadata__":{}}'), "__metadata__ twice"),
    "duplicate field": (lambda p: write_raw(p, b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8), "twice"),
    "missing field": (lambda p: write_raw(p, _hdr({"a": {"dtype": "F32", "shape": [2]}}), b"\0" * 8), "lacks data_offsets"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_hostile_headers_are_refused_with_named_errors(tmp_path, case):
    make, needle = BAD_FILES[case]
    p = tmp_path / "bad.safetensors"
    make(p)
    before = p.read_bytes()
    with pytest.raises(QuantkitError) as ei:
        SafetensorsReader(p)
    msg = ei.value.one_line()
    assert needle in msg, msg
    assert str(p) in msg and "fix:" in msg and "\n" not in msg
    assert p.read_bytes() == before


def test_tensor_named_in_error(tmp_path):
    p = write_raw(tmp_path / "bad.safetensors", _hdr({"blocks.0.w": _entry("Q4", (2,), (0, 2))}), b"\0" * 2)
    with pytest.raises(QuantkitError, match=r"tensor 'blocks\.0\.w'"):
        SafetensorsReader(p)


def test_good_files_are_not_over_rejected(tmp_path):
    # empty file (no tensors), metadata only, zero-size tensors: all valid safetensors
    save_file({}, str(tmp_path / "e.st"))
    save_file({"z": torch.zeros(0)}, str(tmp_path / "z.st"), metadata={"a": "b"})
    for name in ("e.st", "z.st"):
        with SafetensorsReader(tmp_path / name) as r:
            assert load_file(str(tmp_path / name)).keys() == r.tensors.keys()


def test_read_returns_owned_copies_equal_to_the_views(tmp_path):
    p = tmp_path / "a.safetensors"
    ts = sample_tensors()
    save_file(ts, str(p))
    with SafetensorsReader(p) as r:
        got = {n: r.read(n) for n in ts}
        for n, t in ts.items():
            assert got[n].dtype == t.dtype and got[n].shape == t.shape
            assert bytes(tensor_bytes(got[n])) == bytes(tensor_bytes(r.tensor(n)))
    for n, t in ts.items():  # still valid after the file is closed
        assert bytes(tensor_bytes(got[n])) == bytes(tensor_bytes(t))


# --- the reader's verdict against safetensors' own -------------------------------------------------

E = _entry
DEEP = 1100


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Headers the issue found escaping as tracebacks, and others Python's json takes but serde_json
# (safetensors) refuses: each must be one QuantkitError line, and safetensors must refuse it too.
REFUSED = {
    "nesting 100000": (b"[" * 100_000, b""),
    "metadata nested 1100 deep": (b'{"__metadata__":{"a":' + _nested(DEEP) + b"}}", b""),
    "extra field nested 128 deep": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                                    + _nested(126) + b"}}", b"\0" * 8),
    "5000-digit shape": (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', b"\0" * 8),
    "5000-digit offset": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,' + b"9" * 5000 + b"]}}", b"\0" * 8),
    "5000-digit extra field": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"9" * 5000 + b"}}",
                               b"\0" * 8),
    "lone surrogate in a name": (b'{"buf\\ud800":' + _hdr(E()) + b"}", b"\0" * 8),
    "lone low surrogate in a name": (b'{"buf\\udc00x":' + _hdr(E()) + b"}", b"\0" * 8),
    "lone surrogate in metadata": (b'{"__metadata__":{"k":"v\\ud800"},"a":' + _hdr(E()) + b"}", b"\0" * 8),
    "lone surrogate in a shadowed entry": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":"\\ud800"},'
                                           b'"a":' + _hdr(E()) + b"}", b"\0" * 8),
    "dtype object": (_hdr({"a": E({"a": 1})}), b"\0" * 8),
    "dtype list": (_hdr({"a": E(["F32"])}), b"\0" * 8),
    "dtype object of two": (_hdr({"a": E({"F32": None, "F16": None})}), b"\0" * 8),
    "dtype lowercase": (_hdr({"a": E("f32")}), b"\0" * 8),
    "shape 2**64": (_hdr({"a": E(shape=(0, 2 ** 64), offs=(0, 0))}), b""),
    "shape 2**63 (torch sizes are signed)": (_hdr({"a": E(shape=(0, 2 ** 63), offs=(0, 0))}), b""),
    "shape product overflows before the zero": (_hdr({"a": E(shape=(2 ** 32, 2 ** 32, 0), offs=(0, 0))}), b""),
    "shape -0": (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b""),
    "shape 2.0": (b'{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', b"\0" * 8),
    "shape true": (b'{"a":{"dtype":"F32","shape":[true,2],"data_offsets":[0,8]}}', b"\0" * 8),
    "NaN in an extra field": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', b"\0" * 8),
    "1e400 in an extra field": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e400}}', b"\0" * 8),
    "F6 (no torch dtype)": (_hdr({"a": E("F6_E2M3", (4,), (0, 3))}), b"\0" * 3),
    "F4 odd last dimension": (_hdr({"a": E("F4", (2, 3), (0, 3))}), b"\0" * 3),
    "F4 odd element count": (_hdr({"a": E("F4", (3,), (0, 2))}), b"\0" * 2),
    "U8 2**61 (bits overflow)": (_hdr({"a": E("U8", (2 ** 61,), (0, 2 ** 61))}), b""),
    "metadata twice": (b'{"__metadata__":{"x":"1"},"__metadata__":null}', b""),
    "metadata value null": (_hdr({"__metadata__": {"x": None}}), b""),
    "entry as a sequence of 4": (_hdr({"a": ["F32", [2], [0, 8], 1]}), b"\0" * 8),
    "entry null": (_hdr({"a": None}), b""),
    "three offsets": (_hdr({"a": E(offs=(0, 8, 8))}), b"\0" * 8),
    "form feed after the JSON": (_hdr({"a": E()}) + b"\x0c", b"\0" * 8),
    "byte-order mark": (b"\xef\xbb\xbf" + _hdr({"a": E()}), b"\0" * 8),
    "header length 100000001": (_hdr({"a": E()}), b"\0" * 8, 100_000_001),
}

# Files safetensors 0.8 loads that the reader used to refuse (or might): each must read the same.
ACCEPTED = {
    "duplicated entry": (b'{"a":' + _hdr(E()) + b',"a":' + _hdr(E()) + b"}", b"\0" * 8),
    "duplicated entry, the first elsewhere": (b'{"a":' + _hdr(E(offs=(8, 16))) + b',"a":' + _hdr(E()) + b"}", b"\1" * 8),
    "extra field": (_hdr({"a": {**E(), "x": 1}}), b"\2" * 8),
    "extra field nested 127 deep": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                                    + _nested(125) + b"}}", b"\0" * 8),
    "300-digit integer in an extra field": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                                            + b"9" * 300 + b"}}", b"\0" * 8),
    "duplicated key in an extra field": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":{"k":1,"k":2}}}',
                                         b"\0" * 8),
    "F4": (_hdr({"a": E("F4", (3, 4), (0, 6))}), bytes(range(6))),
    "F4 zero-size": (_hdr({"a": E("F4", (2, 0), (0, 0))}), b""),
    "F8_E8M0": (_hdr({"a": E("F8_E8M0", (2,), (0, 2))}), b"\x7f\x80"),
    "F8_E4M3FNUZ and F8_E5M2FNUZ": (_hdr({"a": E("F8_E4M3FNUZ", (2,), (0, 2)), "b": E("F8_E5M2FNUZ", (2,), (2, 4))}),
                                    b"\1\2\3\4"),
    "entry as a sequence": (_hdr({"a": ["F32", [2], [0, 8]]}), b"\3" * 8),
    "dtype as an object": (_hdr({"a": E({"F32": None})}), b"\4" * 8),
    "whitespace around the JSON": (b" \r\n\t" + _hdr({"a": E()}) + b"\n  ", b"\0" * 8),
    "surrogate pair in a name": (b'{"a\\ud83d\\ude00":' + _hdr(E()) + b"}", b"\0" * 8),
    "control escape in a name": (b'{"a\\u000ab":' + _hdr(E()) + b"}", b"\0" * 8),
    "empty name": (_hdr({"": E()}), b"\0" * 8),
    "repeated metadata key": (b'{"__metadata__":{"k":"1","k":"2"}}', b""),
    "metadata null": (_hdr({"__metadata__": None, "a": E()}), b"\0" * 8),
    "shape [0, 2**63-1]": (_hdr({"a": E(shape=(0, 2 ** 63 - 1), offs=(0, 0))}), b""),
    "shape [0, 2**62, 4]": (_hdr({"a": E(shape=(0, 2 ** 62, 4), offs=(0, 0))}), b""),
    "scalar": (_hdr({"a": E(shape=(), offs=(0, 4))}), b"\0" * 4),
    "empty object": (b"{}", b""),
}


def _make(tmp_path, case):
    header, data, *length = case
    return write_raw(tmp_path / "h.safetensors", header, data, length=length[0] if length else None)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_as_safetensors_refuses(tmp_path, name):
    from st_oracle import quantkit_view, safetensors_view
    p = _make(tmp_path, REFUSED[name])
    assert safetensors_view(p) is None
    got = quantkit_view(p)
    assert isinstance(got, QuantkitError), got
    msg = got.one_line()
    assert msg.startswith(str(p) + ": ") and "fix:" in msg and len(msg.splitlines()) == 1, msg
    assert len(msg) < 400, msg  # a 5000-digit number or 100000 brackets are not echoed


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_as_safetensors_accepts(tmp_path, name):
    from st_oracle import quantkit_view, safetensors_view
    p = _make(tmp_path, ACCEPTED[name])
    want = safetensors_view(p)
    assert want is not None
    assert quantkit_view(p) == want


def test_header_length_limit_is_safetensors_own(tmp_path):
    """100_000_000 header bytes load; one more is refused (safetensors' MAX_HEADER_SIZE)."""
    from st_oracle import quantkit_view, safetensors_view
    for n, ok in ((100_000_000, True), (100_000_001, False)):
        h = _hdr({"a": E()})
        p = write_raw(tmp_path / "big.safetensors", h + b" " * (n - len(h)), b"\5" * 8)
        want, got = safetensors_view(p), quantkit_view(p)
        assert (want is not None) == ok
        assert got == want if ok else isinstance(got, QuantkitError)
        p.unlink()


def test_header_builder_refuses_a_lone_surrogate():
    with pytest.raises(QuantkitError, match="not Unicode text") as ei:
        build_header([PlannedTensor("buf\ud800", "F32", (1,))], None)
    assert "\\ud800" in ei.value.one_line()
    with pytest.raises(QuantkitError, match="not Unicode text"):
        build_header([PlannedTensor("a", "F32", (1,))], {"k": "v\udfff"})


def test_header_builder_refuses_an_oversized_header():
    with pytest.raises(QuantkitError, match="over safetensors' 100000000-byte limit"):
        build_header([PlannedTensor("a", "F32", (1,))], {"k": "v" * 100_000_000})


def test_one_line_escapes_line_breaks_in_names():
    e = QuantkitError("bad", file="f", tensor="a\rb\u2028c\x85d\ne", fix="x")
    assert len(e.one_line().splitlines()) == 1
    assert "a\\rb\\u2028c\\x85d e" in e.one_line()
