"""The torch reference of int8-convrot, mxfp8 and nvfp4 (``quantkit.formats_next``):

* helpers against comfy-kitchen's own (Hadamard matrix, block-scale swizzle, E2M1 rounding/packing);
* dequantization bit-identical to comfy-kitchen's layouts, the QuantizedTensor built from our stored
  tensors exactly as ComfyUI's loader (``comfy/ops.py`` ``_load_quantized_module``) builds it;
* our stored tensors have the names, dtypes and shapes of kitchen's own quantizer's, and with the
  scale search off mxfp8/nvfp4 are byte-identical to it;
* quality on all-MiniLM-L6-v2 (bf16): per-layer SQNR against kitchen's quantizer, held-out sentence
  embedding error, each floor from a measurement with its margin stated.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import at_most
from quantkit.errors import QuantkitError
from quantkit.formats_next import FORMATS, blocked, e2m1, e8m0, hadamard, int8_convrot, mxfp8, nvfp4

ck = pytest.importorskip("comfy_kitchen.tensor")
from comfy_kitchen import float_utils as ckf  # noqa: E402
from comfy_kitchen.tensor.int8_utils import _build_hadamard  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: on a loaded 2-core machine every multi-threaded elementwise op pays
    ~16 ms of thread wake-up (measured), one thread runs them ~10x faster. Our ops and kitchen's run
    under the same setting, so bit-exactness is unaffected (test_quantize_thread_independent checks
    that the quantizers give the same bytes with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def weight(n, k, case="normal", dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if k > 3:
        w[:, 3] *= 30  # an outlier input channel
    if case == "specials":
        w[0] = 0  # a zero row
        if n > 2:
            w[2, : min(k, 40)] = 0  # zero blocks
            w[1] *= 1e-6  # a row far below the others
    elif case == "huge":
        w *= 1e35
    elif case == "tiny":
        w *= 1e-35  # bf16/fp32 subnormals among the values, scales near the bottom of fp32
    return w.to(dtype)


# ---------------------------------------------------------------- how ComfyUI builds the tensor

STORAGE = {"int8_tensorwise": torch.int8, "mxfp8": torch.float8_e4m3fn, "nvfp4": torch.uint8}  # QUANT_ALGOS storage_t


def kitchen_tensor(stored: dict[str, torch.Tensor], marker: dict, dtype: torch.dtype):
    """``_load_quantized_module`` (ComfyUI 0271a469) for these formats: weight ``.to(storage_t)``;
    mxfp8 scale viewed as float8_e8m0fnu; nvfp4 scale = weight_scale_2, block_scale = weight_scale
    viewed as float8_e4m3fn; int8_tensorwise scale = weight_scale plus convrot/convrot_groupsize;
    orig_dtype = the compute dtype, orig_shape = the module's (out, in)."""
    fmt = marker["format"]
    shape = tuple(marker["orig_shape"])
    q = stored["weight"].to(dtype=STORAGE[fmt])
    if fmt == "mxfp8":
        params = ck.TensorCoreMXFP8Layout.Params(scale=stored["weight_scale"].view(torch.float8_e8m0fnu),
                                                 orig_dtype=dtype, orig_shape=shape)
        return ck.QuantizedTensor(q, "TensorCoreMXFP8Layout", params)
    if fmt == "nvfp4":
        params = ck.TensorCoreNVFP4Layout.Params(scale=stored["weight_scale_2"],
                                                 block_scale=stored["weight_scale"].view(torch.float8_e4m3fn),
                                                 orig_dtype=dtype, orig_shape=shape)
        return ck.QuantizedTensor(q, "TensorCoreNVFP4Layout", params)
    params = ck.TensorWiseINT8Layout.Params(scale=stored["weight_scale"], orig_dtype=dtype, orig_shape=shape,
                                            convrot=True, convrot_groupsize=int(marker["convrot_groupsize"]))
    return ck.QuantizedTensor(q, "TensorWiseINT8Layout", params)


def kitchen_quantizer(w: torch.Tensor, fmt: str, group: int | None = None):
    """Kitchen's own quantizer on the fp32-upcast weight (ComfyUI's QUANT_ALGOS layouts)."""
    wf = w.float()
    if fmt == "mxfp8":
        return ck.QuantizedTensor.from_float(wf, "TensorCoreMXFP8Layout")
    if fmt == "nvfp4":
        return ck.QuantizedTensor.from_float(wf, "TensorCoreNVFP4Layout")
    return ck.QuantizedTensor.from_float(wf, "TensorWiseINT8Layout", per_channel=True, convrot=True,
                                         convrot_groupsize=group)


