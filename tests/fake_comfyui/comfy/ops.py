"""Stand-in for ``comfy.ops``: the module-level loader ``_load_quantized_module`` (same name and
signature as ComfyUI's; stock formats only (fp8, int8_tensorwise with or without ConvRot, mxfp8, nvfp4,
convrot_w4a4, asym_w4a8_int8, awq_w4a16: the scale tensors, views, marker keys and defaults of ComfyUI
0271a469), an explicit per-format branch and a ValueError for any
other name, as in ComfyUI) and ``mixed_precision_ops`` whose ``Linear`` loads through it (looked up
at call time, so a wrapper installed on the module is used) and runs ComfyUI's forward decisions:
quantized input unless ``quantize_input`` is False, dequantized weight when ``_full_precision_mm``."""

import json

import torch

from .quant_ops import QUANT_ALGOS, QuantizedTensor, get_layout_class


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


def _nested(conf):
    """The marker's ``params`` object, where ComfyUI also looks for some keys ({} if not a dict)."""
    nested = conf.get("params", {})
    return nested if isinstance(nested, dict) else {}


def _load_quantized_module(module, super_load, state_dict, prefix, local_metadata, strict,
                           missing_keys, unexpected_keys, error_msgs, load_extra_params=False):
    device = module.factory_kwargs["device"]
    compute_dtype = module.factory_kwargs["dtype"]
    weight = state_dict.pop(f"{prefix}weight", None)
    if weight is None:
        module.weight = None
        return
    loaded = [f"{prefix}weight"]

    def pop_scale(name, view=None):
        v = state_dict.pop(f"{prefix}{name}", None)
        if v is not None:
            loaded.append(f"{prefix}{name}")
            v = v.to(device=device)
            if view is not None:
                v = v.view(dtype=view)  # a byte view: U8 on disk and the native dtype load alike
        return v

    conf = state_dict.pop(f"{prefix}comfy_quant", None)
    if conf is None:
        module.weight = torch.nn.Parameter(weight.to(device=device, dtype=compute_dtype), requires_grad=False)
    else:
        conf = json.loads(conf.numpy().tobytes())
        module.quant_format = conf.get("format", None)
        module._full_precision_mm_config = conf.get("full_precision_matrix_mult", False)
        if not module._full_precision_mm:
            module._full_precision_mm = module._full_precision_mm_config
        if module.quant_format in module._disabled_formats:
            module._full_precision_mm = True
        if module.quant_format is None:
            raise ValueError(f"Unknown quantization format for layer {prefix.rstrip('.')}")
        qconfig = QUANT_ALGOS[module.quant_format]  # KeyError for an unknown format, as in ComfyUI
        module.layout_type = qconfig["comfy_tensor_layout"]
        layout_cls = get_layout_class(module.layout_type)
        if module.quant_format in ("float8_e4m3fn", "float8_e5m2"):
            scales = {"scale": pop_scale("weight_scale")}
        elif module.quant_format == "int8_tensorwise":
            scale = pop_scale("weight_scale")
            if scale is None:
                raise ValueError(f"Missing INT8 weight scale for layer {prefix}")
            scales = {"scale": scale}
            nested = _nested(conf)
            if conf.get("convrot", nested.get("convrot", False)):
                scales["convrot"] = True
                scales["convrot_groupsize"] = int(conf.get("convrot_groupsize", nested.get("convrot_groupsize", 256)))
        elif module.quant_format == "mxfp8":
            block = pop_scale("weight_scale", torch.float8_e8m0fnu)
            if block is None:
                raise ValueError(f"Missing MXFP8 block scales for layer {prefix.rstrip('.')}")
            scales = {"scale": block}
        elif module.quant_format == "nvfp4":
            per_tensor = pop_scale("weight_scale_2")
            block = pop_scale("weight_scale", torch.float8_e4m3fn)
            if per_tensor is None or block is None:
                raise ValueError(f"Missing NVFP4 scales for layer {prefix.rstrip('.')}")
            scales = {"scale": per_tensor, "block_scale": block}
        elif module.quant_format == "convrot_w4a4":
            scale = pop_scale("weight_scale")
            if scale is None:
                raise ValueError(f"Missing ConvRot W4A4 weight scale for layer {prefix.rstrip('.')}")
            nested = _nested(conf)
            scales = {"scale": scale,
                      "convrot_groupsize": int(conf.get("convrot_groupsize", nested.get("convrot_groupsize", 256))),
                      "quant_group_size": 64,  # fixed by ComfyUI's loader
                      "linear_dtype": conf.get("linear_dtype", nested.get("linear_dtype", "int4"))}
        elif module.quant_format == "asym_w4a8_int8":
            group = pop_scale("weight_s_rel")
            if group is None:
                raise ValueError(f"Missing W4A8 group scale (weight_s_rel) for layer {prefix.rstrip('.')}")
            if group.dtype == torch.uint8:
                group = group.view(torch.float8_e4m3fn)
            nested = _nested(conf)
            scales = {"scale": group, "s_channel": pop_scale("weight_s_channel"),
                      "codebook": pop_scale("weight_codebook"),  # optional: None for uniform codes
                      "group_size": int(conf.get("group_size", nested.get("group_size", 16))),
                      "convrot_groupsize": int(conf.get("convrot_groupsize", nested.get("convrot_groupsize", 256)))}
        elif module.quant_format == "awq_w4a16":
            scale = pop_scale("weight_scale")
            zeros = pop_scale("weight_zeros")
            if scale is None or zeros is None:
                raise ValueError(f"Missing AWQ W4A16 scale/zeros for layer {prefix.rstrip('.')}")
            scales = {"scale": scale, "zeros": zeros, "group_size": int(conf.get("group_size", 64))}  # no nested read
        else:
            raise ValueError(f"Unsupported quantization format: {module.quant_format}")
        params = layout_cls.Params(**scales, orig_dtype=compute_dtype, orig_shape=module._orig_shape)
        module.weight = torch.nn.Parameter(
            QuantizedTensor(weight.to(device=device, dtype=qconfig["storage_t"]), module.layout_type, params),
            requires_grad=False)
        if load_extra_params:
            for name in qconfig["parameters"]:
                if name in ("weight_scale", "weight_scale_2"):
                    continue
                v = state_dict.pop(f"{prefix}{name}", None)
                if v is not None:
                    module.register_parameter(name, torch.nn.Parameter(v.to(device=device), requires_grad=False))
                    loaded.append(f"{prefix}{name}")
    super_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    for k in loaded:
        if k in missing_keys:
            missing_keys.remove(k)


