"""The fused 4-bit Triton GEMMs (quantkit.runtime.triton_w4) and their switch in the runtime's F.linear.

Without CUDA the kernels run on CPU under TRITON_INTERPRET=1 (small shapes). Weights come from the
formats' own ``quantize``. References:

* awq4: ``F.linear`` in fp32 on the format's ``dequantize`` in the input's dtype: the kernel decodes
  the same weights (bit for bit) and differs only by the order of its fp32 sums and the final
  rounding to the input's dtype;
* w4a8: comfy-kitchen's eager ``w4a8_int8_linear`` (activation rotated, INT8 per token, INT8 GEMM),
  which the kernel matches bit for bit in the interpreter; and dequantize + ``F.linear`` within the
  activation's INT8 rounding.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import triton_interpreter
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, LayerOpts
from quantkit.runtime import QuantizedTensor, linear

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")
with contextlib.nullcontext() if CUDA else triton_interpreter():
    from quantkit.runtime import triton_w4 as tw
kitchen = pytest.importorskip("comfy_kitchen.backends.eager.w4a8_int8")
kq = pytest.importorskip("comfy_kitchen.backends.eager.quantization")

DEV = "cuda" if CUDA else "cpu"
AWQ, W4A8 = FORMATS["awq4"], FORMATS["w4a8"]
U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff: the most a rounding moves a value, relative


@pytest.fixture(autouse=True)
def _interpret_while_running(monkeypatch):
    if not CUDA:  # triton also reads the variable when a kernel runs
        monkeypatch.setenv("TRITON_INTERPRET", "1")


_CACHE: dict = {}


def layer(fmt, n, k, seed=0):
    """(stored tensors, marker) of a random [n, k] weight quantized by the format (cached)."""
    key = (fmt.name, n, k, seed)
    if key not in _CACHE:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
        w[:, 3] *= 6  # a wide input channel
        _CACHE[key] = (fmt.quantize(w, LayerOpts()), fmt.marker((n, k), torch.float32, LayerOpts()))
    st, marker = _CACHE[key]
    return {s: t.to(DEV) for s, t in st.items()}, marker


def acts(m, k, dtype, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2
    x[:, 7] *= 30  # an outlier channel
    if m > 2:
        x[1] = 0  # an all-zero token
    return x.to(dtype).to(DEV)


def bias_of(n, dtype, with_bias):
    return (torch.randn(n, generator=torch.Generator().manual_seed(2)) * 4).to(dtype).to(DEV) if with_bias else None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("with_bias", [True, False])
def test_awq4_matches_dequantized_linear(dtype, m, with_bias):
    n, k = 40, 192  # N not a multiple of the tile, K three groups
    st, marker = layer(AWQ, n, k)
    x, b = acts(m, k, dtype), bias_of(n, dtype, with_bias)
    y = tw.awq4_linear(x, st["weight"], st["weight_scale"], st["weight_zeros"], b)
    w = AWQ.dequantize(st, marker, dtype).to(dtype)  # the weights the kernel decodes (fp16: fp32 math, cast)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == dtype and y.shape == (m, n)
    err = (y.float() - ref).abs()
    # The output is rounded once to dtype (at most U relative) after fp32 sums in another order.
    # Measured in the interpreter: max over elements of (err - U |ref|) / max |ref| = 0.0 for both
    # dtypes (bf16 max err / |ref| 0.0038 < U = 0.0039). Bound: U |ref| plus 1e-5 of the range for
    # the sum order (fp32 sums of K = 192 terms: ~1e-7 of the range); the lowest code bit flipped
    # in every byte gives 0.064 of the range.
    bound = U[dtype] * ref.abs() + 1e-5 * ref.abs().max()
    assert bool((err <= bound).all()), float((err - bound).max())


def test_awq4_fp32_and_3d_input():
    n, k = 24, 128
    st, marker = layer(AWQ, n, k)
    x = acts(10, k, torch.float32).reshape(2, 5, k)
    y = tw.awq4_linear(x, st["weight"], st["weight_scale"], st["weight_zeros"], None)
    ref = F.linear(x, AWQ.dequantize(st, marker, torch.float32))
    assert y.shape == (2, 5, n)
    # fp32 in, ieee fp32 dot: only the sum order differs (measured 4.4e-7 of the range)
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


def kitchen_w4a8(x, st, marker, b, codebook=True):
    return kitchen.w4a8_int8_linear(x, st["weight"], st["weight_s_rel"], st["weight_s_channel"],
                                    codebook=st["weight_codebook"] if codebook else None, bias=b,
                                    group_size=16, convrot_groupsize=marker["convrot_groupsize"], out_dtype=x.dtype)


def run_w4a8(x, st, marker, b, codebook=True):
    return tw.w4a8_linear(x, st["weight"], st["weight_s_rel"], st["weight_s_channel"],
                          st["weight_codebook"] if codebook else None, b, 16, marker["convrot_groupsize"])


def same_as_kitchen(y, ref):
    if CUDA:  # rotation sums in another order can move an INT8 activation by one step (unmeasured)
        return float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < 2e-2
    return torch.equal(y, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 48, 256), (7, 40, 640), (33, 32, 96)])  # ConvRot groups 256, 64, 16
@pytest.mark.parametrize("with_bias", [True, False])
def test_w4a8_matches_kitchen(dtype, m, n, k, with_bias):
    st, marker = layer(W4A8, n, k)
    x, b = acts(m, k, dtype), bias_of(n, dtype, with_bias)
    y = run_w4a8(x, st, marker, b)
    assert y.dtype == dtype and y.shape == (m, n)
    assert same_as_kitchen(y, kitchen_w4a8(x, st, marker, b))


def test_w4a8_without_codebook_matches_kitchen():
    """A 4-bit layer without a codebook decodes uniform codes (c - 8): kitchen's rule."""
    st, marker = layer(W4A8, 32, 256)
    x = acts(5, 256, torch.bfloat16)
    y = run_w4a8(x, st, marker, None, codebook=False)
    ref = kitchen_w4a8(x, st, marker, None, codebook=False)
    assert same_as_kitchen(y, ref)
    assert not torch.equal(y, run_w4a8(x, st, marker, None))  # the codebook is read when present


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_w4a8_near_dequantized_linear(dtype):
    """Against what the runtime computes without the kernel: the difference is the activation's
    INT8 rounding (relative RMS error, measured 0.0068 bf16, 0.0051 fp16, 0.0052 fp32 at this
    shape; bound 0.02: about three times that, while the lowest code bit flipped in every byte
    gives 0.167)."""
    n, k = 48, 256
    st, marker = layer(W4A8, n, k)
    x, b = acts(9, k, dtype), bias_of(n, dtype, True)
    y = run_w4a8(x, st, marker, b).float()
    ref = F.linear(x.float(), W4A8.dequantize(st, marker, dtype).float(), b.float())
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 0.02, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [16, 64, 256])
def test_rotate_quantize_matches_kitchen(dtype, group):
    x = acts(19, 512, dtype)
    q, s = tw.rotate_quantize(x, group)
    h = kq._build_hadamard(group, device="cpu", dtype=dtype)
    rq, rs = kq.quantize_and_rotate_rowwise(x.cpu(), h, group)
    assert s.shape == (19,) and q.dtype == torch.int8
    assert float(s[1]) == 1e-30 or abs(float(s[1]) - 1e-30) < 1e-36  # the all-zero token
    if CUDA:  # rotation sums in another order: an INT8 step at most (unmeasured)
        assert int((q.cpu().int() - rq.int()).abs().max()) <= 1
    else:
        assert torch.equal(q, rq) and torch.equal(s, rs.reshape(-1))


