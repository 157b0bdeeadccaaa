"""quantkit plan / convert --dry-run, the per-layer config file, several inputs with -O, --report."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import quantkit
from conftest import at_least, count_of, db_floor, says
from quantkit.cli import app
from quantkit.errors import UsageError
from quantkit.layerconfig import parse_layer_config

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def markers(path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        per_layer = {k.removesuffix(".comfy_quant"): json.loads(bytes(f.get_tensor(k).tolist()))
                     for k in f.keys() if k.endswith(".comfy_quant")}
    assert meta == per_layer
    return per_layer


def test_plan_table_auto_preset(sample):
    r = run("plan", sample)
    assert r.exit_code == 0, r.output
    assert says(r.stdout, "Flux.1 (flux1) (--preset auto)")
    assert says(r.stdout, "34: 20 quantized, 0 fell back, 14 kept", "80 in, 140 to write")
    assert says(r.stdout, "entry projection of the latent", "yes: stock ComfyUI loads it")
    r = run("plan", sample, "--preset", "none", "--format", "int8-block")
    assert says(r.stdout, "34: 32 quantized, 2 fell back, 0 kept", "needs a node that registers int8_blockwise")


@pytest.mark.parametrize("fmt", ["fp8", "int8-block"])
def test_plan_json_predicts_the_written_file(sample, tmp_path, fmt):
    r = run("plan", sample, "--format", fmt, "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["families"] == [{"family": "flux1", "title": "Flux.1", "prefix": ""}]
    assert plan["stock_comfyui"] is (fmt == "fp8")
    out = tmp_path / "o.safetensors"
    rep = quantkit.convert(sample, out, format=fmt)
    assert plan["output_bytes"] == out.stat().st_size == rep.bytes_out
    assert plan["input_bytes"] == sample.stat().st_size
    by_name = {t["tensor"]: t for t in plan["tensors"]}
    assert plan["counts"] == rep.counts() and len(by_name) == len(rep.tensors) == 80
    for lay in rep.tensors:
        p = by_name[lay.name]
        assert (p["action"], p["format"], p["reason"]) == (lay.action, lay.format, lay.reason)


def test_dry_run_writes_nothing(sample, tmp_path):
    before = sorted(os.listdir(sample.parent))
    r = run("convert", sample, "--dry-run", "-O", tmp_path / "never")
    assert r.exit_code == 0, r.output
    assert says(r.stdout, "34: 20 quantized, 0 fell back, 14 kept")
    assert sorted(os.listdir(sample.parent)) == before and not (tmp_path / "never").exists()
    r = run("convert", sample, sample, "--dry-run", "--json", "-O", tmp_path)
    assert r.exit_code == 2 and says(r.output, "would both be written")
    r = run("convert", sample, "--dry-run", "--json")
    assert [p["counts"] for p in json.loads(r.stdout)] == [
        {"layers": 34, "quantized": 20, "fallback": 0, "kept": 14, "tensors_in": 80, "tensors_out": 140}]


CONFIG = r"""
[layers.'re:^double_blocks\.\d+\.(img|txt)_mlp\.\d+$']
format = "int8-row"

[layers.'re:^double_blocks\.0\.img_mlp\.0$']
format = "fp8"
options = { full_precision_matrix_mult = true }

[layers."double_blocks.0.img_mlp.2"]
skip = true

[layers.'re:^single_blocks\.\d+\.linear2$']
format = "int8-block"
block_size = 64

