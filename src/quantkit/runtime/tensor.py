"""``QuantizedTensor``: a torch.Tensor subclass holding quantized data, and its op dispatch.

It looks like a float tensor of the original shape and dtype; underneath it keeps ``_qdata`` (the
stored fp8/int8 tensor), ``_layout_type`` (a registered layout name) and ``_layout_params``
(:class:`~quantkit.runtime.layouts.LayoutParams`: scale, orig_dtype, orig_shape, block size, and for
the formats without a scaled kernel their other stored tensors and marker).

Dispatch, in order, for every op that sees a QuantizedTensor:

1. ``F.linear`` is caught in ``__torch_function__`` (before autograd decomposes it into ``t`` and
   ``addmm``) and sent to the handler registered for ``aten.linear.default`` and the layout.
2. In ``__torch_dispatch__``: the layout-agnostic handlers below (detach, clone, device/dtype moves,
   ``t``/``transpose``), then handlers registered with :func:`register_layout_op` for the layout
   (searched along the layout class's MRO).
3. Anything else runs on dequantized arguments (correct, not fast).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layouts import LayoutParams, QuantizedLayout, get_layout_class

aten = torch.ops.aten
Handler = Callable[[object, tuple, dict], object]  # (func, args, kwargs) -> result

_LAYOUT_OPS: dict[object, dict[type[QuantizedLayout], Handler]] = {}
_GENERIC_OPS: dict[object, Handler] = {}


def register_layout_op(torch_op, layout_type: str | type[QuantizedLayout]):
    """Decorator: ``@register_layout_op(torch.ops.aten.linear.default, "TensorCoreFP8E4M3Layout")``
    registers ``handler(func, args, kwargs)`` for that op on tensors of that layout (and of layouts
    subclassing it). A later registration for the same op and layout replaces the earlier one."""
    cls = get_layout_class(layout_type)

    def decorator(handler: Handler) -> Handler:
        _LAYOUT_OPS.setdefault(torch_op, {})[cls] = handler
        return handler
    return decorator


class QuantizedTensor(torch.Tensor):
    _qdata: torch.Tensor
    _layout_type: str
    _layout_params: LayoutParams

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, layout_type: str, params: LayoutParams):
        return torch.Tensor._make_wrapper_subclass(cls, params.orig_shape, dtype=params.orig_dtype,
                                                   device=qdata.device, requires_grad=False)

    def __init__(self, qdata: torch.Tensor, layout_type: str, params: LayoutParams) -> None:
        get_layout_class(layout_type)  # fail early on an unknown name
        self._qdata = qdata
        self._layout_type = layout_type
        self._layout_params = params

    # ---- construction and inspection ----
    @classmethod
    def from_float(cls, tensor: torch.Tensor, layout_type: str, **kwargs) -> QuantizedTensor:
        """Quantize ``tensor`` with the layout's math (``block_size=``, ``per_channel=`` as the
        layout takes)."""
        qdata, params = get_layout_class(layout_type).quantize(tensor, **kwargs)
        return cls(qdata, layout_type, params)

    @property
    def layout_cls(self) -> type[QuantizedLayout]:
        return get_layout_class(self._layout_type)

    @property
    def params(self) -> LayoutParams:
        return self._layout_params

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor (in ``dtype``, default the original dtype), as ComfyUI computes it."""
        return self.layout_cls.dequantize(self._qdata, self._layout_params, dtype)

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        return {prefix + k: v for k, v in self.layout_cls.state_dict_tensors(self._qdata, self._layout_params).items()}

    def _with(self, qdata: torch.Tensor, **param_changes) -> QuantizedTensor:
        return QuantizedTensor(qdata, self._layout_type, self._layout_params.replace(**param_changes))

    def __repr__(self) -> str:  # noqa: D105
        p = self._layout_params
        return (f"QuantizedTensor(shape={tuple(self.shape)}, layout={self._layout_type}, "
                f"storage={self._qdata.dtype}, scale_shape={tuple(p.scale.shape)}, dtype={p.orig_dtype}, "
                f"device={self._qdata.device})")

    # Being a "traceable wrapper subclass" makes nn.Module.to()/.cuda() swap whole parameter
    # objects (torch.utils.swap_tensors) instead of assigning .data, which would leave _qdata behind.
    def __tensor_flatten__(self):
        return ["_qdata"], (self._layout_type, self._layout_params)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return QuantizedTensor(inner["_qdata"], ctx[0], ctx[1])

    # ---- dispatch ----
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            handler = _layout_handler(aten.linear.default, args, kwargs)
            if handler is not None:
                return handler(aten.linear.default, args, kwargs)
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _GENERIC_OPS.get(func)
        if handler is None:
            handler = _layout_handler(func, args, kwargs)
        if handler is not None:
            return handler(func, args, kwargs)
        return func(*dequantize_args(args), **dequantize_args(kwargs))


