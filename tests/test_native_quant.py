"""The native CPU kernels (``cpu_quant.c``) against the torch reference, bit for bit; their build,
cache and fallback; and the converter's output with them against the torch path's."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from quantkit import backend, reference
from quantkit.errors import QuantkitError, UsageError
from quantkit.formats import FORMATS, LayerOpts
from quantkit.kernels import native

pytestmark = pytest.mark.skipif(native.available() is not None, reason=f"no native build: {native.available()}")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SCALED = {n: f for n, f in FORMATS.items() if f.kernel is not None}  # cpu_quant.c's formats (cpu_blocks.c's: test_new_formats.py)
CASES = [(name, b) for name, spec in SCALED.items()
         for b in ((128, 64, 32, 16) if spec.granularity == "block" else (128,))]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def wide_weight(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Columns spanning 10 decades (fp8 subnormals, int8 zeros), a zero row, signed zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-8, 2, k)[torch.randperm(k, generator=g)]
    w[0, 0] = 0.0
    if n > 2:
        w[1] = 0.0
        w[2, : min(k, 3)] = -0.0
    return w.to(dtype)


def check(w: torch.Tensor, fmt: str, b: int) -> None:
    spec = FORMATS[fmt]
    q, s, stats = native.quantize_tensor(w, spec, b)
    qr, sr = reference.quantize(w, spec, b)
    assert q.dtype == qr.dtype and s.shape == sr.shape
    assert torch.equal(bits(s), bits(sr)), f"{fmt} b={b} {w.dtype} {tuple(w.shape)}: scales differ"
    assert torch.equal(bits(q), bits(qr)), f"{fmt} b={b} {w.dtype} {tuple(w.shape)}: " \
        f"{int((bits(q) != bits(qr)).sum())} q bytes differ"
    want = reference.sqnr(w.float(), reference.dequantize(qr, sr, spec, b))
    assert stats.sqnr_db == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,b", CASES)
def test_matches_reference(fmt, b, dtype):
    # 1000 and 136 columns leave a tail after the last 8-lane vector; (3, 7) and (1, 1) are all tail
    for shape in [(256, 384), (128, 1000), (64, 136), (3, 7), (1, 1)]:
        if FORMATS[fmt].cannot_take(shape, LayerOpts(b)) is None:
            check(wide_weight(*shape, dtype, seed=shape[1] + b), fmt, b)


def test_rounding_ties_and_clamp():
    """With amax = qmax the scale is 1, so w / scale is w itself: ties round to even, both signs."""
    int8 = torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.5, -0.5, 1.5, -126.5, 0.49999997]])
    q, s, _ = native.quantize_tensor(int8, FORMATS["int8-tensor"], 128)
    assert float(s) == 1.0 and q.tolist() == [[127, 2, 4, -2, 0, 0, 2, -126, 0]]
    check(int8, "int8-tensor", 128)
    # e4m3fn: ties between 1 and 1.125, 1.125 and 1.25; subnormal ties at 0.5 and 1.5 steps (2^-9)
    e4 = torch.tensor([[448.0, 1.0625, 1.1875, -1.0625, 2.0 ** -10, 3 * 2.0 ** -10, -(2.0 ** -10),
                        2.0 ** -6 - 2.0 ** -10, 440.0, 2.0 ** -6]])
    q, s, _ = native.quantize_tensor(e4, FORMATS["fp8"], 128)
    assert float(s) == 1.0
    assert q.float().tolist() == [[448.0, 1.0, 1.25, -1.0, 0.0, 2.0 ** -8, -0.0, 2.0 ** -6, 448.0, 2.0 ** -6]]
    check(e4, "fp8", 128)
    e5 = torch.tensor([[57344.0, 1.125, 1.375, 2.0 ** -17, 3 * 2.0 ** -17, 2.0 ** -14, -49152.0]])
    check(e5, "fp8-e5m2", 128)


def test_fp16_special_inputs():
    """fp16 subnormals convert exactly; inf and NaN give a non-finite scale, as the reference's."""
    sub = torch.tensor([[2.0 ** -24, -(2.0 ** -20), 6e-5, 1.0, -3.0, 0.0, 2.0 ** -14, 65504.0]], dtype=torch.float16)
    for fmt, spec in SCALED.items():
        if spec.granularity != "block":
            check(sub, fmt, 128)
    for bad in (float("inf"), float("nan")):
        w = torch.ones(16, 32, dtype=torch.float16)
        w[3, 5] = bad
        for fmt in ("fp8", "int8-row", "int8-block"):
            spec = FORMATS[fmt]
            _, s, _ = native.quantize_tensor(w, spec, 16)
            _, sr = reference.quantize(w, spec, 16)
            assert torch.equal(torch.isfinite(s), torch.isfinite(sr)) and not bool(torch.isfinite(s).all())
            assert torch.equal(s.isnan(), sr.isnan())


def test_non_finite_weights_match_reference_scales():
    for dtype in DTYPES:
        w = torch.randn(64, 64).to(dtype)
        w[5, 9], w[40, 60] = float("nan"), float("-inf")
        for fmt, b in [("fp8", 128), ("int8-tensor", 128), ("int8-row", 128), ("int8-block", 32)]:
            _, s, _ = native.quantize_tensor(w, FORMATS[fmt], b)
            _, sr = reference.quantize(w, FORMATS[fmt], b)
            assert torch.equal(s.isnan(), sr.isnan()) and torch.equal(s.isinf(), sr.isinf())
            assert torch.equal(s[torch.isfinite(s)], sr[torch.isfinite(sr)])


