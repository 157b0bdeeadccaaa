"""The 4-bit formats (w4a8, w4a8-6bit, int4-convrot, awq4) in quantkit's runtime and in ComfyUI's loader:

* ``quantkit.runtime.mixed_precision_ops`` loads a converted file (the bundled sample; a small
  synthetic model through ``load_quantized``) with every key consumed; each layer dequantizes bit for
  bit to the format's ``dequantize`` and runs as ``F.linear`` on it (no 4-bit kernel: the same bits);
* ComfyUI's loader (tests/fake_comfyui: the 4-bit branches of comfy/ops.py ``_load_quantized_module``
  at 0271a469) builds comfy-kitchen's REAL layouts (AsymW4A8Int8Layout, TensorCoreConvRotW4A4Layout,
  TensorCoreAWQW4A16Layout) from the same file, keys consumed exactly, and they dequantize to the
  same bits as quantkit's runtime (fp32, bf16);
* the refusals of both loaders on a layer missing a tensor, and ``inspect`` / ``verify --against``
  on a 4-bit file (per-layer SQNR of what ComfyUI dequantizes).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, LayerOpts, decode_comfy_quant, scaled
from quantkit.runtime import QuantizedTensor, get_layout_class, load_quantized, mixed_precision_ops

from comfy_fixture import comfy  # noqa: F401  (fixture)
from conftest import SAMPLE

ck = pytest.importorskip("comfy_kitchen.tensor")

NAMES = ("w4a8", "w4a8-6bit", "int4-convrot", "awq4")
KITCHEN = {"w4a8": "AsymW4A8Int8Layout", "w4a8-6bit": "AsymW4A8Int8Layout",
           "int4-convrot": "TensorCoreConvRotW4A4Layout", "awq4": "TensorCoreAWQW4A16Layout"}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
DTYPES = (torch.float32, torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def markers(sd: dict) -> dict[str, dict]:
    return {k.removesuffix(".comfy_quant"): decode_comfy_quant(v.numpy().tobytes())
            for k, v in sd.items() if k.endswith(".comfy_quant")}


def sub(sd: dict, layer: str) -> dict:
    return {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".") and "." not in k[len(layer) + 1:]}


def stored(sd: dict, layer: str) -> dict:
    return {k: v for k, v in sub(sd, layer).items() if k not in ("comfy_quant", "bias")}


# The sample's layers of one double block's image stream and one single block: K = 128, 512 and 640
# (640: ConvRot group 64); the rest of the file is copied (converting all of it costs minutes here).
SAMPLE_OTHERS = ("^(?!double_blocks\\.0\\.img_|single_blocks\\.0\\.linear)",)  # excluded


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt4")
    out = {}
    for name in NAMES:
        out[name] = d / f"{name}.safetensors"
        rep = quantkit.convert(SAMPLE, out[name], format=name, exclude=SAMPLE_OTHERS)
        assert sum(lr.format == name for lr in rep.layers) == 6  # img_mod.lin: kept by the Flux preset
    return out


def comfy_linear(comfy, sd: dict, layer: str, dtype):  # noqa: F811
    """``layer`` of ``sd`` loaded by the stand-in ComfyUI loader, strict: every key consumed."""
    n, k = json.loads(sd[f"{layer}.comfy_quant"].numpy().tobytes())["orig_shape"]
    ops = comfy.ops.mixed_precision_ops({}, dtype, disabled=comfy.ops.get_disabled_quant_formats())
    lin = ops.Linear(k, n, bias=f"{layer}.bias" in sd)
    res = lin.load_state_dict(sub(sd, layer), strict=True)
    return lin, res


# ---------------------------------------------------------------- the runtime, on the bundled sample

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_loads_and_runs_in_runtime_and_comfyui_alike(comfy, sample_files, name, dtype):  # noqa: F811
    fmt = FORMATS[name]
    sd = load_file(str(sample_files[name]))
    m = markers(sd)
    layers = [layer for layer, mk in m.items() if mk["format"] == fmt.comfy_format]
    assert layers, "the sample has no layer in this format"
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        n, k = m[layer]["orig_shape"]
        ref = fmt.dequantize(stored(sd, layer), m[layer], dtype, layer)
        # quantkit's runtime: every key consumed, weight = the format's dequantize, output = F.linear on it
        lin = mixed_precision_ops(compute_dtype=dtype).Linear(k, n, bias=f"{layer}.bias" in sd)
        res = lin.load_state_dict(sub(sd, layer))
        assert not res.missing_keys and not res.unexpected_keys, res
        assert lin.weight.layout_cls.__name__ == KITCHEN[name]
        assert lin.quant_format == fmt.comfy_format
        assert same_bits(lin.weight.dequantize(), ref), layer
        x = torch.randn(2, 3, k, generator=g).to(dtype)
        bias = sd.get(f"{layer}.bias")
        with torch.inference_mode():
            y = lin(x)
        assert torch.equal(y, torch.nn.functional.linear(x, ref, None if bias is None else bias.to(dtype))), layer
        # ComfyUI's loader: kitchen's real layout class, every key consumed, the same bits
        clin, cres = comfy_linear(comfy, sd, layer, dtype)
        assert not cres.missing_keys and not cres.unexpected_keys, cres
        assert isinstance(clin.weight, ck.QuantizedTensor) and clin.weight.layout_cls is getattr(ck, KITCHEN[name])
        assert same_bits(clin.weight.dequantize(), ref), layer


def test_w4a8_and_w4a8_6bit_both_in_sample(sample_files):
    """The two widths share a comfy string and a layout; the loader tells them apart by row width."""
    for name, bits in (("w4a8", 4), ("w4a8-6bit", 6)):
        sd = load_file(str(sample_files[name]))
        for layer, mk in markers(sd).items():
            n, k = mk["orig_shape"]
            lin = mixed_precision_ops(compute_dtype=torch.float32).Linear(k, n, bias=f"{layer}.bias" in sd)
            lin.load_state_dict(sub(sd, layer))
            assert lin.weight._qdata.shape == (n, k * bits // 8)
            assert lin.weight.layout_cls.spec_for(lin.weight.params, lin.weight._qdata) is FORMATS[name]
            assert set(lin.weight.state_dict("weight")) == set(stored(sd, layer))  # saved under the stored names


# ---------------------------------------------------------------- a small synthetic model, whole

class Net(torch.nn.Module):
    def __init__(self, ops=torch.nn, dtype=torch.float32):
        super().__init__()
        self.inp = ops.Linear(192, 320, dtype=dtype)
        self.mid = ops.Linear(320, 37, bias=False, dtype=dtype)  # K = 320: ConvRot group 64
        self.out = ops.Linear(37, 64, dtype=dtype)  # K = 37: no 4-bit format takes it -> fallback

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.mid(torch.nn.functional.gelu(self.inp(x)))))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_synthetic_model_loads_and_runs_as_its_dequantized_weights(comfy, tmp_path, name, dtype):  # noqa: F811
    torch.manual_seed(1)
    src = {k: (v * 0.5).to(torch.bfloat16) for k, v in Net().state_dict().items()}
    save_file(src, str(tmp_path / "in.safetensors"))
    out = tmp_path / "q.safetensors"
    rep = quantkit.convert(tmp_path / "in.safetensors", out, format=name, preset="none", fallback="int8-row")
    assert {lr.name: lr.format for lr in rep.layers if lr.action != "kept"} == {
        "inp.weight": name, "mid.weight": name, "out.weight": "int8-row"}
    model = Net(dtype=dtype)
    res = load_quantized(model, out, compute_dtype=dtype)
    assert sorted(res.quantized) == ["inp", "mid", "out"] and not res.unexpected
    sd = load_file(str(out))
    m = markers(sd)
    ref_model = Net(dtype=dtype)
    with torch.no_grad():
        for layer in ("inp", "mid"):
            w = FORMATS[name].dequantize(stored(sd, layer), m[layer], dtype, layer)
            assert same_bits(getattr(model, layer).weight.dequantize(), w)
            getattr(ref_model, layer).weight.copy_(w)
            # comfy-kitchen's layout, as ComfyUI's loader builds it: the same bits
            clin, cres = comfy_linear(comfy, sd, layer, dtype)
            assert not cres.missing_keys and not cres.unexpected_keys
            assert same_bits(clin.weight.dequantize(), w)
        ref_model.out.weight.copy_(model.out.weight.dequantize(dtype))
        for layer in ("inp", "out"):
            getattr(ref_model, layer).bias.copy_(sd[f"{layer}.bias"].to(dtype))
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.inference_mode():
        y = model(x)
        y_ref = ref_model(x)
        y_orig = Net(dtype=torch.float32)
        y_orig.load_state_dict({k: v.float() for k, v in src.items()})
        y0 = y_orig(x.float())
    # int8-row runs W8A8 in the runtime (activations quantized), so the whole model is compared to its
    # dequantized weights with a tolerance, the 4-bit layers exactly above and below
    rel = float((y.float() - y_ref.float()).norm() / y_ref.float().norm())
    assert rel < 2e-2, rel
    q_rel = float((y.float() - y0).norm() / y0.norm())
    assert q_rel < 0.2, q_rel  # a 4-bit model of random weights: ~10 dB SQNR per layer
    with torch.inference_mode():  # the 4-bit layers alone: bit-exact F.linear on the dequantized weight
        h = torch.nn.functional.gelu(model.inp(x))
        assert torch.equal(h, torch.nn.functional.gelu(ref_model.inp(x)))
        assert torch.equal(model.mid(h), ref_model.mid(h))


# ---------------------------------------------------------------- runtime layouts directly

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_float_is_the_format_and_kitchens_layout(name, dtype):
    fmt = FORMATS[name]
    w = (torch.randn(37, 256, generator=torch.Generator().manual_seed(4)) * 0.02).to(torch.bfloat16)
    kw = {"bits": 6} if name == "w4a8-6bit" else {}
    qt = QuantizedTensor.from_float(w, KITCHEN[name], **kw)
    assert qt.shape == (37, 256) and qt.dtype == torch.bfloat16
    t = fmt.quantize(w, LayerOpts())
    mk = fmt.marker((37, 256), w.dtype, LayerOpts())
    ref = fmt.dequantize(t, mk, dtype)
    assert same_bits(qt.dequantize(dtype), ref)
    state = qt.state_dict("weight")
    assert set(state) == set(t) and all(torch.equal(state[s].view(torch.uint8), t[s].view(torch.uint8)) for s in t)
    # kitchen's layout from the same stored tensors, as ComfyUI's loader fills its Params
    theirs = _kitchen_qt(t, mk, dtype).dequantize()
    assert same_bits(theirs, ref)
    # moves and clones keep the stored tensors
    assert same_bits(qt.clone().to("cpu").dequantize(dtype), ref)
    with pytest.raises(QuantkitError, match="cannot quantize"):
        QuantizedTensor.from_float(torch.randn(8, 40), KITCHEN[name], **kw)  # K = 40: no 4-bit layout takes it


def _kitchen_qt(t: dict, mk: dict, dtype):
    n, k = mk["orig_shape"]
    lay = mk["format"]
    if lay == "asym_w4a8_int8":
        p = ck.AsymW4A8Int8Layout.Params(scale=t["weight_s_rel"], s_channel=t["weight_s_channel"],
                                         codebook=t.get("weight_codebook"), orig_dtype=dtype, orig_shape=(n, k),
                                         group_size=mk["group_size"], convrot_groupsize=mk["convrot_groupsize"])
        return ck.QuantizedTensor(t["weight"], "AsymW4A8Int8Layout", p)
    if lay == "convrot_w4a4":
        p = ck.TensorCoreConvRotW4A4Layout.Params(scale=t["weight_scale"], orig_dtype=dtype, orig_shape=(n, k),
                                                  convrot_groupsize=mk["convrot_groupsize"], quant_group_size=64,
                                                  linear_dtype=mk.get("linear_dtype", "int4"))
        return ck.QuantizedTensor(t["weight"], "TensorCoreConvRotW4A4Layout", p)
    p = ck.TensorCoreAWQW4A16Layout.Params(scale=t["weight_scale"], zeros=t["weight_zeros"], orig_dtype=dtype,
                                           orig_shape=(n, k), group_size=mk["group_size"])
    return ck.QuantizedTensor(t["weight"], "TensorCoreAWQW4A16Layout", p)


def test_w4a8_layout_refuses_other_widths():
    with pytest.raises(QuantkitError, match="4 or 6 bits"):
        get_layout_class("AsymW4A8Int8Layout").quantize(torch.randn(8, 64), bits=8)


# ---------------------------------------------------------------- refusals of both loaders

@pytest.mark.parametrize("name, drop, comfy_msg", [
    ("w4a8", "weight_s_rel", "Missing W4A8 group scale"),
    ("int4-convrot", "weight_scale", "Missing ConvRot W4A4 weight scale"),
    ("awq4", "weight_zeros", "Missing AWQ W4A16 scale/zeros"),
])
def test_loaders_refuse_a_layer_missing_a_tensor(comfy, sample_files, name, drop, comfy_msg):  # noqa: F811
    sd = load_file(str(sample_files[name]))
    layer = next(iter(markers(sd)))
    del sd[f"{layer}.{drop}"]
    with pytest.raises(ValueError, match=comfy_msg):
        comfy_linear(comfy, sd, layer, torch.float32)
    n, k = markers(sd)[layer]["orig_shape"]
    with pytest.raises(QuantkitError, match=f"{FORMATS[name].comfy_format} layer has no {drop}") as e:
        named_load(mixed_precision_ops(compute_dtype=torch.float32).Linear(k, n), sd, layer)
    assert f"tensor '{layer}'" in str(e.value)


def named_load(lin, sd: dict, layer: str):
    """Load ``layer`` of ``sd`` into ``lin`` placed at ``layer`` in a module tree (errors name it)."""
    root = torch.nn.Module()
    parent = root
    *path, leaf = layer.split(".")
    for p in path:
        parent.add_module(p, torch.nn.Module())
        parent = getattr(parent, p)
    parent.add_module(leaf, lin)
    return root.load_state_dict({f"{layer}.{k}": v for k, v in sub(sd, layer).items()}, strict=False)


def test_runtime_refuses_a_wrong_dtype_or_shape(sample_files):
    sd = load_file(str(sample_files["awq4"]))
    layer = next(iter(markers(sd)))
    n, k = markers(sd)[layer]["orig_shape"]
    bad = {**sub(sd, layer), "weight_zeros": sd[f"{layer}.weight_zeros"].float()}
    with pytest.raises(QuantkitError, match=r"weight_zeros is F32 .* stores BF16") as e:
        named_load(mixed_precision_ops(compute_dtype=torch.float32).Linear(k, n), {f"{layer}.{s}": v for s, v in bad.items()},
                   layer)
    assert f"{layer}.weight_zeros" in str(e.value)
    with pytest.raises(QuantkitError, match="does not match the layer's"):
        mixed_precision_ops(compute_dtype=torch.float32).Linear(k, n + 1).load_state_dict(sub(sd, layer))


# ---------------------------------------------------------------- inspect and verify --against

@pytest.mark.parametrize("name", NAMES)
def test_verify_reports_sqnr_of_what_comfyui_dequantizes(comfy, sample_files, name):  # noqa: F811
    from quantkit.inspection import inspect_file
    from quantkit.verify import verify
    info = inspect_file(sample_files[name])
    assert not info.violations, [v.line() for v in info.violations]
    v = verify(sample_files[name], SAMPLE)
    assert not v.violations, [x.line() for x in v.violations]
    src = load_file(str(SAMPLE))
    sd = load_file(str(sample_files[name]))
    rows = {r.name.removesuffix(".weight"): r for r in v.layers if getattr(r, "sqnr_db", None) is not None}
    m = markers(sd)
    assert set(m) <= set(rows), sorted(set(m) - set(rows))
    for layer in m:
        clin, _ = comfy_linear(comfy, sd, layer, torch.float32)
        want = scaled.sqnr(src[f"{layer}.weight"].float(), clin.weight.dequantize().float())
        got = rows[layer].sqnr_db
        assert math.isfinite(got) and abs(got - want) < 1e-3, (layer, got, want)
        assert got > 10.0  # 4-bit on the sample's weights: 17-30 dB measured


@pytest.mark.parametrize("name", NAMES)
def test_cli_inspect_and_verify_against_on_a_4bit_file(sample_files, tmp_path, name):
    from typer.testing import CliRunner

    from quantkit.cli import app
    from quantkit.verify import verify
    runner = CliRunner()
    f = sample_files[name]
    r = runner.invoke(app, ["inspect", str(f), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["formats"] == {FORMATS[name].comfy_format: 6} and d["comfyui_loads"].startswith("yes: stock ComfyUI")
    assert d["violations"] == [] and d["needs_node_for"] == []
    rep = tmp_path / "v.json"
    r = runner.invoke(app, ["verify", str(f), "--against", str(SAMPLE), "--report", str(rep), "--quiet"])
    assert r.exit_code == 0, r.output
    (entry,) = json.loads(rep.read_text())["files"]
    want = {c.name: c.sqnr_db for c in verify(f, SAMPLE).layers if c.format is not None}
    assert len(want) == 6 and min(want.values()) > 10.0
    got = {x["name"]: x["sqnr_db"] for x in entry["layers"] if x["format"] is not None}
    assert entry["status"] == "ok" and got == pytest.approx(want, abs=1e-9)
    # --min-sqnr above the worst layer fails (exit 1), just under it passes
    worst = min(want.values())
    assert runner.invoke(app, ["verify", str(f), "--against", str(SAMPLE), "--min-sqnr", f"{worst + 0.01:.4f}",
                               "--quiet"]).exit_code == 1
    assert runner.invoke(app, ["verify", str(f), "--against", str(SAMPLE), "--min-sqnr", f"{worst - 0.01:.4f}",
                               "--quiet"]).exit_code == 0
    # a layer whose scale is gone: inspect names the violation and exits 1
    sd = load_file(str(f))
    layer = next(iter(markers(sd)))
    drop = FORMATS[name].stored((1, 64), torch.bfloat16, LayerOpts())[1].suffix
    del sd[f"{layer}.{drop}"]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    r = runner.invoke(app, ["inspect", str(bad), "--json"])
    assert r.exit_code == 1 and any(v["tensor"] and layer in v["tensor"] for v in json.loads(r.output)["violations"]), r.output


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a8_without_codebook_loads_as_comfyui_loads_it(comfy, sample_files, dtype):  # noqa: F811
    """ComfyUI's loader takes weight_codebook as optional (uniform 4-bit codes without it); so does the runtime."""
    sd = load_file(str(sample_files["w4a8"]))
    layer = next(iter(markers(sd)))
    del sd[f"{layer}.weight_codebook"]
    n, k = markers(sd)[layer]["orig_shape"]
    ref = FORMATS["w4a8"].dequantize(stored(sd, layer), markers(sd)[layer], dtype, layer)
    lin = mixed_precision_ops(compute_dtype=dtype).Linear(k, n, bias=f"{layer}.bias" in sd)
    res = lin.load_state_dict(sub(sd, layer))
    assert not res.missing_keys and not res.unexpected_keys
    assert "weight_codebook" not in lin.weight.params.tensors
    clin, cres = comfy_linear(comfy, sd, layer, dtype)
    assert not cres.missing_keys and not cres.unexpected_keys and clin.weight.params.codebook is None
    assert same_bits(lin.weight.dequantize(), ref) and same_bits(clin.weight.dequantize(), ref)
    with_cb = FORMATS["w4a8"].dequantize(stored(load_file(str(sample_files["w4a8"])), layer), markers(sd)[layer], dtype)
    assert not torch.equal(ref, with_cb)  # the codebook matters: uniform codes are other values
