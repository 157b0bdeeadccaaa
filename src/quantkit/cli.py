"""The command line: options are declared here and handed to the library; nothing else.

Exit codes: 0 success, 1 bad input or failed conversion, 2 usage error, 130 / 143 / 129 interrupted
(SIGINT / SIGTERM / SIGHUP).

Start-up: this module imports neither torch nor rich; each command imports what it uses, so
``--version``, ``--help``, ``formats`` and ``presets`` start without torch (``tests/test_cli.py``
checks it), and ``convert`` imports the converter once its options are checked.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

from typing import TYPE_CHECKING

import typer
from typer.core import TyperGroup

from . import __version__
from .formats import DEFAULT_BLOCK_SIZE, DEFAULT_FALLBACK, DEFAULT_FORMAT, FALLBACK_CHOICES, FORMATS, LayerOpts
from .errors import EXIT_INTERRUPTED, QuantkitError

if TYPE_CHECKING:
    from .plan import Options
    from .report import ConvertReport

# Typer >= 0.26 vendors Click; its exception classes are reached from the public typer.BadParameter.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def usage_error_line(e: Exception) -> str | None:
    """A Click usage error (unknown option, bad or missing value, missing argument) as one line,
    or None for the no-arguments case, whose help text has been printed already."""
    if type(e).__name__ == "NoArgsIsHelpError":
        return None
    msg = " ".join(e.format_message().split())  # type: ignore[attr-defined]
    if len(msg) > 1 and msg[1].islower():
        msg = msg[0].lower() + msg[1:]
    ctx = getattr(e, "ctx", None)
    return f"error: {ctx.command_path}: {msg}" if ctx is not None else f"error: {msg}"


def _untag(param) -> None:
    """Typer 0.29's --help prints a type tag beside each parameter (``<bool>``, ``<list[Path]>``):
    show the parameter's metavar instead (FILE, NAME, REGEX), and nothing beside a flag or an
    argument (whose name column already is its metavar)."""
    if getattr(param, "_quantkit_untagged", False):
        return
    argument = param.param_type_name == "argument"
    shown = "" if argument or getattr(param, "is_flag", False) else (param.metavar or param.name.upper())
    param.display_type_rich = lambda ctx=None: shown
    if argument and hasattr(param, "_usage_display_name"):  # "{inputs}..." in the usage line
        name = param.metavar or param.name.upper()
        param._usage_display_name = lambda: name if param.required else f"[{name}]"
    _plain_flag(param)
    param._quantkit_untagged = True


def _plain_flag(param) -> None:
    """Typer coerces a flag left at None (its completion options) through a pydantic adapter, and
    importing pydantic costs more than the rest of ``quantkit formats``; a bool or None needs no
    coercion. Typer internals: where they differ, typer's own coercion is left in place."""
    try:
        from typer._coercion import PassThroughRuntimeParam
        desc = param.type_descriptor
        if desc.annotation is bool and getattr(param, "_runtime_param", 0) is None:
            param._runtime_param = PassThroughRuntimeParam(annotation=bool, parameter_info=desc.parameter_info)
    except (ImportError, AttributeError, TypeError):
        pass


