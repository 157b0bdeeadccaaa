"""Registration into (stand-in) ComfyUI: int8_blockwise files load through ComfyUI's own
mixed-precision Linear; stock formats load exactly as before; registering twice, a format ComfyUI
already defines, a changed loader signature and a taken layout name are all handled."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import quantkit
from quantkit import reference
from quantkit.comfyui import layout
from quantkit.comfyui.register import LOADER_NAME, WRAPPED_MARK, register
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS

from comfy_fixture import comfy  # noqa: F401  (fixture)
from conftest import SAMPLE


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """flux-mini in every format quantkit writes, generic rules (--preset none) so that int8-block
    b=128 falls back to int8-row on the layers 128 does not divide."""
    d = tmp_path_factory.mktemp("fmts")
    out = {}
    for fmt in FORMATS:
        p = d / f"mini-{fmt}.safetensors"
        quantkit.convert(SAMPLE, p, format=fmt, block_size=128, preset="none")
        out[fmt] = load_file(str(p))
    return out


def layer_sd(sd, layer):
    pre = f"{layer}."
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}


def load_layer(comfy, sd, layer, compute_dtype=torch.float32):
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype, disabled=comfy.ops.get_disabled_quant_formats())
    lsd = layer_sd(sd, layer)
    n, k = lsd["weight"].shape
    m = ops.Linear(k, n, bias="bias" in lsd, dtype=compute_dtype)
    m.load_state_dict(lsd, strict=True)
    return m


BLOCK_LAYER = "double_blocks.0.img_mlp.0"  # [512, 128]: int8_blockwise at b=128
ROW_FALLBACK = "final_layer.linear"  # [64, 128]: 128 does not divide 64 -> int8-row


def test_int8_blockwise_needs_the_node(comfy, files):
    with pytest.raises(KeyError):  # stock ComfyUI: QUANT_ALGOS has no int8_blockwise
        load_layer(comfy, files["int8-block"], BLOCK_LAYER)


def test_register_then_load_every_format(comfy, files):
    before = {}
    for fmt in ("fp8", "fp8-e5m2", "int8-tensor", "int8-row"):
        m = load_layer(comfy, files[fmt], BLOCK_LAYER)
        before[fmt] = (m.weight._qdata.clone(), m.weight._params.scale.clone(), m.weight._layout_cls)
    stock_loader = getattr(comfy.ops, LOADER_NAME)

    r = register()
    assert r.ok and r.layout in ("added", "present") and r.quant_algos == "added" and r.loader == "wrapped"
    assert getattr(comfy.ops, LOADER_NAME) is not stock_loader
    assert getattr(getattr(comfy.ops, LOADER_NAME), WRAPPED_MARK) is stock_loader
    entry = comfy.quant_ops.QUANT_ALGOS["int8_blockwise"]
    assert entry["comfy_tensor_layout"] == layout.LAYOUT_NAME and entry["quantize_input"] is False

    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(1))
    for fmt in ("fp8", "fp8-e5m2", "int8-tensor", "int8-row"):  # stock formats: loaded by ComfyUI as before
        m = load_layer(comfy, files[fmt], BLOCK_LAYER)
        q, s, lay = before[fmt]
        assert m.weight._layout_cls == lay and torch.equal(m.weight._qdata, q) and torch.equal(m.weight._params.scale, s)

    sd = files["int8-block"]
    m = load_layer(comfy, sd, BLOCK_LAYER)
    assert m.quant_format == "int8_blockwise" and m.layout_type == layout.LAYOUT_NAME
    assert m.weight._layout_cls == layout.LAYOUT_NAME and m.weight._params.block_size == 128
    assert torch.equal(m.input_scale, torch.ones(()))  # tolerated, registered as ComfyUI does
    assert not m._full_precision_mm
    q, s = sd[f"{BLOCK_LAYER}.weight"], sd[f"{BLOCK_LAYER}.weight_scale"]
    deq = reference.dequantize(q, s, FORMATS["int8-block"], 128, torch.float32)
    with torch.inference_mode():
        assert torch.equal(m(x), F.linear(x, deq, sd[f"{BLOCK_LAYER}.bias"].float()))
    assert torch.equal(m(x), F.linear(x, deq, sd[f"{BLOCK_LAYER}.bias"].float()))
    # bf16 compute, as on GPU
    mb = load_layer(comfy, sd, BLOCK_LAYER, torch.bfloat16)
    xb = x.bfloat16()
    with torch.inference_mode():
        want = F.linear(xb, reference.dequantize(q, s, FORMATS["int8-block"], 128, torch.bfloat16),
                        sd[f"{BLOCK_LAYER}.bias"])
        assert torch.equal(mb(xb), want)
    # the fallback layer of the same file is stock int8_tensorwise
    assert load_layer(comfy, sd, ROW_FALLBACK).weight._layout_cls == "TensorWiseINT8Layout"


def test_register_twice_is_harmless(comfy, files):
    assert register().ok
    wrapped = getattr(comfy.ops, LOADER_NAME)
    entry = dict(comfy.quant_ops.QUANT_ALGOS["int8_blockwise"])
    r = register()
    assert r.ok and r.layout == "present" and r.quant_algos == "present" and r.loader == "present"
    assert getattr(comfy.ops, LOADER_NAME) is wrapped
    assert comfy.quant_ops.QUANT_ALGOS["int8_blockwise"] == entry
    m = load_layer(comfy, files["int8-block"], BLOCK_LAYER)
    assert m.weight._layout_cls == layout.LAYOUT_NAME


def test_format_already_defined_is_left_alone(comfy, files, caplog):
    other = {"storage_t": torch.int8, "parameters": {"weight_scale"}, "comfy_tensor_layout": "TensorWiseINT8Layout"}
    comfy.quant_ops.QUANT_ALGOS["int8_blockwise"] = other
    with caplog.at_level(logging.INFO, logger="quantkit.comfyui"):
        r = register()
    assert r.ok and r.quant_algos == "comfyui"
    assert comfy.quant_ops.QUANT_ALGOS["int8_blockwise"] is other
    assert "already defined" in caplog.text
    # not ours: the wrapper hands the layer to ComfyUI's loader (which, here, has no branch for it)
    with pytest.raises(ValueError, match="Unsupported quantization format: int8_blockwise"):
        load_layer(comfy, files["int8-block"], BLOCK_LAYER)


def test_changed_loader_signature_changes_nothing(comfy, files, caplog):
    def _load_quantized_module(module, super_load, state_dict, prefix, *rest):
        raise AssertionError("not called")
    comfy.ops._load_quantized_module = _load_quantized_module
    with caplog.at_level(logging.ERROR, logger="quantkit.comfyui"):
        r = register()
    assert not r.ok
    assert comfy.ops._load_quantized_module is _load_quantized_module
    assert "int8_blockwise" not in comfy.quant_ops.QUANT_ALGOS
    assert "int8_blockwise files will not load" in caplog.text and "signature" in caplog.text


def test_missing_loader_changes_nothing(comfy, caplog):
    del comfy.ops._load_quantized_module
    with caplog.at_level(logging.ERROR, logger="quantkit.comfyui"):
        assert not register().ok
    assert "does not exist" in caplog.text and "int8_blockwise" not in comfy.quant_ops.QUANT_ALGOS


def test_taken_layout_name_changes_nothing(comfy, monkeypatch, caplog):
    import comfy_kitchen.tensor.base as kb

    class Other(layout.BlockINT8Layout):
        pass
    monkeypatch.setitem(kb.LAYOUTS, layout.LAYOUT_NAME, Other)
    loader = comfy.ops._load_quantized_module
    with caplog.at_level(logging.ERROR, logger="quantkit.comfyui"):
        assert not register().ok
    assert kb.LAYOUTS[layout.LAYOUT_NAME] is Other and comfy.ops._load_quantized_module is loader
    assert "int8_blockwise" not in comfy.quant_ops.QUANT_ALGOS and "already registered" in caplog.text


def test_without_comfy_kitchen_nothing_is_registered(comfy, caplog):
    comfy.quant_ops._CK_AVAILABLE = False
    with caplog.at_level(logging.ERROR, logger="quantkit.comfyui"):
        assert not register().ok
    assert "comfy-kitchen" in caplog.text and "int8_blockwise" not in comfy.quant_ops.QUANT_ALGOS


def _tamper(sd, layer, **changes):
    out = dict(layer_sd(sd, layer))
    out.update(changes)
    return out


def test_loader_checks_and_infers_block_size(comfy, files):
    assert register().ok
    ops = comfy.ops.mixed_precision_ops({}, torch.float32, disabled=comfy.ops.get_disabled_quant_formats())
    sd = files["int8-block"]
    marker_no_gs = torch.frombuffer(bytearray(b'{"format":"int8_blockwise"}'), dtype=torch.uint8)

    m = ops.Linear(128, 512)
    m.load_state_dict(_tamper(sd, BLOCK_LAYER, comfy_quant=marker_no_gs))  # as ComfyUI itself saves it
    assert m.weight._params.block_size == 128

    cases = [
        (dict(weight_scale=torch.ones(4, 2)), "needs weight_scale \\[4, 1\\]"),
        (dict(weight=sd[f"{BLOCK_LAYER}.weight"].float()), "must be int8"),
        (dict(weight_scale=torch.ones(4, 1, dtype=torch.int32)), "must be float32"),
        (dict(comfy_quant=marker_no_gs, weight_scale=torch.ones(8, 1)), "no square tile"),
    ]
    for change, msg in cases:
        with pytest.raises(QuantkitError, match=msg) as e:
            ops.Linear(128, 512).load_state_dict(_tamper(sd, BLOCK_LAYER, **change))
        assert BLOCK_LAYER in str(e.value) or "tensor" in str(e.value)
    with pytest.raises(QuantkitError, match="different model"):
        ops.Linear(256, 256).load_state_dict(_tamper(sd, BLOCK_LAYER))
