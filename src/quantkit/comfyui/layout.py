"""``int8_blockwise`` as a comfy-kitchen layout, so ComfyUI can hold it in a ``QuantizedTensor``.

Comfy-kitchen has no block-wise INT8 layout; this one is registered under :data:`LAYOUT_NAME` (a
name of our own, so a layout another node registered as ``BlockWiseINT8Layout`` is never
replaced). The numbers are quantkit's: ``quantize`` is :func:`quantkit.reference.quantize` and
``dequantize`` is :func:`quantkit.reference.dequantize`, the contract formula
``q.view(N/b,b,K/b,b).permute(0,2,1,3).to(D) * scale[..., None, None]``.

``F.linear(x, W)`` with such a ``W``:

=====================================  ===================================================
where                                  what runs
=====================================  ===================================================
CUDA (sm >= 8.0), triton and          W8A8: activations quantized per token and per group
quantkit's runtime kernel importable   of b columns, then the Triton block-scaled int8 GEMM
                                       (``quantkit.runtime.triton_w8a8``)
anywhere else (CPU, no triton,         ``F.linear(x, dequantize(W, x.dtype), bias)``: exactly
``QUANTKIT_NODE_FAST=0``)              what ComfyUI computes for a dequantized layer
=====================================  ===================================================

ComfyUI calls ``F.linear`` under ``torch.inference_mode`` (one ``aten.linear`` call); with autograd
on, torch decomposes it into ``t`` then ``mm``/``addmm``, which are handled too (the transpose is a
flag, as in comfy-kitchen's INT8 layout).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import (BaseLayoutParams, QuantizedLayout, QuantizedTensor, dequantize_args,
                                  register_layout_op)

from ..formats import scaled
from ..formats import DEFAULT_BLOCK_SIZE, FORMATS, LayerOpts

log = logging.getLogger("quantkit.comfyui")

# the registered format this layout holds: the one the runtime's block-wise INT8 layout holds
SPEC = next(f for f in FORMATS.values() if f.runtime_layout == "BlockWiseINT8Layout")
COMFY_FORMAT = SPEC.comfy_format
LAYOUT_NAME = "QuantkitBlockINT8Layout"
FAST_ENV = "QUANTKIT_NODE_FAST"  # "0" forces the dequantize path everywhere

aten = torch.ops.aten


class BlockINT8Layout(QuantizedLayout):
    """INT8 weight ``[N, K]`` with one fp32 scale per ``b x b`` tile, ``scale`` ``[N/b, K/b]``."""

    @dataclass(frozen=True)
    class Params(BaseLayoutParams):
        block_size: int = DEFAULT_BLOCK_SIZE
        transposed: bool = False  # logical W^T after aten.t; storage stays [N, K]

        def _tensor_fields(self) -> list[str]:
            return ["scale"]

    @classmethod
    def quantize(cls, tensor: torch.Tensor, scale=None, block_size: int | None = None,
                 stochastic_rounding=0, inplace_ops: bool = False, **kwargs):
        """Round-to-nearest, bit-identical to ``quantkit convert --format int8-block``.

        ``scale``: None or ``"recalculate"`` computes the tile scales (what ComfyUI asks for when it
        re-quantizes a LoRA-patched weight); a ``[N/b, K/b]`` tensor is used as given.
        ``stochastic_rounding`` and ``inplace_ops`` are accepted for ComfyUI's ``set_weight`` call
        and ignored: quantkit rounds to nearest-even.
        """
        b = int(block_size or DEFAULT_BLOCK_SIZE)
        why = SPEC.cannot_take(tuple(tensor.shape), LayerOpts(b))
        if why:
            raise ValueError(f"{LAYOUT_NAME}: cannot quantize a tensor of shape {tuple(tensor.shape)}: {why}")
        if scale is None or isinstance(scale, str):
            q, s = scaled.quantize(tensor, SPEC, b)
        else:
            s = scale.to(device=tensor.device, dtype=torch.float32)
            q = scaled.quantize_with_scale(tensor, s, SPEC, b)
        return q, cls.Params(scale=s, orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape), block_size=b)

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: Params) -> torch.Tensor:
        """The ``[N, K]`` weight in ``params.orig_dtype`` (the storage orientation, even when
        ``transposed``: ``QuantizedTensor.dequantize`` applies the flag)."""
        return scaled.dequantize(qdata, params.scale, SPEC, params.block_size, params.orig_dtype)

    @classmethod
    def get_plain_tensors(cls, qtensor: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qtensor._qdata, qtensor._params.scale

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
        return {"": qdata, "_scale": params.scale}

    @classmethod
    def requantize_kwargs(cls, qtensor: QuantizedTensor) -> dict:
        return {"block_size": qtensor._params.block_size}

    @classmethod
    def supports_fast_matmul(cls) -> bool:
        return torch.cuda.is_available() and fast_kernels() is not None


def make_tensor(qdata: torch.Tensor, scale: torch.Tensor, block_size: int,
                orig_dtype: torch.dtype = torch.float32) -> QuantizedTensor:
    """A ``QuantizedTensor`` of this layout from a quantkit file's ``weight`` / ``weight_scale``."""
    n, k = qdata.shape
    params = BlockINT8Layout.Params(scale=scale.to(torch.float32), orig_dtype=orig_dtype, orig_shape=(n, k),
                                    block_size=int(block_size))
    return QuantizedTensor(qdata, LAYOUT_NAME, params)