class QuantkitGroup(TyperGroup):
    """Typer's group, with every usage error printed as one line on stderr (exit code 2) instead
    of a usage banner and a box, "quantkit" as the program name under ``python -m``, and no type
    tags in --help."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            _untag(p)
        return params

    def get_command(self, ctx, cmd_name):
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            for p in cmd.get_params(ctx):
                _untag(p)
        return cmd

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        prog_name = prog_name or "quantkit"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as e:
            line = usage_error_line(e)
            if line is not None:
                sys.stdout.flush()
                sys.stderr.write(line + "\n")
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.stderr.write("aborted\n")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # a typer.Exit's code, or 0 when a command returns


app = typer.Typer(
    name="quantkit",
    cls=QuantkitGroup,
    help="Quantize diffusion-model checkpoints to FP8/INT8 .safetensors files that ComfyUI loads.\n\n"
         "Exit codes: 0 success, 1 bad input, a failed conversion, a contract violation or a layer under "
         "--min-sqnr, 2 usage error, 130 / 143 / 129 interrupted (SIGINT / SIGTERM / SIGHUP).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=True,
)


class _Console:
    """A rich Console made on first use (rich takes a while to import, and --version needs none)."""

    def __init__(self, **kwargs) -> None:
        self._kwargs, self._console = kwargs, None

    def get(self):
        if self._console is None:
            from rich.console import Console
            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.get(), name)


err = _Console(stderr=True)
out = _Console()


def _text(s: str):
    """Plain text for rich (no markup, no highlighting of numbers and paths)."""
    from rich.text import Text
    return Text(s)


def convert_file(*args, **kwargs) -> ConvertReport:
    """:func:`quantkit.convert.convert`, imported on first use (torch comes with it)."""
    from .convert import convert
    return convert(*args, **kwargs)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"quantkit {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


def _fail(e: QuantkitError) -> typer.Exit:
    _fail_one(e)
    return typer.Exit(e.exit_code)


class Rates:
    """Read and write throughput over the last ``window`` seconds, from cumulative byte counts."""

    def __init__(self, window: float = 2.0, clock=time.monotonic) -> None:
        self.window, self.clock = window, clock
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def add(self, read: int, written: int) -> None:
        now = self.clock()
        self.samples.append((now, read, written))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()  # keep one sample at least `window` old

    def text(self) -> str:
        if len(self.samples) < 2 or self.samples[-1][0] <= self.samples[0][0]:
            return "read -- / write -- GB/s"
        (t0, r0, w0), (t1, r1, w1) = self.samples[0], self.samples[-1]
        return f"read {(r1 - r0) / (t1 - t0) / 1e9:.2f} / write {(w1 - w0) / (t1 - t0) / 1e9:.2f} GB/s"


LEARNED_OBJECTIVES = ("calibration", "subspace")

# Options shared by `convert` and `plan`.
FormatOpt = Annotated[str, typer.Option("--format", "-f", metavar="NAME", help=f"Target format: {', '.join(tuple(FORMATS))} ('quantkit formats' describes them), or auto: a measured format per layer to the budget of --bits or --max-error.")]
BitsOpt = Annotated[Optional[float], typer.Option("--bits", metavar="B", help="With --format auto: the average bits per quantized weight (scales included) the choice keeps within, at the least total error.")]
MaxErrorOpt = Annotated[Optional[float], typer.Option("--max-error", metavar="X", help="With --format auto: each layer takes the smallest format whose error is at most X times its int8-row error (output error with --calibration, else weight 1/SQNR).")]
AutoCandidatesOpt = Annotated[Optional[str], typer.Option("--auto-candidates", metavar="LIST", help="With --format auto: the formats to choose from, comma-separated (default: int4-convrot,awq4,w4a8,nvfp4,w4a8-6bit,mxfp8,int8-convrot,int8-row).")]
BlockOpt = Annotated[int, typer.Option("--block-size", metavar="B", help="Tile size of int8-block: one scale per B x B tile.")]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", metavar="REGEX", help="Quantize the layers whose name matches, even where the defaults or the preset keep them. Repeatable.")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", metavar="REGEX", help="Keep the layers whose name matches unquantized. Repeatable; wins over every other rule.")]
ConvrotOpt = Annotated[int, typer.Option("--convrot-group-size", metavar="G", help="ConvRot group of int8-convrot: a power of 4 (16, 64, 256, 1024). A layer whose K it does not divide takes the largest power of 4 that does (written in its marker, said in the plan).")]
FallbackOpt = Annotated[str, typer.Option("--fallback", metavar="NAME", help=f"Format for a layer the chosen format cannot take (int8-block, a side B does not divide): {', '.join(FALLBACK_CHOICES)}.")]
PresetOpt = Annotated[str, typer.Option("--preset", metavar="NAME", help="Model family whose layer rules apply: auto (detected from tensor names), none (generic rules only), or a family from 'quantkit presets'.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", metavar="FILE", help="Per-layer settings (.toml or .json): pattern -> format, block_size, skip, options. The most specific pattern wins.")]
FpmmOpt = Annotated[bool, typer.Option("--full-precision-mm", help="Mark every layer full_precision_matrix_mult: ComfyUI dequantizes it and runs a normal matmul.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")]
KeepQuantizedOpt = Annotated[bool, typer.Option("--keep-quantized", help="Copy an input's already quantized layers through as they are, instead of dequantizing them as ComfyUI does and quantizing them to --format.")]


def _options(format: str, block_size: int, include, exclude, fallback: str, preset: str, config, fpmm: bool,
             convrot_group_size: int = LayerOpts.convrot_group_size, auto: dict | None = None) -> Options:
    from .families import PRESET_CHOICES
    if format not in (*FORMATS, "auto"):
        raise typer.BadParameter(f"'{format}' (choose from {', '.join((*FORMATS, 'auto'))})", param_hint="--format")
    if fallback not in FALLBACK_CHOICES:
        raise typer.BadParameter(f"'{fallback}' (choose from {', '.join(FALLBACK_CHOICES)})", param_hint="--fallback")
    if preset not in PRESET_CHOICES:
        raise typer.BadParameter(f"'{preset}' (choose from {', '.join(PRESET_CHOICES)})", param_hint="--preset")
    from .convert import make_options
    try:
        fo = {} if convrot_group_size == LayerOpts.convrot_group_size else {"convrot_group_size": convrot_group_size}
        return make_options(format, block_size, include or (), exclude or (), fallback, preset, config, fpmm, fo,
                            **_auto_kwargs(auto))
    except QuantkitError as e:
        raise _fail(e) from None


def _auto_kwargs(auto: dict | None) -> dict:
    """make_options' keywords of --format auto from the command line's values."""
    if not auto:
        return {}
    cands = auto.get("candidates")
    return {"bits": auto.get("bits"), "max_error": auto.get("max_error"), "calibration": auto.get("calibration"),
            "auto_candidates": None if cands is None else tuple(c.strip() for c in cands.split(",") if c.strip())}


def _plan_json(plan, src: Path, dst: Path | None) -> dict:
    return {"input": str(src), "output": None if dst is None else str(dst), **plan.to_dict()}


@app.command(epilog="Examples:\n\n  quantkit convert flux1-dev.safetensors\n\n"
                    "  quantkit convert model.safetensors --format int8-block -o model-int8.safetensors\n\n"
                    "  quantkit convert t5xxl.safetensors --format int8-row --exclude 'shared'\n\n"
                    "  quantkit convert a.safetensors b.safetensors -O out/ --report report.json\n\n"
                    "  quantkit convert wan.safetensors --preset wan --config layers.toml --dry-run")
def convert(
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...", help="Checkpoints to convert (.safetensors: bf16/fp16/fp32, or already quantized: their quantized layers are re-quantized, or copied with --keep-quantized); each is converted on its own.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="FILE", help="Output file, for one input. Default: <stem>-<format>.safetensors beside the input.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("-O", "--output-dir", metavar="DIR", help="Write each output as <stem>-<format>.safetensors into DIR (created if missing).")] = None,
    format: FormatOpt = DEFAULT_FORMAT,
    block_size: BlockOpt = DEFAULT_BLOCK_SIZE,
    convrot_group_size: ConvrotOpt = LayerOpts.convrot_group_size,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fallback: FallbackOpt = DEFAULT_FALLBACK,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary; errors still go to stderr.")] = False,
    preset: PresetOpt = "auto",
    config: ConfigOpt = None,
    fpmm: FpmmOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-layer plan and write nothing (same as 'quantkit plan').")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plans as a JSON array.")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", metavar="FILE", help="Write a JSON report: versions, sha256 of input and output, layer counts, and per tensor its format, shapes, SQNR and time.")] = None,
    device: Annotated[str, typer.Option("--device", metavar="NAME", help="Where to quantize: auto (a GPU if present), cpu, cuda or cuda:N. Round-to-nearest output is the same on every device.")] = "auto",
    learned_rounding: Annotated[bool, typer.Option("--learned-rounding", help="Round each weight to lower its layer's output error (GPTQ-style), keeping round-to-nearest where that is not better. Needs --calibration, except with --learned-objective subspace.")] = False,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", metavar="FILE", help="Input statistics saved by quantkit.calibration.capture(): they set a static input_scale (fp8: max |x| / 448; nvfp4: max |x| / (448 * 6)) and the objective of --learned-rounding and --bias-correction.")] = None,
    bias_correction: Annotated[bool, typer.Option("--bias-correction", help="Rewrite each quantized layer's bias as b + (W - Wq) mean(x). Needs --calibration.")] = False,
    learned_objective: Annotated[str, typer.Option("--learned-objective", metavar="NAME", help="What --learned-rounding lowers: calibration (the output error on the --calibration statistics) or subspace (data-free, so no --calibration; it was neutral on real inputs).")] = "calibration",
    devices: Annotated[Optional[str], typer.Option("--devices", metavar="LIST", help="Run --learned-rounding in one worker process per device: cuda:0,cuda:1,... or all. The output bytes are those of one process.")] = None,
    keep_quantized: KeepQuantizedOpt = False,
    bits: BitsOpt = None,
    max_error: MaxErrorOpt = None,
    auto_candidates: AutoCandidatesOpt = None,
) -> None:
    """Convert checkpoints: quantize their linear weights, copy everything else bit-exactly.

    Exit codes: 0 all converted, 1 any input failed (the others are still converted), 2 usage
    error, 130 / 143 / 129 interrupted (SIGINT / SIGTERM / SIGHUP).
    """
    if output is not None and (len(inputs) > 1 or output_dir is not None):
        raise typer.BadParameter("-o names one output file; with several inputs or -O use -O DIR only",
                                 param_hint="-o")
    if json_out and not dry_run:
        raise typer.BadParameter("--json prints a plan; use it with --dry-run (or 'quantkit plan --json')",
                                 param_hint="--json")
    if report is not None and dry_run:
        raise typer.BadParameter("--report records a conversion, and --dry-run converts nothing",
                                 param_hint="--report")
    if learned_objective not in LEARNED_OBJECTIVES:
        raise typer.BadParameter(f"'{learned_objective}' (choose from {', '.join(LEARNED_OBJECTIVES)})",
                                 param_hint="--learned-objective")
    if learned_objective != "calibration" and not learned_rounding:
        raise typer.BadParameter("it sets the objective of --learned-rounding; add --learned-rounding",
                                 param_hint="--learned-objective")
    auto = dict(bits=bits, max_error=max_error, candidates=auto_candidates, calibration=calibration)
    opts = _options(format, block_size, include, exclude, fallback, preset, config, fpmm, convrot_group_size,
                    auto if format == "auto" or bits is not None or max_error is not None
                    or auto_candidates is not None else None)
    from . import reportfile
    from .plan import default_output_name, plan_file
    from .render import print_plan
    targets: list[tuple[Path, Optional[Path]]] = []
    for src in inputs:
        dst = output if output is not None else (
            output_dir / default_output_name(src.name, format) if output_dir is not None else None)
        targets.append((src, dst))
    seen: dict[Path, Path] = {}
    for src, dst in targets:
        key = (dst if dst is not None else src.with_name(default_output_name(src.name, format))).absolute()
        if key in seen:
            raise typer.BadParameter(f"{seen[key]} and {src} would both be written to {key}",
                                     param_hint="INPUTS")
        seen[key] = src
    if output_dir is not None and not dry_run:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _fail(QuantkitError(f"cannot create the output directory ({e.strerror})", file=output_dir,
                                      fix="choose a writable directory with -O")) from None

    failed = worst = 0
    if dry_run:
        plans = []
        for src, dst in targets:
            try:
                plan = plan_file(src, replace(opts, keep_quantized=keep_quantized))
            except QuantkitError as e:
                failed, worst = failed + 1, max(worst, e.exit_code)
                _fail_one(e)
                continue
            if json_out:
                plans.append(_plan_json(plan, src, dst))
            else:
                print_plan(plan, src.name, None if dst is None else str(dst), out)
        if json_out:
            out.print_json(data=plans)
        raise typer.Exit(worst)

    entries: list[dict] = []
    show_progress = not quiet and err.is_terminal
    for i, (src, dst) in enumerate(targets):
        try:
            rep = _convert_one(src, dst, opts, overwrite, show_progress, device,
                               dict(learned_rounding=learned_rounding, calibration=calibration,
                                    bias_correction=bias_correction, learned_objective=learned_objective,
                                    devices=devices, keep_quantized=keep_quantized), first=i == 0)
        except QuantkitError as e:
            failed, worst = failed + 1, max(worst, e.exit_code)
            _fail_one(e)
            entries.append(reportfile.failed_entry(src, dst, e))
            continue
        except KeyboardInterrupt:
            sys.stderr.write("interrupted; no output written\n")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if not quiet:
            _print_result(rep, out, err)
        if report is not None:
            entries.append(reportfile.convert_entry(rep))
    if report is not None:
        try:
            reportfile.write_report(report, list(sys.argv), entries)
        except QuantkitError as e:
            raise _fail(e) from None
    if failed and len(targets) > 1:
        sys.stderr.write(f"{failed} of {len(targets)} inputs failed\n")
    raise typer.Exit(worst)


def _fail_one(e: QuantkitError) -> None:
    if os.environ.get("QUANTKIT_DEBUG") == "1":
        raise e
    sys.stdout.flush()
    sys.stderr.write(f"error: {e.one_line()}\n")


def since_process_start() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc/self/stat, 10 ms
    resolution), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, clock ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _convert_one(src: Path, dst: Optional[Path], opts: Options, overwrite: bool, show_progress: bool,
                 device: str, refine: dict, first: bool = False) -> ConvertReport:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    rates = Rates()
    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), TextColumn("{task.fields[tensors]} tensors"),
                  TextColumn("{task.fields[rates]}", style="cyan"), TimeRemainingColumn(), console=err.get(),
                  disable=not show_progress, transient=True) as bar:
        title = f"{src.name} -> {opts.format}"
        task = bar.add_task(title, total=None, tensors=0, rates=rates.text())
        count = 0

        def on_progress(done: int, total: int, name: str, written: int) -> None:
            nonlocal count
            count += 1
            rates.add(done, written)
            bar.update(task, description=title, completed=done, total=total, tensors=count, rates=rates.text())

        def on_measure(done: int, total: int, name: str) -> None:  # --format auto, before any writing
            bar.update(task, description=f"{src.name}: measuring auto candidates", completed=done, total=total,
                       tensors=done)

        startup = since_process_start() if first else None  # imports and option checks, before convert()
        with _auto_measuring(opts, on_measure):
            rep = convert_file(src, dst, format=opts.format, block_size=opts.block_size, include=opts.include,
                               exclude=opts.exclude, fallback=opts.fallback, overwrite=overwrite,
                               progress=on_progress, preset=opts.preset, config=opts.config,
                               full_precision_matrix_mult=bool(dict(opts.comfy_options).get("full_precision_matrix_mult")),
                               device=device, format_options=dict(opts.format_options), **_auto_of(opts),
                               **refine)
        rep.startup_seconds = startup or 0.0
        return rep


def _auto_measuring(opts: Options, callback):
    """``autoplan.measuring(callback)`` for a --format auto run, else nothing (autoplan not imported)."""
    if opts.auto is None:
        return contextlib.nullcontext()
    from .autoplan import measuring
    return measuring(callback)


def _auto_of(opts: Options) -> dict:
    a = opts.auto
    return {} if a is None else {"bits": a.bits, "max_error": a.max_error, "auto_candidates": a.candidates}


@app.command(epilog="Examples:\n\n  quantkit plan flux1-dev.safetensors\n\n"
                    "  quantkit plan wan2.2.safetensors --format int8-row --preset wan --json\n\n"
                    "  quantkit plan model.safetensors --config layers.toml")
def plan(
    input: Annotated[Path, typer.Argument(metavar="INPUT", help="The .safetensors checkpoint (only its header is read).", show_default=False)],
    format: FormatOpt = DEFAULT_FORMAT,
    block_size: BlockOpt = DEFAULT_BLOCK_SIZE,
    convrot_group_size: ConvrotOpt = LayerOpts.convrot_group_size,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fallback: FallbackOpt = DEFAULT_FALLBACK,
    preset: PresetOpt = "auto",
    config: ConfigOpt = None,
    fpmm: FpmmOpt = False,
    json_out: JsonOpt = False,
    keep_quantized: KeepQuantizedOpt = False,
    bits: BitsOpt = None,
    max_error: MaxErrorOpt = None,
    auto_candidates: AutoCandidatesOpt = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", metavar="FILE", help="With --format auto: measure each candidate's output error on these input statistics (quantkit.calibration) instead of its weight SQNR.")] = None,
) -> None:
    """Show what 'convert' would do with each layer, and why; write nothing.

    Prints each layer's shape, dtype, format and reason, then the family, the counts, the exact
    output size and whether stock ComfyUI loads it. Exit codes: 0 ok, 1 bad input, 2 usage error.
    """
    if calibration is not None and format != "auto":
        raise typer.BadParameter("plan measures calibration errors for --format auto only; add --format auto or "
                                 "drop --calibration", param_hint="--calibration")
    auto = dict(bits=bits, max_error=max_error, candidates=auto_candidates, calibration=calibration)
    opts = _options(format, block_size, include, exclude, fallback, preset, config, fpmm, convrot_group_size,
                    auto if format == "auto" or bits is not None or max_error is not None
                    or auto_candidates is not None else None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .plan import plan_file
    from .render import print_plan
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), TextColumn("{task.fields[layer]}"),
                      TimeRemainingColumn(), console=err.get(), disable=not (err.is_terminal and opts.auto is not None),
                      transient=True) as bar:
            task = bar.add_task(f"{input.name}: measuring auto candidates", total=None, layer="")

            def on_measure(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, total=total, layer=f"{done}/{total} layers")

            with _auto_measuring(opts, on_measure):
                p = plan_file(input, replace(opts, keep_quantized=keep_quantized))
    except QuantkitError as e:
        raise _fail(e) from None
    if json_out:
        out.print_json(data=_plan_json(p, input, None))
    else:
        print_plan(p, input.name, None, out)


@app.command(epilog="Examples:\n\n  quantkit upgrade flux1-dev-fp8-scaled.safetensors -o flux1-dev-fp8.safetensors")
def upgrade(
    input: Annotated[Path, typer.Argument(metavar="OLD", help="A legacy scaled fp8 .safetensors file (scaled_fp8 marker, scale_weight / scale_input tensors).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="NEW", help="The file to write.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary; errors still go to stderr.")] = False,
) -> None:
    """Rewrite a legacy scaled fp8 file with .comfy_quant markers, losslessly, as ComfyUI converts it at load.

    Every weight is copied byte for byte; scale_weight / scale_input become weight_scale / input_scale
    (fp32; an input scale of 1.0 is dropped, as ComfyUI does), each scaled layer gets its marker and the
    header its _quantization_metadata; the scaled_fp8 marker tensor is dropped. Exit codes: 0 written,
    1 bad input (not a legacy scaled fp8 file), 2 usage error, 130 / 143 / 129 interrupted.
    """
    from .convert import upgrade as upgrade_file
    try:
        rep = upgrade_file(input, output, overwrite=overwrite)
    except QuantkitError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; no output written\n")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if not quiet:
        _print_result(rep, out, err)


@app.command(epilog="Examples:\n\n  quantkit inspect flux1-dev-fp8.safetensors\n\n"
                    "  quantkit inspect downloaded-int8.safetensors --json")
def inspect(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Any .safetensors file, from quantkit or another tool.", show_default=False)],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show what a .safetensors file holds, whether ComfyUI loads it, and every contract violation.

    Reads the header and the small marker tensors only. Exit codes: 0 no violation, 1 violations
    or a bad file, 2 usage error.
    """
    from .inspection import inspect_file
    from .render import print_inspection
    try:
        ins = inspect_file(file)
    except QuantkitError as e:
        raise _fail(e) from None
    if json_out:
        out.print_json(data=ins.to_dict())
    else:
        print_inspection(ins, out)
    raise typer.Exit(1 if ins.violations else 0)


