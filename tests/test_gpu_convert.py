"""GPU conversion writes the same bytes as the CPU path (run on a CUDA machine: -m gpu)."""

from __future__ import annotations

import pytest
import torch

import quantkit
from quantkit.formats import FORMATS

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cuda_output_bytes_equal_cpu(sample, tmp_path, fmt):
    a, b = tmp_path / "cpu.st", tmp_path / "gpu.st"
    ra = quantkit.convert(sample, a, format=fmt, device="cpu")
    rb = quantkit.convert(sample, b, format=fmt, device="cuda")
    assert a.read_bytes() == b.read_bytes()
    for la, lb in zip(ra.layers, rb.layers):
        if la.sqnr_db is not None:
            assert lb.sqnr_db == pytest.approx(la.sqnr_db, abs=0.01)
