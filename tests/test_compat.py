"""The drop-in for the old converter's flags: shell-style invocations from its README."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from safetensors import safe_open

from conftest import ROOT, says
from quantkit.compat import map_args
from quantkit.errors import UsageError


def mapped(line: str) -> list[str] | None:
    argv = shlex.split(line)
    assert argv[0] == "ctq"
    return map_args(argv[1:])


@pytest.mark.parametrize("line,expect", [
    # the old README's quick-start lines
    ("ctq -i model.safetensors -o model-fp8mixed.safetensors --comfy_quant --save-quant-metadata --simple --low-memory",
     "convert model.safetensors -o model-fp8mixed.safetensors --format fp8 --preset none"),
    ("ctq -i model.safetensors -o model-int8mixedrow.safetensors --int8 --scaling_mode row --comfy_quant "
     "--save-quant-metadata --simple --low-memory",
     "convert model.safetensors -o model-int8mixedrow.safetensors --format int8-row --preset none"),
    # its exclude example, with --simple
    ("ctq -i model.safetensors --exclude-layers \"(double_blocks.[01]|final_layer|txt_attn.proj)\" --comfy_quant --simple",
     "convert model.safetensors -o model_simple_fp8_tensor.safetensors --format fp8 "
     "--exclude '(double_blocks.[01]|final_layer|txt_attn.proj)' --preset none"),
    ("ctq -i m.safetensors --int8 --simple", "convert m.safetensors -o m_simple_int8_tensorwise.safetensors "
     "--format int8-tensor --preset none"),
    ("ctq -i m.safetensors --int8 --scaling-mode block --block_size 64 --simple -fpmm",
     "convert m.safetensors -o m_simple_int8_bs64.safetensors --format int8-block --block-size 64 "
     "--full-precision-mm --preset none"),
    ("ctq -i m.safetensors --int8 --scaling_mode=block2d --simple --wan",
     "convert m.safetensors -o m_simple_int8mixed_bs128.safetensors --format int8-block --block-size 128 --preset wan"),
    ("ctq --input=dir/flux2.safetensors --flux2 --simple --exclude_layers=img_in",
     "convert dir/flux2.safetensors -o dir/flux2_simple_fp8mixed_tensor.safetensors --format fp8 --exclude img_in "
     "--preset flux2"),
    ("ctq -i t5.safetensors --t5xxl --simple --int8 --scaling_mode row -o t5-int8.safetensors",
     "convert t5.safetensors -o t5-int8.safetensors --format int8-row --preset t5xxl"),
    ("ctq -h", None),
])
def test_readme_invocations_map(line, expect):
    got = mapped(line)
    assert (shlex.join(got) if got is not None else None) == expect


@pytest.mark.parametrize("line,needle", [
    # the old README's MXFP8, ConvRot and FP8 block-scaling examples
    ("ctq -i model.safetensors -o model-mxfp8mixed.safetensors --mxfp8 --comfy_quant --save-quant-metadata --simple "
     "--low-memory", "--mxfp8: not supported by quantkit's drop-in for convert_to_quant (run 'quantkit convert --format mxfp8' itself)"),
    ("ctq -i model.safetensors -o model-int8-convrot-simple.safetensors --comfy_quant --save-quant-metadata --int8 "
     "--scaling-mode row --convrot --convrot-group-size 256 --simple", "--convrot: not supported"),
    ("ctq -i model.safetensors --scaling-mode block --block_size 64 --comfy_quant --simple",
     "FP8 with --scaling_mode block (a block-wise FP8 format) is not a quantkit format"),
    ("ctq -i model.safetensors --exclude-layers x --comfy_quant",
     "without --simple the old converter runs learned rounding, which quantkit does not do"),
    ("ctq -i m.safetensors --simple --nvfp4", "run 'quantkit convert --format nvfp4' itself"),
    ("ctq -i m.safetensors --simple --heur", "--heur: not supported"),
    ("ctq -i m.safetensors --simple --optimizer adamw", "--optimizer: not supported by quantkit's drop-in"),
    ("ctq -i m.safetensors --simple --wan --flux2", "several model flags (--wan, --flux2)"),
    ("ctq -i m.safetensors --simple --block_size 64", "--block_size only applies to --int8 --scaling_mode block"),
    ("ctq -i m.safetensors --simple --exclude-layers 'final_layer.linear.weight'", "mentions 'weight'"),
    ("ctq -i m.safetensors --simple --scaling_mode block3d --int8", "--scaling_mode block3d: not supported"),
    ("ctq --simple --int8", "-i INPUT is required"),
    ("ctq -i", "-i needs a value"),
    ("ctq m.safetensors --simple", "unexpected argument 'm.safetensors'"),
])
def test_unsupported_flags_are_errors(line, needle):
    with pytest.raises(UsageError) as e:
        mapped(line)
    assert needle in e.value.one_line()


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, str(ROOT / "convert_to_quant.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd)


def test_entry_module_converts_and_prints_the_command(sample, tmp_path):
    r = _run("-i", sample, "--int8", "--scaling_mode", "row", "--simple", "--comfy_quant", "--save-quant-metadata",
             "--low-memory")
    out = tmp_path / "flux-mini_simple_int8_rowwise.safetensors"
    assert r.returncode == 0, r.stderr
    assert says(r.stderr, f"equivalent: quantkit convert {sample} -o {out} --format int8-row --preset none")
    with safe_open(str(out), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        assert list(f.get_slice("img_in.weight_scale").get_shape()) == [128, 1]
    assert len(layers) == 34 and {v["format"] for v in layers.values()} == {"int8_tensorwise"}
    r = _run("-i", sample, "--int8", "--scaling_mode", "row", "--simple")  # output exists now
    assert r.returncode == 1 and says(r.stderr, "already exists")
    r = _run("-i", sample, "--mxfp8", "--simple")
    assert r.returncode == 2 and r.stderr.startswith("error: --mxfp8") and "Traceback" not in r.stderr
    r = _run("--help")
    assert r.returncode == 0 and says(r.stdout, "--simple is required")
