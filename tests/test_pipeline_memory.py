"""The overlapped pipeline writes the same bytes as the inline path, and a whole-process peak RSS
bound holds on a multi-tensor Flux-shaped file: the process after its imports + 3x the largest
tensor + the output writer's bounce buffers + 150 MB."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from quantkit import fileio
from quantkit.plan import Options, plan_conversion
from quantkit.safetensors_io import SafetensorsReader


def _synth():
    spec = importlib.util.spec_from_file_location("synth", ROOT / "benchmarks" / "synth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fmt", ["fp8", "int8-block"])
def test_threaded_inline_and_buffered_bytes_identical(sample, tmp_path, fmt, monkeypatch):
    """Threaded and inline, O_DIRECT (the default where the file system allows it) and buffered."""
    outs = []
    for threaded, direct in ((True, "1"), (False, "1"), (True, "0")):
        monkeypatch.setenv("QUANTKIT_DIRECT_IO", direct)
        out = tmp_path / f"o-{threaded}-{direct}.st"
        with SafetensorsReader(sample) as r:
            plan = plan_conversion(r, Options(format=fmt))
            importlib.import_module("quantkit.convert")._execute(r, plan, out, None, threaded=threaded)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    return _synth().build(p, gb=0.55)


@pytest.mark.parametrize("fmt", ["fp8", "int8-block"])
def test_peak_rss_bounded(flux_file, tmp_path, fmt):
    with SafetensorsReader(flux_file) as r:
        largest = max(t.nbytes for t in r.tensors_in_order)
        total = r.file_size
    out = tmp_path / "o.st"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child started from a
    # large pytest process would report the parent's peak. The baseline is the process after its
    # imports (~0.25 GB with a CPU torch, more with a CUDA build's libraries); the CPU path is pinned
    # (on a GPU machine `auto` would pick CUDA).
    code = ("import torch, quantkit, quantkit.convert\n"
            "vm = lambda k: int([l.split()[1] for l in open('/proc/self/status') if l.startswith(k)][0]) * 1024\n"
            "base = vm('VmRSS')\n"
            "quantkit.convert(%r, %r, format=%r, device='cpu')\n"
            "print(base, vm('VmHWM'))") % (str(flux_file), str(out), fmt)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = map(int, r.stdout.split())
    bound = 3 * largest + fileio.BUFFERS * fileio.BOUNCE + 150e6  # + the direct writer's bounce buffers
    assert total > 5 * largest  # the file is several times the bound's tensor term
    assert peak - base < bound, f"peak RSS {peak / 1e6:.0f} MB, {(peak - base) / 1e6:.0f} MB over the " \
                                f"{base / 1e6:.0f} MB after imports; bound {bound / 1e6:.0f} MB"


@pytest.mark.parametrize("fmt", ["fp8", "int8-row", "int8-block"])
def test_device_path_bytes_identical_to_cpu_path(sample, tmp_path, fmt, monkeypatch):
    """The GPU pipeline's buffer logic (preadv into a staging buffer, a pool of output buffers handed
    back by the writer thread), run with the CPU as its device, writes the CPU path's bytes."""
    import torch
    conv = importlib.import_module("quantkit.convert")
    a, b = tmp_path / "cpu.st", tmp_path / "dev.st"
    with SafetensorsReader(sample) as r:
        conv._execute(r, plan_conversion(r, Options(format=fmt)), a, None)
    monkeypatch.setattr(conv, "_make_quantizer",
                        lambda layers, reader, device: conv._device_quantizer(layers, reader, torch.device("cpu")))
    with SafetensorsReader(sample) as r:
        conv._execute(r, plan_conversion(r, Options(format=fmt)), b, None)
    assert a.read_bytes() == b.read_bytes()
