"""nvfp4's static ``input_scale`` from calibration: the value (max |x| / (448 * 6), fp32), the plan
listing it only with calibration, ComfyUI's loader (the stand-in, comfy-kitchen's real layout)
taking it with no unexpected keys, and held-out activation error with the static scale against
kitchen's dynamic one on all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import quantkit
from comfy_fixture import comfy  # noqa: F401
from conftest import at_least, record
from quantkit import calibration
from quantkit.formats import FORMATS, LayerOpts
from quantkit.plan import Options, plan_file

torch.set_num_threads(1)

NVFP4 = FORMATS["nvfp4"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 256)
        self.down = nn.Linear(256, 128)
        self.unused = nn.Linear(40, 24)  # never runs: no input_scale; 40x24 pads to 48x32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def tiny_files(tmp_path):
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad(), calibration.capture(m) as cap:
        for _ in range(8):
            m(torch.randn(64, 8) * 2 + 1)
    stats = tmp_path / "stats.safetensors"
    cap.save(stats)
    ck = tmp_path / "tiny.safetensors"
    save_file({k: v.detach().to(torch.bfloat16) for k, v in m.state_dict().items()}, str(ck))
    return ck, stats, cap.result


def _want(cal, layer: str) -> torch.Tensor:
    """The formula, written out: fp32 max |x| over the calibration set, divided by 448 * 6 in fp32."""
    amax = cal.layers[layer]["absmax"].to(torch.float32).max()
    return amax / torch.tensor(448.0 * 6.0, dtype=torch.float32)


def test_static_input_scale_rule():
    s = NVFP4.static_input_scale({"absmax": torch.tensor([0.5, 26.88, 1.0])})
    assert s.dtype == torch.float32 and s.shape == () and float(s) == pytest.approx(0.01, rel=1e-6)
    # no non-zero input (or a non-finite statistic): no static scale, kitchen's dynamic one stays
    assert NVFP4.static_input_scale({"absmax": torch.zeros(3)}) is None
    assert NVFP4.static_input_scale({"absmax": torch.tensor([1.0, float("inf")])}) is None
    assert [s.suffix for s in NVFP4.stored((24, 40), torch.bfloat16, LayerOpts())] == \
        ["weight", "weight_scale", "weight_scale_2"]
    assert NVFP4.stored((24, 40), torch.bfloat16, LayerOpts(static_input_scale=True))[-1] == \
        ("input_scale", "F32", ())


def test_static_input_scale_is_not_a_user_option(tiny_files):
    ck, _, _ = tiny_files
    with pytest.raises(quantkit.errors.UsageError, match="unknown format option 'static_input_scale'"):
        plan_file(ck, Options(format="nvfp4", format_options=(("static_input_scale", True),)))


@pytest.mark.parametrize("learned_rounding", [False, True])
def test_convert_writes_calibrated_input_scale(tiny_files, tmp_path, learned_rounding):
    ck, stats, cal = tiny_files
    plain, calib = tmp_path / "plain.safetensors", tmp_path / "calib.safetensors"
    quantkit.convert(ck, plain, format="nvfp4")
    rep = quantkit.convert(ck, calib, format="nvfp4", calibration=stats, learned_rounding=learned_rounding)
    a, b = load_file(str(plain)), load_file(str(calib))
    assert not any(k.endswith(".input_scale") for k in a)  # without calibration: dynamic, as before
    assert sorted(k for k in b if k.endswith(".input_scale")) == ["down.input_scale", "up.input_scale"]
    for L in ("up", "down"):
        s = b[f"{L}.input_scale"]
        assert s.dtype == torch.float32 and s.shape == ()
        assert torch.equal(s, _want(cal, L)), (L, float(s), float(_want(cal, L)))
        if not learned_rounding:  # calibration alone leaves the weight bytes as they were
            for sfx in ("weight", "weight_scale", "weight_scale_2"):
                assert torch.equal(a[f"{L}.{sfx}"].reshape(-1).view(torch.uint8), b[f"{L}.{sfx}"].reshape(-1).view(torch.uint8))
    # the file's header lists exactly what the plan said: input_scale after weight_scale_2, marker last
    with safe_open(str(calib), "pt") as f:
        names = [k for k in f.keys() if k.startswith("down.")]
    assert set(names) == {"down.weight", "down.weight_scale", "down.weight_scale_2", "down.input_scale",
                          "down.comfy_quant", "down.bias"}
    assert {r.name for r in rep.tensors} >= {"up.weight", "down.weight", "unused.weight"}
    # markers unchanged: ComfyUI needs no key to read input_scale
    assert torch.equal(a["down.comfy_quant"], b["down.comfy_quant"])


def test_input_scale_name_taken_by_the_input_is_refused(tiny_files, tmp_path):
    """A checkpoint that already holds ``down.input_scale`` (the calibrated one would be a second
    tensor of that name) is refused up front, with calibration too: one line naming file, tensor and
    fix; nothing at the target."""
    ck, stats, _ = tiny_files
    sd = load_file(str(ck))
    sd["down.input_scale"] = torch.tensor(0.5)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    out = tmp_path / "out.safetensors"
    with pytest.raises(quantkit.errors.QuantkitError) as e:
        quantkit.convert(bad, out, format="nvfp4", calibration=stats)
    msg = str(e.value)
    assert "'down.input_scale'" in msg and str(bad) in msg and "fix:" in msg and "\n" not in msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def _comfy_linear(comfy, sd: dict, layer: str, shape: tuple[int, int], dtype):  # noqa: F811
    ops = comfy.ops.mixed_precision_ops({}, dtype, disabled=comfy.ops.get_disabled_quant_formats())
    lin = ops.Linear(shape[1], shape[0], bias=f"{layer}.bias" in sd)
    sub = {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".")}
    return lin, lin.load_state_dict(sub, strict=False)


def test_comfyui_loads_input_scale_into_kitchens_layout(comfy, tiny_files, tmp_path):  # noqa: F811
    ck, stats, cal = tiny_files
    out = tmp_path / "calib.safetensors"
    quantkit.convert(ck, out, format="nvfp4", calibration=stats)
    sd = load_file(str(out))
    lin, res = _comfy_linear(comfy, sd, "down", (128, 256), torch.bfloat16)
    assert not res.missing_keys and not res.unexpected_keys, res
    assert torch.equal(lin.input_scale.data, sd["down.input_scale"])
    lin0, res0 = _comfy_linear(comfy, sd, "unused", (24, 40), torch.bfloat16)
    assert not res0.missing_keys and not res0.unexpected_keys and getattr(lin0, "input_scale", None) is None
    # kitchen's activation quantizer takes it as the per-tensor scale: its Params.scale is ours, and its
    # block scales are clamp((amax_b / 6) / input_scale, max=448) in E4M3
    from comfy_kitchen import tensor as ck_
    x = torch.randn(32, 256) * 2
    qx = ck_.QuantizedTensor.from_float(x, "TensorCoreNVFP4Layout", scale=lin.input_scale)
    assert torch.equal(qx._params.scale, sd["down.input_scale"])
    dyn = ck_.QuantizedTensor.from_float(x, "TensorCoreNVFP4Layout")
    assert float(dyn._params.scale) == pytest.approx(float(x.abs().max()) / 2688, rel=1e-6)
    # the stand-in forward quantizes the input with it (no exception, finite output)
    y = lin(x.to(torch.bfloat16))
    assert y.shape == (32, 128) and bool(torch.isfinite(y).all())


# ---- held-out activation error on all-MiniLM-L6-v2: static input_scale against dynamic scaling ----

# Calibrated on CALIBRATION (32 sentences), measured on EVALUATION (32 others), one quantizer call per
# sentence and layer as ComfyUI's forward makes them, bf16 activations, comfy-kitchen's eager
# quantize_nvfp4 both ways (scale=input_scale vs none: amax(x) / (448 * 6) per call). Measured per layer
# SQNR(static) - SQNR(dynamic), 36 linears that run (the pooler does not): min -0.0993 dB
# (layer 5 FFN down-projection, one held-out sentence above the calibration max is clipped), max
# +0.0245 dB, mean -0.0052 dB (static 21.069, dynamic 21.074 dB). The per-tensor scale only moves the
# E4M3 block-scale grid, so the difference is rounding luck of the block scales, plus clipping above
# the calibration max. Floors: per layer -0.15 dB (measured minus 0.05 dB), mean -0.03 dB (minus
# 0.025 dB); kitchen's eager quantizer is elementwise fp32 (no BLAS), so the margins are for the model's
# forward (the activations) on other CPUs / thread counts.
MIN_LAYER_DIFF_DB = -0.15
MEAN_DIFF_DB = -0.03


@pytest.fixture(scope="module")
def minilm_activation_sqnr():
    pytest.importorskip("tokenizers")
    ckt = pytest.importorskip("comfy_kitchen.tensor")
    import math

    from quantkit.models.bert import load_bert, tokenize
    from quantkit.models.sentences import CALIBRATION, EVALUATION
    ref = load_bert()
    with torch.no_grad(), calibration.capture(ref) as cap:
        for s in CALIBRATION:
            ref(*tokenize([s]))
    calls: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: calls.setdefault(n, []).append(
                 a[0].detach().reshape(-1, a[0].shape[-1]).to(torch.bfloat16)))
             for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            for s in EVALUATION:
                ref(*tokenize([s]))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, xs in calls.items():
        s = NVFP4.static_input_scale(cap.result.layers[n])
        sig = e_static = e_dyn = 0.0
        for x in xs:
            xd = x.double()
            qs = ckt.QuantizedTensor.from_float(x, "TensorCoreNVFP4Layout", scale=s).dequantize().double()
            qd = ckt.QuantizedTensor.from_float(x, "TensorCoreNVFP4Layout").dequantize().double()
            sig += float((xd ** 2).sum())
            e_static += float(((xd - qs) ** 2).sum())
            e_dyn += float(((xd - qd) ** 2).sum())
        out[n] = (10 * math.log10(sig / e_static), 10 * math.log10(sig / e_dyn))
    return out


def test_minilm_static_input_scale_loses_nothing_to_dynamic(minilm_activation_sqnr):
    r = minilm_activation_sqnr
    assert len(r) == 36
    diff = {n: s - d for n, (s, d) in r.items()}
    worst = min(diff, key=diff.get)
    at_least(diff[worst], MIN_LAYER_DIFF_DB, f"nvfp4 activation SQNR static - dynamic, worst layer ({worst}), dB")
    at_least(sum(diff.values()) / len(diff), MEAN_DIFF_DB, "nvfp4 activation SQNR static - dynamic, mean, dB")
    record("nvfp4 activation SQNR static, mean dB", sum(s for s, _ in r.values()) / len(r))
    record("nvfp4 activation SQNR dynamic, mean dB", sum(d for _, d in r.values()) / len(r))
    # kitchen takes the static scale (were it ignored, the two would be the same bits on every layer)
    assert sum(abs(v) > 1e-3 for v in diff.values()) >= 30, diff