# ---------------------------------------------------------------- helpers

@pytest.mark.parametrize("g", [4, 16, 64, 256])
def test_hadamard_matrix_is_kitchens(g):
    h = hadamard.matrix(g)
    assert same_bits(h, _build_hadamard(g, dtype=torch.float32).contiguous())
    assert torch.equal(h, h.T) and torch.equal(h @ h, torch.eye(g))  # symmetric, self-inverse (exact)


def test_hadamard_sizes():
    assert [g for g in range(1, 1100) if hadamard.is_power_of_4(g)] == [4, 16, 64, 256, 1024]
    with pytest.raises(ValueError):
        hadamard.matrix(128)


@pytest.mark.parametrize("g", [4, 16, 64, 256])
def test_butterfly_is_the_matrix(g):
    # small integers: every sum in both computations is exact, so any index slip shows
    x = torch.randint(-8, 9, (3, 2 * g), generator=torch.Generator().manual_seed(g)).float()
    assert torch.equal(hadamard.rotate(x, g), hadamard.rotate_like_kitchen(x, g))
    # real values: within a few fp32 ulps of the fp64 product
    x = weight(5, 3 * g, dtype=torch.float32, seed=1)
    exact = (x.double().reshape(5, 3, g) @ hadamard.matrix(g).double().T).reshape(5, 3 * g)
    assert float((hadamard.rotate(x, g).double() - exact).abs().max()) < 1e-6 * float(x.abs().max())


