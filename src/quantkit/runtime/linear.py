"""``F.linear`` on a QuantizedTensor weight: one handler per layout, registered with
:func:`register_layout_op` for ``aten.linear.default``.

==================  =====================================================  ===========================
layout              CUDA                                                   CPU
==================  =====================================================  ===========================
FP8 E4M3            ``torch._scaled_mm`` (sm >= 89): input per-tensor if   dequantize
                    it is an FP8 QuantizedTensor (static ``input_scale``),
                    else dynamic per-token FP8 (Triton), row-wise scales
FP8 E5M2            dequantize                                             dequantize
INT8 tensor / row   dynamic per-token INT8 (Triton) + the Triton W8A8      the torch reference W8A8
                    kernel (int32 accumulation, scales in the epilogue)    (``torch._int_mm``)
INT8 convrot        dequantize                                             dequantize
MXFP8, NVFP4        dequantize                                             dequantize
W4A8 (4-bit), AWQ   up to a token count per format (:data:`W4_TRITON_MAX_M`,  dequantize
W4A16               measured): the fused Triton GEMMs of
                    :mod:`.triton_w4` (awq4: the same math; w4a8:
                    comfy-kitchen's, INT8 activations)
W4A8 6-bit, INT4    dequantize                                             dequantize
ConvRot
INT8 block          dynamic per-token, per-group INT8 (Triton) + the        the torch reference W8A8
                    Triton W8A8 block kernel (sm_90: or the Gluon one,     (``_int_mm`` per group)
                    whichever timed faster for the shape)
==================  =====================================================  ===========================

"Dequantize" means ``F.linear(x, W.dequantize(x.dtype), bias)``: exactly ComfyUI's result.
The 4-bit Triton kernels run only where :data:`W4_TRITON_MAX_M` (or ``QUANTKIT_W4_TRITON``) says,
because they are faster than dequantize + bf16 only for some shapes (benchmarks/bench_w4_linear.py).
W8A8 paths also quantize the activations, so they differ from it by that rounding (measured on a
real model in DEVELOPMENT.md). ``mixed_precision_ops(full_precision_mm=True)`` always dequantizes.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..errors import QuantkitError
from ..formats import scaled
from ..formats.scaled import grid
from . import activations
from .layouts import StoredLayout
from .tensor import QuantizedTensor, register_layout_op

aten = torch.ops.aten


def supports_fp8_compute(device: torch.device | str | None = None) -> bool:
    """True where ``torch._scaled_mm`` runs FP8 on tensor cores: a CUDA device of sm >= 8.9."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return False
    return device_capability(device) >= (8, 9)


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, looked up once per device; (0, 0) without CUDA."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index) if torch.cuda.is_available() else (0, 0)


@functools.cache
def _triton():
    from . import triton_w8a8
    return triton_w8a8


@functools.cache
def _triton_w4():
    from . import triton_w4
    return triton_w4


# The fused 4-bit kernels (:mod:`.triton_w4`) run on CUDA (sm >= 8.0) for a layer of format awq4 /
# w4a8 when the flattened token count M (x's elements / K) is at most this; 0: never. The defaults
# are the largest M of benchmarks/bench_w4_linear.py (M 1 / 16 / 256 / 4096 on Flux's 3072x3072,
# 12288x3072, 3072x12288, bf16) at which, for every shape, the kernel beat dequantize + cuBLAS bf16 on
# an H200: awq4 at all of them (1.19-6.4x), w4a8 up to 256 (1.14-7.2x; at 4096 it is 4-6x slower).
# Note that w4a8 through the kernel computes comfy-kitchen's numbers (activations rotated and
# INT8-quantized per token, as kitchen's own w4a8 linear), not dequantize + F.linear's.
# ``QUANTKIT_W4_TRITON`` replaces it at import: "awq4=64,w4a8=16" (per format), "1" (every M, both
# formats) or "0" (never); the table may also be changed at run time.
W4_TRITON_MAX_M: dict[str, int] = {"awq4": 4096, "w4a8": 256}
_W4_ENV = "QUANTKIT_W4_TRITON"
_NO_LIMIT = 1 << 62


def parse_w4_setting(text: str) -> dict[str, int]:
    """``QUANTKIT_W4_TRITON``'s value as a :data:`W4_TRITON_MAX_M` table."""
    text = text.strip()
    if text in ("", "0"):
        return {k: 0 for k in W4_TRITON_MAX_M}
    if text == "1":
        return {k: _NO_LIMIT for k in W4_TRITON_MAX_M}
    out = {k: 0 for k in W4_TRITON_MAX_M}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in out or not value.strip().isdigit():
            raise QuantkitError(f"{_W4_ENV}={text!r}: cannot read {part.strip()!r}",
                                fix=f"set {_W4_ENV} to 0, 1 or e.g. awq4=64,w4a8=16 (format=max tokens)")
        out[name] = int(value)
    return out


