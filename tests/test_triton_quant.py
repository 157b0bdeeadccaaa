"""Triton quantizers vs the torch reference, bit for bit (q and scale), and the backend dispatcher.

Without a GPU the kernels run on CPU under ``TRITON_INTERPRET=1`` (set below, before the kernels
module is imported); shapes stay small so the interpreter stays fast. ``-m gpu`` runs the same
checks on CUDA with larger random shapes and several seeds.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # conftest.py sets it too, before anything imports triton

pytest.importorskip("triton")

from quantkit import backend, reference  # noqa: E402
from quantkit.errors import QuantkitError, UsageError  # noqa: E402
from quantkit.formats import FORMATS  # noqa: E402
from quantkit.kernels import triton_quant  # noqa: E402

if not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl
    if not isinstance(tl.standard.max, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it earlier (tests/conftest.py)",
                    pytrace=False)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
# Interpreter runs use tiny tiles so that every loop, mask and second pass is exercised.
SMALL = dict(flat_block=512, programs=3, row_tile=1024, block_tile=1024)


def dev_params():
    return ["cpu", CUDA]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):
        return t.view(torch.uint8)
    return t.view(torch.int32)


def region_mask(scale, shape, spec, b):
    """Elements whose scale is finite (q is specified there)."""
    fin = torch.isfinite(scale)
    if spec.granularity == "tensor":
        return fin.expand(shape)
    if spec.granularity == "row":
        return fin.expand(shape)
    return fin.repeat_interleave(b, 0).repeat_interleave(b, 1)


def run(w, spec, b, device, **kw):
    if device == "cuda":
        w = w.cuda()
        q, s, sig, noi = triton_quant.quantize(w, spec, b, **kw)
        torch.cuda.synchronize()
        return q.cpu(), s.cpu(), float(sig), float(noi)
    q, s, sig, noi = triton_quant.quantize(w, spec, b, **{**SMALL, **kw})
    return q, s, float(sig), float(noi)


def assert_matches_reference(w, spec, b, device, **kw):
    q, s, sig, noi = run(w, spec, b, device, **kw)
    qr, sr = reference.quantize(w, spec, b)
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape and s.dtype == torch.float32
    # scale: same NaN positions, same bits elsewhere (NaN payloads may differ)
    assert torch.equal(torch.isnan(s), torch.isnan(sr))
    keep = ~torch.isnan(sr)
    assert torch.equal(as_bits(s)[keep], as_bits(sr)[keep]), "scale bits differ"
    m = region_mask(sr, tuple(w.shape), spec, b)
    bad = (as_bits(q) != as_bits(qr)) & m
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{int(bad.sum())} q mismatches, first at {i}: w={w[tuple(i)].item()!r} "
                             f"got {as_bits(q)[tuple(i)].item():#x} want {as_bits(qr)[tuple(i)].item():#x}")
    return q, s, sig, noi, qr, sr


def rand_weight(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, 1 % k] *= 40  # outlier input channel
    w[2 % n, :] = 0  # an all-zero row: scale 1.0 in its row / tiles
    w[5 % n, 7 % k] = -0.0
    return w.to(dtype)


def true_sums(w, qr, sr, spec, b):
    w64 = w.double()
    deq = (qr.float() * reference.expand_scale(sr, tuple(w.shape), spec, b)).double()
    return float((w64 * w64).sum()), float(((w64 - deq) ** 2).sum())


# ---------------------------------------------------------------- random weights, every format

FORMAT_CASES = [("fp8", 128), ("fp8-e5m2", 128), ("int8-tensor", 128), ("int8-row", 128),
                ("int8-block", 64), ("int8-block", 128)]


@pytest.mark.parametrize("fmt,b", FORMAT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreter_matches_reference(fmt, b, dtype):
    spec = FORMATS[fmt]
    n, k = (128, 192) if b == 64 else (128, 256)
    if spec.granularity != "block":
        n, k = 40, 200  # ragged: masked tails in every kernel
    w = rand_weight(n, k, dtype, seed=sum(map(ord, fmt)) + b)
    # row_tile 64 < k: the row kernel's two-pass loop over K
    _, _, sig, noi, qr, sr = assert_matches_reference(w, spec, b, "cpu", row_tile=64)
    ts, tn = true_sums(w, qr, sr, spec, b)
    assert sig == pytest.approx(ts, rel=1e-5)
    assert noi == pytest.approx(tn, rel=1e-4)


@pytest.mark.parametrize("b", [16, 32])
def test_interpreter_small_blocks(b):
    w = rand_weight(64, 96, torch.bfloat16, seed=b)
    assert_matches_reference(w, FORMATS["int8-block"], b, "cpu")


@pytest.mark.parametrize("fmt", ["fp8", "int8-row", "int8-block"])
def test_interpreter_default_tiles(fmt):
    """The production tile sizes (one-pass rows, 128x128 tiles in one pass) under the interpreter."""
    w = rand_weight(128 if fmt == "int8-block" else 32, 256, torch.bfloat16, seed=3)
    q, s, *_ = triton_quant.quantize(w, FORMATS[fmt], 128)
    qr, sr = reference.quantize(w, FORMATS[fmt], 128)
    assert torch.equal(as_bits(q), as_bits(qr)) and torch.equal(s, sr)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fmt,b", FORMAT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_reference(fmt, b, dtype, seed):
    spec = FORMATS[fmt]
    shapes = [(1024, 3072), (3072, 1024), (768, 4096 + 512)]
    if spec.granularity != "block":
        shapes += [(1000, 1500), (7, 20000), (3, 5)]
    for i, (n, k) in enumerate(shapes):
        w = rand_weight(n, k, dtype, seed=seed * 10 + i)
        _, _, sig, noi, qr, sr = assert_matches_reference(w, spec, b, "cuda")
        ts, tn = true_sums(w, qr, sr, spec, b)
        assert sig == pytest.approx(ts, rel=1e-4) and noi == pytest.approx(tn, rel=1e-3)


# ---------------------------------------------------------------- edge cases (CPU and GPU)

def fp8_grid(dtype):
    """Every finite non-negative value of an fp8 dtype, ascending."""
    v = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    v = v[torch.isfinite(v) & (v >= 0)]
    return torch.unique(v)


@pytest.mark.parametrize("device", dev_params())
@pytest.mark.parametrize("fmt", ["fp8", "fp8-e5m2"])
def test_fp8_ties_and_near_ties_round_to_even(device, fmt):
    """Values at every midpoint of the fp8 grid (subnormals included) and one fp32 ulp either side,
    both signs, with scale exactly 1.0: only correct round-to-nearest-even gets all of them."""
    spec = FORMATS[fmt]
    g = fp8_grid(spec.weight_dtype)
    mids = (g[:-1] + g[1:]) / 2
    vals = torch.cat([g, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9))])
    vals = torch.cat([vals, -vals, torch.tensor([spec.qmax, -0.0])])
    w = torch.zeros(8, triton_quant.FLAT_BLOCK // 8 if device == "cuda" else 256)
    w.view(-1)[:vals.numel()] = vals[: w.numel()]
    assert vals.numel() <= w.numel()
    _, s, *_ = assert_matches_reference(w, spec, 128, device)
    assert float(s) == 1.0


@pytest.mark.parametrize("device", dev_params())
def test_int8_ties_round_half_even_and_clamp(device):
    spec = FORMATS["int8-row"]
    halves = torch.arange(-127, 127, dtype=torch.float32) + 0.5
    w = torch.zeros(4, 256)
    w[0, :254] = halves
    w[0, 254] = 127.0  # row amax 127: scale exactly 1.0
    w[1, :3] = torch.tensor([1.0, -1.0, 0.3])  # x = w / (1/127) rounds just above 127: clamp path
    w[2, 0] = -0.0  # an all-zero row with a negative zero
    w[3] = torch.linspace(-3.0, 3.0, 256)
    q, s, *_ = assert_matches_reference(w, spec, 128, device)
    assert float(s[0]) == 1.0 and float(s[2]) == 1.0
    assert q[0, :4].tolist() == [-126, -126, -124, -124]  # -126.5, -125.5, -124.5, -123.5
    for fmt in ("int8-tensor", "int8-block"):
        assert_matches_reference(w[:, :128].contiguous().repeat(32, 1), FORMATS[fmt], 128, device)


@pytest.mark.parametrize("device", dev_params())
@pytest.mark.parametrize("fmt,b", FORMAT_CASES)
def test_all_zero_weight(device, fmt, b):
    spec = FORMATS[fmt]
    w = torch.zeros(128, 256, dtype=torch.bfloat16)
    w[0, :5] = -0.0
    q, s, sig, noi, *_ = assert_matches_reference(w, spec, b, device)
    assert bool((s == 1.0).all()) and sig == 0.0 and noi == 0.0


@pytest.mark.parametrize("device", dev_params())
@pytest.mark.parametrize("fmt,b", FORMAT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_weights(device, fmt, b, dtype):
    """Regions of subnormal weights: tiny scales, exact division, no flush to zero."""
    spec = FORMATS[fmt]
    tiny = torch.finfo(dtype).smallest_normal
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(128, 256, generator=g) * 2 - 1) * 0.05
    w[:64, :128] = ((torch.rand(64, 128, generator=g) * 2 - 1) * tiny)  # subnormal tile
    w[70, :] *= tiny  # a row of tiny values
    w = w.to(dtype)
    assert_matches_reference(w, spec, b, device)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on NaN casts
@pytest.mark.parametrize("device", dev_params())
@pytest.mark.parametrize("fmt,b", FORMAT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_and_inf_give_the_reference_scale(device, fmt, b, dtype):
    """NaN in one region, Inf in another: the scale is NaN / Inf exactly where the reference's is,
    so the converter's isfinite(scale) check refuses the weight; other regions stay exact."""
    spec = FORMATS[fmt]
    w = rand_weight(128, 256, torch.float32, seed=11)
    w[3, 5] = float("nan")
    w[100, 200] = float("-inf")
    w[101, 130] = float("inf")
    w = w.to(dtype)
    _, s, *_ = assert_matches_reference(w, spec, b, device)
    assert not bool(torch.isfinite(s).all())
    with pytest.raises(QuantkitError, match="NaN or Inf"):
        backend.check_finite(s, tensor="x.weight", layer="x")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("device", dev_params())
