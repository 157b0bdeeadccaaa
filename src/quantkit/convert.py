"""``convert()``: the library entry point the CLI is a thin shell over.

Flow: open and validate the input header -> check the output path -> plan every tensor -> write a
temporary file beside the target (header first, then each tensor at its planned offset, input read
once in file order) -> fsync -> reopen and check it -> rename over the target. Any failure removes
the temporary file, so the target path never holds a partial file and the input is only read.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import quantize, reference
from .errors import QuantkitError
from .formats import FORMATS, encode_comfy_quant
from .plan import LayerPlan, Options, Plan, default_output_name, plan_conversion
from .refine import Refiner
from .report import ConvertReport, LayerReport
from .safetensors_io import SafetensorsReader, SafetensorsWriter

Progress = Callable[[int, int, str], None]  # (input bytes done, input bytes total, tensor name)


def convert(src: str | os.PathLike, dst: str | os.PathLike | None = None, *, format: str = "fp8",
            block_size: int = 128, include: tuple[str, ...] | list[str] = (),
            exclude: tuple[str, ...] | list[str] = (), fallback: str = "int8-row",
            overwrite: bool = False, progress: Progress | None = None, learned_rounding: bool = False,
            calibration: str | os.PathLike | None = None, bias_correction: bool = False) -> ConvertReport:
    """Quantize the linear weights of ``src`` into ``dst`` (default: ``<stem>-<format>.safetensors``
    beside the input). Returns a :class:`ConvertReport`; raises :class:`QuantkitError` on bad input.

    ``calibration``: a stats file from :func:`quantkit.calibration.capture` (static fp8 input_scale,
    and the objective of the two options below). ``learned_rounding``: choose q to lower the expected
    output error (see :mod:`quantkit.learned`). ``bias_correction``: fold the mean output error into
    the bias (needs ``calibration``)."""
    options = Options(format, block_size, tuple(include), tuple(exclude), fallback)
    options.validate()
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(default_output_name(src.name, format))
    t0 = time.perf_counter()
    with SafetensorsReader(src) as reader:
        check_output_path(src, dst, overwrite)
        plan = plan_conversion(reader, options)
        refiner = Refiner.create(reader, plan, learned_rounding=learned_rounding, calibration=calibration,
                                 bias_correction=bias_correction)
        report = _execute(reader, plan, dst, progress, refiner)
    report.seconds = time.perf_counter() - t0
    return report


def check_output_path(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists() or dst.is_symlink():
        if dst.exists() and os.path.samefile(src, dst):
            raise QuantkitError("output path is the input file", file=dst,
                                fix="choose another path with -o; the input is never modified")
        if dst.is_dir():
            raise QuantkitError("output path is a directory", file=dst, fix="give a file name with -o")
        if not overwrite:
            raise QuantkitError("output file already exists", file=dst,
                                fix="pass --overwrite to replace it, or choose another path with -o")
    parent = dst.parent
    if not parent.is_dir():
        raise QuantkitError("output directory does not exist", file=dst, fix=f"create {parent} first")


def _os_error(e: OSError, dst: Path, need: int) -> QuantkitError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return QuantkitError(f"no space left on the device (the output needs {need / 1e9:.2f} GB)", file=dst,
                             fix="free space there or write elsewhere with -o")
    if e.errno in (errno.EACCES, errno.EPERM):
        return QuantkitError("output directory is not writable", file=dst,
                             fix="choose a writable directory with -o or fix its permissions")
    if e.errno == errno.EROFS:
        return QuantkitError("output is on a read-only file system", file=dst, fix="write elsewhere with -o")
    return QuantkitError(f"cannot write: {e.strerror or e}", file=dst, fix="check the disk and the path")


def _execute(reader: SafetensorsReader, plan: Plan, dst: Path, progress: Progress | None,
             refiner: Refiner | None = None) -> ConvertReport:
    opts = plan.options
    report = ConvertReport(str(reader.path), str(dst), opts.format, opts.block_size, bytes_in=reader.file_size)
    total_in = sum(t.nbytes for t in reader.tensors_in_order)
    need = 0
    fd = -1
    tmp = None
    try:
        try:
            fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
            tmp = Path(tmp_name)
            writer = SafetensorsWriter(fd, plan.outputs, plan.metadata)
            need = writer.total_size
            done = 0
            for lp in plan.layers:
                report.layers.append(_convert_one(reader, writer, lp, opts.block_size, refiner))
                done += reader.tensors[lp.tensor].nbytes
                if progress is not None:
                    progress(done, total_in, lp.tensor)
            writer.finish()
            os.fsync(fd)
        except OSError as e:
            raise _os_error(e, dst, need) from None
        finally:
            if fd >= 0:
                os.close(fd)
        verify_written(tmp, plan, writer)
        os.replace(tmp, dst)
        tmp = None
        _fsync_dir(dst.parent)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    report.bytes_out = need
    return report


def _convert_one(reader: SafetensorsReader, writer: SafetensorsWriter, lp: LayerPlan, block_size: int,
                 refiner: Refiner | None = None) -> LayerReport:
    info = reader.tensors[lp.tensor]
    if refiner is not None and lp.spec is None and (bias := refiner.bias(lp)) is not None:
        writer.write(lp.tensor, bias)
        return LayerReport(lp.tensor, lp.shape, lp.dtype, "kept", None, None, "bias corrected: b + (W - Wq) mean(x)")
    if lp.spec is None:
        writer.copy_from_fd(lp.tensor, reader.fileno(), reader.data_start + info.start, info.nbytes)
        return LayerReport(lp.tensor, lp.shape, lp.dtype, "kept", None, None, lp.reason)
    spec, layer = lp.spec, lp.layer
    w = reader.tensor(lp.tensor)
    scale = quantize.compute_scale(w, spec, block_size)
    if not bool(torch.isfinite(scale).all()):
        raise QuantkitError("weight holds NaN or Inf values, which cannot be quantized", file=reader.path,
                            tensor=lp.tensor, fix=f"repair the checkpoint, or keep the layer with --exclude '^{layer}$'")
    if refiner is not None:
        return _refined(reader, writer, lp, block_size, refiner, w)
    stats = quantize.ErrorStats()
    for chunk in quantize.quantize_chunks(w, scale, spec, block_size, stats):
        writer.write(f"{layer}.weight", chunk)
    writer.write(f"{layer}.weight_scale", scale)
    if spec.writes_input_scale:
        writer.write(f"{layer}.input_scale", torch.ones((), dtype=torch.float32))
    writer.write(f"{layer}.comfy_quant", encode_comfy_quant(lp.comfy_quant(block_size)))
    del w
    reader.release(lp.tensor)
    return LayerReport(lp.tensor, lp.shape, lp.dtype, "fallback" if lp.fallback else "quantized", spec.name,
                       spec.comfy_format, lp.reason, stats.sqnr_db)


def _refined(reader: SafetensorsReader, writer: SafetensorsWriter, lp: LayerPlan, block_size: int,
             refiner: Refiner, w: torch.Tensor) -> LayerReport:
    spec, layer = lp.spec, lp.layer
    q, scale, note = refiner.quantize(lp)
    writer.write(f"{layer}.weight", q)
    writer.write(f"{layer}.weight_scale", scale)
    if spec.writes_input_scale:
        s = refiner.input_scale(lp)
        writer.write(f"{layer}.input_scale", s if s is not None else torch.ones((), dtype=torch.float32))
    writer.write(f"{layer}.comfy_quant", encode_comfy_quant(lp.comfy_quant(block_size)))
    sqnr = reference.sqnr(w, reference.dequantize(q, scale, spec, block_size, torch.float32))
    del w
    reader.release(lp.tensor)
    return LayerReport(lp.tensor, lp.shape, lp.dtype, "fallback" if lp.fallback else "quantized", spec.name,
                       spec.comfy_format, "; ".join(x for x in (lp.reason, note) if x), sqnr)


def verify_written(path: Path, plan: Plan, writer: SafetensorsWriter) -> None:
    """Reopen the written file: header parses, every tensor sits where planned, metadata and every
    .comfy_quant marker decode to exactly what was planned."""
    with SafetensorsReader(path) as out:
        expect = {t.name: t for t in writer.order}
        if set(out.tensors) != set(expect) or out.metadata != plan.metadata:
            raise QuantkitError("written file does not match its plan (header)", file=path,
                                fix="report this as a quantkit bug")
        for name, t in out.tensors.items():
            if out.data_start + t.start != writer.offsets[name] or t.shape != expect[name].shape \
                    or t.dtype != expect[name].dtype:
                raise QuantkitError("written file does not match its plan (offsets)", file=path, tensor=name,
                                    fix="report this as a quantkit bug")
        for lp in plan.quantized:
            name = f"{lp.layer}.comfy_quant"
            got = json.loads(bytes(out.buffer(name)).decode("utf-8"))
            if got != lp.comfy_quant(plan.options.block_size):
                raise QuantkitError("written .comfy_quant marker does not decode to the plan", file=path,
                                    tensor=name, fix="report this as a quantkit bug")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["convert", "check_output_path", "verify_written", "FORMATS"]