@app.command(epilog="Examples:\n\n  quantkit verify model-fp8.safetensors\n\n"
                    "  quantkit verify model-fp8.safetensors --against model.safetensors --min-sqnr 25\n\n"
                    "  quantkit verify out.safetensors --against in.safetensors --report verify.json")
def verify(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A quantized .safetensors file, from quantkit or another tool.", show_default=False)],
    against: Annotated[Optional[Path], typer.Option("--against", metavar="FILE", help="The original checkpoint: measure each layer's SQNR against it.")] = None,
    min_sqnr: Annotated[Optional[float], typer.Option("--min-sqnr", metavar="DB", help="Fail if a measured layer's SQNR is below DB. Needs --against.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", metavar="FILE", help="Write a JSON report: versions, sha256 of both files, violations, per-layer SQNR and time.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; the exit code tells.")] = False,
) -> None:
    """Check a file against ComfyUI's on-disk contract, and its quality against the original.

    Exit codes: 0 no violation, 1 any violation or layer under --min-sqnr (or a bad file), 2
    usage error, 130 / 143 / 129 interrupted.
    """
    from . import reportfile
    from .render import print_verify
    from .verify import verify as verify_file
    try:
        rep = verify_file(file, against, min_sqnr)
        if report is not None:
            entry = {"status": "ok" if rep.ok else "failed", **rep.to_dict(),
                     "sha256": reportfile.sha256_file(file),
                     "against_sha256": None if against is None else reportfile.sha256_file(against)}
            reportfile.write_report(report, list(sys.argv), [entry])
    except QuantkitError as e:
        raise _fail(e) from None
    if not quiet:
        print_verify(rep, out)
    raise typer.Exit(0 if rep.ok else 1)