if os.environ.get(_W4_ENV) is not None:
    W4_TRITON_MAX_M.update(parse_w4_setting(os.environ[_W4_ENV]))


def quantize_input_static(x: torch.Tensor, scale: torch.Tensor, spec) -> torch.Tensor:
    """An activation quantized with one static scale (a layer's ``input_scale``): the Triton kernel
    on CUDA, the reference elsewhere; the same bits."""
    if x.is_cuda and not spec.is_int:
        return _triton().quantize_static(x, scale, spec.weight_dtype)
    return scaled.quantize_with_scale(x, scale, spec, 0)


def dequantized_linear(x, w, bias):
    x = x.dequantize() if isinstance(x, QuantizedTensor) else x
    # .to: awq4's dequantize in fp16 computes (and returns) fp32, torch's promotion of fp16 and bf16
    return F.linear(x, w.dequantize(x.dtype).to(x.dtype), None if bias is None else bias.to(x.dtype))


def _unpack(args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(bias, QuantizedTensor):
        bias = bias.dequantize()
    return x, w, bias


def _weight_ok(x, w) -> bool:
    """The fast paths take a plain float input and a [N, K] row-major quantized weight. (Shape and
    device are read from ``_qdata``/``params``: on the QuantizedTensor itself each property access
    would go through ``__torch_function__``.)"""
    q = w._qdata
    return (q.is_contiguous() and q.dim() == 2 and tuple(q.shape) == tuple(w._layout_params.orig_shape)
            and x.shape[-1] == q.shape[1] and x.device == q.device and x.numel() > 0)


# fp8 GEMMs use the fast (not periodically promoted) fp8 accumulation of torch._scaled_mm; the
# error it adds is measured in benchmarks/bench_linear.py (rel_err) and DEVELOPMENT.md.
FP8_FAST_ACCUM = True


def _fp8_weight_scale_row(w) -> torch.Tensor:
    """The weight's per-tensor scale as the ``[1, N]`` fp32 row ``_scaled_mm``'s row-wise mode
    takes, built once per QuantizedTensor (tensors are immutable here: new scale, new tensor)."""
    scale = w._layout_params.scale
    cached = w.__dict__.get("_fp8_scale_row")
    if cached is not None and cached[0] is scale:
        return cached[1]
    row = scale.float().reshape(1, 1).expand(1, w._qdata.shape[0]).contiguous()
    w.__dict__["_fp8_scale_row"] = (scale, row)
    return row


def _flat(x):
    return x.reshape(-1, x.shape[-1])


@register_layout_op(aten.linear.default, "TensorCoreFP8E4M3Layout")
def fp8_linear(func, args, kwargs):
    x, w, bias = _unpack(args, kwargs)
    wq = w._qdata
    if not (_weight_ok(x, w) and supports_fp8_compute(x.device) and wq.shape[0] % 16 == 0
            and wq.shape[1] % 16 == 0):
        return dequantized_linear(x, w, bias)
    n = wq.shape[0]
    ws = w._layout_params.scale
    if isinstance(x, QuantizedTensor):  # static input scale: per-tensor scaled_mm
        out_dtype = x.params.orig_dtype
        y = torch._scaled_mm(_flat(x._qdata), wq.t(), scale_a=x.params.scale.float(), scale_b=ws.float(),
                             bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                             use_fast_accum=FP8_FAST_ACCUM)
        return y.reshape(*x.shape[:-1], n)
    out_dtype = x.dtype
    xq, xs = _triton().quantize_activations(_flat(x), torch.float8_e4m3fn, x.shape[-1])
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=_fp8_weight_scale_row(w),
                         bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                         use_fast_accum=FP8_FAST_ACCUM)
    if out_dtype != torch.bfloat16:
        y = y.to(out_dtype)
    return y.reshape(*x.shape[:-1], n)


