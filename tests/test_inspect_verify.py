"""inspect and verify: contract checks on files written by other tools, SQNR against the original."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import quantkit
from conftest import at_least, db_floor, says
from quantkit.cli import app
from quantkit.inspection import inspect_file
from quantkit.verify import verify

runner = CliRunner()
N, K = 64, 64


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def marker(d: dict, pad: bytes = b"") -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode() + pad), dtype=torch.uint8)


def fp8_layer(sd: dict, name: str = "blocks.0.fc", **over) -> dict:
    w = torch.randn(N, K)
    s = w.abs().amax() / 448
    sd[f"{name}.weight"] = (w / s).to(torch.float8_e4m3fn)
    sd[f"{name}.weight_scale"] = s.float()
    sd[f"{name}.comfy_quant"] = marker({"format": "float8_e4m3fn"})
    sd.update(over)
    return sd


def write(tmp_path, sd: dict, layers: dict | None = None, name: str = "f.safetensors"):
    p = tmp_path / name
    meta = None
    if layers is not None:
        meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(sd, str(p), metadata=meta)
    return p


def rules(path) -> list[tuple[str, str]]:
    return [(v.rule, v.tensor) for v in inspect_file(path).violations]


def test_clean_file_from_another_tool(tmp_path):
    sd = fp8_layer({"blocks.0.norm.weight": torch.ones(N)})
    sd["blocks.0.fc.weight_scale"] = sd["blocks.0.fc.weight_scale"].reshape(1)  # [1] also works in ComfyUI
    p = write(tmp_path, sd, {"blocks.0.fc": {"format": "float8_e4m3fn"}})
    ins = inspect_file(p)
    assert ins.violations == [] and ins.formats == {"float8_e4m3fn": 1}
    assert ins.loads == "yes: stock ComfyUI"
    r = run("inspect", p)
    assert r.exit_code == 0 and says(r.stdout, "yes: stock ComfyUI", "float8_e4m3fn 1")


@pytest.mark.parametrize("case,expect", [
    ("scale_without_marker", [("scale-without-marker", "blocks.1.fc.weight_scale")]),
    ("uint8_fp8", [("uint8-stored-fp8", "blocks.0.fc.weight")]),
    ("int8_1d_scale", [("int8-scale-1d", "blocks.0.fc.weight_scale")]),
    ("fp8_row_scale", [("wrong-scale-shape", "blocks.0.fc.weight_scale")]),
    ("missing_scale", [("missing-scale", "blocks.0.fc.weight")]),
    ("nul_padded_marker", [("bad-marker", "blocks.0.fc.comfy_quant"),
                           ("header-marker-mismatch", "blocks.0.fc.comfy_quant")]),
    ("header_disagrees", [("header-marker-mismatch", "blocks.0.fc.comfy_quant")]),
    ("header_extra_layer", [("header-marker-mismatch", "blocks.9.fc.comfy_quant")]),
    ("blockwise_bad_scale", [("wrong-scale-shape", "blocks.0.fc.weight_scale")]),
    ("bf16_scale", [("wrong-scale-dtype", "blocks.0.fc.weight_scale")]),
    ("mxfp8_e8m0_scale", [("wrong-scale-dtype", "blocks.0.fc.weight_scale")]),
])
def test_contract_violations(tmp_path, case, expect):
    sd = fp8_layer({})
    layers = {"blocks.0.fc": {"format": "float8_e4m3fn"}}
    if case == "scale_without_marker":
        sd["blocks.1.fc.weight"] = torch.randn(N, K).to(torch.float8_e4m3fn)
        sd["blocks.1.fc.weight_scale"] = torch.tensor(1.0)
    elif case == "uint8_fp8":
        sd["blocks.0.fc.weight"] = sd["blocks.0.fc.weight"].view(torch.uint8)
    elif case == "int8_1d_scale":
        cq = {"format": "int8_tensorwise"}
        sd["blocks.0.fc.weight"] = torch.randint(-127, 127, (N, K), dtype=torch.int8)
        sd["blocks.0.fc.weight_scale"] = torch.rand(N)
        sd["blocks.0.fc.comfy_quant"] = marker(cq)
        layers = {"blocks.0.fc": cq}
    elif case == "fp8_row_scale":
        sd["blocks.0.fc.weight_scale"] = torch.rand(N, 1)
    elif case == "missing_scale":
        del sd["blocks.0.fc.weight_scale"]
    elif case == "nul_padded_marker":
        sd["blocks.0.fc.comfy_quant"] = marker({"format": "float8_e4m3fn"}, b"\x00\x00")
    elif case == "header_disagrees":
        layers = {"blocks.0.fc": {"format": "float8_e5m2"}}
    elif case == "header_extra_layer":
        layers["blocks.9.fc"] = {"format": "float8_e4m3fn"}
    elif case == "blockwise_bad_scale":
        cq = {"format": "int8_blockwise", "group_size": 32}
        sd["blocks.0.fc.weight"] = torch.randint(-127, 127, (N, K), dtype=torch.int8)
        sd["blocks.0.fc.weight_scale"] = torch.rand(2, 1)
        sd["blocks.0.fc.comfy_quant"] = marker(cq)
        layers = {"blocks.0.fc": cq}
    elif case == "bf16_scale":
        sd["blocks.0.fc.weight_scale"] = sd["blocks.0.fc.weight_scale"].bfloat16()
    elif case == "mxfp8_e8m0_scale":
        cq = {"format": "mxfp8"}
        sd["blocks.0.fc.weight_scale"] = torch.zeros(128, 4, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        sd["blocks.0.fc.comfy_quant"] = marker(cq)
        layers = {"blocks.0.fc": cq}
    p = write(tmp_path, sd, layers)
    assert rules(p) == expect
    r = run("inspect", p)
    assert r.exit_code == 1 and says(r.stdout, "violation", f"[{expect[0][0]}]")


def test_violation_messages_say_what_breaks(tmp_path):
    sd = {"l.weight": torch.randint(-127, 127, (N, N), dtype=torch.int8), "l.weight_scale": torch.rand(N),
          "l.comfy_quant": marker({"format": "int8_tensorwise"})}
    (v,) = inspect_file(write(tmp_path, sd)).violations
    assert v.message == ("1-D [64] int8 scale: ComfyUI breaks on it, or, as here with N == K, silently scales "
                         "columns instead of rows; store it as [64, 1]")
    sd = fp8_layer({})
    sd["blocks.0.fc.weight"] = sd["blocks.0.fc.weight"].view(torch.uint8)
    (v,) = inspect_file(write(tmp_path, sd, name="g.safetensors")).violations
    assert "stored as U8: the loader converts by value" in v.message and "F8_E4M3" in v.message


def test_inspect_json_and_node_formats(sample, tmp_path):
    out = tmp_path / "o.safetensors"
    quantkit.convert(sample, out, format="int8-block", preset="none")
    r = run("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["formats"] == {"int8_blockwise": 32, "int8_tensorwise": 2} and d["violations"] == []
    assert d["needs_node_for"] == ["int8_blockwise"] and d["comfyui_loads"].startswith("only with a node")
    assert d["families"] == [{"family": "flux1", "prefix": ""}] and d["unquantized_float_weights"] == 0
    assert d["metadata"]["format"] == "pt"
    r = run("inspect", sample)
    assert r.exit_code == 0 and says(r.stdout, "a plain checkpoint", "Flux.1")
    r = run("inspect", tmp_path / "missing.safetensors")
    assert r.exit_code == 1 and says(r.stderr, "no such file")


@pytest.mark.parametrize("fmt", ["fp8", "int8-tensor", "int8-row", "int8-block"])
def test_verify_sqnr_matches_the_converter(sample, tmp_path, fmt):
    out = tmp_path / "o.safetensors"
    rep = quantkit.convert(sample, out, format=fmt)
    ver = verify(out, sample)
    assert ver.ok and ver.identical == 60
    want = {lay.name: lay.sqnr_db for lay in rep.layers if lay.format}
    got = {c.name: c.sqnr_db for c in ver.layers}
    assert set(got) == set(want) and len(got) == 20
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-4), k  # converter sums fp32 chunks, verify fp64


def test_verify_floor_tampering_and_exit_codes(sample, tmp_path):
    out = tmp_path / "o.safetensors"
    rep = quantkit.convert(sample, out, format="int8-row")
    worst = min(lay.sqnr_db for lay in rep.layers if lay.format)
    r = run("verify", out, "--against", sample, "--min-sqnr", f"{worst - 0.01:.3f}")
    assert r.exit_code == 0 and says(r.stdout, "OK"), r.output
    r = run("verify", out, "--against", sample, "--min-sqnr", f"{worst + 0.01:.3f}")
    assert r.exit_code == 1 and says(r.stdout, "[below-min-sqnr]", "FAILED: 1 violation(s)")
    # a tampered weight shows as a low SQNR; a dropped tensor as a violation
    sd = load_file(str(out))
    sd["double_blocks.0.img_attn.qkv.weight"] = -sd["double_blocks.0.img_attn.qkv.weight"]
    del sd["txt_in.bias"]
    bad = write(tmp_path, sd, None, "bad.safetensors")
    ver = verify(bad, sample, min_sqnr=10)
    sq = {c.name: c.sqnr_db for c in ver.layers}
    assert sq["double_blocks.0.img_attn.qkv.weight"] < 0
    assert {(v.rule, v.tensor) for v in ver.violations} == {
        ("missing-tensor", "txt_in.bias"), ("below-min-sqnr", "double_blocks.0.img_attn.qkv.weight")}
    r = run("verify", out, "--min-sqnr", "20")
    assert r.exit_code == 2 and says(r.output, "--min-sqnr needs --against")


def test_verify_report(sample, tmp_path):
    out = tmp_path / "o.safetensors"
    quantkit.convert(sample, out, format="fp8")
    rj = tmp_path / "v.json"
    r = run("verify", out, "--against", sample, "--report", rj, "-q")
    assert r.exit_code == 0 and r.stdout == ""
    doc = json.loads(rj.read_text())
    (f,) = doc["files"]
    import hashlib
    assert f["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert f["against_sha256"] == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert doc["ok"] is True and len(f["layers"]) == 20
    at_least(min(x["sqnr_db"] for x in f["layers"]), db_floor(30.84), "flux-mini fp8 worst layer SQNR dB")


def test_old_converter_layout_is_a_note_not_a_violation(tmp_path):
    """convert_to_quant 1.3.4 (--int8 --scaling_mode row) writes 'per_row': true in each marker but
    not in the header, and orig_dtype as 'torch.bfloat16': ComfyUI reads neither key, so the file
    loads correctly; inspect reports a note. A difference in a key ComfyUI reads stays a violation."""
    w = torch.randn(N, K)
    s = w.abs().amax(1, keepdim=True) / 127
    cq = {"format": "int8_tensorwise", "orig_dtype": "torch.bfloat16", "per_row": True}
    sd = {"l.weight": (w / s).round().to(torch.int8), "l.weight_scale": s, "l.comfy_quant": marker(cq)}
    p = write(tmp_path, sd, {"l": {"format": "int8_tensorwise", "orig_dtype": "torch.bfloat16"}})
    ins = inspect_file(p)
    assert ins.violations == [] and [(n.rule, n.tensor) for n in ins.notes] == [("header-marker-mismatch", "l.comfy_quant")]
    assert ins.notes[0].message.endswith("they differ only in keys ComfyUI ignores")
    r = run("inspect", p)
    assert r.exit_code == 0 and says(r.stdout, "1 note(s) (not violations)")
    p = write(tmp_path, sd, {"l": {"format": "int8_tensorwise", "full_precision_matrix_mult": True}}, "h.safetensors")
    assert [v.rule for v in inspect_file(p).violations] == ["header-marker-mismatch"]
