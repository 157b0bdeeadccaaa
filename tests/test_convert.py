"""End to end: what the output file holds, its quality on real weights, reproducibility, and
every bad-input path (clear error, non-zero exit, nothing at the target, input untouched)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import quantkit
from conftest import at_least, db_floor, sha
from quantkit import quantize, reference
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, LayerOpts

SCALED_FORMATS = [n for n, f in FORMATS.items() if f.kernel]  # the formats the fast chunked path runs

ck = pytest.importorskip("comfy_kitchen.tensor")


# Round-to-nearest SQNR per layer on all-MiniLM-L6-v2 (bf16), 37 linear weights: (worst, median) dB
# measured, identical at 1 and 2 threads and ATEN_CPU_CAPABILITY avx512 / default (the quantized bits
# are machine-independent and the same on the torch and native paths; only the SQNR's float sum is not:
# the two paths agree to 1e-5 dB, tests/test_native_quant.py). db_floor takes
# 0.5 dB off; a quantizer one bit coarser measures 6-8.5 dB lower (int8-tensor's worst layer, an
# outlier-dominated one, measures 8.07 dB, and 1.55 dB one bit coarser).
FLOORS = {fmt: (db_floor(lo), db_floor(med)) for fmt, (lo, med) in {
    "fp8": (31.472, 31.540),
    "fp8-e5m2": (25.525, 25.560),
    "int8-row": (33.482, 42.084),
    "int8-block": (23.137, 37.879),
    "int8-tensor": (8.070, 35.847),
}.items()}


def layers_of(path: Path) -> dict[str, dict]:
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if k.endswith(".comfy_quant"):
                out[k[: -len(".comfy_quant")]] = json.loads(f.get_tensor(k).numpy().tobytes())
    return out


def test_chunked_quantize_bit_identical_to_reference():
    g = torch.Generator().manual_seed(0)
    for fmt in SCALED_FORMATS:
        spec = FORMATS[fmt]
        for shape in [(256, 384), (1024, 2048), (384, 128), (3, 7), (1000, 300)]:
            b = 128
            if spec.cannot_take(shape, LayerOpts(b)):
                continue
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                w = (torch.randn(*shape, generator=g) * 0.05).to(dtype)
                q_ref, s_ref = reference.quantize(w, spec, b)
                q, s, _ = quantize.quantize_tensor(w, spec, b)
                assert torch.equal(s, s_ref), (fmt, shape, dtype)
                assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8)), (fmt, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_scale_matches_reference_at_the_edges(dtype):
    """Per-tensor scales come from one aminmax pass: the amax is max(|min|, |max|), and NaN / inf /
    all-negative / all-zero weights give the reference's scale."""
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(300, 256, generator=g) * 0.05).to(dtype)
    cases = [base, -base.abs(), torch.zeros_like(base), base.clone().index_put_((torch.tensor(7), torch.tensor(9)),
             torch.tensor(float("nan"), dtype=dtype)), base.clone().index_put_((torch.tensor(0), torch.tensor(0)),
             torch.tensor(float("-inf"), dtype=dtype))]
    for fmt in ("fp8", "fp8-e5m2", "int8-tensor"):
        spec = FORMATS[fmt]
        for w in cases:
            got, want = quantize.tensor_scale(w, spec), reference.compute_scale(w, spec, 128)
            assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all()), (fmt, got, want)


def test_chunked_sqnr_matches_reference():
    w = (torch.randn(512, 768) * 0.02).to(torch.bfloat16)
    for fmt in ("fp8", "int8-row", "int8-block"):
        spec = FORMATS[fmt]
        q, s = reference.quantize(w, spec, 128)
        _, _, st = quantize.quantize_tensor(w, spec, 128)
        assert st.sqnr_db == pytest.approx(reference.sqnr(w, reference.dequantize(q, s, spec, 128)), abs=1e-3)


