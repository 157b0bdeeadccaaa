"""Backend dispatcher: one call that quantizes a weight on the chosen device.

API for the converter (all other modules are implementation)::

    dev = parse_device("auto" | "cpu" | "cuda" | "cuda:N")   # -> torch.device, or UsageError
    r = quantize_tensor(w, spec, block_size, dev)              # -> QuantResult
    r.q, r.scale          # on ``dev``; bit-identical to scaled.quantize(w, spec, block_size)
    r.signal, r.noise     # 0-d float64 tensors on ``dev``: sum w^2, sum (w - q.float()*scale)^2
    check_finite(r.scale, file=..., tensor=...)               # QuantkitError if NaN/Inf weights

``w`` is a 2-D bf16/fp16/fp32 tensor on any device; it is moved to ``dev`` first (``non_blocking``:
pass a pinned host tensor to overlap the copy). On CUDA ``quantize_tensor`` only queues work on the
current stream and never waits for it: reading ``float(r.signal)``, ``check_finite`` or copying
``r.q`` to the host waits. Per call it allocates q, scale and a small partial-sum buffer on ``dev``.
Where a region's scale is NaN/Inf, ``q`` there is unspecified (the reference's too): call
``check_finite`` before writing ``q``.

Backends (``backend_for(dev)`` tells which one a device gets):

=========  =======================================================================================
``torch``  CPU: the chunked fast path of :mod:`quantkit.quantize` (cache-sized row chunks, no
           fp32 copy of the whole tensor). CUDA: the reference math on the GPU, whole tensor
           (with the scale divided by a device tensor: see :func:`quantize_torch`).
``native`` CPU only: :mod:`quantkit.kernels.native`, C vector code built at first use with the
           machine's C compiler (one pass per row, SQNR sums in the same loop).
``triton`` :mod:`quantkit.kernels.triton_quant` (CUDA only; one pass over the weight per format,
           SQNR sums in the same kernels).
=========  =======================================================================================

``auto`` picks ``triton`` on CUDA when Triton imports, else ``torch``; on the CPU ``native`` when it
builds, else ``torch``. The environment variable ``QUANTKIT_BACKEND=torch`` forces the torch path
everywhere (the fallback and the reference); ``QUANTKIT_BACKEND=triton`` / ``native`` demand that
backend and fail clearly where it cannot run (Triton on CPU is allowed only under
``TRITON_INTERPRET=1``, for debugging kernels). Tests call :func:`quantize_torch`,
:func:`quantize_native` and :func:`quantize_triton` directly.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch

from . import quantize as cpu_quantize
from .formats import scaled
from .errors import QuantkitError, UsageError
from .formats import SCALED, LayerOpts
from .formats.scaled import ScaledFormat

BACKEND_ENV = "QUANTKIT_BACKEND"
BACKENDS = ("auto", "torch", "native", "triton")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class QuantResult(NamedTuple):
    q: torch.Tensor  # spec.weight_dtype, shape of w
    scale: torch.Tensor  # float32, spec.scale_shape(...)
    signal: torch.Tensor  # 0-d float64: sum w^2
    noise: torch.Tensor  # 0-d float64: sum (w - dequant(q))^2, dequant = q.float() * scale in fp32

    def sqnr_db(self) -> float:
        """Weight SQNR in dB (synchronizes)."""
        return scaled.sqnr_db(float(self.signal), float(self.noise))


def parse_device(text: str) -> torch.device:
    """``auto`` (first CUDA device if there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    t = str(text).strip().lower()
    if t == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if t == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", t)
    if not m:
        raise UsageError(f"unknown device '{text}'", fix=f"use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else \
            "no CUDA device or driver is visible"
        raise UsageError(f"device '{text}' requested but CUDA is not available ({why})",
                         fix="use --device cpu (or auto), or install a CUDA build of torch")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"device '{text}' does not exist: {count} CUDA device(s) visible",
                         fix=f"use cuda:0 .. cuda:{count - 1}, or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def _requested_backend() -> str:
    v = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if v not in BACKENDS:
        raise UsageError(f"{BACKEND_ENV}='{os.environ.get(BACKEND_ENV)}' is not a backend",
                         fix=f"set it to one of: {', '.join(BACKENDS)}, or unset it")
    return v


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"{type(e).__name__}: {e}"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _native_error() -> str | None:
    from .kernels import native
    return native.available()


def backend_for(device: torch.device | str) -> str:
    """'torch', 'native' or 'triton': the backend :func:`quantize_tensor` uses on ``device``."""
    device = torch.device(device)
    want = _requested_backend()
    if want == "torch":
        return "torch"
    if want == "auto":
        if device.type == "cpu":
            return "native" if _native_error() is None else "torch"
        return "triton" if device.type == "cuda" and _triton_import_error() is None else "torch"
    if want == "native":
        if device.type != "cpu":
            raise UsageError(f"{BACKEND_ENV}=native runs on the CPU, got '{device}'",
                             fix=f"use --device cpu, or unset {BACKEND_ENV}")
        err = _native_error()
        if err is not None:
            raise QuantkitError(f"{BACKEND_ENV}=native but the CPU kernels cannot be built ({err})",
                                fix=f"install a C compiler (gcc or clang) or set CC, or unset {BACKEND_ENV}")
        return "native"
    err = _triton_import_error()
    if err is not None:
        raise QuantkitError(f"{BACKEND_ENV}=triton but Triton cannot be imported ({err})",
                            fix=f"pip install triton (the 'gpu' extra), or unset {BACKEND_ENV}")
    if device.type != "cuda" and not _interpreting():
        raise UsageError(f"{BACKEND_ENV}=triton needs a CUDA device, got '{device}'",
                         fix=f"use --device cuda, or unset {BACKEND_ENV} (TRITON_INTERPRET=1 runs kernels on CPU)")
    return "triton"


def quantize_tensor(w: torch.Tensor, spec: ScaledFormat, block_size: int,
                    device: torch.device | str | None = None) -> QuantResult:
    """Quantize one 2-D weight on ``device`` (default: w's device) with the backend it gets."""
    device = w.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if w.device != device:
        w = w.to(device, non_blocking=True)
    chosen = backend_for(device)
    if chosen == "triton":
        return quantize_triton(w, spec, block_size)
    if chosen == "native":
        return quantize_native(w, spec, block_size)
    return quantize_torch(w, spec, block_size)


def cpu_quantizer():
    """The CPU quantizer the backend choice names: ``(w, spec, block_size, out=None) -> (q, scale,
    ErrorStats)``, as :func:`quantkit.quantize.quantize_tensor` (the converter's per-layer call)."""
    if backend_for("cpu") == "native":
        from .kernels import native
        return native.quantize_tensor
    return cpu_quantize.quantize_tensor


def quantize_stored(w: torch.Tensor, spec, opts, out: torch.Tensor | None = None):
    """A format without a scaled kernel (``kernel`` None): ``(stored tensors, ErrorStats or None)``.
    On the CPU with the native backend, the format's C kernel (its ``native``: a function of
    :mod:`quantkit.kernels.native_blocks`, byte-identical to its torch ``quantize``); on CUDA with the
    Triton backend its Triton quantizer (its ``triton``: :mod:`quantkit.kernels.triton_blocks`, the same
    bytes); else that torch ``quantize`` (stats None: the caller measures them). Every format's torch
    ``quantize`` writes the same bytes on CUDA as on the CPU (tests/test_lowbit_exact.py, the GPU suite).
    ``out``: a uint8 CPU buffer of at least the stored weight's bytes that the C kernel writes the weight
    into (the caller reuses it once the weight is written); the other paths ignore it."""
    if runs_native(w, spec):
        return spec.quantize_native(w, opts, out=out)
    if runs_triton(w, spec):
        from .kernels import triton_blocks
        return triton_blocks.quantize_stored(spec.triton, w)
    return spec.quantize(w, opts), None


def runs_triton(w: torch.Tensor, spec) -> bool:
    """Whether :func:`quantize_stored` runs ``spec``'s Triton quantizer (its ``triton``, the bytes of its
    torch ``quantize``) on ``w``: a CUDA tensor where the backend choice is Triton."""
    return getattr(spec, "triton", None) is not None and w.device.type == "cuda" and backend_for(w.device) == "triton"


def runs_native(w: torch.Tensor, spec) -> bool:
    """Whether :func:`quantize_stored` runs ``spec``'s C kernel on ``w`` (those refuse NaN/Inf
    themselves, in the pass they make anyway)."""
    if getattr(spec, "native", None) is None or w.device.type != "cpu" or backend_for("cpu") != "native":
        return False
    from .kernels import native_blocks
    return native_blocks.available() is None


def quantize_torch(w: torch.Tensor, spec: ScaledFormat, block_size: int) -> QuantResult:
    """The torch path on w's device: chunked on CPU, whole-tensor reference on CUDA."""
    _check_shape(w, spec, block_size)
    if w.device.type == "cpu":
        return _cpu_result(*cpu_quantize.quantize_tensor(w, spec, block_size))
    # reference.scale_from_amax divides by a device tensor: an IEEE division on CUDA too (torch turns
    # division by a CPU scalar into a multiply by its reciprocal there), so the bits match the CPU.
    q, scale = scaled.quantize(w, spec, block_size)
    w32 = w.float()
    deq = q.float() * scaled.expand_scale(scale, tuple(w.shape), spec, block_size)
    signal = torch.dot(w32.view(-1), w32.view(-1)).double()
    d = (deq - w32).view(-1)
    return QuantResult(q, scale, signal, torch.dot(d, d).double())


def quantize_native(w: torch.Tensor, spec: ScaledFormat, block_size: int) -> QuantResult:
    """The native C kernels (CPU tensors only)."""
    _check_shape(w, spec, block_size)
    from .kernels import native
    return _cpu_result(*native.quantize_tensor(w, spec, block_size))


def _cpu_result(q: torch.Tensor, scale: torch.Tensor, stats: cpu_quantize.ErrorStats) -> QuantResult:
    return QuantResult(q, scale, torch.tensor(stats.signal, dtype=torch.float64),
                       torch.tensor(stats.noise, dtype=torch.float64))


def quantize_triton(w: torch.Tensor, spec: ScaledFormat, block_size: int) -> QuantResult:
    """The Triton kernels on w's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check_shape(w, spec, block_size)
    from .kernels import triton_quant
    return QuantResult(*triton_quant.quantize(w, spec, block_size))


def has_kernel(fmt) -> bool:
    """Whether this module's quantizers (torch chunked, native C, Triton) run format ``fmt``: the
    scaled-grid family. Other formats are quantized by their own torch ``quantize``."""
    return fmt.kernel == SCALED


def check_finite(scale: torch.Tensor, *, file: object = None, tensor: str | None = None,
                 layer: str | None = None) -> None:
    """Raise the converter's error for a weight holding NaN/Inf (its scale is not finite)."""
    if not bool(torch.isfinite(scale).all()):
        fix = "repair the checkpoint" + (f", or keep the layer with --exclude '^{layer}$'" if layer else "")
        raise QuantkitError("weight holds NaN or Inf values, which cannot be quantized", file=file,
                            tensor=tensor, fix=fix)


def _check_shape(w: torch.Tensor, spec: ScaledFormat, block_size: int) -> None:
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QuantkitError(f"cannot quantize a {str(w.dtype).removeprefix('torch.')} weight",
                            fix="only bf16, fp16 and fp32 weights are quantized; keep this tensor")
    why = spec.cannot_take(tuple(w.shape), LayerOpts(block_size))
    if why is None and w.numel() == 0:
        why = "empty weight"
    if why is not None:
        raise QuantkitError(f"cannot store as {spec.name}: {why}", fix="keep this tensor or choose another format")


__all__ = ["QuantResult", "parse_device", "backend_for", "quantize_tensor", "quantize_torch",
           "quantize_native", "quantize_triton", "cpu_quantizer", "check_finite", "has_kernel", "runs_triton",
           "BACKEND_ENV"]
