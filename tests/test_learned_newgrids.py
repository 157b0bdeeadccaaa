"""Learned rounding + bias correction on the registry formats' own grids (Format.learn_grid,
learned.learn_format): held-out quality on all-MiniLM-L6-v2 against each format's round-to-nearest
(calibrate on models.sentences.CALIBRATION, measure on EVALUATION), the written file's validity,
the keep-RTN rule and the error paths.

Held-out mean 1-cos of sentence embeddings, learned + bias correction vs RTN, measured at this
commit (1 thread; `benchmarks/learned_newgrids.py` prints the same table through the library):

    format         RTN        learned+bc  ratio
    int8-convrot   2.061e-4   6.63e-5     0.322
    mxfp8          1.607e-3   7.77e-4     0.483
    nvfp4          1.972e-2   8.15e-3     0.413
    int4-convrot   4.995e-2   1.50e-2     0.301
    awq4           2.785e-2   9.93e-3     0.356
    w4a8           1.712e-2   5.97e-3     0.349
    w4a8-6bit      1.342e-3   4.44e-4     0.331

Ceilings: the issue's targets (ratio 0.5 on the 8-bit formats, nvfp4 1.2e-2; int4-convrot 3.3e-2,
awq4 1.7e-2, w4a8 1.0e-2, w4a8-6bit 8e-4) where the measurement is inside them, each with the
measured value times 1.15 as a tighter bound on the ratio (covers BLAS / thread / CPU-capability
differences in the Cholesky factors and the model's forward; the 1-cos of a 5-sentence mean moves
by a few percent with them).
"""

from __future__ import annotations

import pytest
import torch

import quantkit
from conftest import at_most, record
from quantkit import learned
from quantkit.errors import UsageError
from quantkit.formats import FORMATS
from quantkit.formats.base import LayerOpts
from quantkit.inspection import inspect_file
from quantkit.verify import verify

torch.set_num_threads(1)  # many tiny column ops: threads only add sync cost on the 2-core CI box

# format: (measured ratio, ratio ceiling, absolute 1-cos ceiling)
MEASURED = {
    "int8-convrot": (0.322, 0.322 * 1.15, None),
    "mxfp8": (0.483, 0.5, None),  # target 0.5x; measured 0.483 leaves 3.5%, the target is the bound
    "nvfp4": (0.413, 0.413 * 1.15, 1.2e-2),
    "int4-convrot": (0.301, 0.301 * 1.15, 3.3e-2),
    "awq4": (0.356, 0.356 * 1.15, 1.7e-2),
    "w4a8": (0.349, 0.349 * 1.15, 1.0e-2),
    "w4a8-6bit": (0.331, 0.331 * 1.15, 8e-4),
}
FAST = ("int8-convrot", "mxfp8", "nvfp4")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from quantkit.models import heldout
    from quantkit.models.bert import load_bert, minilm_dir
    from quantkit.models.sentences import CALIBRATION
    d = tmp_path_factory.mktemp("newgrids")
    ref = load_bert()
    heldout.calibrate(ref, CALIBRATION, d / "stats.safetensors")
    return ref, minilm_dir() / "model.safetensors", d


def _one_minus_cos(ref, path) -> float:
    from quantkit.models import heldout
    from quantkit.models.sentences import EVALUATION
    return 1.0 - heldout.embedding_cosine(ref, heldout.model_from(heldout.load_converted(path)), EVALUATION)


