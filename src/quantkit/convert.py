"""``convert()``: the library entry point the CLI is a thin shell over.

Flow: open and validate the input header -> check the output path -> plan every tensor -> write a
temporary file beside the target (header first, then each tensor at its planned offset, input read
once in file order) -> fsync -> reopen and check it -> rename over the target. Any failure removes
the temporary file, so the target path never holds a partial file and the input is only read.

The temporary file is named for the target and this process and locked while it is written
(:mod:`quantkit.tempfiles`); before writing, the stale temporary files of earlier runs for the same
target that were killed (SIGKILL, out of memory, power cut) are removed, and the report's ``notes``
says so.
"""

from __future__ import annotations

import errno
import os
import queue
import time
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import backend, interrupts, qinput, readahead, tempfiles
from .formats import scaled
from .backend import check_finite, parse_device
from .dtypes import bitsize, torch_dtype
from .errors import QuantkitError, UsageError
from .formats import DEFAULT_FALLBACK, DEFAULT_FORMAT, FORMATS, decode_comfy_quant, encode_comfy_quant
from .pipeline import DEFAULT_DEPTH, BackgroundWriter
from .layerconfig import LayerConfig, load_layer_config
from .plan import AUTO, LayerPlan, Options, Plan, default_output_name, plan_conversion, with_static_input_scales
from .report import ConvertReport, LayerReport
from .safetensors_io import SafetensorsReader, SafetensorsWriter

if TYPE_CHECKING:
    from .refine import Refiner

# (input bytes read, input bytes total, tensor name, output bytes written): called after each tensor
# is read and queued; the written count trails it by the writer's queue.
Progress = Callable[[int, int, str, int], None]


