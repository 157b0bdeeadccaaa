"""The CLI boundary: exit codes, one-line errors on stderr, no tracebacks, the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import says
from quantkit import __version__
from quantkit.cli import app

runner = CliRunner()


def run(*args, env=None):
    r = runner.invoke(app, [str(a) for a in args], env=env)
    return r


def test_convert_ok_and_summary(sample, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run("convert", sample, "-o", out, "--format", "int8-block", "--preset", "none")
    assert r.exit_code == 0, r.output
    assert out.exists()
    assert says(r.stdout, "32 quantized, 2 fell back")
    assert says(r.stdout, "SQNR int8-block", "fallback -> int8-row: 2 layers")


def test_quiet_prints_nothing(sample, tmp_path):
    r = run("convert", sample, "-o", tmp_path / "o.st", "--quiet")
    assert r.exit_code == 0 and r.stdout == ""


@pytest.mark.parametrize("args,code,needle", [
    (["convert", "{tmp}/missing.safetensors"], 1, "no such file"),
    (["convert", "{sample}", "-o", "{sample}", "--overwrite"], 1, "output path is the input"),
    (["convert", "{sample}", "--format", "int4"], 2, "int4"),
    (["convert", "{sample}", "--fallback", "nope"], 2, "nope"),
    (["convert", "{sample}", "-o", "{tmp}/o.st", "--exclude", "("], 2, "not a valid regular expression"),
    (["convert"], 2, "missing argument"),
])
def test_error_exit_codes(sample, tmp_path, args, code, needle):
    args = [a.format(tmp=tmp_path, sample=sample) for a in args]
    r = run(*args)
    assert r.exit_code == code, r.output
    assert says(r.output, needle)
    assert "Traceback" not in r.output


def test_error_is_one_line_on_stderr(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    r = run("convert", bad, "-o", tmp_path / "o.st")
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0] and "fix:" in lines[0]
    assert r.stdout == ""


def test_debug_env_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(tmp_path / "missing.st")],
                       capture_output=True, text=True, env={"QUANTKIT_DEBUG": "1", "PATH": ""})
    assert r.returncode == 1 and says(r.stderr, "Traceback", "QuantkitError")
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(tmp_path / "missing.st")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")


def test_version_and_formats():
    r = run("--version")
    assert r.exit_code == 0 and says(r.stdout, __version__)
    r = run("formats")
    assert r.exit_code == 0
    for name in ("fp8", "fp8-e5m2", "int8-tensor", "int8-row", "int8-block", "needs node", "stock ComfyUI"):
        assert says(r.stdout, name)


@pytest.mark.parametrize("cmd", ["convert", "plan", "inspect", "verify", "presets", "formats"])
def test_help_has_examples(cmd):
    r = run(cmd, "--help")
    assert r.exit_code == 0 and says(r.stdout, "Examples", f"quantkit {cmd}")


def test_shell_completion_script():
    # typer reads the shell off the process tree unless told not to; a detached run (no shell among the
    # parents) then prints "Shell  not supported." whatever was asked for
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    r = subprocess.run([sys.executable, "-m", "quantkit", "--show-completion", "bash"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and says(r.stdout, "QUANTKIT_COMPLETE=complete_bash", "complete -o default -F")


def test_device_errors(sample, tmp_path, monkeypatch):
    r = run("convert", sample, "-o", tmp_path / "o.st", "--device", "tpu")
    assert r.exit_code == 2 and says(r.output, "unknown device 'tpu'")
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # so it runs on CUDA machines too
    r = run("convert", sample, "-o", tmp_path / "o.st", "--device", "cuda:0")
    assert r.exit_code == 2 and says(r.output, "CUDA is not available")
    assert not (tmp_path / "o.st").exists()


def test_console_process_output_and_exit_codes(tmp_path):
    """The process ends with os._exit once a command is done: its output must still be complete,
    its files in place, and its exit code the command's."""
    sample = Path(__file__).resolve().parents[1] / "samples" / "flux-mini.safetensors"
    out = tmp_path / "o.safetensors"
    rep = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(sample), "-o", str(out), "--report", str(rep),
                        "--format", "int8-row"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert says(r.stdout, "SQNR int8-row") and json.loads(rep.read_text())["files"][0]["output"] == str(out)
    assert load_file(str(out))
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(sample), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and says(r.stderr, "already exists")
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(sample), "--format", "int4"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and says(r.stderr, "int4")


