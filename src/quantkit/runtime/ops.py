"""``mixed_precision_ops``: an operations namespace whose ``Linear`` loads and runs ComfyUI-style
quantized layers, mirroring ``comfy.ops.mixed_precision_ops``.

A quantized layer ``L`` in a state dict is ``L.weight`` (stored fp8/int8), ``L.weight_scale``,
optionally ``L.input_scale`` and ``L.comfy_quant`` (uint8 bytes of a JSON object with ``format``;
``group_size`` for int8_blockwise; ``full_precision_matrix_mult``). ``quant_config`` maps layer
names to such dicts (the file's ``_quantization_metadata`` layers) and, as in ComfyUI, wins over
the per-layer marker. Layers without a marker load as plain float weights in ``compute_dtype``.

Differences from ComfyUI, on purpose: an FP8 layer without ``input_scale`` quantizes its input
dynamically per token on the GPU (ComfyUI uses a static 1.0), and INT8 layers run W8A8 where
:mod:`quantkit.runtime.linear` says so. ``full_precision_mm=True`` (or the layer's
``full_precision_matrix_mult``) always dequantizes: exactly ComfyUI's numbers.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantkitError
from ..dtypes import name_of, torch_dtype
from ..formats import FORMATS, SCALE_SUFFIXES, LayerOpts, decode_comfy_quant, format_of_marker
from .layouts import LAYOUT_FOR_FORMAT, QUANT_ALGOS, LayoutParams
from .linear import dequantized_linear, quantize_input_static, supports_fp8_compute
from .tensor import QuantizedTensor

_STRAY_SCALES = tuple(s[1:] for s in SCALE_SUFFIXES)


def parse_comfy_quant(t: torch.Tensor, layer: str) -> dict:
    """The JSON object in a ``.comfy_quant`` uint8 tensor."""
    try:
        d = decode_comfy_quant(t.detach().cpu().to(torch.uint8).numpy().tobytes())
    except ValueError as e:
        raise QuantkitError(f"comfy_quant is not UTF-8 JSON ({e})", tensor=f"{layer}.comfy_quant",
                            fix="rewrite the file with quantkit convert") from None
    if "format" not in d:
        raise QuantkitError("comfy_quant has no 'format' key", tensor=f"{layer}.comfy_quant",
                            fix="rewrite the file with quantkit convert")
    return d


def mixed_precision_ops(quant_config: dict | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                        full_precision_mm: bool = False):
    """An operations namespace (``ops.Linear``, ``ops.Conv2d``, ``ops.LayerNorm``, ...) for building
    a model that loads quantized state dicts; only ``Linear`` differs from ``torch.nn``."""
    layer_config = dict(quant_config or {})

    class MixedPrecisionOps:
        _quant_config = layer_config
        _compute_dtype = compute_dtype
        _full_precision_mm = full_precision_mm

        Conv1d, Conv2d, Conv3d = nn.Conv1d, nn.Conv2d, nn.Conv3d
        ConvTranspose1d, ConvTranspose2d = nn.ConvTranspose1d, nn.ConvTranspose2d
        GroupNorm, LayerNorm, Embedding = nn.GroupNorm, nn.LayerNorm, nn.Embedding
        RMSNorm = getattr(nn, "RMSNorm", None)

        class Linear(nn.Module):
            def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                         dtype=None) -> None:
                super().__init__()
                self.in_features = in_features
                self.out_features = out_features
                kw = {"device": device, "dtype": compute_dtype}
                self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
                self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
                # fp32 as stored (a plain attribute: a buffer would be cast by module.to(dtype))
                self.input_scale: torch.Tensor | None = None
                self.pre_quant_scale: torch.Tensor | None = None  # a format's input_smoothing tensor, if the file has one
                self._static_spec = None  # the FP8 spec when the input is quantized with input_scale
                self.quant_format: str | None = None
                self.full_precision_mm = full_precision_mm

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                layer = prefix[:-1]
                marker = state_dict.pop(prefix + "comfy_quant", None)
                conf = layer_config.get(layer)
                if conf is None and marker is not None:
                    conf = parse_comfy_quant(marker, layer)
                weight = state_dict.pop(prefix + "weight", None)
                bias = state_dict.pop(prefix + "bias", None)
                if weight is None:
                    missing_keys.append(prefix + "weight")
                elif conf is None:
                    stray = [s for s in _STRAY_SCALES if prefix + s in state_dict]
                    if stray:
                        raise QuantkitError(f"has {', '.join(stray)} but no comfy_quant marker", tensor=layer,
                                            fix="write the marker (quantkit convert does), or drop the scales")
                    self._check_shape(layer, tuple(weight.shape))
                    self.weight = nn.Parameter(weight.to(compute_dtype), requires_grad=False)
                else:
                    self._load_quantized(layer, prefix, state_dict, weight, conf)
                if bias is not None:
                    self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
                elif self.bias is not None:
                    missing_keys.append(prefix + "bias")
                for key in state_dict:
                    if key.startswith(prefix) and "." not in key[len(prefix):]:
                        unexpected_keys.append(key)

            def _check_shape(self, layer: str, shape: tuple) -> None:
                if shape != (self.out_features, self.in_features):
                    raise QuantkitError(f"weight shape {list(shape)} does not match the layer's "
                                        f"[{self.out_features}, {self.in_features}]", tensor=f"{layer}.weight",
                                        fix="load the file into the model it was converted from")

            def _load_quantized(self, layer, prefix, state_dict, weight, conf) -> None:
                fmt = conf["format"]
                algo = QUANT_ALGOS.get(fmt)
                if algo is None:
                    raise QuantkitError(f"unknown quantization format '{fmt}'", tensor=f"{layer}.comfy_quant",
                                        fix=f"formats this runtime loads: {', '.join(QUANT_ALGOS)}")
                if weight.dtype != algo["storage_t"]:
                    raise QuantkitError(f"{fmt} weight stored as {weight.dtype}, expected {algo['storage_t']}",
                                        tensor=f"{layer}.weight", fix="rewrite the file with quantkit convert")
                present = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items()
                           if k.startswith(prefix) and "." not in k[len(prefix):]}
                stored_spec = format_of_marker(conf, {"weight": tuple(weight.shape), **present})
                if stored_spec is None:  # a tensor missing: the format a stored-only comfy string names says which
                    named = [f for f in FORMATS.values() if f.comfy_format == fmt and f.name in LAYOUT_FOR_FORMAT]
                    if named and all(f.kernel is None for f in named):
                        stored_spec = named[0]
                if stored_spec is not None and stored_spec.kernel is None and stored_spec.name in LAYOUT_FOR_FORMAT:
                    return self._load_stored(layer, prefix, state_dict, weight, conf, stored_spec)
                self._check_shape(layer, tuple(weight.shape))
                scale = state_dict.pop(prefix + "weight_scale", None)
                if scale is None:
                    raise QuantkitError(f"{fmt} layer has no weight_scale", tensor=layer,
                                        fix="rewrite the file with quantkit convert")
                input_scale = state_dict.pop(prefix + "input_scale", None)
                layout = algo["comfy_tensor_layout"]
                n, k = weight.shape
                shapes = {"weight": (n, k), "weight_scale": tuple(scale.shape)}
                spec = format_of_marker(conf, shapes)
                if spec is not None and spec.name not in LAYOUT_FOR_FORMAT:
                    raise QuantkitError(f"{spec.name} layers do not load in this runtime", tensor=f"{layer}.comfy_quant",
                                        fix="load the file in ComfyUI")
                # the tile size of a block format, checked as every loader checks it
                block = spec.layer_block_size(layer, conf, shapes) if spec is not None else 0
                if spec is None or tuple(scale.shape) != spec.scale_shape((n, k), block):
                    raise QuantkitError(f"weight_scale shape {list(scale.shape)} does not fit a {fmt} weight "
                                        f"[{n}, {k}]", tensor=f"{layer}.weight_scale",
                                        fix="rewrite the file with quantkit convert")
                params = LayoutParams(scale.float(), compute_dtype, (n, k), block)
                self.weight = nn.Parameter(QuantizedTensor(weight, layout, params), requires_grad=False)
                self.input_scale = None if input_scale is None else input_scale.float()
                self._static_spec = spec if input_scale is not None and spec.static_input else None
                self.quant_format = fmt
                self.full_precision_mm = full_precision_mm or bool(conf.get("full_precision_matrix_mult", False))

            def _load_stored(self, layer, prefix, state_dict, weight, conf, spec) -> None:
                """A format without a scaled kernel (int8-convrot, mxfp8, nvfp4, the 4-bit ones): its stored tensors
                are checked against what the format writes for this layer's [out, in] and kept as
                they are; the layer dequantizes with the format's own math."""
                shape = (self.out_features, self.in_features)
                orig = conf.get("orig_shape")
                if orig is not None and tuple(orig) != shape:
                    raise QuantkitError(f"orig_shape {list(orig)} does not match the layer's {list(shape)}",
                                        tensor=f"{layer}.comfy_quant", fix="load the file into the model it was converted from")
                want = spec.stored(shape, compute_dtype, LayerOpts())
                tensors = {"weight": weight}
                optional = getattr(spec, "optional_suffixes", ())  # tensors ComfyUI's loader takes as absent
                want = [st for st in want if st.suffix not in optional or prefix + st.suffix in state_dict]
                for st in want[1:]:
                    t = state_dict.pop(prefix + st.suffix, None)
                    if t is None:
                        raise QuantkitError(f"{conf['format']} layer has no {st.suffix}", tensor=layer,
                                            fix="rewrite the file with quantkit convert")
                    tensors[st.suffix] = t
                input_scale = state_dict.pop(prefix + "input_scale", None)
                smooth = state_dict.pop(prefix + spec.input_smoothing, None) if spec.input_smoothing else None
                if smooth is not None and (smooth.dim() != 1 or smooth.shape[0] != self.in_features
                                           or not smooth.is_floating_point()):
                    raise QuantkitError(f"{spec.input_smoothing} is {name_of(smooth.dtype)} {list(smooth.shape)}, not a "
                                        f"float [{self.in_features}]", tensor=f"{layer}.{spec.input_smoothing}",
                                        fix="re-export the layer")
                self.pre_quant_scale = smooth
                for st in want:
                    t = tensors[st.suffix]
                    ok = {st.dtype, "U8", *(("F8_E8M0",) if st.dtype == "U8" else ())}  # byte views ComfyUI takes
                    if tuple(t.shape) != tuple(st.shape) or name_of(t.dtype) not in ok:
                        raise QuantkitError(f"{st.suffix} is {name_of(t.dtype)} {list(t.shape)}, a {spec.name} "
                                            f"layer {list(shape)} stores {st.dtype} {list(st.shape)}",
                                            tensor=f"{layer}.{st.suffix}", fix="rewrite the file with quantkit convert")
                    if name_of(t.dtype) != st.dtype:  # a U8-stored fp8 scale is a byte view, as ComfyUI reads it
                        tensors[st.suffix] = t.view(torch_dtype(st.dtype))
                marker = {**conf, "orig_shape": list(shape)}
                scale_suffix = want[1].suffix  # weight_scale; w4a8: weight_s_rel
                q, scale = tensors.pop("weight"), tensors.pop(scale_suffix)
                params = LayoutParams(scale, compute_dtype, shape, 0, tensors, marker, scale_suffix)
                self.weight = nn.Parameter(QuantizedTensor(q, LAYOUT_FOR_FORMAT[spec.name], params), requires_grad=False)
                self.input_scale = None if input_scale is None else input_scale.float()
                self._static_spec = None
                self.quant_format = conf["format"]
                self.full_precision_mm = full_precision_mm or bool(conf.get("full_precision_matrix_mult", False))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if self.pre_quant_scale is not None:  # as ComfyUI: the input times it, in the input's dtype
                    x = x * self.pre_quant_scale.to(device=x.device, dtype=x.dtype)
                w = self.weight
                if not isinstance(w, QuantizedTensor):
                    return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
                if self.full_precision_mm:
                    return dequantized_linear(x, w, self.bias)
                if self._static_spec is not None and supports_fp8_compute(x.device):
                    s = self.input_scale.to(x.device)
                    xq = quantize_input_static(x, s, self._static_spec)
                    x = QuantizedTensor(xq, w._layout_type, LayoutParams(s, x.dtype, tuple(x.shape)))
                return F.linear(x, w, self.bias)

            def extra_repr(self) -> str:
                return (f"in_features={self.in_features}, out_features={self.out_features}, "
                        f"bias={self.bias is not None}, format={self.quant_format}")

    return MixedPrecisionOps