@app.command(epilog="Examples:\n\n  quantkit clean models/\n\n  quantkit clean models/ --remove")
def clean(
    directory: Annotated[Path, typer.Argument(help="A directory outputs are written to.", show_default=False)],
    remove: Annotated[bool, typer.Option("--remove", "--yes", help="Delete the stale ones (never a file a running conversion holds).")] = False,
) -> None:
    """List the temporary files that killed conversions left in DIR, with their sizes.

    A conversion writes .<output>.quantkit-<pid>-<random>.partial beside its output and holds a
    lock on it; a run killed by SIGKILL or out of memory cannot remove it. Files whose writer is
    gone are stale; --remove deletes them. The next conversion to the same output removes its own
    stale ones by itself. Exit codes: 0 listed or removed, 1 DIR is not a readable directory.
    """
    from . import tempfiles
    try:
        found = tempfiles.scan(directory, remove_stale=remove)
    except OSError as e:
        raise _fail(QuantkitError(f"cannot list the directory ({e.strerror or e})", file=directory,
                                  fix="give a readable directory")) from None
    stale = [f for f in found if not f.in_use]
    busy = [f for f in found if f.in_use]
    for f in found:
        state = "in use" if f.in_use else ("removed" if remove else "stale")
        out.print(_text(f"{state:8} {f.bytes / 1e9:8.2f} GB  pid {f.pid:<8} {f.path.name}"), soft_wrap=True,
                  highlight=False)
    gb = sum(f.bytes for f in stale) / 1e9
    if not found:
        line = f"no quantkit temporary files in {directory}"
    elif remove:
        line = f"removed {len(stale)} stale temporary files ({gb:.2f} GB)"
    else:
        line = f"{len(stale)} stale temporary files ({gb:.2f} GB)" + (
            f"; 'quantkit clean {directory} --remove' deletes them" if stale else "")
    if busy:
        line += f"; {len(busy)} in use by running conversions, left alone"
    out.print(_text(line), soft_wrap=True, highlight=False)


