"""The int8_blockwise comfy-kitchen layout (real comfy-kitchen, no ComfyUI needed): built from a
quantkit file's tensors it dequantizes bit-exactly to the contract formula, and F.linear on it is
exactly the dequantized matmul, whichever aten ops torch routes it through."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

pytest.importorskip("comfy_kitchen")

from comfy_kitchen.tensor import QuantizedTensor, get_layout_class, register_layout_class  # noqa: E402

import quantkit  # noqa: E402
from conftest import at_least, db_floor, record  # noqa: E402
from quantkit import reference  # noqa: E402
from quantkit.comfyui import layout  # noqa: E402
from quantkit.formats import FORMATS  # noqa: E402

SPEC = FORMATS["int8-block"]


def contract_dequant(q: torch.Tensor, scale: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
    """comfy-contract.md, int8_blockwise row, written out independently of quantkit.reference."""
    n, k = q.shape
    tiles = q.view(n // b, b, k // b, b).permute(0, 2, 1, 3).to(dtype) * scale[..., None, None]
    return tiles.permute(0, 2, 1, 3).reshape(n, k).to(dtype)


@pytest.fixture(scope="module")
def block_file(tmp_path_factory):
    """flux-mini converted to int8-block (b=64): every linear weight tiles at 64."""
    from conftest import SAMPLE
    out = tmp_path_factory.mktemp("blk") / "mini-int8-block.safetensors"
    report = quantkit.convert(SAMPLE, out, format="int8-block", block_size=64)
    assert all(lr.format in (None, "int8-block") for lr in report.layers)
    sd = load_file(str(out))
    assert len(_block_layers(sd)) == sum(lr.action == "quantized" for lr in report.layers) >= 15
    return sd, load_file(str(SAMPLE))


def _block_layers(sd):
    return sorted(k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant"))


@pytest.fixture(autouse=True)
def _registered():
    try:
        get_layout_class(layout.LAYOUT_NAME)
    except KeyError:
        register_layout_class(layout.LAYOUT_NAME, layout.BlockINT8Layout)


def test_dequantize_is_the_contract_formula_bit_for_bit(block_file):
    sd, orig = block_file
    layers = _block_layers(sd)
    for name in layers:
        q, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            qt = layout.make_tensor(q, s, 64, dtype)
            assert isinstance(qt, QuantizedTensor) and qt.shape == q.shape and qt.dtype == dtype
            got = qt.dequantize()
            assert got.dtype == dtype
            assert torch.equal(got, contract_dequant(q, s, 64, dtype)), (name, dtype)
            assert torch.equal(got, reference.dequantize(q, s, SPEC, 64, dtype)), (name, dtype)
        # a real quantization of the source weight: these synthetic weights measure 28.93 dB (worst) to 32.1 dB
        at_least(reference.sqnr(orig[f"{name}.weight"].float(), qt.dequantize().float()), db_floor(28.93),
                 f"{name} SQNR dB")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_dequantized_matmul(block_file, dtype):
    sd, _ = block_file
    g = torch.Generator().manual_seed(0)
    for name in _block_layers(sd)[:6]:
        q, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
        bias = sd[f"{name}.bias"].to(dtype)
        qt = layout.make_tensor(q, s, 64, dtype)
        deq = contract_dequant(q, s, 64, dtype)
        x = torch.randn(3, 5, q.shape[1], generator=g).to(dtype)
        want = F.linear(x, deq, bias)
        with torch.inference_mode():  # one aten.linear call (how ComfyUI samples)
            assert torch.equal(F.linear(x, qt, bias), want)
        # autograd on: torch decomposes into aten.t + aten.mm / aten.addmm
        assert torch.equal(F.linear(x, qt, bias), want)
        assert torch.equal(F.linear(x[0], qt, bias), F.linear(x[0], deq, bias))
        assert torch.equal(F.linear(x, qt), F.linear(x, deq))
        assert torch.equal(x[0] @ qt.t(), x[0] @ deq.t())


def test_transpose_flag_dequantizes_transposed(block_file):
    sd, _ = block_file
    name = _block_layers(sd)[0]
    q, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
    qt = layout.make_tensor(q, s, 64)
    t = qt.t()
    assert isinstance(t, QuantizedTensor) and t.shape == (q.shape[1], q.shape[0])
    assert torch.equal(t.dequantize(), contract_dequant(q, s, 64, torch.float32).t())


def test_quantize_matches_the_converter_and_requantizes(block_file):
    """ComfyUI re-quantizes a LoRA-patched weight with requantize_from_float(scale="recalculate",
    stochastic_rounding=seed, inplace_ops=True): that must give quantkit's bits."""
    sd, orig = block_file
    name = _block_layers(sd)[0]
    w = orig[f"{name}.weight"]
    q, params = layout.BlockINT8Layout.quantize(w, block_size=64)
    assert torch.equal(q, sd[f"{name}.weight"]) and torch.equal(params.scale, sd[f"{name}.weight_scale"])
    qt = QuantizedTensor(q, layout.LAYOUT_NAME, params)
    w2 = w.float() * 1.5
    re = qt.requantize_from_float(w2, scale="recalculate", stochastic_rounding=1234, inplace_ops=True)
    rq, rs = reference.quantize(w2, SPEC, 64)
    assert re._layout_cls == layout.LAYOUT_NAME and re._params.block_size == 64
    assert torch.equal(re._qdata, rq) and torch.equal(re._params.scale, rs)
    with pytest.raises(ValueError, match="not divisible"):
        layout.BlockINT8Layout.quantize(torch.randn(96, 64), block_size=64)