def test_kernel_errors():
    st, _ = layer(AWQ, 24, 128)
    x = acts(3, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="group 48"):
        tw.awq4_linear(x, st["weight"], st["weight_scale"], st["weight_zeros"], None, group=48)
    with pytest.raises(ValueError, match="input dtype"):
        tw.awq4_linear(x.to(torch.float64), st["weight"], st["weight_scale"], st["weight_zeros"], None)
    with pytest.raises(ValueError, match=r"x \[\.\., 64\]"):
        tw.awq4_linear(x[:, :64], st["weight"], st["weight_scale"], st["weight_zeros"], None)
    w6 = FORMATS["w4a8-6bit"].quantize(torch.randn(16, 256), LayerOpts())
    with pytest.raises(ValueError, match="4-bit w4a8"):  # 6-bit rows are 3K/4 bytes
        tw.w4a8_linear(acts(2, 256, torch.bfloat16), w6["weight"].to(DEV), w6["weight_s_rel"].to(DEV),
                       w6["weight_s_channel"].to(DEV), None, None)
    with pytest.raises(ValueError, match="ConvRot group 32"):
        tw.rotate_quantize(x, 32)


def test_switch_parsing():
    assert linear.parse_w4_setting("0") == {"awq4": 0, "w4a8": 0}
    assert linear.parse_w4_setting("awq4=64, w4a8=16") == {"awq4": 64, "w4a8": 16}
    assert linear.parse_w4_setting("w4a8=4096") == {"awq4": 0, "w4a8": 4096}
    assert min(linear.parse_w4_setting("1").values()) > 1 << 40
    for bad in ("yes", "awq4=-1", "int4=8", "awq4"):
        with pytest.raises(QuantkitError, match="QUANTKIT_W4_TRITON"):
            linear.parse_w4_setting(bad)


