"""Drop-in for the command line of the old converter (``convert_to_quant`` 1.3.x): accept its
common flags, print the equivalent ``quantkit convert`` command, and run it.

Facts about the old flags (from its ``--help`` and README): FP8 per-tensor is the default;
``--int8`` picks INT8 with ``--scaling_mode`` tensor (its default), row or block;
``--comfy_quant`` is always on in 1.3.4 and ``--low-memory`` only changes how it loads, so both
are accepted and need nothing; ``--exclude-layers`` is one regex searched in the tensor name;
model flags (``--flux2``, ``--wan``, ...) keep model-specific layers in high precision. Without
``-o`` it names the output ``<stem>_simple_<fmt>[mixed]_<scaling>.safetensors``; so does this.

Anything else is refused with a message saying so: never silently ignored. Learned rounding (the
old default without ``--simple``) is refused too, since quantkit rounds to nearest.
"""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

from .errors import EXIT_USAGE, UsageError
from .formats import DEFAULT_BLOCK_SIZE, FORMATS
from .formats.scaled import grid

PROG = "convert_to_quant.py"

# old preset flag -> quantkit --preset (only where quantkit has the family and the intent matches)
PRESETS = {"flux2": "flux2", "t5xxl": "t5xxl", "wan": "wan", "hunyuan": "hunyuan-video", "qwen": "qwen-image",
           "zimage": "z-image", "distillation_large": "chroma", "mistral": "llama"}

_BOOL = {"--int8": "int8", "--simple": "simple", "--comfy_quant": "comfy_quant", "--comfy-quant": "comfy_quant",
         "--save-quant-metadata": "meta", "--save_quant_metadata": "meta", "--low-memory": "low_memory",
         "--low_memory": "low_memory", "-lm": "low_memory", "--full_precision_matrix_mult": "fpmm",
         "--full-precision-matrix-mult": "fpmm", "-fpmm": "fpmm", "-h": "help", "--help": "help",
         **{f"--{k}": f"preset:{k}" for k in PRESETS}}
_VALUE = {"-i": "input", "--input": "input", "-o": "output", "--output": "output",
          "--scaling_mode": "scaling_mode", "--scaling-mode": "scaling_mode",
          "--block_size": "block_size", "--block-size": "block_size", "--group_size": "block_size",
          "--group-size": "block_size", "--exclude-layers": "exclude", "--exclude_layers": "exclude"}

# Old flags refused with a specific reason (any other unknown flag gets the generic message).
_WHY = {
    "--nvfp4": "run 'quantkit convert --format nvfp4' itself", "--mxfp8": "run 'quantkit convert --format mxfp8' itself",
    "--convrot": "run 'quantkit convert --format int8-convrot' itself",
    "--dynamic-convrot": "quantkit quantizes no activations; 'quantkit convert --format int8-convrot' writes the weights",
    "--heur": "quantkit has no size/aspect heuristics; use --exclude-layers",
    "--fallback": "quantkit's --fallback means something else (the format for layers a block format cannot take)",
    "--custom-layers": "use a quantkit per-layer config file (quantkit convert --config layers.toml)",
    "--custom_layers": "use a quantkit per-layer config file (quantkit convert --config layers.toml)",
    "--layer-config": "use a quantkit per-layer config file (quantkit convert --config layers.toml)",
    "--device": "quantkit converts on the CPU, streaming", "--verbose": "quantkit has --quiet only",
    "--output-dtype": "quantkit copies unquantized tensors in their own dtype",
    "--distillation_small": "quantkit's chroma preset keeps more (use --distillation_large)",
    "--ltxv2": "quantkit knows LTX-Video, not LTX-2", "--qwen_vlm": "quantkit has no Qwen-VL vision preset",
}

HELP = f"""usage: {PROG} -i INPUT [-o OUTPUT] --simple [--int8] [--scaling_mode tensor|row|block]
                  [--block_size N] [--exclude-layers REGEX] [--full_precision_matrix_mult]
                  [--comfy_quant] [--save-quant-metadata] [--low-memory]
                  [--{' | --'.join(PRESETS)}]

quantkit's drop-in for the old convert_to_quant command line: maps these flags to
'quantkit convert', prints that command, and runs it. Any other flag is an error.
--simple is required: quantkit rounds to nearest (no learned rounding).
Model flags map to quantkit presets: {', '.join(f'--{k} -> {v}' for k, v in PRESETS.items())}.
Exit codes: 0 success, 1 conversion failed, 2 usage error, 130 interrupted.
"""


