"""The command line: options are declared here and handed to the library; nothing else.

Exit codes: 0 success, 1 bad input or failed conversion, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .convert import convert as convert_file
from .errors import EXIT_INTERRUPTED, QuantkitError
from .formats import DEFAULT_BLOCK_SIZE, DEFAULT_FORMAT, FALLBACK_CHOICES, FORMATS
from .report import ConvertReport

app = typer.Typer(
    name="quantkit",
    help="Quantize diffusion-model checkpoints to FP8/INT8 .safetensors files that ComfyUI loads.\n\n"
         "Exit codes: 0 success, 1 bad input or failed conversion, 2 usage error, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=True,
)
err = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"quantkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


def _fail(e: QuantkitError) -> typer.Exit:
    if os.environ.get("QUANTKIT_DEBUG") == "1":
        raise e
    err.print(Text(f"error: {e.one_line()}"), soft_wrap=True, highlight=False)
    return typer.Exit(e.exit_code)


class _Throughput(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.speed
        return Text(f"{speed / 1e9:.2f} GB/s" if speed else "-- GB/s", style="cyan")


def _gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _db(x: float) -> str:
    return "exact" if x == float("inf") else f"{x:.1f} dB"


def print_summary(report: ConvertReport, console: Console) -> None:
    t = Table(title=f"{Path(report.output).name}", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("layers", f"{report.count('quantized')} quantized, {report.count('fallback')} fell back, "
                        f"{report.count('kept')} kept")
    ratio = report.bytes_out / report.bytes_in if report.bytes_in else 0
    t.add_row("size", f"{_gb(report.bytes_in)} -> {_gb(report.bytes_out)} ({ratio:.0%})")
    t.add_row("time", f"{report.seconds:.1f} s ({report.bytes_in / max(report.seconds, 1e-9) / 1e9:.2f} GB/s in)")
    for fmt, (lo, med, n) in report.sqnr_by_format().items():
        stock = "stock ComfyUI" if FORMATS[fmt].stock_comfy else "needs the quantkit node"
        t.add_row(f"SQNR {fmt}", f"min {_db(lo)}, median {_db(med)} over {n} layers ({stock})")
    learned = [lay.reason for lay in report.layers if "objective" in lay.reason]
    if learned:
        kept = sum("rtn (learned not better)" in r for r in learned)
        t.add_row("learned", f"{len(learned) - kept} improved, {kept} kept RTN (calibration objective)")
    corrected = sum(lay.reason.startswith("bias corrected") for lay in report.layers)
    if corrected:
        t.add_row("bias", f"{corrected} biases corrected")
    console.print(t)
    fallen: dict[str, list[str]] = {}
    for lay in report.layers:
        if lay.action == "fallback" or (lay.action == "kept" and "--fallback keep" in lay.reason):
            fallen.setdefault(lay.format or "keep (unquantized)", []).append(f"{lay.name} {list(lay.shape)}")
    for fmt, names in fallen.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        console.print(Text(f"fallback -> {fmt}: {len(names)} layers the requested format cannot take: {shown}"),
                      highlight=False)


@app.command(epilog="Examples:\n\n  quantkit convert flux1-dev.safetensors\n\n"
                    "  quantkit convert model.safetensors --format int8-block -o model-int8.safetensors\n\n"
                    "  quantkit convert t5xxl.safetensors --format int8-row --exclude 'shared'")
def convert(
    input: Annotated[Path, typer.Argument(help="Input .safetensors checkpoint (bf16/fp16/fp32).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file. Default: <input stem>-<format>.safetensors beside the input.")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help=f"Target format: {', '.join(FORMATS)}. See 'quantkit formats'.")] = DEFAULT_FORMAT,
    block_size: Annotated[int, typer.Option("--block-size", help="Tile size b for int8-block (b x b tiles).")] = DEFAULT_BLOCK_SIZE,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Regex (searched in the layer name) to quantize even if kept by default. Repeatable.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Regex (searched in the layer name) to keep unquantized. Repeatable; wins over --include.")] = None,
    fallback: Annotated[str, typer.Option("--fallback", help=f"Format for layers the chosen format cannot take (int8-block with indivisible dims): {', '.join(FALLBACK_CHOICES)}.")] = "int8-row",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    learned_rounding: Annotated[bool, typer.Option("--learned-rounding", help="Choose each weight's rounding to lower its expected output error (GPTQ-style error feedback on the format's grid; int8 also searches the scale). Needs --calibration: the data-free proxy we measured (W^T W) made held-out error worse than round-to-nearest, so it is not offered. Keeps round-to-nearest for any layer where it is not better. GPU when present.")] = False,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Stats file from quantkit.calibration.capture(model): sets static fp8 input_scale (max |x| / 448) and the learned-rounding objective.")] = None,
    bias_correction: Annotated[bool, typer.Option("--bias-correction", help="Rewrite each quantized layer's bias as b + (W - Wq) mean(x). Needs --calibration.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary; errors still go to stderr.")] = False,
) -> None:
    """Convert a checkpoint: quantize its linear weights, copy everything else bit-exactly."""
    if format not in FORMATS:
        raise typer.BadParameter(f"'{format}' is not one of: {', '.join(FORMATS)}", param_hint="--format")
    if fallback not in FALLBACK_CHOICES:
        raise typer.BadParameter(f"'{fallback}' is not one of: {', '.join(FALLBACK_CHOICES)}", param_hint="--fallback")
    show_progress = not quiet and err.is_terminal
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tensors]} tensors"),
                      _Throughput(), TimeRemainingColumn(), console=err, disable=not show_progress,
                      transient=True) as bar:
            task = bar.add_task(f"{input.name} -> {format}", total=None, tensors=0)
            count = 0

            def on_progress(done: int, total: int, name: str) -> None:
                nonlocal count
                count += 1
                bar.update(task, completed=done, total=total, tensors=count)

            report = convert_file(input, output, format=format, block_size=block_size, include=include or (),
                                  exclude=exclude or (), fallback=fallback, overwrite=overwrite,
                                  progress=on_progress, learned_rounding=learned_rounding,
                                  calibration=calibration, bias_correction=bias_correction)
    except QuantkitError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        err.print("interrupted; no output written")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if not quiet:
        print_summary(report, out)


@app.command()
def formats() -> None:
    """List the formats quantkit writes and whether stock ComfyUI loads them."""
    t = Table("--format", ".comfy_quant format", "weight", "scale", "loads in")
    for s in FORMATS.values():
        scale = {"tensor": "fp32 []", "row": "fp32 [N,1]", "block": "fp32 [N/b,K/b]"}[s.granularity]
        t.add_row(s.name, s.comfy_format, s.weight_dtype_name, scale,
                  "stock ComfyUI" if s.stock_comfy else "needs node")
    out.print(t)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":  # pragma: no cover
    main()
