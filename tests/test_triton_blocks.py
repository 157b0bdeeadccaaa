"""Triton quantizers of mxfp8 and nvfp4 (quantkit.kernels.triton_blocks) vs their torch ``quantize``,
byte for byte, and their error sums.

Without a GPU the kernels run on CPU under ``TRITON_INTERPRET=1`` (set below, before the kernels
module is imported); shapes and tiles stay small so the interpreter stays fast (each nvfp4 call
runs its 7 candidates per program). ``-m gpu`` runs the same comparisons on CUDA with larger shapes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # conftest.py sets it too, before anything imports triton

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter runs on numpy

from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.formats import _blocked, _e2m1, _e8m0, mxfp8, nvfp4  # noqa: E402
from quantkit.formats._common import tree_sum_fp64  # noqa: E402
from quantkit.kernels import triton_blocks  # noqa: E402
from quantkit.quantize import ErrorStats  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SPECS = {"mxfp8": mxfp8, "nvfp4": nvfp4}
KERNELS = {"mxfp8": triton_blocks.mxfp8, "nvfp4": triton_blocks.nvfp4}
# Several programs in both grid dimensions on the small shapes below, with masked tails in each.
SMALL_TILE = {"mxfp8": (8, 2), "nvfp4": (8, 4)}
# Signal and noise are fp64 sums of the same exact fp64 terms as the reference's, in another order:
# for N positive terms the relative difference is at most (N - 1) * 2^-53, under 1e-12 for the
# N <= 10^4 elements of these tests (no cancellation: every term is >= 0).
SUM_REL = 1e-12
# CPU runs of the kernels (the interpreter): a machine with CUDA runs the gpu-marked tests instead
INTERP = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs need TRITON_INTERPRET=1")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def reference_sums(fmt: str, w: torch.Tensor, ref: dict) -> tuple[float, float]:
    """sum w^2 and sum (w - dequant)^2 of the reference's bytes, each fp32 difference squared in
    fp64 (the fp32 dequantization: q * 2^(e-127) per block, v * (g * c) for nvfp4)."""
    n, k = w.shape
    wf = w.float()
    if fmt == "mxfp8":
        rows, cols = mxfp8.padded_shape((n, k))
        e = _blocked.unswizzle(ref["weight_scale"], rows, cols // 32)
        deq = (ref["weight"].float().reshape(rows, cols // 32, 32) * _e8m0.decode(e)[..., None]).reshape(rows, cols)
    else:
        rows, cols = nvfp4.padded_shape((n, k))
        c = _blocked.unswizzle(ref["weight_scale"], rows, cols // 16).float()
        total = ref["weight_scale_2"].float() * c
        vals = _e2m1.lut(torch.float32)[_e2m1.unpack(ref["weight"]).long()].reshape(rows, cols // 16, 16)
        deq = (vals * total[..., None]).reshape(rows, cols)
    d = (wf - deq[:n, :k]).double()
    w64 = wf.double()
    return float((w64 * w64).sum()), float((d * d).sum())


def run(fmt: str, w: torch.Tensor, device: str, **kw):
    if device == "cuda":
        stored, sig, noi = KERNELS[fmt](w.cuda(), **kw)
        assert all(t.device.type == "cuda" for t in stored.values())
        assert sig.device.type == "cuda" and noi.device.type == "cuda"
        stored = {name: t.cpu() for name, t in stored.items()}
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("CPU runs need TRITON_INTERPRET=1 (a machine without CUDA)")
        stored, sig, noi = KERNELS[fmt](w, **{"tile": SMALL_TILE[fmt], **kw})
    assert sig.dtype == torch.float64 and sig.dim() == 0 and noi.dtype == torch.float64 and noi.dim() == 0
    return stored, float(sig), float(noi)


def assert_matches(fmt: str, w: torch.Tensor, device: str = "cpu", **kw):
    """The kernel's stored tensors equal the torch quantize's (names, dtypes, shapes, bytes); its
    sums equal the reference's. Returns the reference."""
    stored, sig, noi = run(fmt, w, device, **kw)
    ref = SPECS[fmt].quantize(w)
    assert sorted(stored) == sorted(ref)
    for name, t in ref.items():
        got = stored[name]
        assert got.dtype == t.dtype and got.shape == t.shape, (name, got.dtype, got.shape, t.dtype, t.shape)
        bad = as_bytes(got) != as_bytes(t)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise AssertionError(f"{fmt} {name}: {int(bad.sum())} of {bad.numel()} bytes differ, first at flat "
                                 f"{i}: got {int(as_bytes(got)[i]):#04x}, want {int(as_bytes(t)[i]):#04x}")
    rs, rn = reference_sums(fmt, w, ref)
    assert sig == pytest.approx(rs, rel=SUM_REL, abs=0.0)
    assert noi == pytest.approx(rn, rel=SUM_REL, abs=0.0)
    return ref