def convert(src: str | os.PathLike, dst: str | os.PathLike | None = None, *, format: str = DEFAULT_FORMAT,
            block_size: int = 128, include: tuple[str, ...] | list[str] = (),
            exclude: tuple[str, ...] | list[str] = (), fallback: str = DEFAULT_FALLBACK,
            overwrite: bool = False, progress: Progress | None = None, preset: str = "auto",
            config: str | os.PathLike | LayerConfig | None = None,
            full_precision_matrix_mult: bool = False, device: str = "auto", learned_rounding: bool = False,
            calibration: str | os.PathLike | None = None, bias_correction: bool = False,
            learned_objective: str = "calibration", devices: str | list[str] | None = None,
            format_options: dict | None = None, keep_quantized: bool = False,
            bits: float | None = None, max_error: float | None = None,
            auto_candidates: tuple[str, ...] | list[str] | None = None,
            _upgrade: bool = False) -> ConvertReport:
    """Quantize the linear weights of ``src`` into ``dst`` (default: ``<stem>-<format>.safetensors``
    beside the input). Returns a :class:`ConvertReport`; raises :class:`QuantkitError` on bad input.

    ``preset``: a model family (``quantkit.families``), ``auto`` (detect) or ``none``; ``config``: a
    per-layer config file (``quantkit.layerconfig``); ``device``: ``auto`` (a GPU if there is one),
    ``cpu``, ``cuda`` or ``cuda:N`` (round-to-nearest bytes are the same on every device).
    ``calibration``: a stats file from :func:`quantkit.calibration.capture` (a static input_scale for fp8 and nvfp4,
    and the objective of the two options below). ``learned_rounding``: choose q to lower the expected
    output error (see :mod:`quantkit.learned`). ``bias_correction``: fold the mean output error into
    the bias (needs ``calibration``). ``learned_objective``: ``calibration`` (default) or ``subspace``
    (data-free: error on W's top singular subspace, :func:`quantkit.learned.learn_subspace`).
    ``devices``: spread learned rounding over one worker process per device (``cuda:0,cuda:1``,
    ``all``, or ``cpu,cpu``; see :mod:`quantkit.multi`); same output bytes. ``progress(read, total,
    tensor, written)``: input bytes read of ``total``, the tensor just read, output bytes written.
    ``format_options``: per-layer options a format reads besides ``block_size`` (fields of
    :class:`quantkit.formats.LayerOpts`).

    ``format="auto"``: a format per layer from ``auto_candidates`` (default
    :data:`quantkit.autoplan.CANDIDATES`), measured on the weights (on ``calibration``'s statistics
    when given) and chosen to one budget: ``bits`` (average bits per quantized weight, scales
    included) or ``max_error`` (per layer, relative to int8-row); see :mod:`quantkit.autoplan`.

    An input whose layers are already quantized (``.comfy_quant`` markers of any producer, or a legacy
    ``scaled_fp8`` file; :mod:`quantkit.qinput`): each such layer is dequantized as ComfyUI does and
    quantized to ``format`` (the report's notes say its quality is bounded by the input's), or, with
    ``keep_quantized``, copied through (a legacy layer with the marker ComfyUI gives it at load)."""
    if devices is not None and learned_objective != "calibration":
        raise UsageError("--devices spreads the calibration objective only",
                         fix="drop --devices, or use --learned-objective calibration")
    options = make_options(format, block_size, include, exclude, fallback, preset, config,
                           full_precision_matrix_mult, format_options, keep_quantized, _upgrade,
                           bits=bits, max_error=max_error, auto_candidates=auto_candidates,
                           calibration=calibration)
    dev = parse_device(device)
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(default_output_name(src.name, format))
    clock = Clock()
    ahead = readahead.adopt(src)  # the disk starts now (or started with the process, from the CLI)
    try:
        with SafetensorsReader(src) as reader:
            check_output_path(src, dst, overwrite)
            reclaimed = tempfiles.reclaim_note(tempfiles.reclaim(dst))
            plan = plan_conversion(reader, options)
            if learned_rounding:
                _refuse_unlearnable(plan, learned_objective)
            refiner = None
            if learned_rounding or calibration is not None or bias_correction or devices is not None:
                if plan.requantized:
                    raise UsageError("learned rounding, calibration and bias correction need the original float "
                                     f"weights, and {len(plan.requantized)} layers are already quantized", file=src,
                                     tensor=plan.requantized[0].tensor,
                                     fix="convert the original checkpoint, or pass --keep-quantized")
                # imported only when asked for: not on the way to a round-to-nearest conversion's first read
                from . import multi
                from .refine import Refiner
                refiner = Refiner.create(reader, plan, learned_rounding=learned_rounding, calibration=calibration,
                                         bias_correction=bias_correction,
                                         options=_learned_options(learned_objective))
                if refiner is not None:
                    plan = with_static_input_scales(plan, refiner.static_input_layers(), src)
                learned_ctx = multi.precompute(refiner, devices, dst)
            else:
                learned_ctx = contextlib.nullcontext()
            clock.mark("plan")
            with learned_ctx as learned_store:
                clock.mark("plan" if learned_store is None else "learned rounding (workers)")
                report = _execute(reader, plan, dst, progress, device=dev, refiner=refiner, ahead=ahead,
                                  clock=clock, overwrite=overwrite)
            report.notes.extend(plan.notes)
            if plan.auto is not None:
                report.auto = plan.auto.to_dict()
            if reclaimed is not None:
                report.notes.append(reclaimed)
            if learned_store is not None:
                report.detail_seconds["learned workers"] = learned_store.log.seconds
                report.detail_seconds["learned workers start"] = learned_store.log.start_seconds
    finally:
        if ahead is not None:
            ahead.stop(timeout=0.1)  # an error or the end is not held up by a window still being read
    report.seconds = clock.finish(report.stage_seconds)
    return report