# ---- the fast path ---------------------------------------------------------------------------------

@functools.cache
def fast_kernels():
    """quantkit's Triton W8A8 module, or None where triton or the runtime is missing."""
    try:
        from ..runtime import triton_w8a8
    except Exception as e:  # ImportError, or triton failing to initialise
        log.info("quantkit: %s runs dequantized (Triton W8A8 kernel unavailable: %s)", COMFY_FORMAT, e)
        return None
    return triton_w8a8


MIN_CAPABILITY = (8, 0)  # Triton's int8 tensor-core dot
_fast_failed: list[str] = []  # set once the kernel has failed on this machine: dequantize from then on


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _fast_enabled(x: torch.Tensor) -> bool:
    if not x.is_cuda or os.environ.get(FAST_ENV, "1") == "0" or _fast_failed:
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _capability(index) >= MIN_CAPABILITY and fast_kernels() is not None


def fast_linear(x2: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 ``x2 @ W^T + bias`` for 2-D ``x2`` with the runtime's Triton kernels (CUDA, or CPU under
    ``TRITON_INTERPRET=1``)."""
    t = fast_kernels()
    b = w._params.block_size
    xq, xs = t.quantize_activations(x2, torch.int8, b)
    return t.w8a8_block_matmul(xq, xs, w._qdata.contiguous(), w._params.scale.contiguous(), b,
                               None if bias is None else bias.contiguous(), x2.dtype)


def block_linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a weight of this layout in ``[N, K]`` orientation."""
    if isinstance(x, QuantizedTensor):
        x = x.dequantize()
    if isinstance(bias, QuantizedTensor):
        bias = bias.dequantize()
    if bias is not None:
        bias = bias.to(x.dtype)
    n, k = w._qdata.shape
    if _fast_enabled(x) and w._qdata.is_cuda and x.shape[-1] == k and x.numel() > 0:
        try:
            y = fast_linear(x.reshape(-1, k), w, bias)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # a kernel that does not build or run here: never refuse the layer
            _fast_failed.append(repr(e))
            log.warning("quantkit: %s Triton kernel failed (%r); dequantizing from now on", COMFY_FORMAT, e)
        else:
            return y.reshape(*x.shape[:-1], n)
    deq = scaled.dequantize(w._qdata, w._params.scale, SPEC, w._params.block_size, x.dtype)
    return F.linear(x, deq, bias)


def _ours(t) -> bool:
    return isinstance(t, QuantizedTensor) and t._layout_cls == LAYOUT_NAME


@register_layout_op(aten.linear.default, BlockINT8Layout)
def _linear(qt, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not _ours(w) or w._params.transposed:
        return F.linear(*dequantize_args(args), **dequantize_args(kwargs))
    return block_linear(x, w, bias)


@register_layout_op(aten.t.default, BlockINT8Layout)
def _transpose(qt, args, kwargs):
    w = args[0]
    p = w._params
    params = dataclasses.replace(p, orig_shape=(p.orig_shape[1], p.orig_shape[0]), transposed=not p.transposed)
    return QuantizedTensor(w._qdata, LAYOUT_NAME, params)


def _untransposed(w: QuantizedTensor) -> QuantizedTensor:
    p = w._params
    return QuantizedTensor(w._qdata, LAYOUT_NAME, dataclasses.replace(p, orig_shape=tuple(w._qdata.shape),
                                                                        transposed=False))


@register_layout_op(aten.mm.default, BlockINT8Layout)
def _mm(qt, args, kwargs):
    x, wt = args[0], args[1]
    if kwargs or not _ours(wt) or not wt._params.transposed or _ours(x):
        return torch.mm(*dequantize_args(args), **dequantize_args(kwargs))
    return block_linear(x, _untransposed(wt), None)


@register_layout_op(aten.addmm.default, BlockINT8Layout)
def _addmm(qt, args, kwargs):
    bias, x, wt = args[0], args[1], args[2]
    plain = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and len(args) == 3
    if not plain or not _ours(wt) or not wt._params.transposed or _ours(x) or bias.dim() != 1:
        return torch.addmm(*dequantize_args(args), **dequantize_args(kwargs))
    return block_linear(x, _untransposed(wt), bias)