def _heldout_case(minilm, fmt):
    ref, src, d = minilm
    got = {}
    for mode, kw in {"rtn": {}, "learned+bc": {"learned_rounding": True, "bias_correction": True,
                                               "calibration": d / "stats.safetensors"}}.items():
        out = d / f"{fmt}-{mode}.safetensors"
        rep = quantkit.convert(src, out, format=fmt, overwrite=True, **kw)
        got[mode] = _one_minus_cos(ref, out)
        if mode == "learned+bc":
            v = verify(out)
            assert v.ok, [x.line() for x in v.violations]
            assert inspect_file(out).loads == "yes: stock ComfyUI"
            notes = [t.reason for t in rep.tensors if t.format == fmt]
            assert len(notes) == 37
            # 36 linears ran during calibration and are learned (or keep RTN where it is not better);
            # the pooler never runs for sentence embeddings and stays round-to-nearest
            assert sum("objective" in n for n in notes) == 36
    rtn, lr = got["rtn"], got["learned+bc"]
    _, ratio_ceiling, abs_ceiling = MEASURED[fmt]
    record(f"{fmt} held-out 1-cos, rtn", rtn)
    record(f"{fmt} held-out 1-cos, learned+bc", lr)
    at_most(lr / rtn, ratio_ceiling, f"{fmt} held-out 1-cos learned+bc / rtn")
    if abs_ceiling is not None:
        at_most(lr, abs_ceiling, f"{fmt} held-out 1-cos learned+bc")