def _refuse_unlearnable(plan: Plan, objective: str = "calibration") -> None:
    """Learned rounding runs on the scaled grids and on the formats that give their own grid
    (``Format.learn_grid``, with the calibration objective only): a plan holding a layer of another
    format is refused up front, before anything is read or written."""
    from .refine import learnable
    if objective == "subspace":
        other = sorted({lp.spec.name for lp in plan.quantized if not backend.has_kernel(lp.spec)})
        if other:
            grids = ", ".join(f.name for f in FORMATS.values() if backend.has_kernel(f))
            raise UsageError(f"--learned-rounding does not run {', '.join(other)} with the data-free subspace "
                             "objective", fix=f"drop --learned-rounding, pass --calibration FILE without "
                                              f"--learned-objective subspace, or use one of: {grids}")
        return
    other = sorted({lp.spec.name for lp in plan.quantized if not learnable(lp.spec)})
    if other:
        grids = ", ".join(f.name for f in FORMATS.values() if learnable(f))
        raise UsageError(f"--learned-rounding does not run {', '.join(other)}",
                         fix=f"drop --learned-rounding, or use one of: {grids}")


class Clock:
    """Splits one wall-clock interval into named, disjoint parts: :meth:`mark` adds the time since
    the previous mark to a part; :meth:`finish` puts the rest under "other" and returns the total,
    which the parts sum to."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + (now - self.last)
        self.last = now

    def finish(self, into: dict[str, float]) -> float:
        total = time.perf_counter() - self.start
        into.clear()
        into.update(self.parts)
        into["other"] = total - sum(self.parts.values())  # marks are in order: never negative
        return total


def _learned_options(objective: str):
    from .learned import LearnedOptions
    return LearnedOptions(objective=objective)


def make_options(format: str = DEFAULT_FORMAT, block_size: int = 128, include=(), exclude=(), fallback: str = DEFAULT_FALLBACK,
                 preset: str = "auto", config: str | os.PathLike | LayerConfig | None = None,
                 full_precision_matrix_mult: bool = False, format_options: dict | None = None,
                 keep_quantized: bool = False, upgrade: bool = False, *, bits: float | None = None,
                 max_error: float | None = None, auto_candidates=None, calibration=None) -> Options:
    """Validated :class:`Options` from keyword values (a config path is loaded and checked here).
    ``bits`` / ``max_error`` / ``auto_candidates`` / ``calibration``: the budget, candidates and
    statistics of ``format="auto"`` (:class:`quantkit.autoplan.AutoSpec`)."""
    if config is not None and not isinstance(config, LayerConfig):
        config = load_layer_config(config)
    extra = (("full_precision_matrix_mult", True),) if full_precision_matrix_mult else ()
    auto = None
    if format == AUTO or bits is not None or max_error is not None or auto_candidates is not None:
        from .autoplan import CANDIDATES, AutoSpec
        if format != AUTO:
            given = [n for n, v in (("--bits", bits), ("--max-error", max_error), ("--auto-candidates", auto_candidates))
                     if v is not None]
            raise UsageError(f"{' and '.join(given)}: {'options' if len(given) > 1 else 'an option'} of --format auto, "
                             f"not of --format {format}", fix=f"add --format auto, or drop {' and '.join(given)}")
        auto = AutoSpec(bits, max_error, tuple(auto_candidates) if auto_candidates is not None else CANDIDATES,
                        None if calibration is None else str(calibration))
    options = Options(format, block_size, tuple(include), tuple(exclude), fallback, preset, config, extra,
                      tuple(sorted((format_options or {}).items())), keep_quantized, upgrade, auto)
    options.validate()
    return options


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


def _make_quantizer(layers: list[LayerPlan], reader: SafetensorsReader, device: torch.device):
    """A function (reader, tensor name, spec, block_size) -> (q, scale, stats, give_back) for
    ``layers`` (asked for in this order); q lives in one of a few reused buffers, handed back by
    ``give_back`` once written."""
    if device.type != "cpu":
        return _device_quantizer(layers, reader, device)
    return _cpu_quantizer(layers, reader)


def _max_numel(layers: list[LayerPlan], reader: SafetensorsReader) -> int:
    """Elements of the largest weight: the size of a q buffer (1-byte formats)."""
    return max((reader.tensors[lp.tensor].numel for lp in layers), default=0)


def _device_quantizer(layers: list[LayerPlan], reader: SafetensorsReader, device: torch.device):
    from .cuda_path import DeviceQuantizer
    max_out = _max_numel(layers, reader)
    jobs = [(lp.tensor, reader.data_start + reader.tensors[lp.tensor].start, reader.tensors[lp.tensor].nbytes)
            for lp in layers]
    dq = DeviceQuantizer(device, reader.fileno(), jobs, max_out, n_out=DEFAULT_DEPTH + 1)

    def on_device(reader: SafetensorsReader, name: str, spec, block_size):
        t = reader.tensors[name]
        return dq.quantize(name, torch_dtype(t.dtype), t.shape, spec, block_size)
    on_device.close = dq.close
    return on_device


def _buffers(nbytes: int, count: int = DEFAULT_DEPTH + 1) -> queue.Queue:
    """``count`` reused uint8 output buffers of ``nbytes`` (default: one being written, DEFAULT_DEPTH
    queued for the writer, one being filled), each put back once its tensor is written."""
    free: queue.Queue[torch.Tensor] = queue.Queue()
    for _ in range(count):
        free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8))
    return free


def _cpu_quantizer(layers: list[LayerPlan], reader: SafetensorsReader):
    quantize_tensor = backend.cpu_quantizer()
    free = _buffers(_max_numel(layers, reader))

    def on_cpu(reader: SafetensorsReader, name: str, spec, block_size):
        w = reader.tensor(name)
        buf = free.get()
        q, scale, stats = quantize_tensor(w, spec, block_size, out=buf)
        del w
        reader.release(name)
        return q, scale, stats, lambda: free.put(buf)
    return on_cpu


def _native_pool(layers: list[LayerPlan], device: torch.device) -> queue.Queue | None:
    """Reused weight buffers for ``layers`` whose format's C kernel runs here (``native``; the other
    formats' torch ``quantize`` allocates its own), as :func:`_cpu_quantizer` keeps for the scaled
    formats: a fresh weight per layer costs a page fault per 4 KB. None where no such layer runs."""
    from .kernels import native_blocks
    native = [lp for lp in layers if getattr(lp.spec, "native", None) is not None]
    if not native or device.type != "cpu" or backend.backend_for("cpu") != "native" or native_blocks.available():
        return None
    size = 1
    for lp in native:
        st = lp.spec.stored(lp.shape, torch_dtype(lp.value_dtype), lp.opts)[0]  # the weight comes first
        n = bitsize(st.dtype)
        for d in st.shape:
            n *= d
        size = max(size, n // 8)
    return _buffers(size, min(len(native), DEFAULT_DEPTH + 1))


def _execute(reader: SafetensorsReader, plan: Plan, dst: Path, progress: Progress | None,
             threaded: bool = True, device: torch.device = torch.device("cpu"),
             refiner: Refiner | None = None, ahead: readahead.Readahead | None = None,
             clock: Clock | None = None, overwrite: bool = False) -> ConvertReport:
    """Write ``plan`` to ``dst``. The parts of the time line (``clock``): "prepare" (temporary file,
    quantizer and its buffers), "read+quantize" (the main thread's pass over the tensors),
    "waiting for the writer" (the writer thread's queue and the last buffers), "fsync", "verify"
    (reopen and check), "rename". The writer thread's busy time overlaps them: it goes to
    ``detail_seconds["writer thread busy"]``, not into the total."""
    clock = clock if clock is not None else Clock()
    opts = plan.options
    report = ConvertReport(str(reader.path), str(dst), opts.format, opts.block_size, bytes_in=reader.file_size)
    total_in = sum(t.nbytes for t in reader.tensors_in_order)
    need = 0
    fd = -1
    tmp = None
    writer = None
    try:
        try:
            fd, tmp = tempfiles.create(dst)  # locked until fd is closed, after the rename
            writer = SafetensorsWriter(fd, plan.outputs, plan.metadata)
            need = writer.total_size
            # layers whose weights learned rounding chooses are quantized by the refiner instead, and
            # formats no fast kernel runs by their own torch reference
            quantizer = _make_quantizer([lp for lp in plan.quantized if backend.has_kernel(lp.spec) and not lp.requantized
                                         and (refiner is None or not refiner.rewrites(lp))], reader, device)
            pool = _native_pool([lp for lp in plan.quantized if not backend.has_kernel(lp.spec) and not lp.requantized
                                 and (refiner is None or not refiner.rewrites(lp))], device)
            bw = BackgroundWriter(threaded)
            stages = report.detail_seconds
            stages["writer thread busy"] = 0.0
            clock.mark("prepare")
            try:
                done = 0
                layers = plan.layers
                for i, lp in enumerate(layers):
                    if ahead is None and i + 1 < len(layers):  # the readahead thread is further ahead already
                        reader.prefetch(layers[i + 1].tensor)
                    t0 = time.perf_counter()
                    report.tensors.append(_convert_one(reader, writer, bw, quantizer, lp, stages, refiner, device, pool))
                    report.tensors[-1].seconds = time.perf_counter() - t0
                    t = reader.tensors[lp.tensor]
                    done += t.nbytes
                    if ahead is not None:
                        ahead.advance(reader.data_start + t.start + t.nbytes)
                    if progress is not None:
                        progress(done, total_in, lp.tensor, writer.written)
                    interrupts.check()  # a signal whose exception some C code swallowed
                clock.mark("read+quantize")
                bw.close()
            except BaseException:
                bw.abort()
                raise
            finally:
                if hasattr(quantizer, "close"):
                    quantizer.close()
            writer.finish()
            clock.mark("waiting for the writer")
            os.fsync(fd)
            clock.mark("fsync")
        except OSError as e:
            raise _os_error(e, dst, need) from None
        finally:
            if writer is not None:
                writer.close()
        verify_written(tmp, plan, writer)
        clock.mark("verify")
        interrupts.check()
        _rename(tmp, dst, overwrite)
        tmp = None
        _fsync_dir(dst.parent)
        clock.mark("rename")
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if fd >= 0:
            os.close(fd)  # drops the lock (after the rename or the unlink: never a stale-looking file)
    report.bytes_out = need
    report.tensors_out = len(plan.outputs)
    return report


def _rename(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished file to ``dst``. Without ``overwrite`` the rename itself refuses an
    existing ``dst`` (atomic: :func:`quantkit.tempfiles.rename_noreplace`), so an output another
    process wrote while this one ran is never replaced."""
    try:
        if overwrite:
            os.replace(tmp, dst)
        else:
            tempfiles.rename_noreplace(tmp, dst)
    except FileExistsError:
        raise QuantkitError("output file already exists (written by another process during this run)", file=dst,
                            fix="pass --overwrite to replace it, or choose another path with -o") from None
    except OSError as e:
        raise _os_error(e, dst, 0) from None


def _timed(stages: dict[str, float], job):
    def run() -> None:
        t0 = time.perf_counter()
        try:
            job()
        finally:
            stages["writer thread busy"] += time.perf_counter() - t0
    return run


def _convert_one(reader: SafetensorsReader, writer: SafetensorsWriter, bw: BackgroundWriter, quantizer,
                 lp: LayerPlan, stages: dict[str, float], refiner: Refiner | None = None,
                 device: torch.device = torch.device("cpu"), pool: queue.Queue | None = None) -> LayerReport:
    info = reader.tensors[lp.tensor]
    if lp.drop:
        return LayerReport(lp.tensor, lp.shape, lp.dtype, "dropped", None, None, lp.reason)
    if lp.source is not None:
        return _quantized_input(reader, writer, bw, stages, lp, device)
    if lp.out_name:  # a legacy scale, under the name ComfyUI gives it and in fp32
        value = reader.tensor(lp.tensor).to(torch_dtype(lp.out_dtype)).contiguous()
        bw.submit(_timed(stages, lambda: writer.write(lp.out_name, value)))
        return LayerReport(lp.tensor, lp.shape, lp.dtype, "kept", None, None, lp.reason)
    if refiner is not None and lp.spec is None and (bias := refiner.bias(lp)) is not None:
        bw.submit(_timed(stages, lambda: writer.write(lp.tensor, bias)))
        return LayerReport(lp.tensor, lp.shape, lp.dtype, "kept", None, None, "bias corrected: b + (W - Wq) mean(x)")
    if lp.spec is None:
        src_fd, src_off = reader.fileno(), reader.data_start + info.start
        bw.submit(_timed(stages, lambda: writer.copy_from_fd(lp.tensor, src_fd, src_off, info.nbytes)))
        return LayerReport(lp.tensor, lp.shape, lp.dtype, "kept", None, None, lp.reason)
    spec = lp.spec
    if refiner is not None and refiner.rewrites(lp):
        return _refined(reader, writer, bw, stages, lp, refiner)
    if not backend.has_kernel(spec):
        return _by_reference(reader, writer, bw, stages, lp, refiner, device, pool)
    q, scale, stats, give_back = quantizer(reader, lp.tensor, spec, lp.block_size)
    try:
        check_finite(scale, file=reader.path, tensor=lp.tensor, layer=lp.layer)
        tensors = spec.pack(q, scale)
        _static_input_scale(tensors, lp, refiner)
    except QuantkitError:
        give_back()
        raise
    _submit_layer(writer, bw, stages, lp, tensors, give_back)
    reason = "; ".join(x for x in (lp.reason, refiner.note(lp) if refiner is not None else "") if x)
    return LayerReport(lp.tensor, lp.shape, lp.dtype, "fallback" if lp.fallback else "quantized", spec.name,
                       spec.comfy_format, reason, stats.sqnr_db)


def _static_input_scale(tensors: dict[str, torch.Tensor], lp: LayerPlan, refiner: Refiner | None) -> None:
    """A calibrated input_scale replaces the planned 1.0 (fp8), or is added where the plan lists one
    only with calibration (nvfp4: ``LayerOpts.static_input_scale``)."""
    if refiner is not None and ("input_scale" in tensors or lp.opts.static_input_scale):
        s = refiner.input_scale(lp)
        if s is not None:
            tensors["input_scale"] = s


def _quantized_input(reader: SafetensorsReader, writer: SafetensorsWriter, bw: BackgroundWriter,
                     stages: dict[str, float], lp: LayerPlan, device: torch.device) -> LayerReport:
    """The weight of a layer of a quantized input: copied as it is (with ComfyUI's marker when the
    input has none: a legacy layer), or dequantized as ComfyUI does (fp32) and quantized to the
    target: on the CPU by the converter's quantizer for formats it runs, else by the format's torch
    reference (the two agree bit for bit); SQNR against the dequantized input weight."""
    src, info = lp.source, reader.tensors[lp.tensor]
    if lp.spec is None:
        fd, off = reader.fileno(), reader.data_start + info.start
        marker = qinput.marker_bytes(src) if src.new_marker else None

        def copy() -> None:
            writer.copy_from_fd(lp.tensor, fd, off, info.nbytes)
            if marker is not None:
                writer.write(f"{src.layer}{qinput.MARKER_SUFFIX}", marker)
        bw.submit(_timed(stages, copy))
        return LayerReport(lp.tensor, lp.shape, lp.dtype, "kept", None, None, lp.reason)
    spec = lp.spec
    w = qinput.read(reader, src).to(device)
    check_finite(w, file=reader.path, tensor=lp.tensor, layer=lp.layer)
    if device.type == "cpu" and backend.has_kernel(spec):  # the converter's CPU quantizer: the same bits
        q, scale, stats = backend.cpu_quantizer()(w, spec, lp.block_size)
        check_finite(scale, file=reader.path, tensor=lp.tensor, layer=lp.layer)
        tensors, sqnr = spec.pack(q, scale), stats.sqnr_db
    else:
        tensors = spec.quantize(w, lp.opts)
        for t in tensors.values():
            if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
                check_finite(t, file=reader.path, tensor=lp.tensor, layer=lp.layer)
        sqnr = scaled.sqnr(w, spec.dequantize(tensors, lp.comfy_quant(), torch.float32, lp.layer))
    del w
    tensors = {k: v.cpu() for k, v in tensors.items()}
    _submit_layer(writer, bw, stages, lp, tensors, None)
    return LayerReport(lp.tensor, lp.shape, lp.dtype, "fallback" if lp.fallback else "quantized", spec.name,
                       spec.comfy_format, lp.reason, sqnr)


def _by_reference(reader: SafetensorsReader, writer: SafetensorsWriter, bw: BackgroundWriter,
                  stages: dict[str, float], lp: LayerPlan, refiner: Refiner | None,
                  device: torch.device, pool: queue.Queue | None = None) -> LayerReport:
    """A layer of a format no fast kernel runs: its own torch ``quantize`` on ``device``, SQNR of its
    own ``dequantize`` (what ComfyUI computes) against the weight. Where the format's C kernel runs,
    its weight goes into a buffer of ``pool`` (:func:`_native_pool`), back in the pool once written."""
    spec = lp.spec
    w = reader.tensor(lp.tensor).to(device)
    native = backend.runs_native(w, spec)
    if not (native or backend.runs_triton(w, spec)):  # those refuse NaN/Inf in their own pass
        check_finite(w, file=reader.path, tensor=lp.tensor, layer=lp.layer)  # before a format's searches see NaN
    buf = pool.get() if native and pool is not None else None
    give_back = (lambda: pool.put(buf)) if buf is not None else None
    try:
        try:
            tensors, stats = backend.quantize_stored(w, spec, lp.opts, out=buf)
        except QuantkitError as e:  # NaN/Inf in w, said by the format
            check_finite(w, file=reader.path, tensor=lp.tensor, layer=lp.layer)  # the converter's error, as above
            raise QuantkitError(e.message, file=reader.path, tensor=lp.tensor, fix=e.fix) from None
        for t in tensors.values():
            if t.dtype in (torch.float32, torch.float16, torch.bfloat16):  # scales: NaN/Inf in w shows there
                check_finite(t, file=reader.path, tensor=lp.tensor, layer=lp.layer)
        sqnr = stats.sqnr_db if stats is not None else \
            scaled.sqnr(w, spec.dequantize(tensors, lp.comfy_quant(), torch.float32, lp.layer))
        del w
        reader.release(lp.tensor)
        tensors = {k: v.cpu() for k, v in tensors.items()}
        _static_input_scale(tensors, lp, refiner)
    except BaseException:
        if give_back is not None:
            give_back()
        raise
    _submit_layer(writer, bw, stages, lp, tensors, give_back)
    return LayerReport(lp.tensor, lp.shape, lp.dtype, "fallback" if lp.fallback else "quantized", spec.name,
                       spec.comfy_format, lp.reason, sqnr)


def _refined(reader: SafetensorsReader, writer: SafetensorsWriter, bw: BackgroundWriter, stages: dict[str, float],
             lp: LayerPlan, refiner: Refiner) -> LayerReport:
    spec = lp.spec
    q, scale, note = refiner.quantize(lp)
    dev = refiner.device  # the learning device: a whole-tensor fp64 SQNR is slow on CPU cores
    if scale is None:  # a registry format's own grid (Format.learn_grid): q is its stored tensors
        tensors = dict(q)
        for t in tensors.values():
            if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
                check_finite(t, file=reader.path, tensor=lp.tensor, layer=lp.layer)
        _static_input_scale(tensors, lp, refiner)
        w = reader.tensor(lp.tensor).to(dev)
        sqnr = scaled.sqnr(w, spec.dequantize(tensors, lp.comfy_quant(), torch.float32, lp.layer).to(dev))
        del w
        reader.release(lp.tensor)
        _submit_layer(writer, bw, stages, lp, tensors, None)
        return LayerReport(lp.tensor, lp.shape, lp.dtype, "fallback" if lp.fallback else "quantized", spec.name,
                           spec.comfy_format, "; ".join(x for x in (lp.reason, note) if x), sqnr)
    tensors = spec.pack(q, scale)
    _static_input_scale(tensors, lp, refiner)
    check_finite(scale, file=reader.path, tensor=lp.tensor, layer=lp.layer)
    w = reader.tensor(lp.tensor).to(dev)
    sqnr = scaled.sqnr(w, scaled.dequantize(q.to(dev), scale.to(dev), spec, lp.block_size, torch.float32))
    del w
    reader.release(lp.tensor)
    _submit_layer(writer, bw, stages, lp, tensors, None)
    return LayerReport(lp.tensor, lp.shape, lp.dtype, "fallback" if lp.fallback else "quantized", spec.name,
                       spec.comfy_format, "; ".join(x for x in (lp.reason, note) if x), sqnr)


def _submit_layer(writer: SafetensorsWriter, bw: BackgroundWriter, stages: dict[str, float], lp: LayerPlan,
                  tensors: dict[str, torch.Tensor], give_back) -> None:
    """Queue one quantized layer's tensors (suffix -> tensor, as its format stores them) and its
    marker for the writer thread, in the format's order. ``give_back`` (if any) returns the weight's
    buffer to its pool once the weight is written, or when the job is skipped after an earlier failure."""
    layer = lp.layer
    order = [s.suffix for s in lp.spec.stored(lp.shape, torch_dtype(lp.value_dtype), lp.opts)]
    if sorted(order) != sorted(tensors):
        if give_back is not None:
            give_back()
        raise QuantkitError(f"format {lp.spec.name} produced tensors {sorted(tensors)}, planned {sorted(order)}",
                            tensor=lp.tensor, fix="report this as a quantkit bug")
    marker = encode_comfy_quant(lp.comfy_quant())

    def write() -> None:
        for i, suffix in enumerate(order):
            if i == 0:
                try:
                    writer.write(f"{layer}.{suffix}", tensors[suffix])
                finally:
                    if give_back is not None:
                        give_back()
            else:
                writer.write(f"{layer}.{suffix}", tensors[suffix])
        writer.write(f"{layer}.comfy_quant", marker)
    bw.submit(_timed(stages, write), on_skip=give_back)


def verify_written(path: Path, plan: Plan, writer: SafetensorsWriter) -> None:
    """Reopen the written file: header parses, every tensor sits where planned, metadata and every
    .comfy_quant marker decode to exactly what was planned."""
    with SafetensorsReader(path) as out:
        def raw(name: str) -> bytes:  # one small pread: a page fault on the map would read ahead 100s of KB
            t = out.tensors[name]
            return os.pread(out.fileno(), t.nbytes, out.data_start + t.start)

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
            got = decode_comfy_quant(raw(name))
            if got != lp.comfy_quant():
                raise QuantkitError("written .comfy_quant marker does not decode to the plan", file=path,
                                    tensor=name, fix="report this as a quantkit bug")
        for lp in plan.kept_quantized:
            name = f"{lp.source.layer}{qinput.MARKER_SUFFIX}"
            if lp.source.new_marker and decode_comfy_quant(raw(name)) != lp.source.marker:
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


def upgrade(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            progress: Progress | None = None) -> ConvertReport:
    """Rewrite a legacy ``scaled_fp8`` file as ComfyUI converts it at load
    (:mod:`quantkit.formats.legacy`): every weight byte-identical, each scaled layer's
    ``scale_weight`` / ``scale_input`` under ComfyUI's names (``weight_scale`` / ``input_scale``, fp32;
    an input scale of 1.0 dropped) with its ``.comfy_quant`` marker and the header's
    ``_quantization_metadata``; the file's ``scaled_fp8`` marker tensor is dropped, as ComfyUI drops
    it. Every other tensor is copied. QuantkitError when ``src`` is not a legacy scaled fp8 file."""
    return convert(src, dst, overwrite=overwrite, progress=progress, preset="none", device="cpu",
                   keep_quantized=True, _upgrade=True)


__all__ = ["convert", "upgrade", "check_output_path", "verify_written", "FORMATS"]
