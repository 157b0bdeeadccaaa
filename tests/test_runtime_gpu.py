"""The CUDA fast paths (run with ``-m gpu`` on the device machine)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit import reference
from quantkit.formats import FORMATS, LayerOpts
from quantkit.runtime import QuantizedTensor, activations, mixed_precision_ops, supports_fp8_compute

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def data(m=300, k=1024, n=768, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(torch.bfloat16)
    x[:, 7] *= 30
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    return x, w, bias


@pytest.mark.parametrize("layout,kw", [("TensorWiseINT8Layout", {}), ("TensorWiseINT8Layout", {"per_channel": True}),
                                       ("BlockWiseINT8Layout", {"block_size": 128})])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_cuda_matches_cpu_w8a8_reference(layout, kw, with_bias):
    x, w, bias = data()
    bias = bias if with_bias else None
    qt = QuantizedTensor.from_float(w, layout, **kw)
    want = F.linear(x, qt, bias)  # CPU: the torch reference W8A8 (same activation rounding)
    got = F.linear(x.cuda(), qt.to("cuda"), None if bias is None else bias.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert rel(got.cpu(), want) < 2e-3  # bf16 output rounding
    # M <= 16 (a decode step) runs through the same kernels
    small = F.linear(x[:3].cuda(), qt.to("cuda"), None if bias is None else bias.cuda())
    assert rel(small.cpu(), F.linear(x[:3], qt, bias)) < 1e-2


@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_dynamic_scaled_mm(with_bias):
    assert supports_fp8_compute("cuda") == (torch.cuda.get_device_capability() >= (8, 9))
    if not supports_fp8_compute("cuda"):
        pytest.skip("no FP8 tensor cores")
    x, w, bias = data()
    bias = bias if with_bias else None
    qt = QuantizedTensor.from_float(w, "TensorCoreFP8Layout")
    got = F.linear(x.cuda(), qt.to("cuda"), None if bias is None else bias.cuda()).cpu()
    xq, xs = activations.quantize_activations(x, FORMATS["fp8"], x.shape[1])
    want = (xq.double() * xs.double()) @ qt.dequantize(torch.float32).double().t()
    if bias is not None:
        want = want + bias.double()
    assert rel(got, want) < 2e-3


def test_fp8_static_input_scale_through_ops_linear():
    if not supports_fp8_compute("cuda"):
        pytest.skip("no FP8 tensor cores")
    x, w, bias = data()
    q, s = reference.quantize(w, FORMATS["fp8"], 0)
    in_scale = (x.float().abs().amax() / 448).reshape(())
    sd = {"weight": q, "weight_scale": s, "input_scale": in_scale, "bias": bias,
          "comfy_quant": torch.tensor(list(b'{"format":"float8_e4m3fn"}'), dtype=torch.uint8)}
    lin = mixed_precision_ops().Linear(1024, 768)
    lin.load_state_dict(sd)
    lin = lin.cuda()
    assert lin.weight.device.type == "cuda" and isinstance(lin.weight, QuantizedTensor)
    got = lin(x.cuda()).cpu()
    xq = reference.quantize_with_scale(x, in_scale, FORMATS["fp8"], 0)
    want = (xq.double() * in_scale.double()) @ (q.double() * s.double()).t() + bias.double()
    assert rel(got, want) < 2e-3


def test_module_moves_to_cuda_and_runs():
    x, w, bias = data()
    for fmt, layout in (("fp8-e5m2", "TensorCoreFP8E5M2Layout"), ("int8-block", "BlockWiseINT8Layout")):
        ops = mixed_precision_ops(compute_dtype=torch.bfloat16)
        net = nn.Sequential(ops.Linear(1024, 768), nn.GELU())
        q, s = reference.quantize(w, FORMATS[fmt], 128)
        marker = FORMATS[fmt].marker((768, 1024), torch.bfloat16, LayerOpts(128))

        net.load_state_dict({"0.weight": q, "0.weight_scale": s, "0.bias": bias,
                             "0.comfy_quant": torch.tensor(list(json.dumps(marker).encode()), dtype=torch.uint8)})
        cpu = net(x)
        net.cuda()
        assert net[0].weight._qdata.is_cuda and net[0].weight.params.scale.is_cuda
        assert net[0].weight._layout_type == layout
        assert rel(net(x.cuda()).cpu(), cpu) < 2e-3