def rand_weight(n: int, k: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, 1 % k] *= 40  # an outlier input channel: outlier blocks in every row
    w[3 % n, :] *= 1e-4  # a quiet row (nvfp4: small and subnormal E4M3 block scales)
    w[2 % n, :] = 0  # an all-zero row: zero blocks
    w[5 % n, 7 % k] = -0.0
    return w.to(dtype)


# ---------------------------------------------------------------- random weights, odd shapes

SHAPES = [(40, 200), (33, 17), (1, 1), (130, 48), (16, 144)]


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_weights_match_torch(fmt, dtype):
    """Shapes that are not multiples of 16 / 32 (padded rows and columns), more than 128 rows and
    more than 4 blocks a row (several tiles of the blocked scale layout), every input dtype."""
    for i, (n, k) in enumerate(SHAPES):
        assert_matches(fmt, rand_weight(n, k, dtype, seed=100 * i + DTYPES.index(dtype)))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_default_tiles_and_nvfp4_reference(fmt):
    """The default tiles (one program column here) give the same bytes; nvfp4's ``quantize_reference``
    (one candidate at a time) too."""
    w = rand_weight(48, 96, torch.bfloat16, seed=7)
    ref = assert_matches(fmt, w, tile=triton_blocks.MXFP8_TILE if fmt == "mxfp8" else triton_blocks.NVFP4_TILE)
    if fmt == "nvfp4":
        slow = nvfp4.quantize_reference(w)
        assert all(torch.equal(as_bytes(slow[t]), as_bytes(ref[t])) for t in ref)


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_tile_must_be_a_power_of_two(fmt):
    with pytest.raises(ValueError, match="power of two"):
        KERNELS[fmt](torch.ones(4, 4), tile=(6, 2))


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_zero_weight(fmt, dtype):
    """nvfp4: weight_scale_2 1.0, every scale 0; mxfp8: exponents 0; -0.0 keeps its sign in mxfp8
    (the reference divides it by 1.0) and becomes code 0 in nvfp4."""
    w = torch.zeros(20, 50, dtype=dtype)
    w[1, ::3] = -0.0
    ref = assert_matches(fmt, w)
    assert not as_bytes(ref["weight_scale"]).any()
    if fmt == "nvfp4":
        assert float(ref["weight_scale_2"]) == 1.0 and not ref["weight"].any()
    else:
        assert int((as_bytes(ref["weight"]) == 0x80).sum()) == 17


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_and_subnormal_weights(fmt, dtype):
    """Rows spanning 2^0 .. 2^-150 of the largest weight: the dtype's subnormals (bf16 / fp32
    subnormals, fp16 subnormals that are fp32 normals), E4M3 subnormal block scales and block scales
    that round to 0 (nvfp4), the smallest E8M0 exponents (mxfp8)."""
    g = torch.Generator().manual_seed(11)
    lo = {torch.float16: -30, torch.bfloat16: -140, torch.float32: -150}[dtype]
    rows = torch.cat([torch.arange(0, -24, -1), torch.linspace(-26, lo, 8).round()])  # one binade a row, then big steps
    n, k = rows.numel(), 48
    w = torch.randn(n, k, generator=g) * torch.pow(2.0, rows.double()).float()[:, None]
    ref = assert_matches(fmt, w.to(dtype))
    if fmt == "nvfp4":
        s = as_bytes(ref["weight_scale"])
        assert ((s > 0) & (s < 8)).any(), "no subnormal E4M3 block scale reached"
        assert int((s == 0).sum()) > s.numel() // 2  # the quiet rows' scales round to 0 (and the padding)
    wd = w.to(dtype).float()
    assert ((wd != 0) & (wd.abs() < 2.0 ** -126)).any() or dtype == torch.float16