@pytest.mark.parametrize("layout,bias", [("TensorCoreAWQW4A16Layout", True), ("AsymW4A8Int8Layout", False)])
def test_runtime_dispatch(layout, bias, monkeypatch):
    """F.linear on a 4-bit QuantizedTensor: the kernel only on CUDA and only where the switch allows
    the token count; otherwise (CPU always) dequantize + F.linear, bit for bit."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    qt = QuantizedTensor.from_float(w, layout)
    qt = QuantizedTensor(qt._qdata.to(DEV), layout, qt._layout_params.moved(lambda t: t.to(DEV)))
    x = acts(6, 256, torch.bfloat16)
    b = bias_of(32, torch.bfloat16, bias)
    deq = linear.dequantized_linear(x, qt, b)
    monkeypatch.setitem(linear.W4_TRITON_MAX_M, "awq4", 0)
    monkeypatch.setitem(linear.W4_TRITON_MAX_M, "w4a8", 0)
    assert torch.equal(F.linear(x, qt, b), deq)
    monkeypatch.setitem(linear.W4_TRITON_MAX_M, "awq4", 6)
    monkeypatch.setitem(linear.W4_TRITON_MAX_M, "w4a8", 6)
    y = F.linear(x, qt, b)
    if not CUDA:
        assert torch.equal(y, deq)  # CPU: never the kernel
        return
    t = qt._layout_params.tensors
    p = qt._layout_params
    if layout == "AsymW4A8Int8Layout":
        direct = tw.w4a8_linear(x, qt._qdata, p.scale, t["weight_s_channel"], t["weight_codebook"], b, 16,
                                p.marker["convrot_groupsize"])
    else:
        direct = tw.awq4_linear(x, qt._qdata, p.scale, t["weight_zeros"], b)
    assert torch.equal(y, direct)
    monkeypatch.setitem(linear.W4_TRITON_MAX_M, "awq4", 5)  # 6 tokens: over the limit
    monkeypatch.setitem(linear.W4_TRITON_MAX_M, "w4a8", 5)
    assert torch.equal(F.linear(x, qt, b), deq)


def test_awq4_fp16_input_dequantized_path():
    """awq4's dequantize in fp16 returns fp32 (fp16 x bf16 promotes); F.linear casts it to the input's
    dtype instead of failing on mixed dtypes."""
    qt = QuantizedTensor.from_float(torch.randn(16, 128, generator=torch.Generator().manual_seed(4)),
                                    "TensorCoreAWQW4A16Layout")
    x = acts(3, 128, torch.float16).cpu()
    y = F.linear(x, qt)
    assert y.dtype == torch.float16
    assert torch.equal(y, F.linear(x, qt.dequantize(torch.float16).to(torch.float16)))


_AOT = r"""
import json, os, subprocess, sys, tempfile
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    assert os.path.exists(tool)
except Exception as e:
    print(e)
    sys.exit(3)
from quantkit.runtime import triton_w4 as tw
COMMON = {"M": "i32", "N": "i32", "K": "i32", "M_KEY": "i32"}
W4A8 = {"xq_ptr": "*i8", "xs_ptr": "*fp32", "q_ptr": "*i8", "r_ptr": "*fp8e4nv", "cb_ptr": "*fp32", "sc_ptr": "*fp32",
        "bias_ptr": "*bf16", "c_ptr": "*bf16", **COMMON, "stride_xm": "i32", "stride_qn": "i32", "stride_rn": "i32",
        "stride_cm": "i32"}
AWQ = {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*bf16", "z_ptr": "*bf16", "bias_ptr": "*bf16", "c_ptr": "*bf16",
       **COMMON, "stride_xm": "i32", "stride_qn": "i32", "stride_sg": "i32", "stride_cm": "i32"}
out = []
for fn, sig, meta, cfgs in ((tw._w4a8_kernel, W4A8, {"GROUP": 16, "HAS_CB": 1, "HAS_BIAS": 1}, tw.W4A8_CONFIGS),
                            (tw._awq_kernel, AWQ, {"MODE": 0, "HAS_BIAS": 1, "GROUP": 64}, tw.AWQ_CONFIGS)):
    for cfg in (cfgs[0], cfgs[-1]):
        ce = {**meta, **cfg.kwargs, "RNE": 0, **({"F32_DOT": 0} if "F32_DOT" in fn.arg_names else {})}
        src = ASTSource(fn=fn, signature={a: sig.get(a, "constexpr") for a in fn.arg_names}, constexprs=ce)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        stack = [int(w.split(":")[1]) for w in usage.split() if w.startswith("STACK:")]
        out.append({"kernel": fn.__name__, "config": str(cfg), "shared": k.metadata.shared, "stack": stack})
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90():
    """The smallest and largest tile of each kernel compile for sm_90 (ahead of time: no GPU needed)
    within sm_90's 227 KB of shared memory and without register spills (STACK 0 in cuobjdump)."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode == 3:
        pytest.skip(f"no triton sm_90 AOT toolchain here: {r.stdout.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    for row in rows:
        assert 0 < row["shared"] <= 232448 and row["stack"] == [0], row