@app.command(epilog="Examples:\n\n  quantkit presets")
def presets() -> None:
    """List the model families --preset knows, how each is detected, and what each keeps."""
    from rich.table import Table

    from .families import FAMILIES
    for fam in FAMILIES:
        t = Table(title=f"{fam.name}" + (f" (also: {', '.join(fam.aliases)})" if fam.aliases else "") + f": {fam.title}",
                  title_justify="left", show_header=False)
        t.add_column("layer pattern")
        t.add_column("kept because")
        for pat, why in fam.keep:
            t.add_row(pat, why)
        t.caption = "detected by: " + ", ".join(e if isinstance(e, str) else f"{e[0]} {list(e[1])}" for e in fam.detect)
        t.caption_justify = "left"
        out.print(t)


@app.command(epilog="Examples:\n\n  quantkit formats")
def formats() -> None:
    """List the formats quantkit writes and whether stock ComfyUI loads them."""
    from rich.table import Table
    t = Table("--format", ".comfy_quant format", "weight", "scale", "loads in")
    for s in FORMATS.values():
        weight, scale = s.describe()
        t.add_row(s.name, s.comfy_format, weight, scale,
                  "stock ComfyUI" if s.stock_comfy else "needs node")
    out.print(t)


def _print_result(rep, out, err) -> None:
    """A written file's notes (stderr, one line each) and its summary (stdout)."""
    from .render import print_summary
    for note in rep.notes:
        err.print(_text(f"note: {note}"), soft_wrap=True, highlight=False)
    print_summary(rep, out)


def main() -> None:
    """The console script. Once the command has finished (every output file written, fsynced and
    closed, worker processes joined), the process ends with ``os._exit`` after flushing stdout and
    stderr: interpreter teardown (torch and CUDA) took 0.7 s after an 11 s conversion on the GPU
    benchmark machine, and there is nothing left for it to do."""
    from . import interrupts
    try:
        interrupts.install_raising()  # SIGINT, SIGTERM, SIGHUP raise Interrupted: every finally cleans up
        app()
        code = 0
    except interrupts.Interrupted as e:
        code = interrupts.announce(e)
    except KeyboardInterrupt:
        code = interrupts.announce(interrupts.Interrupted(signal.SIGINT))
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            sys.stderr.write(f"{e.code}\n")
            code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
