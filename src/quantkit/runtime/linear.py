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
INT8 block          dynamic per-token, per-group INT8 (Triton) + the        the torch reference W8A8
                    Triton W8A8 block kernel                               (``_int_mm`` per group)
==================  =====================================================  ===========================

"Dequantize" means ``F.linear(x, W.dequantize(x.dtype), bias)``: exactly ComfyUI's result.
W8A8 paths also quantize the activations, so they differ from it by that rounding (measured on a
real model in DEVELOPMENT.md). ``mixed_precision_ops(full_precision_mm=True)`` always dequantizes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..formats import FORMATS
from . import activations
from .tensor import QuantizedTensor, register_layout_op

aten = torch.ops.aten


def supports_fp8_compute(device: torch.device | str | None = None) -> bool:
    """True where ``torch._scaled_mm`` runs FP8 on tensor cores: a CUDA device of sm >= 8.9."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index) if torch.cuda.is_available() else (0, 0)


@functools.cache
def _triton():
    from . import triton_w8a8
    return triton_w8a8


def dequantized_linear(x, w, bias):
    x = x.dequantize() if isinstance(x, QuantizedTensor) else x
    return F.linear(x, w.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


def _unpack(args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(bias, QuantizedTensor):
        bias = bias.dequantize()
    return x, w, bias


def _weight_ok(x, w) -> bool:
    """The fast paths take a plain float input and a [N, K] row-major quantized weight."""
    return (isinstance(w, QuantizedTensor) and w._qdata.is_contiguous()
            and tuple(w._qdata.shape) == tuple(w.params.orig_shape) and x.shape[-1] == w.shape[1]
            and x.device == w.device and x.numel() > 0)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


@register_layout_op(aten.linear.default, "TensorCoreFP8E4M3Layout")
def fp8_linear(func, args, kwargs):
    x, w, bias = _unpack(args, kwargs)
    if not (_weight_ok(x, w) and supports_fp8_compute(x.device) and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0):
        return dequantized_linear(x, w, bias)
    wq, ws = w._qdata, w.params.scale
    if isinstance(x, QuantizedTensor):  # static input scale: per-tensor scaled_mm
        out_dtype = x.params.orig_dtype
        y = torch._scaled_mm(_flat(x._qdata), wq.t(), scale_a=x.params.scale.float(), scale_b=ws.float(),
                             bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
        return y.reshape(*x.shape[:-1], w.shape[0])
    out_dtype = x.dtype
    xq, xs = _triton().quantize_activations(_flat(x), torch.float8_e4m3fn, x.shape[-1])
    ws_row = ws.float().reshape(1, 1).expand(1, w.shape[0]).contiguous()
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws_row,
                         bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return y.to(out_dtype).reshape(*x.shape[:-1], w.shape[0])


@register_layout_op(aten.linear.default, "TensorWiseINT8Layout")
def int8_linear(func, args, kwargs):
    x, w, bias = _unpack(args, kwargs)
    if isinstance(x, QuantizedTensor) or not _weight_ok(x, w):
        return dequantized_linear(x, w, bias)
    n, k = w.shape
    x2 = _flat(x)
    if x.device.type == "cuda":
        t = _triton()
        xq, xs = t.quantize_activations(x2, torch.int8, k)
        y = t.w8a8_row_matmul(xq, xs, w._qdata, w.params.scale, bias, x.dtype)
    else:
        xq, xs = activations.quantize_activations(x2, FORMATS["int8-row"], k)
        y = activations.w8a8_row_matmul(xq, xs, w._qdata, w.params.scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


@register_layout_op(aten.linear.default, "BlockWiseINT8Layout")
def int8_block_linear(func, args, kwargs):
    x, w, bias = _unpack(args, kwargs)
    if isinstance(x, QuantizedTensor) or not _weight_ok(x, w):
        return dequantized_linear(x, w, bias)
    n, k = w.shape
    b = w.params.block_size
    x2 = _flat(x)
    if x.device.type == "cuda":
        t = _triton()
        xq, xs = t.quantize_activations(x2, torch.int8, b)
        y = t.w8a8_block_matmul(xq, xs, w._qdata, w.params.scale, b, bias, x.dtype)
    else:
        xq, xs = activations.quantize_activations(x2, FORMATS["int8-block"], b)
        y = activations.w8a8_block_matmul(xq, xs, w._qdata, w.params.scale, b, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


@register_layout_op(aten.linear.default, "TensorCoreFP8E5M2Layout")
def fp8_e5m2_linear(func, args, kwargs):
    x, w, bias = _unpack(args, kwargs)
    return dequantized_linear(x, w, bias)