def test_mxfp8_exponent_and_rounding_edges():
    """amax / 448 exactly a power of two and one fp32 ulp above it (exact ceiling: one exponent up);
    block maxima 448 (scale 1) with every E4M3 midpoint and one ulp either side (round to nearest even,
    subnormals included)."""
    grid = torch.unique(torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float())
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, torch.full((), 500.0))])
    vals = torch.cat([vals, -vals])
    nblk = -(-vals.numel() // 31)
    body = torch.zeros(nblk, 32)
    body[:, 0] = 448.0
    body[:, 1:].reshape(-1)[:vals.numel()] = vals
    edge = torch.zeros(8, 32)
    for i, j in enumerate(range(-20, 20, 5)):
        a = 448.0 * 2.0 ** j
        edge[i, 0] = a if i % 2 else float(torch.nextafter(torch.tensor(a), torch.tensor(float("inf"))))
        edge[i, 1:] = torch.linspace(-a, a, 31) * 0.3
    w = torch.cat([body, edge])  # one block a row
    ref = assert_matches("mxfp8", w)
    rows, cols = mxfp8.padded_shape(tuple(w.shape))
    e = _blocked.unswizzle(ref["weight_scale"], rows, cols // 32)[:, 0].to(torch.int32)
    assert (e[:nblk] == 127).all()  # the body blocks: scale 1
    want = torch.tensor([127 + j + (i % 2 == 0) for i, j in enumerate(range(-20, 20, 5))], dtype=torch.int32)
    assert torch.equal(e[nblk:w.shape[0]], want)


def test_nvfp4_e2m1_midpoints():
    """g * c = 1 for the kitchen candidate (W's amax 2688, block maxima 6): elements on every E2M1
    rounding boundary and one ulp either side, both signs."""
    b = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    vals = torch.cat([b, torch.nextafter(b, torch.zeros(())), torch.nextafter(b, torch.full((), 9.0))])
    vals = torch.cat([vals, -vals])  # 42 values, 3 blocks of 14 + the max
    w = torch.zeros(4, 16)
    w[0, 0] = 2688.0
    w[1:, 0] = 6.0
    w[1:, 1:15] = vals.reshape(3, 14)
    w[1:, 15] = -0.0
    assert_matches("nvfp4", w)


def candidate_diffs(x: torch.Tensor, g: torch.Tensor):
    """Every search candidate of fp32 blocks x [R, 16], as the reference forms it: (the fp32
    differences w - v * (g * c) [R, C, 16], candidate codes [R, C])."""
    c0 = ((x.abs().amax(-1) / 6.0) / g).clamp(max=448.0).to(torch.float8_e4m3fn)
    code0 = c0.view(torch.uint8).to(torch.int32)
    diffs, codes = [], []
    for o in nvfp4.SEARCH_OFFSETS:
        cc = (code0 + o).clamp(1, 0x7E).to(torch.uint8).view(torch.float8_e4m3fn)
        cc = torch.where(code0 == 0, c0, cc)
        total = (g * cc.float())[:, None]
        v = _e2m1.round_values((x / total).clamp(-6.0, 6.0))  # no zero scales in these pools
        diffs.append(x - v * total)
        codes.append(cc.view(torch.uint8))
    return torch.stack(diffs, 1), torch.stack(codes, 1)


def winners(d: torch.Tensor, codes: torch.Tensor, order: str) -> torch.Tensor:
    """The code the search picks when the 16 squared errors are summed in ``order``: the reference's
    tree, adjacent pairs first, or left to right."""
    s = d.double() ** 2
    if order == "tree":
        err = tree_sum_fp64(d)
    elif order == "pairs":
        while s.shape[-1] > 1:
            s = s[..., 0::2] + s[..., 1::2]
        err = s[..., 0]
    else:
        err = s[..., 0]
        for i in range(1, 16):
            err = err + s[..., i]
    return codes.gather(-1, err.argmin(-1, keepdim=True))[:, 0]


def int_pool(n: int, gen: torch.Generator) -> torch.Tensor:
    """Blocks of small integers (a third of them 0) with maxima 1..12: with g = 1 every candidate's
    error is a short dyadic number, exact in fp64, and exact ties between candidates are common."""
    pool = torch.randint(-8, 9, (n, 16), generator=gen).float()
    pool[torch.rand(n, 16, generator=gen) < 0.35] = 0
    pool[:, 0] = torch.randint(1, 13, (n,), generator=gen).float()
    return pool


def exact_ties(pool: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Blocks where two different candidate codes give exactly the smallest error."""
    d, codes = candidate_diffs(pool, g)
    err = tree_sum_fp64(d)
    first = err.argmin(-1, keepdim=True)
    return ((err == err.gather(-1, first)) & (codes != codes.gather(-1, first))).any(-1)


def with_g_one(blocks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A weight of these blocks plus one that sets W's amax to 2688 (g = 1), 4 blocks a row."""
    b = torch.cat([torch.tensor([[2688.0] + [0.0] * 15]), blocks])
    b = torch.cat([b, torch.zeros(-b.shape[0] % 4, 16)])  # zero blocks fill the last row
    return b[torch.randperm(b.shape[0], generator=gen)].reshape(-1, 64)


def test_nvfp4_exact_ties_pick_the_first_offset():
    """Blocks on which two different candidate scales give exactly the same smallest error (found
    by the reference's own errors): the kernel must pick the earlier offset, as the reference's strict
    ``<`` does. Plus blocks whose winner is not the kitchen scale (offset 0)."""
    gen = torch.Generator().manual_seed(5)
    g = torch.tensor(1.0)
    pool = int_pool(4096, gen)
    tied = exact_ties(pool, g)
    d, codes = candidate_diffs(pool, g)
    moved = winners(d, codes, "tree") != codes[:, 0]
    assert int(tied.sum()) >= 8, f"only {int(tied.sum())} tied blocks in the pool"
    assert_matches("nvfp4", with_g_one(torch.cat([pool[tied][:32], pool[moved & ~tied][:32]]), gen))


def test_nvfp4_near_ties_follow_the_tree_order():
    """Exactly tied blocks (above) with up to two of their zeros replaced by values far below every
    candidate's grid (~2^-23, full mantissas): those add the same real amount to every candidate's
    error, but fp64 rounds the sum differently in each, so the winner depends on the summation order.
    The blocks kept are those where the reference's tree picks another code than adjacent pairs first
    or left to right would; the kernel must pick the tree's."""
    gen = torch.Generator().manual_seed(9)
    g = torch.tensor(1.0)
    pool = int_pool(8192, gen)
    tied = pool[exact_ties(pool, g) & ((pool[:, 1:] == 0).sum(-1) >= 2)]
    v = tied.repeat(16, 1)
    zero = v == 0
    r = torch.rand(v.shape, generator=gen) * zero
    put = zero & (r >= r.topk(2, dim=-1).values[:, 1:2])
    sign = torch.where(torch.rand(v.shape, generator=gen) < 0.5, -1.0, 1.0)
    tiny = 2.0 ** -23 * (1 + torch.rand(v.shape, generator=gen)) * sign
    v = torch.where(put, tiny, v)
    d, codes = candidate_diffs(v, g)
    tree = winners(d, codes, "tree")
    sensitive = (tree != winners(d, codes, "pairs")) | (tree != winners(d, codes, "left"))
    assert int(sensitive.sum()) >= 16, f"only {int(sensitive.sum())} order-sensitive blocks"
    assert_matches("nvfp4", with_g_one(v[sensitive][:64], gen))


@INTERP
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy on NaN / Inf
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_is_refused(fmt, bad):
    w = torch.randn(20, 40)
    w[13, 37] = bad
    with pytest.raises(QuantkitError, match="NaN or Inf"):
        KERNELS[fmt](w.bfloat16(), tile=SMALL_TILE[fmt])


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_bad_inputs(fmt, monkeypatch):
    with pytest.raises(QuantkitError, match="is not bf16/fp16/fp32"):
        KERNELS[fmt](torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(QuantkitError, match="non-empty 2-D"):
        KERNELS[fmt](torch.ones(16))
    with pytest.raises(QuantkitError, match="non-empty 2-D"):
        KERNELS[fmt](torch.ones(0, 16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(QuantkitError, match="need a CUDA tensor, got one on cpu"):
        KERNELS[fmt](torch.ones(16, 16))


@INTERP
def test_nvfp4_input_scale_and_stats_form():
    """``input_scale`` is stored as the reference stores it; :func:`quantize_stored` gives the
    (stored, ErrorStats) of ``Format.quantize_native`` with the same sums."""
    w = rand_weight(20, 40, torch.bfloat16, seed=3)
    stored, sig, noi = triton_blocks.nvfp4(w, input_scale=0.125, tile=SMALL_TILE["nvfp4"])
    ref = nvfp4.quantize(w, input_scale=0.125)
    assert stored["input_scale"].dtype == torch.float32 and stored["input_scale"].dim() == 0
    assert float(stored["input_scale"]) == float(ref["input_scale"]) == 0.125
    for fmt in ("mxfp8", "nvfp4"):
        got, stats = triton_blocks.quantize_stored(fmt, w)
        want = SPECS[fmt].quantize(w)
        assert isinstance(stats, ErrorStats)
        assert all(torch.equal(as_bytes(got[t]), as_bytes(want[t])) for t in want) and sorted(got) == sorted(want)
        rs, rn = reference_sums(fmt, w, want)
        assert stats.signal == pytest.approx(rs, rel=SUM_REL) and stats.noise == pytest.approx(rn, rel=SUM_REL)


# ---------------------------------------------------------------- sm_90 compile (no GPU needed)

# Compiles both kernels with the tiles, warps and LAUNCH_OPTIONS the entry points use, for sm_90 (no
# GPU needed), and writes their PTX. Run in a fresh process without TRITON_INTERPRET: Triton 3.9's
# interpreter leaves the language patched once an interpreted kernel has called a jit helper.
COMPILE = """
import sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantkit.kernels import triton_blocks as tb
ptr = dict(n="i32", k="i32", rows="i32", nb="i32", cp4="i32")
kernels = [
    ("mxfp8", tb._mxfp8_kernel, dict(w_ptr="*i16", q_ptr="*u8", e_ptr="*u8", stats_ptr="*fp64", bits_ptr="*i32", **ptr),
     dict(IN_BF16=True), tb.MXFP8_TILE),
    ("nvfp4", tb._nvfp4_kernel, dict(w_ptr="*i16", g_ptr="*fp32", off_ptr="*i32", q_ptr="*u8", s_ptr="*u8",
                                     stats_ptr="*fp64", **ptr), dict(NOFF=9, IN_BF16=True), tb.NVFP4_TILE)]
for name, fn, sig, const, (bm, nblk) in kernels:
    const = dict(const, BM=bm, NBLK=nblk)
    sig = dict(sig, **{c: "constexpr" for c in const})
    # what Triton assumes at a launch with K a multiple of 16 (every pointer from torch is 16-aligned)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig
             if a not in ("n", "rows") and a not in const}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": tb.NUM_WARPS, **tb.LAUNCH_OPTIONS})
    (Path(sys.argv[1]) / (name + ".ptx")).write_text(k.asm["ptx"])
"""


def _ptxas() -> Path:
    """The ptxas Triton itself uses for sm_90 (newer Triton ships two)."""
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(90).path)
    except (ImportError, AttributeError, TypeError):
        return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def ptx_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(d / "cache")  # a cold cache: the compile runs
    subprocess.run([sys.executable, "-c", COMPILE, str(d)], check=True, env=env)
    return d


@pytest.mark.skipif(not _ptxas().exists(), reason="this Triton ships no ptxas")
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_compiles_for_sm90_without_fma_or_spills(fmt, ptx_dir, tmp_path):
    """What the interpreter cannot show: the GPU code rounds every product before its sum (a fused
    multiply-add would change nvfp4's search errors; with Triton's default fusion the nvfp4 kernel
    holds 152 fma.rn.f32, measured with Triton 3.9), every division is IEEE (div.rn), nothing flushes
    subnormals, and the default tiles fit in registers."""
    ptx_file = ptx_dir / f"{fmt}.ptx"
    ptx = ptx_file.read_text()
    assert "fma.rn.f32" not in ptx and "div.rn.f32" in ptx
    assert ".ftz" not in ptx  # subnormal weights and scales are not flushed to zero
    assert not re.search(r"\bdiv\.(approx|full)\.f32", ptx)
    out = subprocess.run([str(_ptxas()), "-arch=sm_90a", "-v", str(ptx_file), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, env={**os.environ, "LANG": "C"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert re.search(r"\b0 bytes spill stores", log), log


# ---------------------------------------------------------------- GPU (-m gpu)

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_torch(fmt, dtype):
    """On CUDA with the default tiles: the bytes of the torch quantize on the CPU and on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for i, (n, k) in enumerate([(1024, 3072), (3072, 1024), (777, 1000), (3, 5), (4096, 33)]):
        w = rand_weight(n, k, dtype, seed=1000 + i)
        stored, sig, noi = KERNELS[fmt](w.cuda())
        for ref in (SPECS[fmt].quantize(w), SPECS[fmt].quantize(w.cuda())):
            assert sorted(stored) == sorted(ref)
            for name, t in ref.items():
                assert stored[name].dtype == t.dtype and stored[name].shape == t.shape
                assert torch.equal(as_bytes(stored[name]).cpu(), as_bytes(t).cpu()), (fmt, name, n, k)
        rs, rn = reference_sums(fmt, w, SPECS[fmt].quantize(w))
        # more terms here (up to 3e6): (N - 1) * 2^-53 < 1e-9
        assert float(sig) == pytest.approx(rs, rel=1e-9) and float(noi) == pytest.approx(rn, rel=1e-9)
