"""The Triton W8A8 kernels against the torch reference (quantkit.runtime.activations).

Without CUDA they run on CPU under TRITON_INTERPRET=1 (conftest.triton_interpreter) and
must be bit-identical. On a GPU the same tests run on CUDA: activation quantization must still be
bit-identical; the matmul may differ by FMA contraction in its fp32 epilogue (rel. error < 1e-6).
The reference is computed on CPU: on CUDA, torch divides by a CPU scalar tensor through its
reciprocal, so ``amax / qmax`` there can differ from IEEE division in the last bit.
The interpreter's fp32 -> bf16 and fp32 -> fp8 casts truncate, so those outputs are compared with
a tolerance here (bf16) or only on the GPU (fp8).
"""

import contextlib

import pytest
import torch

from conftest import triton_interpreter
from quantkit import reference
from quantkit.formats import FORMATS
from quantkit.runtime import activations

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")
with contextlib.nullcontext() if CUDA else triton_interpreter():
    from quantkit.runtime import triton_w8a8 as tk

DEV = "cuda" if CUDA else "cpu"
INT8 = FORMATS["int8-block"]


@pytest.fixture(autouse=True)
def _interpret_while_running(monkeypatch):
    if not CUDA:  # triton also reads the variable when a kernel runs
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def acts(m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[:, 5] *= 40  # an outlier channel
    x[2] = 0  # an all-zero token: scale 1.0, q 0
    x[3, :64] = 0  # an all-zero group
    return x.to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [64, 384])