def test_state_dict_and_device_moves(block_file):
    sd, _ = block_file
    name = _block_layers(sd)[0]
    qt = layout.make_tensor(sd[f"{name}.weight"], sd[f"{name}.weight_scale"], 64, torch.bfloat16)
    out = qt.state_dict(f"{name}.weight")
    assert set(out) == {f"{name}.weight", f"{name}.weight_scale"}
    assert torch.equal(out[f"{name}.weight"], sd[f"{name}.weight"])
    moved = qt.to(dtype=torch.float16)
    assert moved.dtype == torch.float16 and moved._params.block_size == 64
    assert torch.equal(moved.dequantize(), contract_dequant(sd[f"{name}.weight"], sd[f"{name}.weight_scale"], 64,
                                                            torch.float16))


def test_registering_twice_is_harmless():
    register_layout_class(layout.LAYOUT_NAME, layout.BlockINT8Layout)
    register_layout_class(layout.LAYOUT_NAME, layout.BlockINT8Layout)
    assert get_layout_class(layout.LAYOUT_NAME) is layout.BlockINT8Layout
    w = torch.randn(128, 256)
    qt = QuantizedTensor.from_float(w, layout.LAYOUT_NAME, block_size=128)
    assert torch.equal(qt.dequantize(), reference.dequantize(*reference.quantize(w, SPEC, 128), SPEC, 128))


FAST_CHECK = r"""
import os, torch
from quantkit import reference
from quantkit.formats import FORMATS
from quantkit.comfyui import layout
from quantkit.runtime import activations
spec = FORMATS["int8-block"]
t = layout.fast_kernels()
assert t is not None and t.INTERPRET
g = torch.Generator().manual_seed(0)
w = torch.randn(128, 256, generator=g)
x = torch.randn(5, 256, generator=g)
bias = torch.randn(128, generator=g)
q, s = reference.quantize(w, spec, 64)
qt = layout.make_tensor(q, s, 64)
y = layout.fast_linear(x, qt, bias)
xq, xs = activations.quantize_activations(x, spec, 64)
want = activations.w8a8_block_matmul(xq, xs, q, s, 64, bias, torch.float32)
assert torch.equal(y, want), (y - want).abs().max()
deq = torch.nn.functional.linear(x, reference.dequantize(q, s, spec, 64), bias)
rel = float((y - deq).norm() / deq.norm())
assert rel < 0.0054 * 1.25, rel  # measured 0.0054 (spread 4e-9); one bit coarser weights raise it ~1.6x
print("ok", rel)
"""


def test_fast_path_calls_the_runtime_kernel_correctly(tmp_path):
    """The W8A8 path the node takes on CUDA, run by Triton's CPU interpreter: bit-identical to the
    runtime's torch reference of the same math, within 1% of the dequantized matmul."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", FAST_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
    record("W8A8 vs dequantized matmul rel. error", float(r.stdout.split()[1]), ceiling=0.0054 * 1.25)


def test_cpu_never_takes_the_fast_path(monkeypatch):
    calls = []
    monkeypatch.setattr(layout, "fast_linear", lambda *a: calls.append(a))
    w = torch.randn(128, 128)
    qt = layout.make_tensor(*reference.quantize(w, SPEC, 128), 128)
    with torch.inference_mode():
        F.linear(torch.randn(2, 128), qt)
    assert calls == []


def test_failing_kernel_falls_back_to_dequantize(monkeypatch):
    """Where the kernel cannot run (e.g. a GPU Triton cannot target) the layer is dequantized, once
    and for all, never refused. Simulated on CPU by forcing the fast-path decision."""
    def boom(*a):
        raise RuntimeError("no kernel for this GPU")
    monkeypatch.setattr(layout, "_fast_failed", [])
    monkeypatch.setattr(layout, "fast_linear", boom)
    monkeypatch.setattr(layout, "_fast_enabled", lambda x: not layout._fast_failed)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    w = torch.randn(128, 128)
    q, s = reference.quantize(w, SPEC, 128)
    qt = layout.make_tensor(q, s, 128)
    x = torch.randn(3, 128)
    y = layout.block_linear(x, qt, None)
    failed = list(layout._fast_failed)
    monkeypatch.undo()
    assert len(failed) == 1 and "no kernel" in failed[0]
    assert torch.equal(y, F.linear(x, reference.dequantize(q, s, SPEC, 128)))