@pytest.mark.parametrize("fmt", SCALED_FORMATS)  # the 4-bit formats: tests/test_formats_4bit.py
def test_minilm_output_contract_and_quality(minilm_bf16, tmp_path, fmt):
    out = tmp_path / "out.safetensors"
    rep = quantkit.convert(minilm_bf16, out, format=fmt)
    spec = FORMATS[fmt]
    assert rep.count("quantized") == 37 and rep.count("fallback") == 0
    sq = sorted(lay.sqnr_db for lay in rep.layers if lay.sqnr_db is not None)
    lo, med = FLOORS[fmt]
    at_least(min(sq), lo, f"{fmt} worst layer SQNR dB")
    at_least(sq[len(sq) // 2], med, f"{fmt} median layer SQNR dB")

    src = load_file(str(minilm_bf16))
    dst = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    layers = layers_of(out)
    assert len(layers) == 37
    # header metadata identical to the per-layer markers; input metadata kept
    assert json.loads(meta["_quantization_metadata"]) == {"format_version": "1.0", "layers": layers}
    assert meta["format"] == "pt"
    for name, t in src.items():
        layer = name.removesuffix(".weight")
        if layer in layers:
            cq = layers[layer]
            assert cq["format"] == spec.comfy_format
            q, s = dst[f"{layer}.weight"], dst[f"{layer}.weight_scale"]
            assert q.dtype == spec.weight_dtype and s.dtype == torch.float32
            assert tuple(s.shape) == spec.scale_shape(tuple(t.shape), 128)
            assert (f"{layer}.input_scale" in dst) == spec.writes_input_scale
            if spec.writes_input_scale:
                assert float(dst[f"{layer}.input_scale"]) == 1.0
            q_ref, s_ref = reference.quantize(t, spec, 128)
            assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8)) and torch.equal(s, s_ref)
        else:
            # everything else copied through bit-exactly in its dtype
            assert dst[name].dtype == t.dtype and torch.equal(dst[name], t), name
    assert set(dst) == set(src) | {f"{L}.{x}" for L in layers for x in ("weight_scale", "comfy_quant")} | (
        {f"{L}.input_scale" for L in layers} if spec.writes_input_scale else set())


@pytest.mark.parametrize("fmt", ["fp8", "fp8-e5m2", "int8-tensor", "int8-row"])
def test_written_file_dequantizes_like_comfy_kitchen(minilm_bf16, tmp_path, fmt):
    out = tmp_path / "o.safetensors"
    quantkit.convert(minilm_bf16, out, format=fmt)
    dst = load_file(str(out))
    layer = "encoder.layer.3.output.dense"
    q, s = dst[f"{layer}.weight"], dst[f"{layer}.weight_scale"]
    layout = "TensorWiseINT8Layout" if FORMATS[fmt].is_int else "TensorCoreFP8Layout"
    cls = getattr(ck, layout)
    qt = ck.QuantizedTensor(q, layout, cls.Params(scale=s, orig_dtype=torch.bfloat16, orig_shape=tuple(q.shape)))
    ours = reference.dequantize(q, s, FORMATS[fmt], 128, torch.bfloat16)
    assert torch.equal(qt.dequantize().view(torch.int16), ours.view(torch.int16))


