"""The format registry and the interface every format module implements (quantkit.formats): what a
format plans is what it quantizes, dequantization quality per format, telling formats apart by
marker and shapes, the generic writer path against the fast kernels (same bytes), and importing
the registry without torch."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import quantkit
from quantkit.errors import UsageError
from quantkit.formats import (FALLBACK_CHOICES, FORMATS, LayerOpts, encode_comfy_quant, format_of_marker,
                              formats_with_option, get_format, register, unregister)
from quantkit.formats import scaled

from conftest import ROOT, SAMPLE, sha
from test_format_bytes import SAMPLE_SHA

# SQNR (dB) of dequantize(quantize(w)) on a seeded N(0, 1) 256x512 bf16 weight, measured
# (fp8 31.54, fp8-e5m2 25.63, int8-tensor 39.67, int8-row 42.55, int8-block 40.35 at b=128, int8-convrot
# 42.59 at G=256, mxfp8 31.49, nvfp4 21.77); floors 1 dB under.
SQNR_FLOOR = {"fp8": 30.5, "fp8-e5m2": 24.6, "int8-tensor": 38.6, "int8-row": 41.5, "int8-block": 39.3,
              "int8-convrot": 41.5, "mxfp8": 30.4, "nvfp4": 20.7,
              # 4-bit formats (measured w4a8 23.09, w4a8-6bit 34.24, int4-convrot 19.05, awq4 21.82); 1 dB under
              "w4a8": 22.0, "w4a8-6bit": 33.2, "int4-convrot": 18.0, "awq4": 20.8}



def _weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 512, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantize_writes_exactly_the_planned_tensors(name):
    fmt, w, opts = FORMATS[name], _weight(), LayerOpts(128)
    assert fmt.cannot_take(tuple(w.shape), opts) is None
    tensors = fmt.quantize(w, opts)
    planned = fmt.stored(tuple(w.shape), w.dtype, opts)
    assert [s.suffix for s in planned][0] == "weight"
    assert sorted(tensors) == sorted(s.suffix for s in planned)
    from quantkit.dtypes import name_of
    for s in planned:
        assert (name_of(tensors[s.suffix].dtype), tuple(tensors[s.suffix].shape)) == (s.dtype, s.shape), s
    marker = fmt.marker(tuple(w.shape), w.dtype, opts)
    rows = fmt.layer_tensors("L", tuple(w.shape), w.dtype, opts, {"full_precision_matrix_mult": True})
    assert rows[-1] == ("L.comfy_quant", "U8", (len(encode_comfy_quant({**marker, "full_precision_matrix_mult": True})),))
    assert [r[0] for r in rows[:-1]] == [f"L.{s.suffix}" for s in planned]
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert format_of_marker(marker, shapes) is fmt  # a layer it wrote is read back as itself
    deq = fmt.dequantize(tensors, marker, torch.float32, "L")
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert scaled.sqnr(w.float(), deq) >= SQNR_FLOOR[name]


@pytest.mark.parametrize("marker, shapes, want", [
    ({"format": "float8_e4m3fn"}, {"weight_scale": ()}, "fp8"),
    ({"format": "float8_e5m2"}, {"weight_scale": ()}, "fp8-e5m2"),
    ({"format": "int8_tensorwise"}, {"weight_scale": ()}, "int8-tensor"),
    ({"format": "int8_tensorwise"}, {"weight_scale": (1,)}, "int8-tensor"),
    ({"format": "int8_tensorwise"}, {"weight_scale": (64, 1)}, "int8-row"),
    ({"format": "int8_tensorwise"}, {"weight_scale": (64,)}, None),  # 1-D: ComfyUI breaks on it
    ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}, {"weight_scale": (64, 1)}, "int8-convrot"),
    ({"format": "int8_tensorwise", "params": {"convrot": True}}, {"weight_scale": (64, 1)}, "int8-convrot"),
    ({"format": "int8_tensorwise", "convrot": False}, {"weight_scale": (64, 1)}, "int8-row"),
    ({"format": "int8_blockwise", "group_size": 32}, {"weight_scale": (2, 4)}, "int8-block"),
    ({"format": "mxfp8"}, {"weight_scale": (128, 4)}, "mxfp8"),
    ({"format": "nvfp4"}, {"weight_scale": (128, 8), "weight_scale_2": ()}, "nvfp4"),
    ({"format": "float8_e4m3fn_rowwise"}, {"weight_scale": (64, 1)}, None),
    # asym_w4a8_int8: the bit depth is the packed row width against K = s_rel columns x group_size
    ({"format": "asym_w4a8_int8", "group_size": 16}, {"weight": (64, 64), "weight_s_rel": (64, 8)}, "w4a8"),
    ({"format": "asym_w4a8_int8", "group_size": 16}, {"weight": (64, 96), "weight_s_rel": (64, 8)}, "w4a8-6bit"),
    ({"format": "asym_w4a8_int8", "group_size": 16}, {"weight": (64, 80), "weight_s_rel": (64, 8)}, None),
    ({"format": "asym_w4a8_int8"}, {"weight": (64, 64)}, None),  # no s_rel: not readable
    ({"format": "convrot_w4a4", "convrot_groupsize": 64}, {"weight": (64, 64), "weight_scale": (64,)}, "int4-convrot"),
    ({"format": "awq_w4a16", "group_size": 64}, {"weight": (64, 64), "weight_scale": (2, 64)}, "awq4"),
])
def test_format_of_marker(marker, shapes, want):
    got = format_of_marker(marker, {"weight": (64, 128), **shapes})
    assert (got.name if got else None) == want


def test_registry_errors_and_choices():
    with pytest.raises(UsageError, match="unknown format 'int9'") as e:
        get_format("int9")
    assert "fp8" in e.value.fix and "int8-block" in e.value.fix
    with pytest.raises(ValueError, match="'fp8' is already registered"):
        register(FORMATS["fp8"])
    assert FALLBACK_CHOICES[0] == "int8-row" and FALLBACK_CHOICES[-1] == "keep"
    assert "int8-block" not in FALLBACK_CHOICES  # it cannot take every 2-D shape
    assert formats_with_option("block_size") == ["int8-block"]
    assert FORMATS["int8-block"].option_error(LayerOpts(96)) == ("--block-size 96 is not a power of two", "use 128 or 64")


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.kernel is not None])
def test_reference_path_writes_the_fast_paths_bytes(tmp_path, name):
    """A format no fast kernel runs goes through its own torch quantize: a copy of each format with
    its kernel taken away writes the bytes the kernels write (same marker, so same file)."""
    ref = copy.copy(FORMATS[name])
    ref.name, ref.kernel = f"{name}-reference-path", None
    register(ref)
    try:
        out = tmp_path / "out.safetensors"
        rep = quantkit.convert(SAMPLE, out, format=ref.name)
    finally:
        unregister(ref.name)
    assert sha(out) == SAMPLE_SHA[name]
    assert all(lr.sqnr_db is None or lr.sqnr_db > 20 for lr in rep.layers)


def test_registry_imports_without_torch():
    """Format names, summaries and choices are known without importing torch (the CLI's --help)."""
    code = ("import sys, types; pkg = types.ModuleType('quantkit'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['quantkit'] = pkg; import quantkit.formats as f; "
            "print(len(f.FORMATS), f.FORMATS['int8-row'].summary, f.FALLBACK_CHOICES, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "src" / "quantkit")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == str(len(FORMATS)) and out[-1] == "False", out


def test_unknown_format_option_is_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown format option 'group'") as e:
        quantkit.convert(SAMPLE, tmp_path / "out.safetensors", format="int8-row", format_options={"group": 64})
    assert e.value.fix == "known: convrot_group_size"
    assert not list(tmp_path.iterdir())
