"""nvfp4 files with ``pre_quant_scale`` (AWQ-style smoothing, written by other producers): ComfyUI
(0271a469) loads it as a module parameter and multiplies the input by it; quantkit's runtime does the
same, and the converter, ``verify`` and ``inspect`` treat the layer's weight as W'[:, k] * s[k]."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, LayerOpts, encode_comfy_quant, nvfp4, scaled
from quantkit.runtime import mixed_precision_ops

from comfy_fixture import comfy  # noqa: F401  (fixture)

N, K = 48, 80  # K not a multiple of 16 x 16: padding
F = FORMATS["nvfp4"]


def _weights():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(N, K, generator=g) * 0.05
    w[:, 7] *= 20  # an outlier input channel
    s = torch.exp(torch.randn(K, generator=g) * 0.7)  # positive per-channel smoothing
    return w, s


def _layer(w, s, with_s=True):
    """The tensors of one smoothed nvfp4 layer ``l``: W / s quantized, s stored."""
    st = nvfp4.quantize((w / s[None, :]).bfloat16())
    m = {**F.marker((N, K), torch.bfloat16, LayerOpts())}
    sd = {f"l.{k}": v for k, v in st.items()}
    sd["l.comfy_quant"] = torch.frombuffer(bytearray(encode_comfy_quant(m)), dtype=torch.uint8)
    sd["l.bias"] = torch.linspace(-1, 1, N)
    if with_s:
        sd["l.pre_quant_scale"] = s.float()
    return sd, m


def _sub(sd):
    return {k[2:]: v for k, v in sd.items()}


def test_dequantize_applies_the_smoothing_per_input_channel():
    w, s = _weights()
    sd, m = _layer(w, s)
    stored = {k[2:]: v for k, v in sd.items() if k not in ("l.comfy_quant", "l.bias")}
    plain = F.dequantize({k: v for k, v in stored.items() if k != "pre_quant_scale"}, m, torch.float32, "l")
    got = F.dequantize(stored, m, torch.float32, "l")
    assert torch.equal(got, plain * s[None, :])
    # the smoothed weight is W again, to nvfp4's error: measured 21.0 dB on this weight; floor 18 dB
    assert scaled.sqnr(w, got) > 18.0
    with pytest.raises(QuantkitError, match="pre_quant_scale is torch.float32 \\[79\\]"):
        F.dequantize({**stored, "pre_quant_scale": s[:-1]}, m, torch.float32, "l")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runtime_and_comfyui_multiply_the_input(comfy, dtype):  # noqa: F811
    w, s = _weights()
    sd, m = _layer(w, s)
    plain = F.dequantize({k[2:]: v for k, v in sd.items() if k not in ("l.comfy_quant", "l.bias", "l.pre_quant_scale")},
                         m, dtype, "l")
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = torch.nn.functional.linear(x * s.to(dtype), plain, sd["l.bias"].to(dtype))
    lin = mixed_precision_ops(compute_dtype=dtype).Linear(K, N)
    res = lin.load_state_dict(_sub(sd))
    assert not res.missing_keys and not res.unexpected_keys, res
    with torch.inference_mode():
        assert torch.equal(lin(x), want)
    # ComfyUI's loader consumes the key (a module parameter) and its forward multiplies the input;
    # on this CPU its nvfp4 matmul is disabled, so the weight is dequantized: the same product
    ops = comfy.ops.mixed_precision_ops({}, dtype, disabled=comfy.ops.get_disabled_quant_formats())
    clin = ops.Linear(K, N)
    cres = clin.load_state_dict(_sub(sd), strict=True)
    assert not cres.missing_keys and not cres.unexpected_keys, cres
    assert torch.equal(clin.pre_quant_scale, s.float())
    with torch.inference_mode():
        assert torch.equal(clin(x), want)


def test_convert_reads_a_smoothed_layer_as_its_effective_weight(tmp_path):
    w, s = _weights()
    sd, _ = _layer(w, s)
    src = tmp_path / "smoothed.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "int8.safetensors"
    quantkit.convert(src, out, format="int8-row", preset="none")
    got = load_file(str(out))
    assert "l.pre_quant_scale" not in got  # the smoothing is folded into the new weight
    deq = FORMATS["int8-row"].dequantize({"weight": got["l.weight"], "weight_scale": got["l.weight_scale"]},
                                         json.loads(got["l.comfy_quant"].numpy().tobytes()), torch.float32, "l")
    eff = F.dequantize({k[2:]: v for k, v in sd.items() if k not in ("l.comfy_quant", "l.bias")},
                       json.loads(sd["l.comfy_quant"].numpy().tobytes()), torch.float32, "l")
    # int8-row of the effective weight: measured 35.93 dB against it (as int8-row of it in memory);
    # floor 33 dB. Quantizing the unsmoothed dequantization instead (the bug this guards against)
    # measures 7.6 dB.
    assert scaled.sqnr(eff, deq) > 33.0
    # --keep-quantized copies the layer through, smoothing included, byte for byte
    kept = tmp_path / "kept.safetensors"
    quantkit.convert(src, kept, format="int8-row", preset="none", keep_quantized=True)
    k = load_file(str(kept))
    assert torch.equal(k["l.pre_quant_scale"], sd["l.pre_quant_scale"])
    assert torch.equal(k["l.weight"], sd["l.weight"])


def test_inspect_flags_a_bad_pre_quant_scale(tmp_path):
    w, s = _weights()
    sd, _ = _layer(w, s)
    sd["l.pre_quant_scale"] = s[:40].float()
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    from quantkit.inspection import inspect_file
    rep = inspect_file(p)
    bad = [v for v in rep.violations if v.tensor == "l.pre_quant_scale"]
    assert bad and bad[0].rule == "wrong-scale-shape", rep.violations
