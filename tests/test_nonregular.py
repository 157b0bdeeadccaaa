"""Inputs that are no regular file (a FIFO, a directory, a device) are refused before they are
opened for reading: a FIFO with no writer used to block ``convert`` in ``open()`` for ever. Each
check runs in a subprocess with a timeout, so a regression fails instead of hanging the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("QUANTKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture
def fifo(tmp_path):
    p = tmp_path / "pipe.safetensors"
    os.mkfifo(p)
    return p


def _one_line(r, needle):
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0] and "fix:" in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_convert_refuses_non_regular_inputs(tmp_path, fifo):
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo)
    inputs = {fifo: "is a FIFO (named pipe), not a regular file", link: "is a FIFO (named pipe), not a regular file",
              tmp_path: "is a directory", Path("/dev/null"): "is a character device, not a regular file"}
    out = tmp_path / "out"
    r = _cli("convert", *inputs, "-O", out)  # a hang here is a TimeoutExpired failure
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    # one line per input, then the count (the multi-input summary)
    assert len(lines) == len(inputs) + 1 and lines[-1] == f"{len(inputs)} of {len(inputs)} inputs failed", r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    for src, needle in inputs.items():
        assert any(f"{src}: {needle}" in line and "fix:" in line for line in lines), (src, r.stderr)
    assert not out.exists() or not list(out.iterdir())


def test_plan_refuses_a_fifo(fifo):
    r = _cli("plan", fifo)
    assert r.returncode == 1, r.stderr
    _one_line(r, "not a regular file")


def test_fifo_config_is_a_usage_error(tmp_path, sample):
    p = tmp_path / "layers.toml"
    os.mkfifo(p)
    r = _cli("convert", sample, "-o", tmp_path / "o.safetensors", "--config", p)
    assert r.returncode == 2, r.stderr
    _one_line(r, "is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "o.safetensors").exists()


def test_reader_refuses_fifo_in_process(fifo):
    code = ("import sys; from quantkit.safetensors_io import SafetensorsReader\n"
            "from quantkit.errors import QuantkitError\n"
            f"try: SafetensorsReader({str(fifo)!r})\n"
            "except QuantkitError as e: print(e.one_line())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.stdout.strip() == f"{fifo}: is a FIFO (named pipe), not a regular file " \
                               "(fix: pass the .safetensors file itself)", r.stdout + r.stderr


def test_symlink_to_a_regular_file_is_read(tmp_path):
    from quantkit.safetensors_io import SafetensorsReader
    real = tmp_path / "real.safetensors"
    save_file({"a": torch.arange(4, dtype=torch.float32)}, str(real))
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    with SafetensorsReader(link) as r:
        assert torch.equal(r.tensor("a"), torch.arange(4, dtype=torch.float32))