def test_reproducible_bytes_and_save_file_identity(tmp_path):
    # no input metadata -> one metadata key, so save_file's hash-map order cannot differ
    sd = {f"blocks.{i}.{n}.weight": (torch.randn(256, 256) * 0.02).to(torch.bfloat16)
          for i in range(2) for n in ("qkv", "proj")}
    sd["blocks.0.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "in.safetensors"))
    for fmt in FORMATS:
        a, b = tmp_path / f"a-{fmt}.st", tmp_path / f"b-{fmt}.st"
        quantkit.convert(tmp_path / "in.safetensors", a, format=fmt)
        quantkit.convert(tmp_path / "in.safetensors", b, format=fmt)
        assert a.read_bytes() == b.read_bytes()
        with safe_open(str(a), "pt") as f:
            meta = f.metadata()
        save_file(load_file(str(a)), str(tmp_path / "ref.st"), metadata=meta)
        assert a.read_bytes() == (tmp_path / "ref.st").read_bytes(), fmt


def test_fallback_is_labelled_with_its_real_format(sample, tmp_path):
    out = tmp_path / "o.safetensors"
    rep = quantkit.convert(sample, out, format="int8-block", preset="none")
    fb = {lay.name: lay for lay in rep.layers if lay.action == "fallback"}
    assert set(fb) == {"img_in.weight", "final_layer.linear.weight"}
    assert all(lay.format == "int8-row" and "not divisible" in lay.reason for lay in fb.values())
    layers = layers_of(out)
    assert layers["img_in"]["format"] == "int8_tensorwise"
    assert layers["double_blocks.0.img_attn.qkv"] == {
        "format": "int8_blockwise", "group_size": 128, "orig_dtype": "bfloat16", "orig_shape": [384, 128]}
    rep = quantkit.convert(sample, out, format="int8-block", fallback="keep", overwrite=True, preset="none")
    assert "img_in" not in layers_of(out) and rep.count("fallback") == 0
    assert load_file(str(out))["img_in.weight"].dtype == torch.bfloat16


def test_include_exclude(sample, tmp_path):
    out = tmp_path / "o.safetensors"
    quantkit.convert(sample, out, exclude=[r"^double_blocks\.0\.", "mod"], preset="none")
    layers = layers_of(out)
    assert not any(k.startswith("double_blocks.0.") or "mod" in k for k in layers)
    assert "double_blocks.1.img_attn.qkv" in layers
    # embeddings are kept by default, --include brings them in; exclude wins over include
    sd = {"x_embedder.weight": torch.randn(128, 128).bfloat16(), "blocks.0.fc.weight": torch.randn(128, 128).bfloat16()}
    save_file(sd, str(tmp_path / "e.st"))
    rep = quantkit.convert(tmp_path / "e.st", tmp_path / "e1.st")
    assert [lay.name for lay in rep.layers if lay.format] == ["blocks.0.fc.weight"]
    rep = quantkit.convert(tmp_path / "e.st", tmp_path / "e2.st", include=["embedder"])
    assert len([lay for lay in rep.layers if lay.format]) == 2
    rep = quantkit.convert(tmp_path / "e.st", tmp_path / "e3.st", include=["embedder"], exclude=["embedder"])
    assert [lay.name for lay in rep.layers if lay.format] == ["blocks.0.fc.weight"]


def test_default_output_name(sample):
    rep = quantkit.convert(sample, format="int8-row")
    assert Path(rep.output) == sample.with_name("flux-mini-int8-row.safetensors")
    assert Path(rep.output).exists()


# ---- bad input: one clear error, nothing at the target, input untouched -----------------------

def _assert_clean_failure(tmp_path, src, dst, needle, **kw):
    before = sha(src) if Path(src).exists() else None
    with pytest.raises(QuantkitError) as ei:
        quantkit.convert(src, dst, **kw)
    msg = ei.value.one_line()
    assert needle in msg, msg
    assert "\n" not in msg and "fix:" in msg
    if before is not None:
        assert sha(src) == before
    parent = Path(dst).parent
    leftovers = [p for p in parent.iterdir() if p.name.endswith(".partial")] if parent.is_dir() else []
    assert leftovers == []
    return msg


def test_missing_input(tmp_path):
    _assert_clean_failure(tmp_path, tmp_path / "nope.safetensors", tmp_path / "o.st", "no such file")
    assert not (tmp_path / "o.st").exists()


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_text("hello, I am a text file pretending to be a model")
    _assert_clean_failure(tmp_path, p, tmp_path / "o.st", "not a safetensors file")
    assert not (tmp_path / "o.st").exists()


def test_truncated_data(sample, tmp_path):
    raw = sample.read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(raw[: len(raw) - 1000])
    msg = _assert_clean_failure(tmp_path, p, tmp_path / "o.st", "truncated")
    assert "tensor '" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight(tmp_path, bad):
    w = torch.randn(128, 128)
    w[5, 7] = bad
    save_file({"blocks.0.fc.weight": w.bfloat16(), "blocks.1.fc.weight": torch.randn(128, 128).bfloat16()},
              str(tmp_path / "in.st"))
    msg = _assert_clean_failure(tmp_path, tmp_path / "in.st", tmp_path / "o.st", "NaN or Inf")
    assert "tensor 'blocks.0.fc.weight'" in msg and "--exclude '^blocks.0.fc$'" in msg
    assert not (tmp_path / "o.st").exists()


def test_output_equal_to_input(sample, tmp_path):
    _assert_clean_failure(tmp_path, sample, sample, "output path is the input", overwrite=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(sample)
    _assert_clean_failure(tmp_path, sample, link, "output path is the input", overwrite=True)


def test_existing_output_needs_overwrite(sample, tmp_path):
    out = tmp_path / "o.st"
    out.write_bytes(b"precious")
    _assert_clean_failure(tmp_path, sample, out, "already exists")
    assert out.read_bytes() == b"precious"
    quantkit.convert(sample, out, overwrite=True)
    assert out.read_bytes() != b"precious"


def test_already_quantized_input(sample, tmp_path):
    q = tmp_path / "q.st"
    quantkit.convert(sample, q)
    _assert_clean_failure(tmp_path, q, tmp_path / "o.st", "already holds quantized layers")


def test_output_directory_not_writable(sample, tmp_path, monkeypatch):
    import tempfile

    def deny(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", deny)
    _assert_clean_failure(tmp_path, sample, tmp_path / "o.st", "not writable")
    monkeypatch.undo()
    _assert_clean_failure(tmp_path, sample, tmp_path / "missing" / "o.st", "does not exist")


def test_disk_full_injected(sample, tmp_path, monkeypatch):
    real = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd, data, pos):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)
    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    out = tmp_path / "o.st"
    _assert_clean_failure(tmp_path, sample, out, "no space left")
    assert not out.exists()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_on_a_small_tmpfs(sample, tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the path")
    try:
        out = mnt / "o.st"
        _assert_clean_failure(tmp_path, sample, out, "no space left")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_unknown_format_and_bad_options(sample, tmp_path):
    with pytest.raises(quantkit.UsageError, match="unknown format"):
        quantkit.convert(sample, tmp_path / "o.st", format="int4")
    with pytest.raises(quantkit.UsageError, match="not a valid regular expression"):
        quantkit.convert(sample, tmp_path / "o.st", exclude=["("])
    with pytest.raises(quantkit.UsageError, match="power of two"):
        quantkit.convert(sample, tmp_path / "o.st", format="int8-block", block_size=96)
    assert not (tmp_path / "o.st").exists()


def test_output_has_ordinary_file_permissions(sample, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o.st"
        quantkit.convert(sample, out)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("device", ["cpu", "cpu-device-path"])
def test_progress_reports_bytes_read_and_written(sample, tmp_path, device, monkeypatch):
    """progress(read, total, tensor, written) once per input tensor: read climbs to the input's tensor
    bytes, written never falls and stays within the output; the CLI turns both into GB/s."""
    if device == "cpu-device-path":  # the GPU pipeline's buffers and reader thread, on the CPU
        import importlib
        qc = importlib.import_module("quantkit.convert")
        monkeypatch.setattr(qc, "_make_quantizer", lambda layers, reader, dev: qc._device_quantizer(layers, reader, dev))
    calls = []
    out = tmp_path / "o.safetensors"
    rep = quantkit.convert(sample, out, format="int8-block", device="cpu",
                           progress=lambda *a: calls.append(a))
    from quantkit.safetensors_io import SafetensorsReader
    with SafetensorsReader(sample) as r:
        names = [t.name for t in r.tensors_in_order]
        total = sum(t.nbytes for t in r.tensors_in_order)
    assert [c[2] for c in calls] == names
    reads = [c[0] for c in calls]
    written = [c[3] for c in calls]
    assert all(c[1] == total for c in calls) and reads == sorted(reads) and reads[-1] == total
    assert written == sorted(written) and 0 < written[0] and written[-1] <= rep.bytes_out == out.stat().st_size


def test_cli_rates_over_a_window():
    from quantkit.cli import Rates
    now = [0.0]
    r = Rates(window=2.0, clock=lambda: now[0])
    assert r.text() == "read -- / write -- GB/s"
    for t, rd, wr in ((0, 0, 0), (1, 1e9, 0), (2, 3e9, 1e9), (3, 5e9, 2e9), (4, 5e9, 4e9)):
        now[0] = t
        r.add(int(rd), int(wr))
    assert r.text() == "read 1.00 / write 1.50 GB/s"  # the last 2 s: 3 -> 5 GB read, 1 -> 4 GB written


def test_cuda_unavailable_is_a_usage_error(sample, tmp_path, monkeypatch):
    """Runs everywhere: on a CUDA machine too, CUDA is made to look absent."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(quantkit.UsageError, match=f"device '{device}' requested but CUDA is not available"):
            quantkit.convert(sample, tmp_path / "o.st", device=device)
    assert sorted(p.name for p in tmp_path.iterdir()) == [sample.name]
