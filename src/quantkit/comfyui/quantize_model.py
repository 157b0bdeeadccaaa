"""Quantize-at-load: a clone of a ComfyUI MODEL whose linear layers run quantized.

The original MODEL is never touched. ComfyUI's ``ModelPatcher.clone()`` shares the torch module
with the original, so the quantized layers are not written into it: each becomes a new module
handed to the clone with ``add_object_patch(name, module)``, which ComfyUI swaps in when it loads
the clone (``patch_model``) and swaps back when it unloads it (``unpatch_model``).

Each new module is an instance of ComfyUI's own ``comfy.ops.mixed_precision_ops(...).Linear``,
filled through its ``load_state_dict`` with exactly the tensors ``quantkit convert`` writes for that
layer (``weight``, ``weight_scale``, ``input_scale`` where the format has one, ``.comfy_quant``,
the float ``bias``). So a layer quantized here is the layer ComfyUI would load from the converted
file: same bits, same loader (ComfyUI's for fp8 / int8_tensorwise, quantkit's wrapper for
int8_blockwise), same matmul paths, LoRA patches applied through the module's ``set_weight``.

Which layers: the same decisions as the converter (:func:`quantkit.plan._plan_one`), on every
linear layer of the model (``torch.nn.Linear``, or a ComfyUI mixed-precision Linear still holding
a float weight): 2-D bf16/fp16/fp32 weights only, ``exclude`` regexes, the keep rules of the model
family detected from the model's parameter names (:mod:`quantkit.families`, as ``--preset auto``;
ComfyUI's ``diffusion_model.`` prefix is recognised like a checkpoint's), embeddings, and
``fallback`` where a block format does not divide the shape. Norms, convolutions and everything
that is not a linear layer are left as they are.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from .. import backend, families
from ..dtypes import TORCH_TO_NAME
from ..errors import QuantkitError
from ..formats import DEFAULT_FALLBACK, FORMATS, LayerOpts, encode_comfy_quant
from ..formats import scaled
from ..plan import LayerPlan, Options, _plan_one
from ..policy import Selection
from ..safetensors_io import TensorInfo

# What the node offers -> quantkit --format, from the registry: every format stock ComfyUI loads
# (under its ``node_target`` where it names one, else its --format name) and every format the node
# registers a layout for (those name a ``node_target``: int8_blockwise).
TARGETS: dict[str, str] = {(f.node_target or f.name): f.name for f in FORMATS.values() if f.node_target or f.stock_comfy}


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    action: str  # "quantized", "fallback", "kept"
    format: str | None
    reason: str = ""
    sqnr_db: float | None = None


@dataclass
class QuantizeSummary:
    target: str
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerResult]:
        return [r for r in self.layers if r.action != "kept"]

    def text(self) -> str:
        q = self.quantized
        lines = [f"quantkit: {len(q)} of {len(self.layers)} linear layers quantized to {self.target}"]
        for r in self.layers:
            if r.action == "kept":
                lines.append(f"  kept {r.name}: {r.reason}")
            elif r.action == "fallback":
                lines.append(f"  {r.name}: {r.reason}")
        if q:
            finite = [r.sqnr_db for r in q if r.sqnr_db is not None and r.sqnr_db != float("inf")]
            if finite:
                lines.append(f"  SQNR min {min(finite):.1f} dB, mean {sum(finite) / len(finite):.1f} dB")
        return "\n".join(lines)


def _is_linear(m, mixed_op) -> bool:
    if isinstance(m, torch.nn.Linear):
        return True
    return mixed_op is not None and isinstance(m, mixed_op) and hasattr(m, "in_features") \
        and not hasattr(m, "num_experts")


def _float_weight(patcher, name: str, module) -> torch.Tensor | None:
    """The layer's original float weight: the patcher's backup when ComfyUI has patched it in
    place (LoRA), else the module's own."""
    bk = getattr(patcher, "backup", {}).get(f"{name}.weight")
    w = bk.weight if bk is not None else getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or type(w).__name__ == "QuantizedTensor" or w.device.type == "meta":
        return None
    return w.detach()