@pytest.mark.parametrize("fmt", FAST)
def test_minilm_heldout_learned_below_rtn(minilm, fmt):
    _heldout_case(minilm, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4-convrot", "awq4", "w4a8", "w4a8-6bit"])
def test_minilm_heldout_learned_below_rtn_4bit(minilm, fmt):
    _heldout_case(minilm, fmt)


def _problem(n=64, k=128, rows=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix
    return w, (x.T @ x / rows)


@pytest.mark.parametrize("fmt", ["int8-convrot", "mxfp8", "nvfp4", "int4-convrot", "awq4", "w4a8", "w4a8-6bit"])
def test_learned_tensors_are_the_formats_and_lower_the_objective(fmt):
    """On correlated inputs learned rounding beats RTN on J; its tensors have the format's planned
    suffixes, dtypes and shapes, and J recomputed from the format's own dequantize is the reported one."""
    f = FORMATS[fmt]
    w, h = _problem()
    r = learned.learn_format(w, h, f, LayerOpts(), learned.LearnedOptions(device="cpu"))
    assert not r.method.startswith("rtn") and r.objective < 0.9 * r.objective_rtn
    plan = {s.suffix: s for s in f.stored(tuple(w.shape), torch.float32, LayerOpts())}
    assert sorted(plan) == sorted(r.stored)
    from quantkit.dtypes import torch_dtype
    for s, t in r.stored.items():
        assert tuple(t.shape) == tuple(plan[s].shape) and t.dtype == torch_dtype(plan[s].dtype), s
    deq = f.dequantize(r.stored, f.marker(tuple(w.shape), torch.float32, LayerOpts()), torch.float32)
    e = (w - deq).double()
    j = float(((e @ h.double()) * e).sum() / ((w.double() @ h.double()) * w.double()).sum())
    assert j == pytest.approx(r.objective, rel=1e-4)


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_rtn_kept_when_learned_is_not_better(fmt):
    """With H = I there is nothing to feed back: the learned codes are RTN's, J ties, and the rule
    (keep RTN unless strictly lower) writes the format's own quantizer's bytes."""
    f = FORMATS[fmt]
    w, _ = _problem(seed=1)
    r = learned.learn_format(w, torch.eye(w.shape[1]), f, LayerOpts(), learned.LearnedOptions(device="cpu"))
    assert r.method == "rtn (learned not better)" and r.objective == r.objective_rtn
    want = f.quantize(w, LayerOpts())
    assert all(torch.equal(r.stored[s].view(torch.uint8) if r.stored[s].dtype.itemsize == 1 else r.stored[s],
                           want[s].view(torch.uint8) if want[s].dtype.itemsize == 1 else want[s]) for s in want)


def test_formats_without_a_grid_are_refused(tmp_path):
    """A format whose learn_grid gives None is refused by the converter up front (nothing written)
    and by learn_format; the data-free subspace objective is refused on the new grids."""
    from safetensors.torch import save_file

    from quantkit.errors import QuantkitError
    from quantkit.formats.base import register, unregister
    from quantkit.refine import learnable

    from quantkit.formats.base import Format

    class NoGrid(type(FORMATS["mxfp8"])):  # mxfp8 as it was before it gave its grid
        name = "mxfp8-nogrid-test"
        learn_grid = Format.learn_grid

    src = tmp_path / "ck.safetensors"
    save_file({"a.weight": torch.randn(64, 64)}, str(src))
    f = register(NoGrid())
    try:
        assert not learnable(f) and learnable(FORMATS["mxfp8"])
        with pytest.raises(UsageError, match="--learned-rounding does not run mxfp8-nogrid-test \\(fix") as e:
            quantkit.convert(src, tmp_path / "o.safetensors", format=f.name, learned_rounding=True,
                             calibration=tmp_path / "never-read.safetensors")
        assert "drop --learned-rounding" in e.value.fix and "nvfp4" in e.value.fix
        with pytest.raises(QuantkitError, match="learned rounding does not run mxfp8-nogrid-test: the format gives no grid"):
            learned.learn_format(torch.randn(32, 32), torch.eye(32), f)
    finally:
        unregister(f.name)
    with pytest.raises(UsageError, match="does not run nvfp4 with the data-free subspace objective"):
        quantkit.convert(src, tmp_path / "o.safetensors", format="nvfp4", learned_rounding=True,
                         learned_objective="subspace")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("fmt", ["int8-convrot", "nvfp4", "awq4", "w4a8"])
def test_cli_writes_learned_weights_and_the_bias_they_correct(tmp_path, fmt):
    """`quantkit convert --calibration --learned-rounding --bias-correction` on a new format: exit 0,
    the file passes the format's contract check, the written codes are learned (not the format's
    RTN bytes), and each written bias is b + (W - Wq) mu for the very Wq written (the format's
    dequantize)."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from quantkit import calibration
    from quantkit.cli import app
    from quantkit.formats import decode_comfy_quant
    torch.manual_seed(3)
    m = _Tiny()
    with torch.no_grad(), calibration.capture(m) as cap:
        for _ in range(4):
            m(torch.randn(64, 64) @ torch.randn(64, 64) * 0.3 + 0.5)
    stats = tmp_path / "stats.safetensors"
    cap.save(stats)
    sd = {k: v.detach().to(torch.bfloat16) for k, v in m.state_dict().items()}
    ck, out = tmp_path / "ck.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(ck))
    r = CliRunner().invoke(app, ["convert", str(ck), "-o", str(out), "--format", fmt, "--preset", "none",
                                 "--calibration", str(stats), "--learned-rounding", "--bias-correction"])
    assert r.exit_code == 0, r.output
    v = verify(out)
    assert v.ok, [x.line() for x in v.violations]
    got = load_file(str(out))
    f = FORMATS[fmt]
    for L in ("up", "down"):
        marker = decode_comfy_quant(got[f"{L}.comfy_quant"].numpy().tobytes())
        stored = {k[len(L) + 1:]: t for k, t in got.items() if k.startswith(L + ".") and k[len(L) + 1:] not in
                  ("bias", "comfy_quant")}
        deq = f.dequantize(stored, marker, torch.float32, L)
        want = learned.corrected_bias(sd[f"{L}.bias"], sd[f"{L}.weight"].float(), deq, cap.result.layers[L]["mean"])
        assert got[f"{L}.bias"].dtype == torch.bfloat16 and torch.equal(got[f"{L}.bias"], want)
        assert not torch.equal(got[f"{L}.bias"], sd[f"{L}.bias"])
        rtn = f.quantize(sd[f"{L}.weight"], LayerOpts())
        assert any(not torch.equal(stored[s].view(torch.uint8), rtn[s].view(torch.uint8)) for s in rtn
                   if rtn[s].dtype.itemsize == 1), f"{L}: learned rounding wrote the RTN codes"
