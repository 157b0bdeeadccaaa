"""The torch reference quantizers: exact rounding rules, and dequantization bit-identical to
ComfyUI's kernel library (comfy-kitchen) for every stock format."""

from __future__ import annotations

import pytest
import torch

from quantkit import reference
from quantkit.formats import FORMATS, LayerOpts, encode_comfy_quant

ck = pytest.importorskip("comfy_kitchen.tensor")


def rand_weight(n, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, 3] *= 30  # an outlier input channel
    return w.to(dtype)


def test_int8_rounds_half_to_even_and_clamps():
    spec = FORMATS["int8-tensor"]
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -127.0, 126.5]])
    q, scale = reference.quantize(w, spec, 128)
    assert float(scale) == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -127, 126]]
    # values beyond qmax after division clamp, never wrap
    q = reference.quantize_with_scale(torch.tensor([[300.0, -300.0, 127.4]]), torch.tensor(1.0), spec, 128)
    assert q.tolist() == [[127, -127, 127]]


def test_fp8_clamps_before_cast():
    spec = FORMATS["fp8"]
    q = reference.quantize_with_scale(torch.tensor([[1000.0, -1e6, 448.0]]), torch.tensor(1.0), spec, 128)
    assert q.float().tolist() == [[448.0, -448.0, 448.0]]  # a bare cast would give NaN
    spec = FORMATS["fp8-e5m2"]
    q = reference.quantize_with_scale(torch.tensor([[1e6]]), torch.tensor(1.0), spec, 128)
    assert q.float().tolist() == [[57344.0]]


def test_zero_region_gets_unit_scale():
    w = torch.zeros(256, 256, dtype=torch.bfloat16)
    w[:128, :128] = 1.0
    q, s = reference.quantize(w, FORMATS["int8-block"], 128)
    assert s.tolist() == [[1 / 127, 1.0], [1.0, 1.0]] or torch.allclose(s, torch.tensor([[1 / 127, 1.0], [1.0, 1.0]]))
    assert s[0, 1] == 1.0 and s[1, 1] == 1.0
    assert int(q[128:].abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_shapes(dtype):
    w = rand_weight(256, 384, dtype)
    assert reference.compute_scale(w, FORMATS["fp8"], 128).shape == ()
    assert reference.compute_scale(w, FORMATS["int8-row"], 128).shape == (256, 1)
    assert reference.compute_scale(w, FORMATS["int8-block"], 128).shape == (2, 3)
    assert reference.compute_scale(w, FORMATS["int8-block"], 64).shape == (4, 6)


def _kitchen_dequant(q, scale, spec, shape, dtype):
    if spec.is_int:
        params = ck.TensorWiseINT8Layout.Params(scale=scale, orig_dtype=dtype, orig_shape=shape)
        qt = ck.QuantizedTensor(q, "TensorWiseINT8Layout", params)
    else:
        params = ck.TensorCoreFP8Layout.Params(scale=scale, orig_dtype=dtype, orig_shape=shape)
        qt = ck.QuantizedTensor(q, "TensorCoreFP8Layout", params)
    return qt.dequantize()


@pytest.mark.parametrize("fmt", ["fp8", "fp8-e5m2", "int8-tensor", "int8-row"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_dequant_matches_comfy_kitchen_bit_for_bit(fmt, compute):
    spec = FORMATS[fmt]
    w = rand_weight(192, 320, seed=1)
    q, scale = reference.quantize(w, spec, 128)
    ours = reference.dequantize(q, scale, spec, 128, compute)
    theirs = _kitchen_dequant(q, scale, spec, tuple(w.shape), compute)
    assert theirs.dtype == ours.dtype == compute
    assert torch.equal(ours.view(torch.int16 if compute == torch.bfloat16 else torch.int32),
                       theirs.view(torch.int16 if compute == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("fmt", ["fp8", "int8-row"])
def test_linear_through_comfy_kitchen_matches_dequantized_matmul(fmt):
    spec = FORMATS[fmt]
    w = rand_weight(128, 256, torch.float32, seed=2)
    q, scale = reference.quantize(w, spec, 128)
    qt = (ck.QuantizedTensor(q, "TensorWiseINT8Layout", ck.TensorWiseINT8Layout.Params(
        scale=scale, orig_dtype=torch.float32, orig_shape=(128, 256))) if spec.is_int else
          ck.QuantizedTensor(q, "TensorCoreFP8Layout", ck.TensorCoreFP8Layout.Params(
              scale=scale, orig_dtype=torch.float32, orig_shape=(128, 256))))
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(5))
    got = torch.nn.functional.linear(x, qt)
    ref = x @ reference.dequantize(q, scale, spec, 128, torch.float32).T
    rel = float((got - ref).norm() / ref.norm())
    # fp8 here dequantizes the weight; int8 also quantizes activations per row (W8A8), which
    # costs about 1/127 of the row's range.
    assert rel < (1e-6 if not spec.is_int else 1e-2), rel


def test_int8_block_matches_contract_formula():
    spec = FORMATS["int8-block"]
    for b in (128, 64):
        w = rand_weight(256, 384, seed=3)
        q, scale = reference.quantize(w, spec, b)
        n, k = w.shape
        for dtype in (torch.float32, torch.bfloat16):
            formula = q.view(n // b, b, k // b, b).permute(0, 2, 1, 3).to(dtype) * scale[..., None, None]
            formula = formula.permute(0, 2, 1, 3).reshape(n, k).to(dtype)
            assert torch.equal(reference.dequantize(q, scale, spec, b, dtype), formula)
        # each tile's largest |w| maps to exactly +-127
        tiles = q.view(n // b, b, k // b, b).permute(0, 2, 1, 3).reshape(n // b, k // b, -1)
        assert tiles.abs().amax(-1).eq(127).all()


def test_comfy_quant_bytes():
    spec = FORMATS["int8-block"]
    raw = encode_comfy_quant(spec.marker((256, 512), torch.bfloat16, LayerOpts(128)))
    assert raw == b'{"format":"int8_blockwise","group_size":128,"orig_dtype":"bfloat16","orig_shape":[256,512]}'
    assert FORMATS["int8-row"].marker((4, 4), torch.float16, LayerOpts(128)) == {
        "format": "int8_tensorwise", "orig_dtype": "float16", "orig_shape": [4, 4]}


def test_sqnr_values():
    assert reference.sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert reference.sqnr_db(1.0, 0.0) == float("inf")