@pytest.mark.parametrize("rows,cols", [(1, 1), (128, 4), (200, 7), (256, 12), (130, 5)])
def test_swizzle_is_kitchens_to_blocked(rows, cols):
    s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    b = blocked.swizzle(s)
    assert b.shape == blocked.blocked_shape(rows, cols) == (-(-rows // 128) * 128, -(-cols // 4) * 4)
    assert torch.equal(b, ckf.to_blocked(s, flatten=False))
    assert torch.equal(blocked.unswizzle(b, rows, cols), s)
    assert torch.equal(ckf.from_blocked(b, rows, cols), s)


def test_swizzle_offsets():
    # the documented placement: tile row 32*r_hi + r_lo, column c -> offset 16*r_lo + 4*r_hi + c
    s = torch.arange(256 * 8, dtype=torch.int32).reshape(256, 8)
    flat = blocked.swizzle(s).reshape(-1)
    for r, c in [(0, 0), (1, 0), (32, 0), (33, 3), (127, 2), (128, 0), (5, 4), (200, 7)]:
        tile = (r // 128) * 2 + c // 4
        rr, cc = r % 128, c % 4
        assert int(flat[tile * 512 + 16 * (rr % 32) + 4 * (rr // 32) + cc]) == int(s[r, c])


def test_e2m1_rounding_is_kitchens():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = torch.cat([torch.linspace(-6, 6, 24001), torch.tensor(ties + [-t for t in ties] + [0.0, -0.0, 6.0, 1e-30])])
    codes = e2m1.encode(x)
    assert torch.equal(codes, ckf._f32_to_floatx_unpacked(x.clone(), 2, 1))
    assert [int(c) for c in e2m1.encode(torch.tensor(ties))] == [0, 2, 2, 4, 4, 6, 6]  # ties to even
    assert torch.equal(e2m1.lut(torch.float32)[codes.long()].view(torch.int32),
                       e2m1.round_values(x).view(torch.int32))


def test_e2m1_nibble_order_even_element_high():
    codes = torch.tensor([[2, 7, 9, 0]], dtype=torch.uint8)  # 1.0, 6.0, -0.5, 0
    packed = e2m1.pack(codes)
    assert packed.tolist() == [[0x27, 0x90]]
    assert torch.equal(packed, ckf.pack_uint4(codes, hi_first=True))
    assert torch.equal(e2m1.unpack(packed), codes)


def test_e8m0_ceil_exponent():
    vals = [1.0, 1.0000001, 0.75, 2.0 ** -126, 2.0 ** -127, 2.0 ** -140, 3.0e35, 2.0 ** 127]
    e = e8m0.ceil_exponent(torch.tensor(vals, dtype=torch.float32))
    expect = [min(254, max(1, math.ceil(math.log2(float(torch.tensor(v, dtype=torch.float32)))) + 127)) for v in vals]
    assert e.tolist() == expect == [127, 128, 127, 1, 1, 1, 245, 254]
    assert e8m0.decode(torch.tensor([0, 1, 127, 254], dtype=torch.uint8)).tolist() == [0.0, 2.0 ** -126, 1.0, 2.0 ** 127]
    assert torch.equal(e8m0.decode(torch.arange(256, dtype=torch.int32).to(torch.uint8)).view(torch.int32),
                       ckf.e8m0_to_f32(torch.arange(256, dtype=torch.int32).to(torch.uint8)).view(torch.int32))


# ---------------------------------------------------------------- group size, marker, refusals

def test_choose_group_size():
    assert int8_convrot.choose_group_size(1536) == 256
    assert int8_convrot.choose_group_size(384) == 64  # kitchen's default 256 raises on K=384
    assert int8_convrot.choose_group_size(48) == 16
    assert int8_convrot.choose_group_size(1536, 64) == 64
    assert int8_convrot.choose_group_size(4096, 1024) == 1024
    assert int8_convrot.choose_group_size(40) is None and int8_convrot.choose_group_size(8) is None
    for bad in (128, 4, 0, "256"):
        with pytest.raises(QuantkitError, match="power of 4"):
            int8_convrot.choose_group_size(1536, bad)


def test_markers():
    assert int8_convrot.marker((384, 384), torch.bfloat16) == {
        "format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64,
        "orig_dtype": "bfloat16", "orig_shape": [384, 384]}
    assert mxfp8.marker((3, 5), torch.float16) == {"format": "mxfp8", "orig_dtype": "float16", "orig_shape": [3, 5]}
    assert nvfp4.marker((3, 5), torch.float32) == {"format": "nvfp4", "orig_dtype": "float32", "orig_shape": [3, 5]}
    assert set(FORMATS) == {"int8-convrot", "mxfp8", "nvfp4"}


def test_cannot_take():
    assert "in_features 40" in int8_convrot.cannot_take((384, 40))
    assert int8_convrot.cannot_take((384, 48)) is None
    for mod in FORMATS.values():
        assert "3-D" in mod.cannot_take((2, 3, 4))
        assert mod.cannot_take((7, 0)).startswith("empty")
        assert mod.cannot_take((7, 33)) is None or mod is int8_convrot
    with pytest.raises(QuantkitError, match="in_features 40"):
        int8_convrot.quantize(weight(8, 40))


@pytest.mark.parametrize("mod", list(FORMATS.values()), ids=list(FORMATS))
def test_quantize_refuses_bad_input(mod):
    with pytest.raises(QuantkitError, match="dtype"):
        mod.quantize(torch.ones(16, 64, dtype=torch.int32))
    with pytest.raises(QuantkitError, match="2-D"):
        mod.quantize(torch.ones(2, 16, 64))
    w = weight(16, 64)
    w[3, 5] = float("nan")
    with pytest.raises(QuantkitError, match="NaN or Inf"):
        mod.quantize(w)


@pytest.mark.parametrize("mod", list(FORMATS.values()), ids=list(FORMATS))
def test_dequantize_refuses_mismatched_tensors(mod):
    w = weight(32, 64)
    stored = mod.quantize(w)
    marker = mod.marker((32, 64), w.dtype)
    with pytest.raises(QuantkitError, match="orig_shape"):
        mod.dequantize(stored, {k: v for k, v in marker.items() if k != "orig_shape"}, torch.float32)
    with pytest.raises(QuantkitError, match="re-convert"):
        mod.dequantize(stored, {**marker, "orig_shape": [32, 256]}, torch.float32)
    with pytest.raises(QuantkitError, match="re-convert"):
        mod.dequantize({**stored, "weight": stored["weight"][:16]}, marker, torch.float32)


# ---------------------------------------------------------------- dequantization == kitchen

SHAPES = {
    "mxfp8": [(1, 17), (40, 50), (130, 96), (64, 384), (257, 200)],
    "nvfp4": [(1, 17), (40, 50), (130, 96), (64, 384), (257, 200)],
    "int8-convrot": [(33, 48), (64, 384), (96, 1536), (7, 1024), (130, 320)],
}
CASES = ["normal", "specials", "huge", "tiny"]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", CASES)
def test_dequantize_is_kitchens_bit_for_bit(fmt, case):
    mod = FORMATS[fmt]
    for i, (n, k) in enumerate(SHAPES[fmt]):
        w = weight(n, k, case, dtype=(torch.bfloat16, torch.float32, torch.float16)[i % 3] if case == "normal" else torch.bfloat16, seed=i)
        stored = mod.quantize(w)
        marker = mod.marker((n, k), w.dtype)
        for dtype in DTYPES:
            ours = mod.dequantize(stored, marker, dtype)
            theirs = kitchen_tensor(stored, marker, dtype).dequantize()
            assert ours.shape == (n, k) and same_bits(ours, theirs), (fmt, case, n, k, dtype)
        if case != "tiny":  # round-trip sanity, so a dequantizer that matched a broken kitchen would show
            err = (mod.dequantize(stored, marker, torch.float32) - w.float()).abs().max()
            assert float(err) <= 0.5 * float(w.float().abs().max()), (fmt, case, n, k)


def test_nvfp4_all_zero_and_mxfp8_tiny_blocks():
    # kitchen's quantizer gives NaN for both (0/0 global scale; E8M0 byte 0 decoding to 0); ours not
    z = nvfp4.quantize(torch.zeros(20, 40))
    assert float(z["weight_scale_2"]) == 1.0 and int(z["weight"].sum()) == 0
    assert torch.equal(nvfp4.dequantize(z, nvfp4.marker((20, 40), torch.float32), torch.float32), torch.zeros(20, 40))
    w = torch.full((32, 64), 1e-37)
    w[:, ::3] = 0.0
    d = mxfp8.dequantize(mxfp8.quantize(w), mxfp8.marker((32, 64), torch.float32), torch.float32)
    assert torch.isfinite(d).all() and float((d - w).abs().max()) <= 2 ** -4 * 1e-37


def test_mxfp8_exponent_is_the_exact_ceiling():
    # amax / 448 one ulp above 2^10: kitchen's fp32 log2 rounds to 10 (scale 2^10, max element clipped
    # to 448); the exact ceiling is 11, the max element stored as 224 (the nearest E4M3 step)
    w = torch.zeros(1, 32)
    w[0, 0] = 448 * 2.0 ** 10 * (1 + 2 ** -23)
    w[0, 1] = 4096.0
    out = mxfp8.quantize(w)
    assert int(out["weight_scale"][0, 0]) == 127 + 11 and float(out["weight"][0, 0].float()) == 224.0
    kq = kitchen_quantizer(w, "mxfp8").state_dict("w")
    assert int(kq["w_scale"].view(torch.uint8)[0, 0]) == 127 + 10  # kitchen as mxfp8.py describes it
    d = mxfp8.dequantize(out, mxfp8.marker((1, 32), torch.float32), torch.float32)
    assert float(d[0, 0]) == 448 * 2.0 ** 10 and float(d[0, 1]) == 4096.0


def test_linear_through_kitchen():
    x = torch.randn(8, 384, generator=torch.Generator().manual_seed(3))
    for fmt, mod in FORMATS.items():
        w = weight(72, 384, dtype=torch.float32, seed=4)
        stored, marker = mod.quantize(w), mod.marker((72, 384), w.dtype)
        got = torch.nn.functional.linear(x, kitchen_tensor(stored, marker, torch.float32))
        ref = x @ mod.dequantize(stored, marker, torch.float32).T
        rel = float((got - ref).norm() / ref.norm())
        # mxfp8/nvfp4 dequantize on CPU; int8 also quantizes activations per row (W8A8, ~1/127)
        assert rel < (2e-2 if fmt == "int8-convrot" else 1e-6), (fmt, rel)


# ---------------------------------------------------------------- our tensors == kitchen's quantizer's

@pytest.mark.parametrize("fmt,shape", [(f, s) for f in FORMATS for s in [(40, 50), (64, 384), (130, 1536)]
                                       if not FORMATS[f].cannot_take(s)])
def test_stored_tensors_match_kitchens_quantizer(fmt, shape):
    n, k = shape
    mod = FORMATS[fmt]
    w = weight(n, k, dtype=torch.float32, seed=n)
    marker = mod.marker(shape, w.dtype)
    kq = kitchen_quantizer(w, fmt, marker.get("convrot_groupsize"))
    theirs = {key.removeprefix("."): t for key, t in kq.state_dict("weight").items()}
    opts = {"scale_search": False} if mod is nvfp4 else {}
    ours = mod.quantize(w, **opts)
    assert set(ours) == set(theirs)
    for key, t in ours.items():
        want = torch.uint8 if t is ours.get("weight_scale") and mod is mxfp8 else theirs[key].dtype
        assert (t.dtype, tuple(t.shape)) == (want, tuple(theirs[key].shape)), key  # mxfp8: U8 on disk
    if mod is int8_convrot:  # butterfly vs BLAS summation order: a q differs by one step at most, rarely
        dq = (ours["weight"].int() - theirs["weight"].int()).abs()
        assert int(dq.max()) <= 1 and float(dq.float().mean()) < 1e-3
        # a scale is a row's amax of rotated values; each is a length-G dot product in kitchen (BLAS,
        # whose summation order varies with the CPU: 1e-6 held on the dev box, not on a 16-core Xeon)
        # and a butterfly here: both within G * 2^-24 relative of the exact value
        g = marker.get("convrot_groupsize")
        rel = ((ours["weight_scale"] - theirs["weight_scale"]).abs() / theirs["weight_scale"]).max()
        at_most(float(rel), 2 * g * 2.0 ** -24, f"{fmt} {shape} scale relative difference to kitchen's")
    else:  # the same rules: byte-identical
        for key, t in ours.items():
            assert torch.equal(t.reshape(-1).view(torch.uint8), theirs[key].reshape(-1).view(torch.uint8)), key
    assert same_bits(mod.dequantize(ours, marker, torch.float32), kitchen_tensor(ours, marker, torch.float32).dequantize())


def test_nvfp4_input_scale_is_a_scalar():
    out = nvfp4.quantize(weight(16, 32), input_scale=0.5)
    assert out["input_scale"].dtype == torch.float32 and out["input_scale"].shape == () and float(out["input_scale"]) == 0.5
    assert "input_scale" not in nvfp4.quantize(weight(16, 32))


def test_quantize_thread_independent():
    w = weight(130, 1536, "specials", seed=9)
    torch.set_num_threads(2)
    try:
        two = {f: m.quantize(w) for f, m in FORMATS.items()}
    finally:
        torch.set_num_threads(1)
    for f, m in FORMATS.items():
        one = m.quantize(w)
        for key in one:
            assert torch.equal(one[key].reshape(-1).view(torch.uint8), two[f][key].reshape(-1).view(torch.uint8)), (f, key)


def test_nvfp4_search_never_worse_per_block():
    w = weight(64, 384, "specials", dtype=torch.float32, seed=11)
    marker = nvfp4.marker((64, 384), w.dtype)
    on = nvfp4.dequantize(nvfp4.quantize(w), marker, torch.float32)
    off = nvfp4.dequantize(nvfp4.quantize(w, scale_search=False), marker, torch.float32)
    e_on = ((on - w) ** 2).double().reshape(64, 24, 16).sum(-1)
    e_off = ((off - w) ** 2).double().reshape(64, 24, 16).sum(-1)
    # per block: kitchen's scale is the first candidate, so the search can only win (the 1e-12 covers
    # the fp64 sum order here differing from the search's fixed tree); in total it measured 0.886x
    assert bool((e_on <= e_off * (1 + 1e-12)).all()) and float(e_on.sum()) < 0.92 * float(e_off.sum())


# ---------------------------------------------------------------- quality on all-MiniLM-L6-v2

def sqnr(w: torch.Tensor, d: torch.Tensor) -> float:
    w, d = w.double(), d.double()
    return float(10 * torch.log10((w ** 2).sum() / ((w - d) ** 2).sum()))


@pytest.fixture(scope="module")
def minilm_linears(minilm_fp32):
    from safetensors.torch import load_file
    sd = load_file(str(minilm_fp32))
    return {k: v.to(torch.bfloat16) for k, v in sd.items()
            if k.endswith(".weight") and v.dim() == 2 and not k.startswith("embeddings")}


# Per-format SQNR margin of ours over kitchen's quantizer (dB), per layer. Measured on all 37 bf16
# linears (2026-12-02): mxfp8 is byte-identical (difference 0); int8-convrot differs only in the
# rotation's summation order (our butterfly vs kitchen's BLAS matmul), which moves a few q by one
# step either way: |difference| <= 7e-8 dB, tolerance 1e-4 dB; nvfp4's scale search (7 offsets,
# 2026-12-04) gains +1.17 dB minimum (+1.29 mean): floor +1.0 dB.
MARGIN_DB = {"mxfp8": 0.0, "int8-convrot": -1e-4, "nvfp4": 1.0}
# Our mean SQNR on the subset below (layer 0 + pooler), measured 2026-12-02: mxfp8 31.51, convrot 42.58
# (all 37: 42.58), nvfp4 21.82 (7 offsets, 2026-12-04); floors 0.05 dB under (the computation is deterministic; the margin
# only covers a different BLAS in the convrot dequantization).
SUBSET_FLOOR_DB = {"mxfp8": 31.45, "int8-convrot": 42.50, "nvfp4": 21.75}


def _sqnr_check(linears: dict[str, torch.Tensor]) -> dict[str, float]:
    means = {}
    for fmt, mod in FORMATS.items():
        ours_all = []
        for name, w in linears.items():
            shape = tuple(w.shape)
            marker = mod.marker(shape, w.dtype)
            ours = sqnr(w.float(), mod.dequantize(mod.quantize(w), marker, torch.float32))
            theirs = sqnr(w.float(), kitchen_quantizer(w, fmt, marker.get("convrot_groupsize")).dequantize())
            assert ours >= theirs + MARGIN_DB[fmt], (fmt, name, ours, theirs)
            ours_all.append(ours)
        means[fmt] = sum(ours_all) / len(ours_all)
    return means


def test_sqnr_vs_kitchen_minilm_subset(minilm_linears):
    subset = {k: v for k, v in minilm_linears.items() if k.startswith(("encoder.layer.0.", "pooler."))}
    assert sorted({tuple(v.shape) for v in subset.values()}) == [(384, 384), (384, 1536), (1536, 384)]
    means = _sqnr_check(subset)
    for fmt, floor in SUBSET_FLOOR_DB.items():
        assert means[fmt] >= floor, (fmt, means[fmt])


@pytest.mark.slow
def test_sqnr_vs_kitchen_minilm_all_layers(minilm_linears):
    assert len(minilm_linears) == 37
    means = _sqnr_check(minilm_linears)
    # all 37 measured: mxfp8 31.51, convrot 42.58, nvfp4 21.79 (2026-12-04); 0.05 dB margin as above
    assert means["mxfp8"] >= 31.45 and means["int8-convrot"] >= 42.52 and means["nvfp4"] >= 21.75, means


@pytest.fixture(scope="module")
def embed_reference(minilm_fp32):
    from quantkit.models.bert import load_bert, tokenize
    from quantkit.models.sentences import EVALUATION
    ids, mask = tokenize(EVALUATION)
    with torch.no_grad():
        return ids, mask, load_bert().sentence_embeddings(ids, mask).double()


def mean_one_minus_cos(embed_reference, fn) -> float:
    from quantkit.models.bert import load_bert
    ids, mask, e0 = embed_reference
    model = load_bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = fn(m.weight.detach().to(torch.bfloat16))
    with torch.no_grad():
        e = model.sentence_embeddings(ids, mask).double()
    return float((1 - torch.nn.functional.cosine_similarity(e, e0, dim=1)).mean())


# Held-out mean 1-cos of sentence embeddings (EVALUATION sentences vs the fp32 model), every linear
# bf16-cast, quantized and dequantized in fp32. Measured 2026-12-02 (ours / kitchen's quantizer):
# int8-convrot 2.215e-4 / 2.215e-4 (int8-row: 3.835e-4), mxfp8 1.615e-3 / 1.615e-3,
# nvfp4 2.028e-2 / 2.251e-2 (7 search offsets, 2026-12-04). Ceilings are ours + 5%: the forward is deterministic, so the margin only
# absorbs another machine's BLAS; it still catches nvfp4 without the scale search (+11.0%).
HELDOUT_CEILING = {"int8-convrot": 2.33e-4, "mxfp8": 1.70e-3, "nvfp4": 2.12e-2}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_heldout_embedding_error(fmt, embed_reference):
    mod = FORMATS[fmt]

    def ours(w):
        return mod.dequantize(mod.quantize(w), mod.marker(tuple(w.shape), w.dtype), torch.float32)

    def theirs(w):
        return kitchen_quantizer(w, fmt, int8_convrot.choose_group_size(w.shape[1])).dequantize()

    e_ours, e_theirs = mean_one_minus_cos(embed_reference, ours), mean_one_minus_cos(embed_reference, theirs)
    assert e_ours <= HELDOUT_CEILING[fmt], (fmt, e_ours)
    assert e_ours <= e_theirs * (1.001 if fmt == "int8-convrot" else 1.0), (fmt, e_ours, e_theirs)