class MixedPrecisionOp(CastWeightBiasOp):
    quant_format = None

    def can_use_quantized_matmul(self, disabled_formats):
        return (self.quant_format in QUANT_ALGOS and not self._full_precision_mm_config
                and self.quant_format not in self._disabled_formats and self.quant_format not in disabled_formats)


def get_disabled_quant_formats(device=None):
    # This machine has no FP8 / INT8 / MXFP8 / FP4 tensor cores (CPU): ComfyUI disables its stock quantized
    # matmuls, the INT8-compute ones (int8_tensorwise, convrot_w4a4, asym_w4a8_int8) included; awq_w4a16 never.
    return {"float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "mxfp8", "nvfp4", "convrot_w4a4", "asym_w4a8_int8"}


def mixed_precision_ops(quant_config={}, compute_dtype=torch.bfloat16, full_precision_mm=False, disabled=[]):
    class MixedPrecisionOps:
        _quant_config = quant_config
        _compute_dtype = compute_dtype
        _full_precision_mm = full_precision_mm
        _disabled = disabled

        class Linear(torch.nn.Module, MixedPrecisionOp):
            _disabled_formats = disabled

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                super().__init__()
                self.factory_kwargs = {"device": device, "dtype": MixedPrecisionOps._compute_dtype}
                self.in_features = in_features
                self.out_features = out_features
                self._orig_shape = (out_features, in_features)
                if bias:
                    self.bias = torch.nn.Parameter(torch.empty(out_features, **self.factory_kwargs))
                else:
                    self.register_parameter("bias", None)
                self.tensor_class = None
                self._full_precision_mm = MixedPrecisionOps._full_precision_mm
                self._full_precision_mm_config = False

            def reset_parameters(self):
                return None

            def _load_from_state_dict(self, *args):
                _load_quantized_module(self, super()._load_from_state_dict, *args, load_extra_params=True)

            def forward(self, input, *args, **kwargs):
                pre_quant_scale = getattr(self, "pre_quant_scale", None)  # ModelOpt AWQ-style smoothing
                if pre_quant_scale is not None:
                    input = input * pre_quant_scale.to(device=input.device, dtype=input.dtype)
                use_quantized = (getattr(self, "layout_type", None) is not None
                                 and not isinstance(input, QuantizedTensor) and not self._full_precision_mm)
                quantize_input = QUANT_ALGOS.get(getattr(self, "quant_format", None), {}).get("quantize_input", True)
                bias = None if self.bias is None else self.bias.to(input.dtype)
                shape = input.shape
                if use_quantized and quantize_input:
                    x2 = input.reshape(-1, shape[-1])
                    q_in = QuantizedTensor.from_float(x2, self.layout_type, scale=getattr(self, "input_scale", None))
                    out = torch.nn.functional.linear(q_in, self.weight.to(dtype=input.dtype), bias)
                    return out.reshape(*shape[:-1], self.weight.shape[0])
                weight = self.weight.to(dtype=input.dtype)
                if not use_quantized and isinstance(weight, QuantizedTensor):
                    weight = weight.dequantize()
                return torch.nn.functional.linear(input, weight, bias)

            def convert_weight(self, weight, inplace=False, **kwargs):
                return weight.dequantize() if isinstance(weight, QuantizedTensor) else weight

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                if getattr(self, "layout_type", None) is not None:
                    weight = self.weight.requantize_from_float(weight, scale="recalculate", stochastic_rounding=seed,
                                                               inplace_ops=True).to(self.weight.dtype)
                else:
                    weight = weight.to(self.weight.dtype)
                if return_weight:
                    return weight
                self.weight = torch.nn.Parameter(weight, requires_grad=False)

    return MixedPrecisionOps