def test_counts_are_layers_and_tensors(sample, tmp_path):
    """A layer is a module with a .weight (34 in the sample); biases and norm scales are tensors only.
    The plan, the report and the written file agree."""
    import quantkit
    from quantkit.plan import Options, plan_file
    from safetensors import safe_open
    out = tmp_path / "o.safetensors"
    rep = quantkit.convert(sample, out, format="int8-block", fallback="keep", preset="none")
    with safe_open(str(sample), "pt") as f:
        names_in = list(f.keys())
    with safe_open(str(out), "pt") as f:
        names_out = list(f.keys())
    weights = [n for n in names_in if n.endswith(".weight")]
    assert len(weights) == 34 and len(names_in) == 80
    # int8-block: 32 layers quantized (weight, weight_scale, input_scale, comfy_quant), 2 of them
    # (128 x 640 does not divide by 128... but 640 = 5 x 128; the 64-wide final_layer) kept by --fallback keep
    want = {"layers": 34, "quantized": 32, "fallback": 0, "kept": 2, "tensors_in": 80,
            "tensors_out": len(names_out)}
    assert rep.counts() == want and len(names_out) == 32 * 4 + (80 - 32)
    assert plan_file(sample, Options("int8-block", fallback="keep", preset="none")).counts() == want
    assert [t.name for t in rep.layers] == weights and len(rep.tensors) == 80
    r = run("convert", sample, "-o", tmp_path / "p.safetensors", "--format", "int8-row", "--report",
            tmp_path / "r.json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r.json").read_text())["files"][0]
    assert doc["counts"]["layers"] == 34 and len(doc["tensors"]) == 80


def test_round_parts_sum_to_the_rounded_total():
    from quantkit.render import round_parts
    parts = {"a": 0.004, "b": 0.004, "c": 0.004, "d": 0.688}  # each rounds to 0.00, the total to 0.70
    r = round_parts(parts, 2)
    assert round(sum(r.values()), 6) == 0.70 and r["d"] == 0.69 and sorted(r.values())[:3] == [0.0, 0.0, 0.01]
    assert round_parts({"x": 1.26, "y": 2.26}, 1) == {"x": 1.3, "y": 2.2}  # 3.52 -> 3.5, not 1.3 + 2.3