def test_inf_only_gives_inf_scale(device):
    w = torch.ones(16, 64)
    w[1, 1] = float("inf")
    _, s, *_ = assert_matches_reference(w, FORMATS["fp8"], 128, device)
    assert float(s) == float("inf")


# ---------------------------------------------------------------- dispatcher

@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)


def test_parse_device(no_backend_env):
    assert backend.parse_device("cpu") == torch.device("cpu")
    assert backend.parse_device(" CPU ") == torch.device("cpu")
    auto = backend.parse_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", ""):
        with pytest.raises(UsageError, match="unknown device") as e:
            backend.parse_device(bad)
        assert "auto, cpu, cuda or cuda:N" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda():
    for text in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(UsageError, match="CUDA is not available") as e:
            backend.parse_device(text)
        assert "--device cpu" in str(e.value) and e.value.exit_code == 2


@pytest.mark.gpu
def test_cuda_index_out_of_range():
    with pytest.raises(UsageError, match="does not exist"):
        backend.parse_device(f"cuda:{torch.cuda.device_count()}")
    assert backend.parse_device("cuda:0") == torch.device("cuda", 0)


def test_backend_choice_and_env(monkeypatch, no_backend_env):
    assert backend.backend_for("cpu") in ("native", "torch")  # native where a C compiler builds it
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    assert backend.backend_for("cpu") == "torch" and backend.backend_for("cuda") == "torch"
    monkeypatch.setenv(backend.BACKEND_ENV, "cuda")
    with pytest.raises(UsageError, match="QUANTKIT_BACKEND='cuda' is not a backend"):
        backend.backend_for("cpu")
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    assert backend.backend_for("cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UsageError, match="needs a CUDA device"):
        backend.backend_for("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.backend_for("cpu") == "triton"
    monkeypatch.delenv(backend.BACKEND_ENV)
    assert backend.backend_for("cuda") == "triton"  # auto: triton imports here


def test_forced_triton_without_triton(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    monkeypatch.setattr(backend, "_triton_import_error", lambda: "ImportError: No module named 'triton'")
    with pytest.raises(QuantkitError, match="Triton cannot be imported") as e:
        backend.backend_for("cuda")
    assert "pip install triton" in str(e.value)
    monkeypatch.delenv(backend.BACKEND_ENV)
    assert backend.backend_for("cuda") == "torch"  # auto falls back


@pytest.mark.parametrize("fmt,b", FORMAT_CASES)
def test_torch_backend_cpu_matches_reference_and_sums(fmt, b, no_backend_env):
    spec = FORMATS[fmt]
    w = rand_weight(256, 384, torch.bfloat16, seed=5)
    r = backend.quantize_tensor(w, spec, b, "cpu")
    qr, sr = reference.quantize(w, spec, b)
    assert torch.equal(as_bits(r.q), as_bits(qr)) and torch.equal(r.scale, sr)
    ts, tn = true_sums(w, qr, sr, spec, b)
    assert float(r.signal) == pytest.approx(ts, rel=1e-5) and float(r.noise) == pytest.approx(tn, rel=1e-4)
    assert r.sqnr_db() == pytest.approx(reference.sqnr(w, reference.dequantize(qr, sr, spec, b)), abs=1e-3)


@pytest.mark.parametrize("fmt,b", [("fp8", 128), ("int8-row", 128), ("int8-block", 64)])
def test_triton_backend_agrees_with_torch_backend(fmt, b, no_backend_env):
    """The two backends called directly give the same bits and (nearly) the same SQNR sums."""
    spec = FORMATS[fmt]
    w = rand_weight(128, 192, torch.float16, seed=9)
    t = backend.quantize_torch(w, spec, b)
    g = backend.quantize_triton(w, spec, b)
    assert torch.equal(as_bits(g.q), as_bits(t.q)) and torch.equal(g.scale, t.scale)
    assert float(g.signal) == pytest.approx(float(t.signal), rel=1e-5)
    assert float(g.noise) == pytest.approx(float(t.noise), rel=1e-4)


def test_backend_refuses_what_the_format_cannot_store(no_backend_env):
    with pytest.raises(QuantkitError, match="not divisible by block size 128"):
        backend.quantize_tensor(torch.ones(100, 128), FORMATS["int8-block"], 128, "cpu")
    with pytest.raises(QuantkitError, match="cannot quantize a int32 weight"):
        backend.quantize_tensor(torch.ones(4, 4, dtype=torch.int32), FORMATS["fp8"], 128, "cpu")
    with pytest.raises(QuantkitError, match="empty weight"):
        backend.quantize_tensor(torch.ones(0, 4), FORMATS["fp8"], 128, "cpu")
    with pytest.raises(QuantkitError, match="3-D weight"):
        backend.quantize_tensor(torch.ones(2, 2, 2), FORMATS["fp8"], 128, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,b", FORMAT_CASES)
def test_gpu_dispatch(fmt, b, monkeypatch):
    """quantize_tensor on cuda: Triton by default, torch when forced; same bits, results on the GPU."""
    spec = FORMATS[fmt]
    w = rand_weight(1024, 2048, torch.bfloat16, seed=1).pin_memory()
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    assert backend.backend_for("cuda") == "triton"
    g = backend.quantize_tensor(w, spec, b, "cuda")
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    t = backend.quantize_tensor(w, spec, b, "cuda")
    assert g.q.is_cuda and g.scale.is_cuda and g.signal.is_cuda
    qr, sr = reference.quantize(w, spec, b)
    for r in (g, t):
        assert torch.equal(as_bits(r.q.cpu()), as_bits(qr)) and torch.equal(r.scale.cpu(), sr)
    assert float(g.noise) == pytest.approx(float(t.noise), rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fmt,b", FORMAT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_torch_backend_matches_cpu_reference(fmt, b, dtype, seed):
    """The torch fallback on CUDA gives the CPU reference's bits (its scale division is exact)."""
    spec = FORMATS[fmt]
    w = rand_weight(1024, 2048, dtype, seed=seed)
    r = backend.quantize_torch(w.cuda(), spec, b)
    qr, sr = reference.quantize(w, spec, b)
    assert torch.equal(as_bits(r.q.cpu()), as_bits(qr)) and torch.equal(as_bits(r.scale.cpu()), as_bits(sr))
    ts, tn = true_sums(w, qr, sr, spec, b)
    assert float(r.signal) == pytest.approx(ts, rel=1e-4) and float(r.noise) == pytest.approx(tn, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,b", [("fp8", 128), ("int8-row", 128), ("int8-block", 128)])
def test_gpu_offsets_beyond_2_31(fmt, b):
    """A weight of more than 2^31 elements: element offsets are 64-bit in every kernel. The tail
    rows (all past element 2^31) are checked against the reference."""
    spec = FORMATS[fmt]
    k = 4096
    n = (1 << 31) // k + 2 * b
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g)
    q, s, *_ = triton_quant.quantize(w, spec, b)
    tail = w[-b:].cpu()
    if spec.granularity == "tensor":
        want_s = reference.scale_from_amax(w.abs().amax().float().cpu(), spec)
        want_q = reference.quantize_with_scale(tail, want_s, spec, b)
        got_s = s.cpu()
    else:
        want_q, want_s = reference.quantize(tail, spec, b)
        got_s = s[-(b if spec.granularity == "row" else 1):].cpu()
    assert torch.equal(as_bits(got_s), as_bits(want_s))
    assert torch.equal(as_bits(q[-b:].cpu()), as_bits(want_q))
    del w, q
    torch.cuda.empty_cache()


def test_quantize_tensor_routes_by_backend(monkeypatch, no_backend_env):
    """quantize_tensor calls the backend backend_for names (CPU: torch when forced, triton when forced
    under the interpreter), and both give the same bits."""
    calls = []
    real_torch, real_triton = backend.quantize_torch, backend.quantize_triton
    monkeypatch.setattr(backend, "quantize_torch", lambda *a: calls.append("torch") or real_torch(*a))
    monkeypatch.setattr(backend, "quantize_triton", lambda *a: calls.append("triton") or real_triton(*a))
    spec = FORMATS["int8-row"]
    w = rand_weight(16, 96, torch.bfloat16, seed=4)
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    a = backend.quantize_tensor(w, spec, 128)
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    b = backend.quantize_tensor(w, spec, 128, "cpu")
    assert calls == ["torch", "triton"]
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