def _split(argv: list[str]) -> dict:
    opts: dict = {"presets": []}
    it = iter(argv)
    for tok in it:
        flag, eq, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        if flag in _VALUE:
            if eq:
                val = inline
            else:
                val = next(it, None)
                if val is None:
                    raise UsageError(f"{flag} needs a value", fix=f"see {PROG} --help")
            opts[_VALUE[flag]] = val
        elif flag in _BOOL and not eq:
            dest = _BOOL[flag]
            if dest.startswith("preset:"):
                opts["presets"].append(dest[7:])
            else:
                opts[dest] = True
        elif flag.startswith("-"):
            why = _WHY.get(flag) or _WHY.get(flag.replace("_", "-"))
            raise UsageError(f"{flag}: not supported by quantkit's drop-in for convert_to_quant"
                             + (f" ({why})" if why else ""), fix=f"see {PROG} --help for the flags it maps")
        else:
            raise UsageError(f"unexpected argument {tok!r}", fix="the old converter takes the input with -i")
    return opts


def old_default_output(src: str, fmt_str: str, scaling: str, mixed: bool) -> str:
    base = src[:-len(".safetensors")] if src.endswith(".safetensors") else str(Path(src).with_suffix(""))
    return f"{base}_simple_{fmt_str}{'mixed' if mixed else ''}{scaling}.safetensors"


def _scaled_format(weight_dtype: str, granularity: str) -> str:
    """The registered scaled-grid format the old tool's flags name: weight dtype and scale granularity."""
    return grid(weight_dtype, granularity).name


def map_args(argv: list[str]) -> list[str] | None:
    """The ``quantkit`` argv for an old-style argv (None for --help). Raises UsageError."""
    o = _split(argv)
    if o.get("help"):
        return None
    if "input" not in o:
        raise UsageError("-i INPUT is required", fix=f"{PROG} -i model.safetensors --simple")
    if not o.get("simple"):
        raise UsageError("without --simple the old converter runs learned rounding, which quantkit does not do",
                         fix="add --simple for round-to-nearest (what quantkit does)")
    mode = o.get("scaling_mode", "tensor")
    mode = "block" if mode == "block2d" else mode
    if mode not in ("tensor", "row", "block"):
        raise UsageError(f"--scaling_mode {mode}: not supported by quantkit's drop-in", fix="use tensor, row or block")
    bs = o.get("block_size")
    if bs is not None:
        try:
            bs = int(bs)
        except ValueError:
            raise UsageError(f"--block_size {bs!r} is not an integer", fix="use 128 or 64") from None
    if o.get("int8"):
        fmt = _scaled_format("I8", mode)
        fmt_str, scaling = "int8", {"tensor": "_tensorwise", "row": "_rowwise"}.get(mode, f"_bs{bs or 128}")
    elif mode != "tensor":
        raise UsageError(f"FP8 with --scaling_mode {mode} (a {mode}-wise FP8 format) is not a quantkit format",
                         fix="drop --scaling_mode for per-tensor FP8, or use --int8 --scaling_mode " + mode)
    else:
        fmt, fmt_str, scaling = _scaled_format("F8_E4M3", mode), "fp8", "_tensor"
    takes_block = "block_size" in FORMATS[fmt].option_names
    if bs is not None and not takes_block:
        raise UsageError(f"--block_size only applies to --int8 --scaling_mode block, not to {fmt}",
                         fix="drop --block_size")
    if len(o["presets"]) > 1:
        raise UsageError(f"several model flags ({', '.join('--' + p for p in o['presets'])}): quantkit applies one",
                         fix="keep one model flag")
    exclude = o.get("exclude")
    if exclude is not None and "weight" in exclude:
        raise UsageError(f"--exclude-layers {exclude!r} mentions 'weight', but quantkit matches layer names "
                         "(the tensor name without '.weight')", fix="drop '.weight' from the pattern")
    src = o["input"]
    out = o.get("output") or old_default_output(src, fmt_str, scaling, bool(o["presets"]))
    cmd = ["convert", src, "-o", out, "--format", fmt]
    if takes_block:
        cmd += ["--block-size", str(bs or DEFAULT_BLOCK_SIZE)]
    if exclude is not None:
        cmd += ["--exclude", exclude]
    if o.get("fpmm"):
        cmd.append("--full-precision-mm")
    # the old converter applies no model rules unless a model flag is given
    cmd += ["--preset", PRESETS[o["presets"][0]] if o["presets"] else "none"]
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``convert_to_quant.py``: map, print the quantkit command, run it."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cmd = map_args(argv)
    except UsageError as e:
        sys.stderr.write(f"error: {e.one_line()}\n")
        return EXIT_USAGE
    if cmd is None:
        sys.stdout.write(HELP)
        return 0
    sys.stderr.write(f"equivalent: quantkit {shlex.join(cmd)}\n")
    from . import interrupts
    from .cli import app
    try:
        interrupts.install_raising()  # SIGINT, SIGTERM, SIGHUP: clean up, exit 128 + n (as `quantkit`)
        app(cmd, prog_name="quantkit")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except interrupts.Interrupted as e:
        return interrupts.announce(e)
    except KeyboardInterrupt:
        return interrupts.announce(interrupts.Interrupted(signal.SIGINT))
    return 0


if __name__ == "__main__":  # python -m quantkit.compat
    raise SystemExit(main())