def test_time_line_parts_add_up(sample, tmp_path):
    """The summary's time line and the report's timings: start-up (process start to convert()) and
    convert()'s disjoint parts sum to the total; the console process's start-up is real."""
    from quantkit.render import time_text
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    t0 = __import__("time").perf_counter()
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(sample), "-o", str(out), "--report",
                        str(rep), "-q"], capture_output=True, text=True)
    wall = __import__("time").perf_counter() - t0
    assert r.returncode == 0, r.stderr
    f = json.loads(rep.read_text())["files"][0]
    parts = f["stage_seconds"]
    assert list(parts)[:3] == ["plan", "prepare", "read+quantize"] and list(parts)[-1] == "other"
    assert all(v >= 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(f["seconds"], abs=1e-6)
    assert f["total_seconds"] == pytest.approx(f["startup_seconds"] + f["seconds"], abs=1e-6)
    assert 0 < f["startup_seconds"] and f["total_seconds"] < wall + 0.02  # /proc start time: 10 ms ticks
    assert "writer thread busy" in f["detail_seconds"] and "write" not in parts

    import quantkit
    from quantkit.report import ConvertReport
    lib = quantkit.convert(sample, tmp_path / "p.safetensors")
    assert lib.startup_seconds == 0 and sum(lib.time_parts().values()) == pytest.approx(lib.seconds, abs=1e-9)
    fake = ConvertReport("i", "o", "fp8", 128, seconds=0.287, startup_seconds=0.413,
                         stage_seconds={"plan": 0.004, "prepare": 0.004, "read+quantize": 0.276, "other": 0.003})
    line = time_text(fake)
    total, _, rest = line.partition(" s = ")
    assert total == "0.70" and sum(float(p.split()[-1]) for p in rest.split(" + ")) == pytest.approx(0.70)


@pytest.mark.parametrize("args,needles", [
    (["convert", "{sample}", "--format", "int9"], ["--format", "'int9'", "fp8, fp8-e5m2, int8-tensor, int8-row, int8-block"]),
    (["plan", "{sample}", "--fallback", "int8-block"], ["--fallback", "int8-row, fp8, fp8-e5m2, int8-tensor, mxfp8, nvfp4, keep"]),
    (["convert", "{sample}", "--preset", "flux3"], ["--preset", "'flux3'", "auto, none, chroma"]),
    (["convert", "{sample}", "--learned-rounding", "--learned-objective", "x"], ["calibration, subspace"]),
    (["convert", "{sample}", "--learned-objective", "subspace"], ["add --learned-rounding"]),
    (["convert", "{sample}", "--formt", "fp8"], ["--formt", "--format"]),
    (["convert", "{sample}", "--block-size", "abc"], ["--block-size", "int"]),
    (["convert"], ["missing argument"]),
    (["plan"], ["missing argument"]),
    (["convert", "{sample}", "-o"], ["-o", "requires an argument"]),
    (["frobnicate"], ["no such command", "frobnicate"]),
    (["verify", "{sample}", "--min-sqnr", "high"], ["--min-sqnr"]),
])
def test_usage_error_is_one_line(sample, tmp_path, args, needles):
    """Every usage error: exit 2, one line on stderr naming what was wrong (and the choices), no box."""
    args = [a.format(sample=sample) for a in args]
    for r in (run(*args, env={"COLUMNS": "60"}),):  # a narrow terminal must not wrap it either
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert lines[0].startswith("error: ") and not any(c in r.stderr for c in "╭│╰")
        flat = " ".join(r.stderr.split())
        assert all(n in flat for n in needles), flat
        assert r.stdout == ""
    assert [p.name for p in sample.parent.iterdir()] == [sample.name]  # nothing written beside the input


def test_usage_error_one_line_from_the_console_script(sample):
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(sample), "--format", "int9"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "40"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("error: quantkit convert: invalid value for --format: 'int9' "
                        "(choose from fp8, fp8-e5m2, int8-tensor, int8-row, int8-block, int8-convrot, mxfp8, nvfp4, "
                        "w4a8, w4a8-6bit, int4-convrot, awq4, auto)\n")


def _sentences(text: str) -> int:
    import re
    return len(re.findall(r"[.!?](?=\s|$)", text.replace("...", "")))


def test_help_texts_are_short_and_untagged():
    """Every option's help is one or two sentences without project history, and --help shows no
    type tags (<bool>, <list[Path]>): a metavar, or nothing for flags and arguments."""
    import typer
    group = typer.main.get_command(app)
    ctx = group.make_context("quantkit", ["--help"], resilient_parsing=True)
    seen = 0
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        for p in cmd.params:
            text = p.help or ""
            assert text and 1 <= _sentences(text) <= 2, (name, p.name, text)
            for history in ("DEVELOPMENT", "issue", "convert_to_quant", "all-MiniLM", "dB"):
                assert history not in text, (name, p.name, text)
            seen += 1
    assert seen > 30
    # typer before 0.29 prints each argument's type beside its metavar (INPUT... <path>): its own
    # column, no option of ours; the options' lines are checked with every typer
    from importlib.metadata import version
    whole = tuple(int(x) for x in version("typer").split(".")[:2]) >= (0, 29)
    for args in (["--help"], *([c, "--help"] for c in ("convert", "plan", "inspect", "verify", "presets", "formats"))):
        r = run(*args, env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        shown = r.stdout if whole else "\n".join(ln for ln in r.stdout.splitlines() if "--" in ln)
        for tag in ("<bool>", "<str>", "<path>", "<int>", "<float>", "<list", "{inputs}", "{input}", "{file}"):
            assert tag not in shown, (args, tag)
    r = run("convert", "--help", env={"COLUMNS": "200"})
    assert "INPUT..." in r.stdout and "--output" in r.stdout and "FILE" in r.stdout


def test_learned_rounding_help_agrees_with_the_code(sample, tmp_path):
    """--learned-rounding needs --calibration except with the data-free subspace objective; bias
    correction always needs it (the help says so; these are the refusals)."""
    import typer
    group = typer.main.get_command(app)
    cmd = group.get_command(group.make_context("quantkit", ["--help"], resilient_parsing=True), "convert")
    helps = {p.name: p.help for p in cmd.params}
    assert "Needs --calibration, except with --learned-objective subspace" in helps["learned_rounding"]
    assert "Needs --calibration" in helps["bias_correction"] and "no --calibration" in helps["learned_objective"]
    r = run("convert", sample, "-o", tmp_path / "a.st", "--learned-rounding")
    assert r.exit_code == 2 and says(r.stderr, "needs --calibration")
    r = run("convert", sample, "-o", tmp_path / "b.st", "--bias-correction")
    assert r.exit_code == 2 and says(r.stderr, "needs --calibration")


NO_TORCH_CHILD = r"""
import os, sys
sys.argv = ["quantkit"] + sys.argv[1:]
real_exit = os._exit
def at_exit(code):  # the console script ends with os._exit
    sys.stderr.write("HEAVY " + ",".join(m for m in ("torch", "safetensors", "numpy") if m in sys.modules) + "\n")
    sys.stderr.flush()
    real_exit(code)
os._exit = at_exit
from quantkit.cli import main
main()
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["formats"], ["presets"], ["convert", "--help"],
                                  ["plan", "--help"], ["verify", "--help"], ["convert", "x.st", "--format", "int9"]])
def test_light_commands_do_not_import_torch(args):
    """--version, --help, formats, presets (and usage errors) start without importing torch."""
    r = subprocess.run([sys.executable, "-c", NO_TORCH_CHILD, *args], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "100"})
    assert r.returncode == (2 if "int9" in args else 0), r.stderr
    heavy = [ln for ln in r.stderr.splitlines() if ln.startswith("HEAVY")]
    assert heavy == ["HEAVY "], r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys, quantkit; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout == "False\n", r.stderr


def test_cli_defaults_are_the_library_defaults():
    """The command line's defaults come from the format registry, as convert()'s do."""
    import inspect as pyinspect
    import quantkit
    from quantkit import formats
    sig = pyinspect.signature(quantkit.convert)
    assert sig.parameters["fallback"].default == formats.DEFAULT_FALLBACK
    assert sig.parameters["format"].default == formats.DEFAULT_FORMAT

def test_package_names_are_lazy_and_convert_is_the_function(sample, tmp_path):
    import importlib
    import quantkit
    mod = importlib.import_module("quantkit.convert")  # the submodule of the same name
    assert callable(quantkit.convert) and quantkit.convert is mod.convert
    assert quantkit.FORMATS["fp8"].comfy_format == "float8_e4m3fn" and quantkit.LayerReport is quantkit.TensorReport
    with pytest.raises(AttributeError):
        quantkit.no_such_name
    assert quantkit.convert(sample, tmp_path / "o.safetensors").count("quantized") == 20