def _int8_w8a8(x, w, bias, block: int):
    """W8A8 for an INT8 weight: activations quantized per token (in groups of ``block`` columns for
    int8-block, ``block`` 0 for one scale per row), then the Triton kernel on CUDA or the torch
    reference elsewhere."""
    n, k = w._qdata.shape
    group = block or k
    x2 = _flat(x)
    if x.device.type == "cuda":
        mod = _triton()
        xq, xs = mod.quantize_activations(x2, torch.int8, group)
    else:
        mod = activations
        xq, xs = mod.quantize_activations(x2, grid("I8"), group)
    if block:
        y = mod.w8a8_block_matmul(xq, xs, w._qdata, w._layout_params.scale, block, bias, x.dtype)
    else:
        y = mod.w8a8_row_matmul(xq, xs, w._qdata, w._layout_params.scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


@register_layout_op(aten.linear.default, "TensorWiseINT8Layout")
def int8_linear(func, args, kwargs):
    x, w, bias = _unpack(args, kwargs)
    if isinstance(x, QuantizedTensor) or not _weight_ok(x, w) or w.layout_cls.spec_for(w._layout_params).kernel is None:
        return dequantized_linear(x, w, bias)  # int8-convrot: dequantize (rotation included) + matmul
    return _int8_w8a8(x, w, bias, 0)


@register_layout_op(aten.linear.default, "BlockWiseINT8Layout")
def int8_block_linear(func, args, kwargs):
    x, w, bias = _unpack(args, kwargs)
    if isinstance(x, QuantizedTensor) or not _weight_ok(x, w):
        return dequantized_linear(x, w, bias)
    return _int8_w8a8(x, w, bias, w._layout_params.block_size)


_W4_LAYOUTS = ("TensorCoreAWQW4A16Layout", "AsymW4A8Int8Layout")


def _w4_kernel_linear(x, w, bias):
    """The fused 4-bit Triton GEMM where it is switched on (:data:`W4_TRITON_MAX_M`) and the layer
    fits its contract; None otherwise (the caller dequantizes)."""
    if (w._layout_type not in _W4_LAYOUTS or isinstance(x, QuantizedTensor) or not x.is_cuda
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.numel() == 0):
        return None
    q, p = w._qdata, w._layout_params
    if not (q.dim() == 2 and q.dtype == torch.int8 and q.device == x.device and x.shape[-1] == 2 * q.shape[1]
            and len(p.orig_shape) == 2 and p.orig_shape[1] == x.shape[-1] and p.marker is not None):
        return None
    name = w.__dict__.get("_w4_format")  # looked up once per tensor (the marker is immutable here)
    if name is None:
        name = w.__dict__["_w4_format"] = w.layout_cls.spec_for(p, q).name
    m = x.numel() // x.shape[-1]
    if m > W4_TRITON_MAX_M.get(name, 0) or device_capability(x.device) < (8, 0):
        return None
    k = x.shape[-1]
    t = p.tensors or {}
    b = None if bias is None else bias.to(x.dtype).contiguous()
    if name == "awq4":
        g = p.marker.get("group_size", 64)
        z = t.get("weight_zeros")
        if g not in (32, 64, 128) or k % g or z is None or tuple(p.scale.shape) != (k // g, q.shape[0]):
            return None
        return _triton_w4().awq4_linear(x, q, p.scale, z, b, g)
    from ..formats import _lowbit
    g = p.marker.get("group_size", 16)
    cr = p.marker.get("convrot_groupsize", _lowbit.DEFAULT_CONVROT)
    sc, cb = t.get("weight_s_channel"), t.get("weight_codebook")
    if (not isinstance(g, int) or g < 2 or g % 2 or k % g or cr not in (16, 64, 256) or k % cr or sc is None
            or tuple(p.scale.shape) != (q.shape[0], k // g) or p.scale.dtype not in (torch.float8_e4m3fn, torch.uint8)):
        return None
    return _triton_w4().w4a8_linear(x, q, p.scale, sc, cb, b, g, cr)


@register_layout_op(aten.linear.default, StoredLayout)
def stored_linear(func, args, kwargs):
    """mxfp8, nvfp4, w4a8 / w4a8-6bit, int4-convrot, awq4 (and int8-convrot through its INT8 layout):
    dequantize + matmul on every device, exactly ComfyUI's numbers where it dequantizes too; awq4
    and 4-bit w4a8 on CUDA: the fused Triton GEMM where :data:`W4_TRITON_MAX_M` switches it on."""
    x, w, bias = _unpack(args, kwargs)
    y = _w4_kernel_linear(x, w, bias)
    return dequantized_linear(x, w, bias) if y is None else y


@register_layout_op(aten.linear.default, "TensorCoreFP8E5M2Layout")
def fp8_e5m2_linear(func, args, kwargs):
    x, w, bias = _unpack(args, kwargs)
    return dequantized_linear(x, w, bias)


