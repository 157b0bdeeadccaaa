"""The streaming writer against safetensors' own save_file (golden bytes), and the reader against
hostile files: every malformed header is refused with a message naming the file and the tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_raw
from quantkit.dtypes import DTYPES, RANK, name_of
from quantkit.errors import QuantkitError
from quantkit.safetensors_io import PlannedTensor, SafetensorsReader, SafetensorsWriter, build_header, tensor_bytes


def all_torch_dtypes():
    return [dt for dt, _ in DTYPES.values() if dt is not None]


def write_with_ours(path, tensors: dict, metadata=None, order=None):
    plan = [PlannedTensor(k, name_of(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
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
    d = {f"x{name}": torch.zeros(1, dtype=dt) for name, (dt, _) in DTYPES.items() if dt is not None}
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
    "duplicate names": (lambda p: write_raw(p, b'{"a":' + _hdr(_entry(offs=(0, 8))) + b',"a":' + _hdr(_entry(offs=(8, 16))) + b"}", b"\0" * 16), "twice"),
    "bad metadata": (lambda p: write_raw(p, _hdr({"__metadata__": {"a": 1}})), "__metadata__"),
    "extra entry keys": (lambda p: write_raw(p, _hdr({"a": {**_entry(), "x": 1}}), b"\0" * 8), "exactly"),
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
