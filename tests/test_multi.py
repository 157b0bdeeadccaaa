"""Learned rounding over worker processes (issue 8), on CPU with CPU workers: device parsing, output
bytes equal to the single-process run, largest-first scheduling, and every failure path (a worker that
raises, runs out of memory, hangs, or dies by SIGKILL / os._exit) named with its layer, retried on
the other worker or stopped with one QuantkitError, with no file left at the target path.

Each conversion here starts two spawned worker processes (torch import, ~2-3 s each on the CI box)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import multi_faults
import quantkit
from conftest import says
from quantkit import calibration, multi
from quantkit.cli import app
from quantkit.errors import QuantkitError, UsageError

SHAPES = {"blocks.0.fc": (256, 128), "blocks.1.fc": (128, 128), "blocks.2.fc": (64, 256), "blocks.3.fc": (128, 64)}
LARGEST = "blocks.0.fc"  # 256 x 128 and 64 x 256 hold the same bytes; the name breaks the tie


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for n, k in SHAPES.values():
            b = nn.Module()
            b.fc = nn.Linear(k, n)
            self.blocks.append(b)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    torch.manual_seed(0)
    m = Blocks()
    with torch.no_grad(), calibration.capture(m) as cap:
        for b in m.blocks:
            k = b.fc.in_features
            b.fc(torch.randn(512, k) * 2 + 0.3)
    stats = d / "stats.safetensors"
    cap.save(stats)
    ck = d / "blocks.safetensors"
    save_file({k: v.detach().to(torch.bfloat16) for k, v in m.state_dict().items()}, str(ck))
    single = {}
    for fmt in ("fp8", "int8-row"):
        single[fmt] = d / f"single-{fmt}.safetensors"
        quantkit.convert(ck, single[fmt], format=fmt, preset="none", learned_rounding=True, calibration=stats,
                         bias_correction=True)
    return ck, stats, single


def _convert(files, dst, fmt="fp8", devices="cpu,cpu", **kw):
    ck, stats, _ = files
    return quantkit.convert(ck, dst, format=fmt, preset="none", learned_rounding=True, calibration=stats,
                            bias_correction=True, devices=devices, **kw)


def _nothing_left(d: Path, dst: Path) -> None:
    assert not dst.exists()
    assert [p.name for p in d.iterdir()] == []  # no partial output, no scratch file, no calibration copy


@pytest.fixture
def fault(monkeypatch, tmp_path):
    """Install a failing work function (by name from multi_faults) for the layer given."""
    def install(name: str, layer: str) -> None:
        monkeypatch.setenv("QK_FAULT_LAYER", layer)
        monkeypatch.setenv("QK_FAULT_ONCE", str(tmp_path / "fault-once"))
        monkeypatch.setenv("QK_FAULT_LOG", str(tmp_path / "fault-log"))
        monkeypatch.setattr(multi, "learn_layer", getattr(multi_faults, name))
    return install


def test_parse_devices():
    assert multi.parse_devices("cpu,cpu") == [torch.device("cpu")] * 2
    assert multi.parse_devices(["cpu"]) == [torch.device("cpu")]
    for spec, msg in [("mps", "only cuda:N and cpu"), ("tpu", "is not a device"), ("cuda", "names no GPU index"), ("what?", "is not a device"),
                      ("", "is not a device")]:
        with pytest.raises(UsageError, match=msg):
            multi.parse_devices(spec)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--devices all: CUDA is not available here"):
            multi.parse_devices("all")
        with pytest.raises(UsageError, match=r"--devices: cuda:0 does not exist here \(0 CUDA devices\)"):
            multi.parse_devices("cuda:0,cuda:1")


def test_devices_need_learned_rounding(files, tmp_path):
    ck, stats, _ = files
    with pytest.raises(UsageError, match="--devices spreads learned rounding .* learned rounding is off"):
        quantkit.convert(ck, tmp_path / "x.safetensors", preset="none", calibration=stats, devices="cpu,cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["fp8", "int8-row"])
def test_same_bytes_as_one_process(files, tmp_path, fmt):
    out = tmp_path / "o" / "multi.safetensors"
    out.parent.mkdir()
    rep = _convert(files, out, fmt)
    assert out.read_bytes() == files[2][fmt].read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["multi.safetensors"]  # scratch files removed
    reasons = {lay.name: lay.reason for lay in rep.layers}
    assert all("objective" in reasons[f"{L}.weight"] for L in SHAPES)


def test_largest_first_and_workers_import_this_checkout(files, tmp_path, fault):
    fault("logged", "-")
    from quantkit.refine import Refiner
    from quantkit.safetensors_io import SafetensorsReader
    from quantkit.plan import plan_conversion
    from quantkit.convert import make_options
    ck, stats, single = files
    with SafetensorsReader(ck) as r:
        refiner = Refiner.create(r, plan_conversion(r, make_options("fp8", preset="none")), learned_rounding=True,
                                 calibration=stats, bias_correction=True)
        with multi.precompute(refiner, "cpu", tmp_path / "out.safetensors") as store:  # one worker: the order is the schedule
            assert store.log.worker_module == [quantkit.__file__]
            assert Path(quantkit.__file__).is_relative_to(Path(__file__).parents[1] / "src")
            assert set(store.log.ran_on.values()) == {"cpu"} and store.log.events == {}
            scratch = store.path
            assert scratch.exists()
    assert not scratch.exists()
    order = (tmp_path / "fault-log").read_text().split()
    by_size = sorted(SHAPES, key=lambda L: (-SHAPES[L][0] * SHAPES[L][1], L))
    assert order == by_size and order[0] == LARGEST


def test_cli_devices(files, tmp_path):
    ck, stats, single = files
    out = tmp_path / "cli.safetensors"
    args = ["convert", str(ck), "-o", str(out), "--preset", "none", "--learned-rounding", "--calibration",
            str(stats), "--bias-correction"]
    r = CliRunner().invoke(app, args + ["--devices", "mps"])
    assert r.exit_code == 2 and says(r.output, "only cuda:N and cpu are supported"), r.output
    r = CliRunner().invoke(app, args + ["--devices", "cpu,cpu"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == single["fp8"].read_bytes()


def test_killed_worker_layer_retried_on_the_other(files, tmp_path, fault):
    fault("sigkill_once", LARGEST)
    out = tmp_path / "o" / "k.safetensors"
    out.parent.mkdir()
    rep = _convert(files, out)
    assert out.read_bytes() == files[2]["fp8"].read_bytes()
    reason = {lay.name: lay.reason for lay in rep.layers}[f"{LARGEST}.weight"]
    assert "died (signal SIGKILL)" in reason and "done on cpu" in reason, reason
    assert [p.name for p in out.parent.iterdir()] == ["k.safetensors"]


def test_oom_on_one_worker_retried_on_the_other(files, tmp_path, fault):
    fault("oom_once", "blocks.2.fc")
    out = tmp_path / "o.safetensors"
    rep = _convert(files, out, "int8-row")
    assert out.read_bytes() == files[2]["int8-row"].read_bytes()
    reason = {lay.name: lay.reason for lay in rep.layers}["blocks.2.fc.weight"]
    assert re.search(r"after: worker (\d) \(cpu\) failed: out of memory: CUDA out of memory\. Tried to allocate "
                     r"20\.00 GiB \(simulated\); done on cpu\)$", reason), reason


def test_layer_that_kills_every_worker_stops_the_run(files, tmp_path, fault):
    fault("exit_always", "blocks.1.fc")
    d = tmp_path / "o"
    d.mkdir()
    with pytest.raises(QuantkitError) as e:
        _convert(files, d / "x.safetensors")
    msg = e.value.one_line()
    assert "tensor 'blocks.1.fc': learned rounding failed: worker" in msg
    assert msg.count("died (exit code 3)") == 2 and "--exclude '^blocks.1.fc$'" in msg, msg
    _nothing_left(d, d / "x.safetensors")


def test_quantkit_error_in_a_worker_stops_at_once(files, tmp_path, fault):
    fault("quantkit_error", "blocks.3.fc")
    d = tmp_path / "o"
    d.mkdir()
    with pytest.raises(QuantkitError, match=r"tensor 'blocks.3.fc': learned rounding stopped on worker \d \(cpu\): "
                                            r"calibration statistics are not positive definite"):
        _convert(files, d / "x.safetensors")
    _nothing_left(d, d / "x.safetensors")


def test_hung_worker_is_killed_after_the_layer_timeout(files, tmp_path, fault, monkeypatch):
    fault("hang", "blocks.1.fc")
    monkeypatch.setattr(multi, "LAYER_TIMEOUT", 4.0)
    d = tmp_path / "o"
    d.mkdir()
    with pytest.raises(QuantkitError) as e:
        _convert(files, d / "x.safetensors")
    assert e.value.tensor == "blocks.1.fc"
    assert e.value.one_line().count("did not finish the layer in 4 s and was killed") == 2, e.value.one_line()
    _nothing_left(d, d / "x.safetensors")


def test_result_of_the_wrong_shape_is_an_error(files, tmp_path, fault):
    fault("wrong_shape", "blocks.0.fc")
    d = tmp_path / "o"
    d.mkdir()
    with pytest.raises(QuantkitError, match=r"blocks.0.fc.*RuntimeError: result shapes \(1, 128\)"):
        _convert(files, d / "x.safetensors")
    _nothing_left(d, d / "x.safetensors")


def test_in_memory_calibration_is_handed_to_the_workers(files, tmp_path):
    ck, stats, single = files
    cal = calibration.Calibration.load(stats)
    out = tmp_path / "mem.safetensors"
    quantkit.convert(ck, out, format="fp8", preset="none", learned_rounding=True, calibration=cal,
                     bias_correction=True, devices="cpu,cpu")
    assert out.read_bytes() == single["fp8"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.safetensors"]


def test_per_layer_block_size_same_bytes(files, tmp_path):
    """A config entry's block_size (not the global one) shapes the learned layer's scale, in one process
    and in the workers alike."""
    ck, stats, _ = files
    cfg = tmp_path / "layers.json"
    cfg.write_text('{"layers": {"blocks.1.fc": {"format": "int8-block", "block_size": 64}}}')
    outs = []
    for devices in (None, "cpu,cpu"):
        outs.append(tmp_path / f"{devices}.safetensors")
        quantkit.convert(ck, outs[-1], format="int8-block", preset="none", config=cfg, learned_rounding=True,
                         calibration=stats, bias_correction=True, devices=devices)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    from safetensors import safe_open
    with safe_open(str(outs[0]), "pt") as f:
        assert tuple(f.get_slice("blocks.1.fc.weight_scale").get_shape()) == (2, 2)
        assert tuple(f.get_slice("blocks.0.fc.weight_scale").get_shape()) == (2, 1)