def test_results_do_not_depend_on_thread_count():
    w = wide_weight(384, 256, torch.bfloat16, seed=3)
    threads = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out.append([native.quantize_tensor(w, FORMATS[f], 128) for f in ("fp8", "int8-block")])
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        for (q0, s0, e0), (q1, s1, e1) in zip(out[0], other):
            assert torch.equal(bits(q0), bits(q1)) and torch.equal(s0, s1)
            assert (e0.signal, e0.noise) == (e1.signal, e1.noise)  # exact: fixed summation order


def test_out_buffer_and_backend_entry_point():
    w = wide_weight(128, 256, torch.bfloat16, seed=8)
    spec = FORMATS["int8-block"]
    buf = torch.full((128 * 256 + 7,), 0x55, dtype=torch.uint8)
    q, _, _ = native.quantize_tensor(w, spec, 64, out=buf)
    assert q.data_ptr() == buf.data_ptr() and bool((buf[128 * 256:] == 0x55).all())
    r = backend.quantize_native(w, spec, 64)
    qr, sr = reference.quantize(w, spec, 64)
    assert torch.equal(bits(r.q), bits(qr)) and torch.equal(r.scale, sr)
    assert r.sqnr_db() == pytest.approx(reference.sqnr(w.float(), reference.dequantize(qr, sr, spec, 64)), abs=1e-5)
    with pytest.raises(QuantkitError, match="cannot store as int8-block"):
        backend.quantize_native(torch.ones(100, 128), spec, 128)


# ---------------------------------------------------------------- build, cache, fallback

@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """native with nothing loaded yet and its own cache folder (the real state comes back after)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    return tmp_path / "cache"


def test_build_is_cached_by_content(fresh_native, monkeypatch):
    assert native.available() is None
    built = sorted(fresh_native.iterdir())
    assert len(built) == 1 and built[0].name.startswith("cpu_quant-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    assert native.available() is None
    assert sorted(fresh_native.iterdir()) == built and built[0].stat().st_mtime_ns == stamp  # reused
    check(wide_weight(32, 48, torch.float16, 1), "fp8", 128)


def test_unwritable_cache_builds_into_a_private_folder(fresh_native, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(native.CACHE_ENV, str(blocker / "cache"))  # mkdir under a file fails
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert native.available() is None
    check(wide_weight(16, 40, torch.bfloat16, 2), "int8-row", 128)
    assert list(tmp.iterdir()) == []  # the private folder is gone once the library is loaded


def test_no_compiler_falls_back_to_torch(fresh_native, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    why = native.available()
    assert why is not None and "no C compiler" in why
    assert backend.backend_for("cpu") == "torch"
    from quantkit import quantize
    assert backend.cpu_quantizer() is quantize.quantize_tensor
    monkeypatch.setenv(backend.BACKEND_ENV, "native")
    with pytest.raises(QuantkitError, match="QUANTKIT_BACKEND=native but the CPU kernels cannot be built") as e:
        backend.backend_for("cpu")
    assert "install a C compiler" in str(e.value)
    assert not fresh_native.exists() or not any(fresh_native.iterdir())


def test_failing_compiler_is_reported_and_leaves_nothing(fresh_native, monkeypatch, tmp_path):
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\necho 'badcc: error: nothing works' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    why = native.available()
    assert why is not None and "could not build cpu_quant.c" in why and "nothing works" in why
    assert backend.backend_for("cpu") == "torch"
    assert [p.name for p in fresh_native.iterdir()] == []  # no half-written library left behind


def test_native_forced_on_cuda_is_a_usage_error(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "native")
    with pytest.raises(UsageError, match="runs on the CPU"):
        backend.backend_for("cuda")
    assert backend.backend_for("cpu") == "native"


def test_auto_picks_native_on_cpu(monkeypatch):
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    assert backend.backend_for("cpu") == "native"
    assert backend.cpu_quantizer() is native.quantize_tensor
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    assert backend.backend_for("cpu") == "torch"


# ---------------------------------------------------------------- the converter

@pytest.mark.parametrize("fmt", [n for n, f in FORMATS.items() if f.kernel])
def test_convert_output_identical_to_torch_path(fmt, sample, tmp_path):
    """Whole output files, byte for byte: native (auto) vs QUANTKIT_BACKEND=torch."""
    outs = []
    for env in ("auto", "torch"):
        dst = tmp_path / f"{env}.safetensors"
        r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(sample), "--format", fmt,
                            "--device", "cpu", "-o", str(dst)],
                           env={**os.environ, backend.BACKEND_ENV: env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(dst.read_bytes())
    assert len(outs[0]) > 0 and outs[0] == outs[1]


def test_fp16_subnormals_with_flush_to_zero_on(tmp_path):
    """A process that turned flush-to-zero on (``torch.set_flush_denormal(True)``) before the kernel's
    threads start gets the same bytes for fp16 subnormal weights: their conversion has no fp32
    denormal operand."""
    w = (torch.arange(1, 1024, dtype=torch.float32) * 2.0 ** -24).to(torch.float16).reshape(1, -1)
    path = tmp_path / "w.pt"
    torch.save(w, path)
    code = ("import sys, torch\n"
            "assert torch.set_flush_denormal(True)\n"
            "from quantkit.kernels import native\nfrom quantkit.formats import FORMATS\n"
            f"w = torch.load({str(path)!r})\n"
            "for f in ('fp8', 'int8-tensor', 'int8-row'):\n"
            "    q, s, _ = native.quantize_tensor(w, FORMATS[f], 128)\n"
            "    print(f, q.view(torch.uint8).tolist(), float(s.reshape(-1)[0]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for line, f in zip(r.stdout.splitlines(), ("fp8", "int8-tensor", "int8-row")):
        qr, sr = reference.quantize(w, FORMATS[f], 128)
        assert line == f"{f} {qr.view(torch.uint8).tolist()} {float(sr.reshape(-1)[0])}"