def _first_quantized(args) -> QuantizedTensor | None:
    for a in args:
        if isinstance(a, QuantizedTensor):
            return a
        if isinstance(a, (list, tuple)):
            found = _first_quantized(a)
            if found is not None:
                return found
    return None


def _layout_handler(func, args, kwargs) -> Handler | None:
    table = _LAYOUT_OPS.get(func)
    if not table:
        return None
    qt = _first_quantized(args)
    if qt is None:
        qt = _first_quantized(tuple(kwargs.values()))
    if qt is None:
        return None
    for c in qt.layout_cls.__mro__:
        if c in table:
            return table[c]
    return None


def dequantize_args(x):
    """``x`` with every QuantizedTensor inside (lists, tuples, dicts) dequantized."""
    if isinstance(x, QuantizedTensor):
        return x.dequantize()
    if isinstance(x, dict):
        return {k: dequantize_args(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(dequantize_args(v) for v in x)
    return x


# ---- layout-agnostic handlers ----

def _generic(*ops):
    def decorator(fn: Handler) -> Handler:
        for op in ops:
            _GENERIC_OPS[op] = fn
        return fn
    return decorator


@_generic(aten.detach.default, aten.alias.default)
def _detach(func, args, kwargs):
    qt = args[0]
    return qt._with(func(qt._qdata))


@_generic(aten.clone.default)
def _clone(func, args, kwargs):
    qt = args[0]
    p = qt.params.moved(lambda t: t.clone())
    return qt._with(qt._qdata.clone(), scale=p.scale, tensors=p.tensors)


@_generic(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """``.to(device)`` moves qdata and scale; ``.to(float dtype)`` changes the dtype it dequantizes to."""
    qt = args[0]
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        return func(qt.dequantize(), **kwargs)
    nb = kwargs.get("non_blocking", False)
    qdata = qt._qdata if device is None else qt._qdata.to(device, non_blocking=nb)
    p = qt.params if device is None else qt.params.moved(lambda t: t.to(device, non_blocking=nb))
    return qt._with(qdata, scale=p.scale, tensors=p.tensors, orig_dtype=dtype or qt.params.orig_dtype)


@_generic(aten.t.default, aten.transpose.int)
def _transpose(func, args, kwargs):
    """A 2-D transpose is a view of qdata and of the scale grid; the dequantize math is unchanged."""
    qt = args[0]
    if qt.dim() != 2 or (func is aten.transpose.int and sorted(d % 2 for d in args[1:3]) != [0, 1]) \
            or qt.layout_cls.spec_for(qt.params).kernel is None:  # padded / rotated storage: no view of it
        return func(*dequantize_args(args), **kwargs)
    p = qt.params
    scale = p.scale.t() if p.scale.dim() == 2 else p.scale
    return qt._with(qt._qdata.t(), scale=scale, orig_shape=tuple(reversed(p.orig_shape)))