[layers."img_in"]
format = "int8-tensor"
"""


def test_config_most_specific_wins_and_feeds_the_plan(sample, tmp_path):
    cfg = tmp_path / "layers.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "o.safetensors"
    rep = quantkit.convert(sample, out, format="fp8", config=cfg)
    m = markers(out)
    assert m["double_blocks.1.img_mlp.0"]["format"] == "int8_tensorwise"  # the general regex
    assert m["double_blocks.0.img_mlp.0"] == {"format": "float8_e4m3fn", "orig_dtype": "bfloat16",
                                              "orig_shape": [512, 128], "full_precision_matrix_mult": True}
    assert "double_blocks.0.img_mlp.2" not in m  # exact name beats the regex
    # linear2 is 128 x 640: divisible by 64 (not by 128)
    assert m["single_blocks.0.linear2"] == {"format": "int8_blockwise", "group_size": 64,
                                            "orig_dtype": "bfloat16", "orig_shape": [128, 640]}
    with safe_open(str(out), "pt") as f:
        assert list(f.get_slice("single_blocks.0.linear2.weight_scale").get_shape()) == [2, 10]
        assert list(f.get_slice("img_in.weight_scale").get_shape()) == []
    assert m["img_in"]["format"] == "int8_tensorwise"  # config beats the Flux.1 keep rule
    assert m["double_blocks.0.img_attn.qkv"]["format"] == "float8_e4m3fn"  # untouched: global format
    layers = {lay.name: lay for lay in rep.layers}
    assert layers["double_blocks.0.img_mlp.2.weight"].reason == "config 'double_blocks.0.img_mlp.2': skip"
    # the written file passes verify and matches the original within quantization error
    r = run("verify", out, "--against", sample, "--min-sqnr", "20")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("text,needle", [
    ('[layers."a"]\nformat = "int4"', "unknown format 'int4'"),
    ('[layers."a"]\nformt = "fp8"', "unknown key(s) ['formt']"),
    ('[layers."a"]\noptions = { fast = true }', "unknown option 'fast'"),
    ('[layers."a"]\noptions = { full_precision_matrix_mult = 1 }', "must be a bool"),
    ('[layers."a"]\nformat = "fp8"\nblock_size = 64', "block_size applies only to block formats"),
    ('[layers."a"]\nformat = "int8-block"\nblock_size = 96', "not a positive power of two"),
    ('[layers."a"]\nskip = true\nformat = "fp8"', "other settings would be ignored"),
    ('[layers."re:("]\nskip = true', "not a valid regular expression"),
    ('[defaults]\nformat = "fp8"', "unknown top-level key(s) ['defaults']"),
    ('[layers', "not valid TOML"),
])
def test_config_errors_are_usage_errors(sample, tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    r = run("plan", sample, "--config", cfg)
    assert r.exit_code == 2, r.output
    assert says(r.output, needle) and "Traceback" not in r.output


def test_config_json_and_ties(sample, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"layers": {"re:^img_.*$": {"format": "int8-row"}, "re:^.*g_in$": {"skip": True}}}))
    r = run("plan", sample, "--config", cfg)
    assert r.exit_code == 2 and says(r.output, "matches 're:^img_.*$' and 're:^.*g_in$' equally specifically")
    c = parse_layer_config({"layers": {"re:^img_in$": {"format": "fp8"}, "re:^img_.*$": {"skip": True}}})
    assert c.lookup("img_in").pattern == "re:^img_in$" and c.lookup("img_x").skip
    assert c.lookup("txt_in") is None
    cfg.write_text(json.dumps({"layers": {"final_layer.linear": {"format": "int8-row"}}}))
    rep = quantkit.convert(sample, tmp_path / "o.st", config=cfg, preset="none", format="fp8")
    assert {lay.name: lay.format for lay in rep.layers}["final_layer.linear.weight"] == "int8-row"
    with pytest.raises(UsageError, match="block_size but this layer's format is fp8"):
        quantkit.convert(sample, tmp_path / "o2.st",
                         config=parse_layer_config({"layers": {"img_in": {"block_size": 64}}}), preset="none")


def test_full_precision_mm_flag(sample, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run("convert", sample, "-o", out, "--full-precision-mm", "-q")
    assert r.exit_code == 0, r.output
    m = markers(out)
    assert len(m) == 20 and all(v["full_precision_matrix_mult"] is True for v in m.values())


def sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_several_inputs_one_failure_and_report(sample, tmp_path):
    a = sample
    b = tmp_path / "broken.safetensors"
    b.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    c = tmp_path / "c.safetensors"
    save_file({"blocks.0.fc.weight": torch.randn(128, 128).bfloat16()}, str(c))
    outdir = tmp_path / "out"
    report = tmp_path / "report.json"
    r = run("convert", a, b, c, "-O", outdir, "--format", "int8-row", "--report", report, "-q")
    assert r.exit_code == 1, r.output
    assert says(r.stderr, "broken.safetensors", "1 of 3 inputs failed")
    assert sorted(os.listdir(outdir)) == ["c-int8-row.safetensors", "flux-mini-int8-row.safetensors"]
    doc = json.loads(report.read_text())
    assert doc["ok"] is False and doc["environment"]["torch"] == torch.__version__
    assert doc["environment"]["quantkit"] == quantkit.__version__
    assert [f["status"] for f in doc["files"]] == ["ok", "failed", "ok"]
    assert "not valid JSON" in doc["files"][1]["error"] and doc["files"][1]["exit_code"] == 1
    first = doc["files"][0]
    assert first["input_sha256"] == sha(a) and first["output_sha256"] == sha(outdir / "flux-mini-int8-row.safetensors")
    assert first["counts"] == {"layers": 34, "quantized": 20, "fallback": 0, "kept": 14, "tensors_in": 80,
                               "tensors_out": 120}  # int8-row layers have no input_scale
    lay = {x["name"]: x for x in first["tensors"]}["double_blocks.0.img_mlp.2.weight"]
    assert lay["outputs"]["double_blocks.0.img_mlp.2.weight_scale"] == {"dtype": "F32", "shape": [128, 1]}
    assert lay["outputs"]["double_blocks.0.img_mlp.2.weight"] == {"dtype": "I8", "shape": [128, 512]}
    at_least(lay["sqnr_db"], db_floor(32.54), "flux-mini img_mlp.2 int8-row SQNR dB")
    assert lay["seconds"] >= 0 and lay["format"] == "int8-row"
    r = run("convert", a, c, "-O", outdir, "--format", "int8-row", "-q")
    assert r.exit_code == 1 and count_of(r.stderr, "already exists") == 2
    r = run("convert", a, c, "-O", outdir, "--format", "int8-row", "-q", "--overwrite")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args,needle", [
    (["-o", "{tmp}/x.st", "-O", "{tmp}"], "-o names one output file"),
    (["--json"], "--json prints a plan"),
    (["--dry-run", "--report", "{tmp}/r.json"], "--report records a conversion"),
    (["--preset", "flux3"], "'flux3' (choose from auto, none,"),
    (["--config", "{tmp}/nope.toml"], "no such per-layer config file"),
    (["--config", "{tmp}"], "is a directory, not a regular file"),
    (["--config", "{sample}"], "unknown config file type"),
])
def test_convert_usage_errors(sample, tmp_path, args, needle):
    r = run("convert", sample, *[a.format(tmp=tmp_path, sample=sample) for a in args])
    assert r.exit_code == 2 and says(r.output, needle), r.output


def test_preset_mismatch_and_presets_listing(sample):
    r = run("plan", sample, "--preset", "wan")
    assert r.exit_code == 2 and says(r.output, "does not look like Wan 2.x")
    r = run("presets")
    assert r.exit_code == 0 and says(r.stdout, "flux1 (also: flux): Flux.1", "modulation")
