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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", [name for name, f in FORMATS.items() if f.kernel is None])
def test_cuda_conversion_refuses_a_nan_weight(tmp_path, fmt):
    """A format quantized by its own (Triton or torch) quantizer on CUDA: the converter's one-line
    NaN/Inf error naming the tensor, and nothing left at the target."""
    from safetensors.torch import save_file

    from quantkit.errors import QuantkitError
    w = torch.randn(64, 256).bfloat16()
    w[5, 7] = float("nan")
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"l.weight": w}, str(src))
    with pytest.raises(QuantkitError, match="NaN or Inf") as e:
        quantkit.convert(src, out, format=fmt, preset="none", device="cuda")
    assert e.value.tensor == "l.weight"
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]