def test_int8_activation_quantization_bit_identical(dtype, group):
    x = acts(37, 384, dtype)
    q, s = tk.quantize_activations(x, torch.int8, group)
    rq, rs = activations.quantize_activations(x.cpu(), INT8, group)  # the spec is the CPU result
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)
    assert s.shape == (37, 384 // group) and torch.equal(s[2], torch.ones_like(s[2]))


@pytest.mark.parametrize("block,k", [(32, 96), (64, 256), (128, 256)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_w8a8_block_matmul_matches_reference(block, k, with_bias, out_dtype):
    m, n = 45, 2 * block  # M not a multiple of any tile
    g = torch.Generator().manual_seed(block + k)
    xq, xs = activations.quantize_activations(acts(m, k, torch.float32), INT8, block)
    wq, ws = reference.quantize((torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)).to(DEV), INT8, block)
    bias = torch.randn(n, generator=g).to(DEV) if with_bias else None
    y = tk.w8a8_block_matmul(xq, xs, wq, ws, block, bias, out_dtype)
    r = activations.w8a8_block_matmul(xq, xs, wq, ws, block, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    rel = float((y.double() - r.double()).norm() / r.double().norm())
    if out_dtype == torch.bfloat16:
        assert rel < 2 ** -7  # bf16 rounding; the interpreter truncates fp32 -> bf16 instead
    elif CUDA:
        assert rel < 1e-6
    else:
        assert torch.equal(y, r)


@pytest.mark.parametrize("kernel,cfg", [("rows", {"rows": 1, "chunk": 128, "warps": 4}),
                                        ("rows", {"rows": 4, "chunk": 256, "warps": 2}),
                                        ("rows", {"rows": 2, "chunk": 1024, "warps": 4}), ("tile", None)])
@pytest.mark.parametrize("k", [200, 384])
def test_per_token_activation_quantization_kernels_bit_identical(kernel, cfg, k):
    """Per-token scales (group = K): the two-pass kernel over K in chunks (K not a multiple of the
    chunk, rows not a multiple of ROWS) and the register-tile kernel."""
    x = acts(37, k, torch.bfloat16, seed=k)
    q, s = tk.quantize_activations(x, torch.int8, k, per_token_kernel=kernel, rows_cfg=cfg)
    rq, rs = activations.quantize_activations(x.cpu(), FORMATS["int8-row"], k)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and s.shape == (37, 1)


@pytest.mark.parametrize("cfg", [
    {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 2, "PAIR": 1, "MAGIC": 1},
    {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 1, "PAIR": 0, "MAGIC": 0},
    {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 2, "PAIR": 1, "MAGIC": 1},  # tile spans 2 weight blocks
    {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 4, "PAIR": 0, "MAGIC": 1},
])
@pytest.mark.parametrize("k", [32, 64, 96])  # 1, 2, 3 groups: PAIR's odd tail and even loop
def test_w8a8_block_matmul_kernel_variants(cfg, k):
    """Every kernel variant the autotuner may pick (two groups per step, the magic-number
    accumulator start, per-column weight scales) computes the reference, in group order."""
    block, m, n = 32, 45, 96
    g = torch.Generator().manual_seed(k)
    xq, xs = activations.quantize_activations(acts(m, k, torch.float32, seed=k), INT8, block)
    wq, ws = reference.quantize((torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)).to(DEV), INT8, block)
    bias = torch.randn(n, generator=g).to(DEV)
    y = tk.w8a8_block_matmul(xq, xs, wq, ws, block, bias, torch.float32, config=cfg)
    r = activations.w8a8_block_matmul(xq, xs, wq, ws, block, bias, torch.float32)
    if CUDA:
        assert float((y.double() - r.double()).norm() / r.double().norm()) < 1e-6
    else:
        assert torch.equal(y, r)


@pytest.mark.parametrize("k", [96, 200])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_row_matmul_matches_reference(k, per_row, with_bias):
    m, n = 45, 72
    g = torch.Generator().manual_seed(k)
    spec = FORMATS["int8-row" if per_row else "int8-tensor"]
    xq, xs = activations.quantize_activations(acts(m, k, torch.float32), spec, k)
    wq, ws = reference.quantize((torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)).to(DEV), spec, 0)
    bias = torch.randn(n, generator=g).to(DEV) if with_bias else None
    y = tk.w8a8_row_matmul(xq, xs, wq, ws, bias, torch.float32)
    r = activations.w8a8_row_matmul(xq, xs, wq, ws, bias, torch.float32)
    if CUDA:
        assert float((y.double() - r.double()).norm() / r.double().norm()) < 1e-6
    else:
        assert torch.equal(y, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_activation_quantization_bit_identical_on_gpu(dtype):
    """Only on the GPU: the interpreter's fp8 cast does not round to nearest even."""
    x = acts(37, 3072, dtype)
    q, s = tk.quantize_activations(x, torch.float8_e4m3fn, 3072)
    rq, rs = activations.quantize_activations(x.cpu(), FORMATS["fp8"], 3072)
    assert torch.equal(q.view(torch.uint8).cpu(), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 384), (5, 4096 + 7)])  # not a multiple of the kernel's block
def test_fp8_static_activation_quantization(dtype, shape):
    """One static scale (a layer's input_scale), saturating outliers. Bit-identical on the GPU; the
    interpreter's fp32 -> fp8 cast is not a rounding (31.4 comes out as 16), so there only the
    division and clamp are checked: signs, zeros and the saturated elements."""
    x = acts(*shape, dtype, seed=shape[1])
    scale = torch.tensor(float(x.float().abs().max()) / 448 / 4, device=DEV)  # 4x outliers saturate
    q = tk.quantize_static(x, scale, torch.float8_e4m3fn)
    r = reference.quantize_with_scale(x.cpu(), scale.cpu(), FORMATS["fp8"], 0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    if CUDA:
        assert torch.equal(q.view(torch.uint8).cpu(), r.view(torch.uint8))
    else:
        a, b = q.float().cpu(), r.float()
        both = (a != 0) & (b != 0)
        assert float(both.float().mean()) > 0.7 and torch.equal(a[both].sign(), b[both].sign())
    assert float(r.float().abs().max()) == 448.0 and torch.equal(q.float().cpu().abs() == 448, r.float().abs() == 448)
