"""Teach a running ComfyUI the formats quantkit writes that it lacks (today: ``int8_blockwise``).

Three steps, each checked before anything is changed, each idempotent:

1. the layout class goes into comfy-kitchen's layout registry (the one ``comfy.quant_ops``
   re-exports as ``register_layout_class`` / ``get_layout_class``) under :data:`LAYOUT_NAME`,
   unless that name is taken by another class;
2. ``comfy.quant_ops.QUANT_ALGOS["int8_blockwise"]`` is added -- unless ComfyUI (or another node)
   already defines the format, in which case its definition is left alone and used;
3. ``comfy.ops._load_quantized_module`` is wrapped: a layer whose ``.comfy_quant`` format maps to
   our layout is read by :func:`.loader.load_layer`; every other call goes to ComfyUI's function
   unchanged. ComfyUI's stock loader picks scale tensors per format with an if/elif and raises
   ``Unsupported quantization format`` for any other name, so step 2 alone would not load a file.

If ComfyUI's function is missing or its signature differs from the one this was written against
(ComfyUI 0.38, ``comfy/ops.py``), nothing is changed and one error line is logged: stock formats
keep loading, ``int8_blockwise`` files fail as they do in stock ComfyUI.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field

from ..formats import decode_comfy_quant
from ..runtime.layouts import QUANT_ALGOS
from .layout import COMFY_FORMAT, LAYOUT_NAME, BlockINT8Layout
from .loader import load_layer

log = logging.getLogger("quantkit.comfyui")

LOADER_NAME = "_load_quantized_module"
LOADER_PARAMS = ("module", "super_load", "state_dict", "prefix", "local_metadata", "strict", "missing_keys",
                 "unexpected_keys", "error_msgs", "load_extra_params")
WRAPPED_MARK = "__quantkit_original__"

QUANT_ALGO_ENTRY = {
    **QUANT_ALGOS[COMFY_FORMAT],  # storage_t, parameters, group_size (informational: each layer's own decides)
    "comfy_tensor_layout": LAYOUT_NAME,
    # ComfyUI must not quantize activations with a static input_scale before calling F.linear: the
    # layout's linear handler quantizes them per token itself (W8A8) or dequantizes the weight.
    "quantize_input": False,
}


@dataclass
class Registration:
    """What :func:`register` found and did; ``ok`` means int8_blockwise files load."""

    ok: bool = False
    layout: str = ""  # "added", "present", or why not
    quant_algos: str = ""  # "added", "present", "comfyui" (defined by someone else: left alone), or why not
    loader: str = ""  # "wrapped", "present", or why not
    messages: list[str] = field(default_factory=list)


def _import(name: str):
    return importlib.import_module(name)


def loader_signature_ok(fn) -> bool:
    try:
        params = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return params == LOADER_PARAMS


def _parse_conf(t) -> dict | None:
    try:
        return decode_comfy_quant(t.detach().cpu().numpy().tobytes())
    except Exception:  # anything unreadable is left to ComfyUI's own loader
        return None


def make_wrapper(original, quant_algos: dict):
    """The replacement for ``comfy.ops._load_quantized_module``: our formats to
    :func:`load_layer`, everything else (including stock formats and unmarked layers) to
    ``original`` with the arguments untouched."""

    def _load_quantized_module(module, super_load, state_dict, prefix, local_metadata, strict, missing_keys,
                               unexpected_keys, error_msgs, load_extra_params=False):
        conf_t = state_dict.get(f"{prefix}comfy_quant")
        if conf_t is not None:
            conf = _parse_conf(conf_t)
            fmt = conf.get("format") if conf else None
            if fmt is not None and quant_algos.get(fmt, {}).get("comfy_tensor_layout") == LAYOUT_NAME:
                return load_layer(module, super_load, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs, load_extra_params, layer_conf=conf)
        return original(module, super_load, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs, load_extra_params=load_extra_params)

    setattr(_load_quantized_module, WRAPPED_MARK, original)
    _load_quantized_module.__doc__ = getattr(original, "__doc__", None)
    return _load_quantized_module


def register() -> Registration:
    """Register quantkit's formats into the running ComfyUI. Safe to call any number of times."""
    r = Registration()
    try:
        quant_ops = _import("comfy.quant_ops")
        ops = _import("comfy.ops")
    except Exception as e:
        r.messages.append(f"ComfyUI's comfy.quant_ops / comfy.ops cannot be imported ({e})")
        return _report(r)
    if not getattr(quant_ops, "_CK_AVAILABLE", True):
        r.messages.append("ComfyUI runs without comfy-kitchen, so it has no quantized layouts at all")
        return _report(r)
    algos = getattr(quant_ops, "QUANT_ALGOS", None)
    get_layout = getattr(quant_ops, "get_layout_class", None)
    add_layout = getattr(quant_ops, "register_layout_class", None)
    if not isinstance(algos, dict) or get_layout is None or add_layout is None:
        r.messages.append("comfy.quant_ops has no QUANT_ALGOS / get_layout_class / register_layout_class")
        return _report(r)

    # Check everything before changing anything.
    loader = getattr(ops, LOADER_NAME, None)
    already_wrapped = loader is not None and getattr(loader, WRAPPED_MARK, None) is not None
    if loader is None:
        r.messages.append(f"comfy.ops.{LOADER_NAME} does not exist in this ComfyUI version")
        return _report(r)
    if not already_wrapped and not loader_signature_ok(loader):
        r.messages.append(f"comfy.ops.{LOADER_NAME} has the signature {inspect.signature(loader)}, expected "
                          f"({', '.join(LOADER_PARAMS)})")
        return _report(r)
    try:
        existing = get_layout(LAYOUT_NAME)
    except KeyError:
        existing = None
    if existing is not None and existing is not BlockINT8Layout:
        r.messages.append(f"layout name {LAYOUT_NAME} is already registered to {existing!r}")
        return _report(r)

    if existing is None:
        add_layout(LAYOUT_NAME, BlockINT8Layout)
        r.layout = "added"
    else:
        r.layout = "present"
    entry = algos.get(COMFY_FORMAT)
    if entry is None:
        algos[COMFY_FORMAT] = dict(QUANT_ALGO_ENTRY)
        r.quant_algos = "added"
    elif entry.get("comfy_tensor_layout") == LAYOUT_NAME:
        r.quant_algos = "present"
    else:
        r.quant_algos = "comfyui"
        r.messages.append(f"{COMFY_FORMAT} is already defined (layout {entry.get('comfy_tensor_layout')}); "
                          "leaving it to ComfyUI / the node that defined it")
    if already_wrapped:
        r.loader = "present"
    else:
        setattr(ops, LOADER_NAME, make_wrapper(loader, algos))
        r.loader = "wrapped"
    r.ok = True
    return _report(r)


def _report(r: Registration) -> Registration:
    if not r.ok:
        log.error("quantkit: %s files will not load in this ComfyUI (stock formats are unaffected): %s",
                  COMFY_FORMAT, "; ".join(r.messages))
    else:
        for m in r.messages:
            log.info("quantkit: %s", m)
        log.info("quantkit: %s registered (layout %s, QUANT_ALGOS %s, loader %s)",
                 COMFY_FORMAT, r.layout, r.quant_algos, r.loader)
    return r