def quantize_weight(w: torch.Tensor, lp: LayerPlan,
                    work_device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """``(stored tensors by suffix, sqnr_db)`` on ``w``'s device, bit-identical to what ``quantkit
    convert`` writes for this weight. A CUDA ``work_device`` does the arithmetic there (the weights
    of an unloaded model sit on the CPU); on the CPU the chunked fast path runs."""
    dev = w.device
    if work_device is not None and torch.device(work_device).type == "cuda" and w.device.type == "cpu":
        dev = torch.device(work_device)
    spec = lp.spec
    if backend.has_kernel(spec):
        r = backend.quantize_tensor(w, spec, lp.block_size, dev)  # the converter's own quantizer
        tensors, sqnr = spec.pack(r.q, r.scale), r.sqnr_db
    else:
        w = w.to(dev)
        tensors = spec.quantize(w, lp.opts)
        deq = spec.dequantize(tensors, lp.comfy_quant(), torch.float32, lp.layer)
        sqnr = lambda: scaled.sqnr(w, deq)  # noqa: E731
    for t in tensors.values():
        if t.dtype == torch.float32 and not bool(torch.isfinite(t).all()):
            raise ValueError("weight holds NaN or Inf values")
    return {k: v.to(w.device) for k, v in tensors.items()}, sqnr()


def layer_state_dict(tensors: dict[str, torch.Tensor], lp: LayerPlan,
                     bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors ``quantkit convert`` writes for the planned layer ``lp``, keyed without the
    layer prefix."""
    marker = encode_comfy_quant(lp.comfy_quant())
    sd = {**tensors, "comfy_quant": torch.frombuffer(bytearray(marker), dtype=torch.uint8)}
    if bias is not None:
        sd["bias"] = bias
    return sd


def format_options(convrot_group_size: int) -> tuple[tuple[str, object], ...]:
    """The per-layer format options a node sets, as ``quantkit convert`` sets them (only where they
    differ from the default, so a plan without them is unchanged)."""
    g = int(convrot_group_size)
    return () if g == LayerOpts.convrot_group_size else (("convrot_group_size", g),)


def quantize_model(model, target: str, block_size: int = 128, fallback: str = DEFAULT_FALLBACK,
                   exclude: tuple[str, ...] = (), preset: str = "auto",
                   convrot_group_size: int = LayerOpts.convrot_group_size):
    """Return ``(clone, summary)``: a clone of the ModelPatcher ``model`` with its linear layers
    quantized to ``target`` (a key of :data:`TARGETS`) via object patches. ``preset`` picks the
    family keep rules as ``quantkit convert --preset`` does; ``convrot_group_size`` is
    ``--convrot-group-size`` (int8-convrot's asked ConvRot group)."""
    ops = importlib.import_module("comfy.ops")
    if target not in TARGETS:
        raise QuantkitError(f"unknown target '{target}'", fix=f"use one of: {', '.join(TARGETS)}")
    fmt = TARGETS[target]
    options = Options(fmt, block_size, (), tuple(exclude), fallback, preset,
                      format_options=format_options(convrot_group_size))
    options.validate()
    shapes = {n: tuple(p.shape) for n, p in model.model.named_parameters()}
    sel = Selection.from_patterns((), options.exclude, families.resolve(options.preset, shapes))
    spec = FORMATS[fmt]
    if not spec.stock_comfy:
        from .register import register
        if not register().ok:
            raise QuantkitError(f"{spec.comfy_format} cannot be loaded by this ComfyUI (see the log line above)",
                                fix="choose another target")
    mixed_op = getattr(ops, "MixedPrecisionOp", None)
    get_disabled = getattr(ops, "get_disabled_quant_formats", None)
    disabled = get_disabled(model.load_device) if get_disabled is not None else set()
    op_classes: dict[torch.dtype, type] = {}

    clone = model.clone()
    summary = QuantizeSummary(target)
    for name, module in list(model.model.named_modules()):
        if not name or not _is_linear(module, mixed_op):
            continue
        current = clone.get_model_object(name)
        if current is not module and not _is_linear(current, mixed_op):
            continue
        w = _float_weight(clone, name, current)
        if w is None:
            if type(getattr(current, "weight", None)).__name__ == "QuantizedTensor":
                summary.layers.append(LayerResult(name, tuple(current.weight.shape), "kept", None,
                                                  "already quantized"))
            continue
        dtype_name = TORCH_TO_NAME.get(w.dtype, str(w.dtype))
        lp = _plan_one(TensorInfo(f"{name}.weight", dtype_name, tuple(w.shape), 0, 0), spec, sel, options)
        if lp.spec is None:
            summary.layers.append(LayerResult(name, tuple(w.shape), "kept", None, lp.reason))
            continue
        try:
            tensors, sqnr = quantize_weight(w, lp, getattr(model, "load_device", None))
        except ValueError as e:
            raise QuantkitError(str(e), tensor=f"{name}.weight",
                                fix=f"repair the model, or keep the layer with exclude '^{name}$'") from None
        compute_dtype = getattr(model.model, "manual_cast_dtype", None) or w.dtype
        if compute_dtype not in op_classes:
            op_classes[compute_dtype] = ops.mixed_precision_ops({}, compute_dtype, disabled=disabled)
        bias = getattr(current, "bias", None)
        bias = None if bias is None else bias.detach().to(compute_dtype)
        new = op_classes[compute_dtype].Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device,
                                               dtype=compute_dtype)
        new.load_state_dict(layer_state_dict(tensors, lp, bias), strict=True)
        new.train(False)
        clone.add_object_patch(name, new)
        summary.layers.append(LayerResult(name, tuple(w.shape), "fallback" if lp.fallback else "quantized",
                                          lp.spec.name, lp.reason, sqnr))
    return clone, summary
