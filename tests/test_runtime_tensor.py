"""QuantizedTensor, layouts and dispatch on CPU: bit-identical to the reference math."""

import pytest
import torch
import torch.nn.functional as F

from quantkit import reference
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS
from quantkit.runtime import (LAYOUTS, QUANT_ALGOS, LayoutParams, QuantizedLayout, QuantizedTensor,
                              get_layout_class, register_layout_class, register_layout_op, supports_fp8_compute)
from quantkit.runtime import activations

# (layout, from_float kwargs, quantkit format, block size)
CASES = [
    ("TensorCoreFP8Layout", {}, "fp8", 0),
    ("TensorCoreFP8E4M3Layout", {}, "fp8", 0),
    ("TensorCoreFP8E5M2Layout", {}, "fp8-e5m2", 0),
    ("TensorWiseINT8Layout", {}, "int8-tensor", 0),
    ("TensorWiseINT8Layout", {"per_channel": True}, "int8-row", 0),
    ("BlockWiseINT8Layout", {"block_size": 64}, "int8-block", 64),
]
IDS = [f"{c[0]}-{c[2]}" for c in CASES]


def weight(n=192, k=256, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    w[:, 3] *= 20  # an outlier column, as real FFN weights have
    return w.to(dtype)


def bits(t):
    return t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t


@pytest.mark.parametrize("layout,kw,fmt,b", CASES, ids=IDS)
def test_from_float_and_dequantize_match_reference(layout, kw, fmt, b):
    w = weight()
    qt = QuantizedTensor.from_float(w, layout, **kw)
    q, s = reference.quantize(w, FORMATS[fmt], b)
    assert torch.equal(bits(qt._qdata), bits(q)) and torch.equal(qt.params.scale, s)
    assert qt.shape == w.shape and qt.dtype == torch.bfloat16 and qt.params.block_size == b
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(qt.dequantize(dt), reference.dequantize(q, s, FORMATS[fmt], b, dt))


@pytest.mark.parametrize("layout,kw,fmt,b", CASES, ids=IDS)
def test_cheap_ops_keep_quantized_data(layout, kw, fmt, b):
    qt = QuantizedTensor.from_float(weight(), layout, **kw)
    deq = qt.dequantize()
    t = qt.t()
    assert isinstance(t, QuantizedTensor) and t.shape == (256, 192)
    assert t._qdata.data_ptr() == qt._qdata.data_ptr()  # a view, not a copy
    assert torch.equal(t.dequantize(), deq.t()) and torch.equal(qt.transpose(0, 1).dequantize(), deq.t())
    for same in (qt.detach(), qt.clone(), torch.nn.Parameter(qt, requires_grad=False)):
        assert isinstance(same, QuantizedTensor) and torch.equal(same.dequantize(), deq)
    half = qt.to(torch.float16)
    assert isinstance(half, QuantizedTensor) and half.dtype == torch.float16
    assert torch.equal(half.dequantize(), qt.dequantize(torch.float16))
    lin = torch.nn.Linear(256, 192)
    lin.weight = torch.nn.Parameter(qt, requires_grad=False)
    lin.to(torch.float16)  # module conversion swaps the whole QuantizedTensor, params included
    assert lin.weight.params.orig_dtype == torch.float16 and lin.weight.dequantize().dtype == torch.float16
    # ops without a handler run on the dequantized tensor
    assert torch.equal(qt * 2, deq * 2) and torch.equal(qt.sum(0), deq.sum(0))
    assert torch.equal(qt.reshape(-1), deq.reshape(-1)) and type(qt * 2) is torch.Tensor


@pytest.mark.parametrize("layout,kw,fmt,b", CASES, ids=IDS)
def test_linear_on_cpu(layout, kw, fmt, b):
    w = weight()
    qt = QuantizedTensor.from_float(w, layout, **kw)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    bias = torch.randn(192, dtype=torch.bfloat16)
    y = F.linear(x, qt, bias)
    assert type(y) is torch.Tensor and y.shape == (3, 5, 192) and y.dtype == torch.bfloat16
    spec = FORMATS[fmt]
    if spec.is_int:  # W8A8: per-token (per-group for block) int8 activations, exact int32 dots
        x2 = x.reshape(15, 256)
        group = b or 256
        xq, xs = activations.quantize_activations(x2, FORMATS["int8-block"], group)
        # independent spelling of the same math, in float64 (exact integer dots at these sizes)
        wq, ws = qt._qdata.double(), reference.expand_scale(qt.params.scale, (192, 256), spec, b).double()
        if b:
            want = sum(((xq[:, g * b:(g + 1) * b].double() @ wq[:, g * b:(g + 1) * b].t()) * xs[:, g:g + 1].double()
                        * ws[:, g * b][None, :]) for g in range(256 // b))
        else:
            want = (xq.double() @ wq.t()) * xs.double() * ws.reshape(1, -1)
        want = (want + bias.double()).reshape(3, 5, 192)
        err = (y.double() - want).norm() / want.norm()
        assert err < 4e-3  # bf16 output rounding only
    else:  # dequantize path: exactly ComfyUI's F.linear(x, deq_in_compute_dtype, bias)
        assert torch.equal(y, F.linear(x, qt.dequantize(torch.bfloat16), bias))


def test_w8a8_reference_is_exact_int_math():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 256, generator=g)
    w = weight(128, 256, torch.float32)
    xq, xs = activations.quantize_activations(x, FORMATS["int8-block"], 64)
    wq, ws = reference.quantize(w, FORMATS["int8-block"], 64)
    y = activations.w8a8_block_matmul(xq, xs, wq, ws, 64, None, torch.float32)
    want = torch.zeros(33, 128, dtype=torch.float64)
    for kb in range(4):
        c = slice(kb * 64, (kb + 1) * 64)
        want += (xq[:, c].double() @ wq[:, c].double().t()) * xs[:, kb:kb + 1].double() \
            * ws[:, kb].repeat_interleave(64)[None, :].double()
    assert float((y.double() - want).norm() / want.norm()) < 1e-6  # fp32 accumulation of exact dots
    # the activation quantizer follows the converter's rules: amax/127 scales, zero rows get 1.0
    x[5] = 0
    q, s = activations.quantize_activations(x, FORMATS["int8-block"], 64)
    assert torch.equal(s[5], torch.ones(4)) and not q[5].any()
    assert torch.equal(s[0], x[0].reshape(4, 64).abs().amax(1) / torch.tensor(127.0))


def test_layout_registry_errors_and_custom_layout_ops():
    with pytest.raises(QuantkitError, match="'TensorWiseINT8Layout' is already registered"):
        register_layout_class("TensorWiseINT8Layout", get_layout_class("TensorWiseINT8Layout"))
    with pytest.raises(QuantkitError, match="unknown layout 'NoSuchLayout'.*AsymW4A8Int8Layout, BlockWiseINT8Layout, TensorCoreAWQW4A16Layout, TensorCoreConvRotW4A4Layout, TensorCoreFP8E4M3Layout"):
        QuantizedTensor.from_float(weight(), "NoSuchLayout")
    with pytest.raises(QuantkitError, match="not divisible by block size 128"):
        QuantizedTensor.from_float(weight(192, 256), "BlockWiseINT8Layout")

    class DoubledFP8Layout(get_layout_class("TensorCoreFP8Layout")):
        pass
    register_layout_class("TestDoubledFP8Layout", DoubledFP8Layout)
    try:
        qt = QuantizedTensor.from_float(weight(), "TestDoubledFP8Layout")
        x = torch.randn(4, 256, dtype=torch.bfloat16)
        # inherits the FP8 linear handler through the layout class's MRO
        assert torch.equal(F.linear(x, qt), F.linear(x, qt.dequantize()))
        seen = []

        @register_layout_op(torch.ops.aten.linear.default, "TestDoubledFP8Layout")
        def doubled(func, args, kwargs):
            seen.append(func)
            return 2 * F.linear(args[0], args[1].dequantize())
        assert torch.equal(F.linear(x, qt), 2 * F.linear(x, qt.dequantize())) and seen == [torch.ops.aten.linear.default]

        @register_layout_op(torch.ops.aten.neg.default, DoubledFP8Layout)
        def neg(func, args, kwargs):
            return args[0].dequantize() * 0
        assert not torch.neg(qt).any()
    finally:
        del LAYOUTS["TestDoubledFP8Layout"]


def test_quant_algos_table_and_fp8_support():
    assert QUANT_ALGOS["float8_e4m3fn"]["comfy_tensor_layout"] == "TensorCoreFP8E4M3Layout"
    assert QUANT_ALGOS["int8_tensorwise"]["storage_t"] is torch.int8
    assert QUANT_ALGOS["int8_blockwise"] == {"storage_t": torch.int8, "parameters": {"weight_scale", "input_scale"},
                                             "comfy_tensor_layout": "BlockWiseINT8Layout", "group_size": 128}
    assert not supports_fp8_compute("cpu")
    assert issubclass(get_layout_class("BlockWiseINT8Layout"), QuantizedLayout)
    assert LayoutParams(torch.ones(()), torch.float32, (2, 2)).block_size == 0


CK_CASES = [(c, i) for c, i in zip(CASES, IDS) if c[0] not in ("TensorCoreFP8Layout", "BlockWiseINT8Layout")]


@pytest.mark.parametrize("layout,kw,fmt,b", [c for c, _ in CK_CASES], ids=[i for _, i in CK_CASES])
def test_dequantize_matches_comfy_kitchen(layout, kw, fmt, b):
    """Our dequantization against ComfyUI's own kernel library where it has the layout (comfy-kitchen
    has no block-wise INT8 one: that layout is checked bit for bit against the contract's formula in
    test_comfyui_layout.py and against reference.dequantize above)."""
    ck = pytest.importorskip("comfy_kitchen.tensor")
    qt = QuantizedTensor.from_float(weight(), layout, **kw)
    name = "TensorCoreFP8Layout" if "FP8" in layout else layout
    cls = getattr(ck, name)
    kt = ck.QuantizedTensor(qt._qdata, name, cls.Params(scale=qt.params.scale, orig_dtype=torch.bfloat16,
                                                         orig_shape=tuple(qt.shape)))
    assert torch.equal(kt.dequantize(), qt.dequantize())


def test_quant_ops_entry_module_reexports_the_runtime():
    import quant_ops
    import quantkit.runtime as rt
    from quant_ops import QuantizedLayout as QL
    from quant_ops import QuantizedTensor as QT
    from quant_ops import mixed_precision_ops as mpo
    from quant_ops import register_layout_op as rlo
    assert (QT, QL, rlo, mpo) == (rt.QuantizedTensor, rt.QuantizedLayout, rt.register_layout_op, rt.mixed_precision_ops)
    assert quant_ops.QUANT_ALGOS is rt.QUANT_ALGOS and quant_ops.TensorCoreFP8Layout is rt.TensorCoreFP8E4M3Layout
