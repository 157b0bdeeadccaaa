"""Capture Calibration / Save Calibration / Compare Models against the ComfyUI stand-ins, on real
torch models: a small DiT (Flux-style names, joint attention) sampled through ComfyUI's sampling
path, and all-MiniLM-L6-v2 for the calibrated conversion (node path vs CLI path, byte for byte).
Also ``quantkit.compare`` on its own. Numbers quoted in comments were printed by these tests
(``-s``) on the 2-core dev box, torch 2.13 CPU."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import quantkit
from quantkit import calibration, reference
from quantkit.cli import app
from quantkit.comfyui import capture_nodes
from quantkit.comfyui.capture_nodes import QuantkitCaptureCalibration, QuantkitSaveCalibration
from quantkit.comfyui.compare_node import VERDICT_TIP, QuantkitCompareModels
from quantkit.comfyui.nodes import NODE_CLASS_MAPPINGS, QuantkitConvertCheckpoint, QuantkitQuantizeModel
from quantkit.compare import THRESHOLDS, VERDICTS, psnr, ssim, verdict
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS

from comfy_fixture import comfy  # noqa: F401  (fixture)
from conftest import sha


# ---- a small DiT with Flux's layer names ------------------------------------------------------------

class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class DoubleBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.img_attn, self.txt_attn = Attn(d), Attn(d)
        self.img_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.txt_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, img, txt):
        b, n, d = img.shape
        ln = lambda t: nn.functional.layer_norm(t, (d,))  # noqa: E731
        qi, ki, vi = self.img_attn.qkv(ln(img)).chunk(3, -1)
        qt, kt, vt = self.txt_attn.qkv(ln(txt)).chunk(3, -1)
        q, k, v = (torch.cat([a, c], 1).reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)
                   for a, c in ((qt, qi), (kt, ki), (vt, vi)))
        o = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
        ot, oi = o[:, : txt.shape[1]], o[:, txt.shape[1]:]
        img = img + self.img_attn.proj(oi)
        txt = txt + self.txt_attn.proj(ot)
        return img + self.img_mlp(ln(img)), txt + self.txt_mlp(ln(txt))


class FinalLayer(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.linear = nn.Linear(d, out)


class ToyDiT(nn.Module):
    """Patchified latent + text tokens through two joint-attention double blocks (names as Flux.1)."""

    def __init__(self, ch=4, d=64, ctx=32, depth=2, heads=4):
        super().__init__()
        self.ch = ch
        self.img_in = nn.Linear(ch * 4, d)
        self.txt_in = nn.Linear(ctx, d)
        self.time_in = nn.Sequential(nn.Linear(32, d), nn.SiLU(), nn.Linear(d, d))
        self.double_blocks = nn.ModuleList(DoubleBlock(d, heads) for _ in range(depth))
        self.final_layer = FinalLayer(d, ch * 4)

    def forward(self, x, timesteps, context=None, transformer_options={}):
        b, c, h, w = x.shape
        p = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        f = torch.exp(-math.log(1000) * torch.arange(16, dtype=x.dtype) / 16)
        t = timesteps.to(x.dtype)[:, None] * 1000 * f[None]
        temb = self.time_in(torch.cat([t.sin(), t.cos()], -1))
        img = self.img_in(p) + temb[:, None]
        txt = self.txt_in(context)
        for blk in self.double_blocks:
            img, txt = blk(img, txt)
        out = self.final_layer.linear(img)
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class ToyVAE:
    """decode(latent) -> IMAGE [B, 4h, 4w, 3] in [0, 1]: a fixed colour projection, upsampled."""

    def __init__(self, ch=4):
        self.w = torch.randn(3, ch, generator=torch.Generator().manual_seed(7)) * 0.8

    def decode(self, samples):
        rgb = torch.sigmoid(torch.einsum("rc,bchw->brhw", self.w, samples.float()))
        return nn.functional.interpolate(rgb, scale_factor=4, mode="bilinear").permute(0, 2, 3, 1)


def make_dit(seed=0):
    torch.manual_seed(seed)
    return ToyDiT().eval()


def linear_names(m):
    return [n for n, x in m.named_modules() if isinstance(x, nn.Linear)]


@pytest.fixture
def world(comfy, tmp_path):
    """A ComfyUI with models/ under tmp_path, a DiT MODEL, prompts and an empty latent."""
    comfy.folder_paths.models_dir = str(tmp_path / "models")
    comfy.sample = importlib.import_module("comfy.sample")
    comfy.samplers = importlib.import_module("comfy.samplers")
    comfy.model_base = importlib.import_module("comfy.model_base")
    base = comfy.model_base.BaseModel(make_dit())
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    prompts = [[[torch.randn(1, 8, 32, generator=g), {}]] for _ in range(2)]
    negative = [[torch.zeros(1, 8, 32), {}]]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    return comfy, base, patcher, prompts, negative, latent


def run_sampler(comfy, model, positive, negative, latent, seed=11, steps=3, cfg=2.0):
    li = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(li, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, li, seed=seed)


# ---- capture ------------------------------------------------------------------------------------------

HESSIAN = r"img_mlp\."


def test_capture_node_equals_library_capture(world):
    comfy, base, patcher, prompts, negative, latent = world
    dit = base.diffusion_model
    clone, summary = QuantkitCaptureCalibration().capture(patcher, HESSIAN, "auto")
    session = capture_nodes.session_of(clone)
    names = linear_names(dit)
    ks = {n: m.in_features for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    want_bytes = sum(8 * 3 * k + (8 * k * k if ".img_mlp." in n else 0) for n, k in ks.items())
    assert session.accumulator.nbytes() == want_bytes
    assert summary.startswith(f"quantkit: recording {len(names)} linear layers (4 with the full E[x x^T]")
    assert f"{want_bytes / 2**20:.1f} MiB of statistics on cpu" in summary

    # The library on the same calls: sample with the original MODEL inside capture().
    with calibration.capture(dit, hessian_layers=HESSIAN) as cap:
        refs = [run_sampler(comfy, patcher, p, negative, latent, seed=11 + i) for i, p in enumerate(prompts)]
    assert session.calls == 0  # the original MODEL does not record
    got = [run_sampler(comfy, clone, p, negative, latent, seed=11 + i) for i, p in enumerate(prompts)]
    assert all(torch.equal(a, b) for a, b in zip(refs, got))  # recording does not change the result
    assert all(not m._forward_pre_hooks for m in base.modules())  # hooks live only during a call
    assert session.calls == 6 and dict(session.steps) == {0: 2, 1: 2, 2: 2}
    assert len(session.sigmas) == 3

    node = session.calibration()
    lib = cap.result
    assert node.second_order == lib.second_order == "mixed"
    assert set(node.layers) == set(lib.layers) == set(names)  # diffusion_model. prefix removed
    for n in names:
        assert set(node.layers[n]) == set(lib.layers[n]), n
        for k, v in lib.layers[n].items():
            assert torch.equal(node.layers[n][k], v), (n, k)
    assert ("hessian" in node.layers["double_blocks.0.img_mlp.2"]
            and "hessian" not in node.layers["double_blocks.0.txt_mlp.0"])
    # cond and uncond rows both count: 2 prompts x 3 steps x 2 (cfg) x 64 image tokens
    assert float(node.layers["img_in"]["count"]) == 2 * 3 * 2 * 64

    # Sampling the capturing clone again keeps accumulating (another prompt, any steps).
    run_sampler(comfy, clone, prompts[0], negative, latent, steps=2)
    assert session.calls == 8 and float(session.calibration().layers["img_in"]["count"]) == (2 * 3 + 2) * 2 * 64


def test_save_node_writes_the_stats_file(world, tmp_path):
    comfy, base, patcher, prompts, negative, latent = world
    ck_dir = tmp_path / "dm"
    ck_dir.mkdir()
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(ck_dir))
    sd = {k: v.to(torch.bfloat16) for k, v in base.diffusion_model.state_dict().items()}
    save_file(sd, str(ck_dir / "toy.safetensors"))
    save_file({"other.weight": torch.zeros(4, 4)}, str(ck_dir / "other.safetensors"))

    clone, _ = QuantkitCaptureCalibration().capture(patcher, HESSIAN, "cpu")
    saver = QuantkitSaveCalibration()
    with pytest.raises(QuantkitError, match="no sampling has run with the capturing MODEL yet"):
        saver.save(clone, {}, "toy", False)
    with pytest.raises(QuantkitError, match="this MODEL does not record calibration statistics"):
        saver.save(patcher, {}, "toy", False)
    out = run_sampler(comfy, clone, prompts[0], negative, latent)
    assert "diffusion_models/toy.safetensors" in QuantkitSaveCalibration.INPUT_TYPES()["optional"]["check_against"][0]
    with pytest.raises(QuantkitError, match="no calibration layer matches a checkpoint layer"):
        saver.save(clone, {"samples": out}, "toy", False, "diffusion_models/other.safetensors")
    folder = tmp_path / "models" / "calibration"
    assert not list(folder.iterdir())  # nothing written on that failure, no temporary left

    path, text = saver.save(clone, {"samples": out}, "toy", False, "diffusion_models/toy.safetensors")
    assert path == str(folder / "toy.safetensors") and os.listdir(folder) == ["toy.safetensors"]
    assert text.startswith(f"quantkit: wrote {path} (")
    back = calibration.Calibration.load(path)
    assert back.second_order == "mixed" and back.meta["quantkit_calls"] == "3"
    assert json.loads(back.meta["quantkit_steps"]) == {"0": 1, "1": 1, "2": 1}
    assert len(json.loads(back.meta["quantkit_sigmas"])) == 3
    mine = capture_nodes.session_of(clone).calibration()
    for n, d in mine.layers.items():
        for k, v in d.items():
            assert torch.equal(back.layers[n][k], v), (n, k)
    with pytest.raises(QuantkitError, match="the calibration file exists"):
        saver.save(clone, {"samples": out}, "toy", False)
    saver.save(clone, {"samples": out}, "toy.safetensors", True)
    with pytest.raises(QuantkitError, match="must be a plain file name"):
        saver.save(clone, {"samples": out}, "../x", True)
    assert capture_nodes.calibration_files() == ["toy.safetensors"]

    # Converting with it: static input_scale from the statistics, learned rounding where hessians are.
    report = quantkit.convert(ck_dir / "toy.safetensors", tmp_path / "q.safetensors", format="fp8", calibration=path,
                              learned_rounding=True, bias_correction=True, preset="none")
    q = load_file(str(tmp_path / "q.safetensors"))
    amax = float(back.layers["double_blocks.1.txt_mlp.0"]["absmax"].max())
    assert float(q["double_blocks.1.txt_mlp.0.input_scale"]) == pytest.approx(amax / 448, rel=1e-6)
    notes = {lr.name: lr.reason for lr in report.layers}
    assert notes["double_blocks.0.txt_mlp.0.weight"] == "rtn: no hessian for this layer in the calibration file"
    assert not notes["double_blocks.0.img_mlp.0.weight"].startswith("rtn")


def test_capture_memory_bound_errors(world, monkeypatch):
    comfy, base, patcher, prompts, negative, latent = world
    monkeypatch.setattr(capture_nodes, "available_bytes", lambda dev: 100_000)
    with pytest.raises(QuantkitError, match=r"4 with the full E\[x x\^T\].* MiB of statistics on cpu, but 0\.00 GiB "
                                            r"are free.*narrow hessian_layers"):
        QuantkitCaptureCalibration().capture(patcher, HESSIAN, "auto")
    with pytest.raises(QuantkitError, match="hessian_layers 'nothing_like_this' matches none of the 21 linear layers"):
        QuantkitCaptureCalibration().capture(patcher, "nothing_like_this", "auto")
    monkeypatch.undo()
    # The check made when statistics are first allocated (the model may have been loaded meanwhile).
    clone, _ = QuantkitCaptureCalibration().capture(patcher, HESSIAN, "auto")
    monkeypatch.setattr(calibration, "available_bytes", lambda dev: 1000)
    with pytest.raises(QuantkitError, match=r"calibration statistics need .* on cpu \(21 layers, 4 with the full"):
        run_sampler(comfy, clone, prompts[0], negative, latent)
    assert all(not m._forward_pre_hooks for m in base.modules())
    monkeypatch.undo()

    # A torch out-of-memory during allocation becomes a one-line QuantkitError.
    def oom(self, x, full):
        raise torch.OutOfMemoryError("CUDA out of memory")
    clone, _ = QuantkitCaptureCalibration().capture(patcher, "", "auto")
    monkeypatch.setattr(calibration.LayerStats, "add", oom)
    with pytest.raises(QuantkitError, match="out of memory allocating .* of statistics on cpu"):
        run_sampler(comfy, clone, prompts[0], negative, latent)


# ---- convert node with the calibration: same bytes as the CLI ----------------------------------------------

ATTN0 = r"^encoder\.layer\.0\.attention\."
EXCLUDE = r"^(?!encoder\.layer\.0\.attention\.)"
SENTENCES = ["A man is playing a guitar on stage.", "The stock market fell sharply on Monday.",
             "Two dogs run through a snowy field."]


def test_minilm_calibrated_conversion_node_path_equals_cli(comfy, minilm_fp32, tmp_path):
    pytest.importorskip("tokenizers")
    from comfy.model_base import BaseModel
    from quantkit.models.bert import load_bert, tokenize

    class BertBase(BaseModel):  # a BaseModel whose network is MiniLM's BERT
        def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
            return self.diffusion_model.sentence_embeddings(x, c_crossattn)

    comfy.folder_paths.models_dir = str(tmp_path / "models")
    src_dir = tmp_path / "dm"
    src_dir.mkdir()
    src = src_dir / "minilm.safetensors"
    os.symlink(minilm_fp32, src)
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(src_dir))

    base = BertBase(load_bert())
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    # Learned rounding of all 37 layers takes minutes on 2 cores: calibrate and quantize the first
    # attention block's 4 linears (the rest excluded alike on both paths).
    clone, summary = QuantkitCaptureCalibration().capture(patcher, ".", "auto", ATTN0)
    wrapper = clone.model_options["model_function_wrapper"]
    with torch.inference_mode():
        for s in SENTENCES:  # calls as ComfyUI's calc_cond_batch makes them
            ids, mask = tokenize([s])
            wrapper(base.apply_model, {"input": ids, "timestep": torch.tensor([1.0]),
                                       "c": {"c_crossattn": mask, "transformer_options": {}}, "cond_or_uncond": [0]})
    path, _ = QuantkitSaveCalibration().save(clone, {}, "minilm", False, "diffusion_models/minilm.safetensors")
    print("\n" + summary)

    conv = QuantkitConvertCheckpoint()
    spec = conv.INPUT_TYPES()["optional"]
    assert "minilm.safetensors" in spec["calibration"][0] and spec["calibration"][1]["default"] == "none"
    node_out, text = conv.convert("diffusion_models/minilm.safetensors", "fp8", 128, "int8-row",
                                  "minilm-node.safetensors", False, exclude=EXCLUDE, calibration="minilm.safetensors",
                                  learned_rounding=True, bias_correction=True)
    cli_out = tmp_path / "minilm-cli.safetensors"
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(cli_out), "--format", "fp8", "--calibration", path,
                                 "--learned-rounding", "--bias-correction", "--exclude", EXCLUDE])
    assert r.exit_code == 0, r.output
    assert sha(node_out) == sha(cli_out)
    plain = tmp_path / "minilm-rtn.safetensors"
    quantkit.convert(src, plain, format="fp8", exclude=[EXCLUDE])
    assert sha(plain) != sha(cli_out)  # the calibration changed the file
    q = load_file(node_out)
    scales = [float(v) for k, v in q.items() if k.endswith(".input_scale")]
    assert len(scales) == 4 and all(s != 1.0 for s in scales)
    print(f"MiniLM node==CLI sha256 {sha(node_out)[:16]}; input_scale range {min(scales):.4g}..{max(scales):.4g}")
    with pytest.raises(QuantkitError, match="'nope.safetensors' is not in ComfyUI's calibration folder"):
        conv.convert("diffusion_models/minilm.safetensors", "fp8", 128, "int8-row", "x.safetensors", False,
                     calibration="nope.safetensors")


# ---- compare ------------------------------------------------------------------------------------------------

def fake_quant(model: nn.Module, fmt: str = "fp8") -> nn.Module:
    """A copy with every linear weight replaced by its quantize-dequantize (round to nearest)."""
    q = copy.deepcopy(model)
    spec = FORMATS[fmt]
    for m in q.modules():
        if isinstance(m, nn.Linear):
            qq, s = reference.quantize(m.weight.data, spec, 128)
            m.weight.data = reference.dequantize(qq, s, spec, 128, torch.float32)
    return q


def test_library_compare_finds_the_broken_layer():
    dit = make_dit()
    g = torch.Generator().manual_seed(5)
    inputs = [(torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g),
               torch.randn(2, 8, 32, generator=g)) for _ in range(3)]
    q = fake_quant(dit)
    rep = quantkit.compare(dit, q, inputs)
    assert {e.name for e in rep.layers} == set(linear_names(dit)) and all(e.calls == 3 for e in rep.layers)
    worst = rep.worst(1)[0]
    print(f"\nfp8 DiT: output rel L2 {rep.output_rel_l2:.4f}, worst layer {worst.name} {worst.rel_l2:.4f}")
    # fp8 e4m3 round to nearest: about 2-3% relative error per layer (3 mantissa bits), measured 0.020-0.029
    assert all(0.005 < e.rel_l2 < 0.05 and e.cosine > 0.998 for e in rep.layers)
    assert rep.output_rel_l2 < 0.1 and rep.output_cosine_min > 0.99
    assert rep.seconds_per_call[0] > 0 and rep.peak_memory == (None, None)

    broken = copy.deepcopy(q)
    broken.double_blocks[1].img_mlp[2].weight.data.normal_()  # one layer's weights become noise
    rb = quantkit.compare(dit, broken, inputs)
    assert rb.worst(1)[0].name == "double_blocks.1.img_mlp.2" and rb.worst(1)[0].rel_l2 > 1
    assert rb.output_rel_l2 > rep.output_rel_l2
    same = quantkit.compare(dit, dit, inputs)
    assert same.layers == [] and same.output_rel_l2 == 0.0
    with pytest.raises(QuantkitError, match="needs at least one input"):
        quantkit.compare(dit, q, [])


def test_image_metrics():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 32, 32, 3, generator=g)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    b = (a + 0.01).clamp(0, 1)
    assert psnr(a, b) == pytest.approx(40.0, abs=0.3)  # a constant 0.01 offset: 40 dB, less the clamped pixels
    noise = torch.rand(1, 32, 32, 3, generator=g)
    assert ssim(a, noise) < 0.1
    # SSIM against the textbook formula on one 11x11 window (uniform image patches: variance terms only)
    x = torch.full((1, 11, 11, 1), 0.5)
    y = torch.full((1, 11, 11, 1), 0.7)
    c1 = 0.01 ** 2
    assert ssim(x, y) == pytest.approx((2 * 0.5 * 0.7 + c1) / (0.25 + 0.49 + c1), rel=1e-7)
    with pytest.raises(QuantkitError, match="images differ in shape"):
        ssim(a, a[:, :16])


@pytest.mark.parametrize("psnr_db,ssim_value,rel_l2,want", [
    (50.0, 0.999, 0.01, 0), (35.0, 0.98, 0.5, 0),      # the indistinguishable bar is inclusive
    (34.9, 0.99, 0.01, 1), (40.0, 0.979, 0.01, 1),     # one criterion short: minor differences
    (12.0, 0.50, 0.30, 1),                             # poor but neither broken criterion
    (50.0, 0.999, 0.501, 2),                           # latents apart by more than half their norm
    (50.0, 0.299, 0.01, 2), (float("inf"), 0.29, 0.0, 2),  # images without shared structure
])
def test_verdict_thresholds(psnr_db, ssim_value, rel_l2, want):
    """Each verdict at and across the thresholds the tooltip states (broken wins over any PSNR)."""
    assert verdict(psnr_db, ssim_value, rel_l2) == VERDICTS[want]


def test_compare_node_verdicts_on_sampled_dit(world):
    comfy, base, patcher, prompts, negative, latent = world
    assert "QuantkitCompareModels" in NODE_CLASS_MAPPINGS
    spec = QuantkitCompareModels.INPUT_TYPES()["required"]
    assert spec["sampler_name"][0] == comfy.samplers.KSampler.SAMPLERS
    assert "35 dB" in VERDICT_TIP and "SSIM < 0.3" in QuantkitCompareModels.DESCRIPTION
    vae = ToyVAE()
    node = QuantkitCompareModels()
    args = (prompts[0], negative, latent, vae, 11, 4, 2.0, "euler", "simple")

    qclone, _ = QuantkitQuantizeModel().quantize(patcher, "fp8_e4m3fn", 128, "int8-row", "", "none")
    img_o, img_q, v_fp8, text_fp8 = node.compare(patcher, qclone, *args)
    assert img_o.shape == img_q.shape == (1, 64, 64, 3) and not torch.equal(img_o, img_q)
    print("\nfp8 clone:\n" + text_fp8)

    rnd = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(make_dit(seed=99)), torch.device("cpu"),
                                           torch.device("cpu"))
    _, _, v_rnd, text_rnd = node.compare(patcher, rnd, *args)
    print("random weights:\n" + text_rnd)
    garbage = copy.deepcopy(base.diffusion_model)  # fp8 bytes read as uint8 (a uint8-stored fp8 file)
    for m in garbage.modules():
        if isinstance(m, nn.Linear):
            q, s = reference.quantize(m.weight.data, FORMATS["fp8"], 128)
            m.weight.data = q.view(torch.uint8).float() * s
    bad = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(garbage), torch.device("cpu"),
                                           torch.device("cpu"))
    _, _, v_bad, text_bad = node.compare(patcher, bad, *args)
    print("fp8 read as uint8:\n" + text_bad)
    _, _, v_same, text_same = node.compare(patcher, patcher.clone(), *args)

    def nums(text):
        line = text.splitlines()[1].replace(",", "").split()
        return float(line[1]), float(line[4]), float(line[-1])  # PSNR, SSIM, latent rel L2

    p8, s8, r8 = nums(text_fp8)
    # Measured here (4 euler steps, cfg 2): the fp8 e4m3 clone PSNR 50.0 dB, SSIM 0.9998, final-latent
    # relative L2 0.015, per-step cosine 0.99988; other random weights: PSNR 20.0 dB, SSIM 0.795,
    # relative L2 0.518, per-step cosine 0.864; fp8 bytes read as uint8: 17.9 dB, SSIM 0.83, relative
    # L2 0.645, per-step cosine down to 0.23. This toy's decoder (a sigmoid of a colour projection) keeps
    # SSIM near 0.8 even for noise latents, so here the latent criterion (> 0.5) is what flags the
    # broken models; the fp8 clone clears the indistinguishable bar (35 dB, 0.98) by 15 dB.
    assert p8 >= THRESHOLDS["indistinguishable_psnr_db"] + 10 and s8 >= 0.999 and r8 < 0.03
    for text in (text_rnd, text_bad):
        pr, sr, rr = nums(text)
        assert rr > THRESHOLDS["broken_latent_rel_l2"] and pr < 25
    assert v_fp8 == VERDICTS[0] and v_rnd == VERDICTS[2] and v_bad == VERDICTS[2] and v_same == VERDICTS[0]
    assert "PSNR inf dB" in text_same
    step_line = [ln for ln in text_fp8.splitlines() if ln.startswith("denoised cosine per step")][0]
    assert step_line.count(",") == 3 and float(step_line.split()[4].rstrip(",")) > 0.999  # one cosine per step
    assert comfy.model_management.unloaded  # models unloaded before each run (each peak its own)
    assert "peak VRAM: n/a (not on a CUDA device)" in text_fp8
