"""Load one ``int8_blockwise`` layer of a state dict into a ComfyUI mixed-precision module.

Called by the wrapper :mod:`.register` puts around ``comfy.ops._load_quantized_module`` (same
arguments), for layers whose ``.comfy_quant`` names a format registered with quantkit's layout. It
leaves the module as ComfyUI's own loader leaves a stock quantized layer: ``quant_format``,
``layout_type``, ``_full_precision_mm`` / ``_full_precision_mm_config``, ``weight`` a Parameter
holding a ``QuantizedTensor``, ``input_scale`` registered when ``load_extra_params`` (the value is
tolerated, not used: activations are quantized per token at run time), then the module's own
``_load_from_state_dict`` for the bias.

Accepted on disk (quantkit's files and the earlier converter's): ``weight`` I8 ``[N, K]``,
``weight_scale`` float ``[N/b, K/b]``, ``.comfy_quant`` with ``group_size: b`` (when it is missing,
as in a state dict ComfyUI itself saved, b is read off the two shapes), optional ``input_scale``.
"""

from __future__ import annotations

import torch

from ..errors import QuantkitError
from ..formats import block_size_of
from .layout import LAYOUT_NAME, make_tensor


def load_layer(module, super_load, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
               error_msgs, load_extra_params=False, *, layer_conf: dict) -> None:
    """``comfy.ops._load_quantized_module`` for one layer whose format is ours (``layer_conf`` is
    its parsed ``.comfy_quant``)."""
    device = module.factory_kwargs["device"]
    compute_dtype = module.factory_kwargs["dtype"]
    disabled = getattr(module, "_disabled_formats", ()) or ()
    layer = prefix.rstrip(".")
    fmt = layer_conf.get("format")

    weight = state_dict.pop(f"{prefix}weight", None)
    scale = state_dict.pop(f"{prefix}weight_scale", None)
    state_dict.pop(f"{prefix}comfy_quant", None)
    input_scale = state_dict.pop(f"{prefix}input_scale", None)
    loaded = [f"{prefix}weight"]
    if weight is None:
        raise QuantkitError(f"{fmt} layer has a .comfy_quant marker but no weight", tensor=f"{layer}.weight",
                            fix="the file is incomplete; re-convert it")
    if scale is None:
        raise QuantkitError(f"{fmt} layer has no weight_scale", tensor=f"{layer}.weight_scale",
                            fix="the file is incomplete; re-convert it")
    if weight.dtype != torch.int8:
        raise QuantkitError(f"{fmt} weight is stored as {weight.dtype}, must be int8 (I8)", tensor=f"{layer}.weight",
                            fix="re-convert the layer with quantkit")
    if not scale.dtype.is_floating_point:
        raise QuantkitError(f"weight_scale is stored as {scale.dtype}, must be float32",
                            tensor=f"{layer}.weight_scale", fix="re-convert the layer with quantkit")
    b = block_size_of(layer, layer_conf, tuple(weight.shape), tuple(scale.shape))
    want = getattr(module, "_orig_shape", None)
    if want is not None and tuple(want) != tuple(weight.shape):
        raise QuantkitError(f"weight is {list(weight.shape)} but the model's layer is {list(want)}",
                            tensor=f"{layer}.weight", fix="this file is for a different model")
    loaded.append(f"{prefix}weight_scale")

    module.quant_format = fmt
    module._full_precision_mm_config = bool(layer_conf.get("full_precision_matrix_mult", False))
    if not getattr(module, "_full_precision_mm", False):
        module._full_precision_mm = module._full_precision_mm_config
    if fmt in disabled:
        module._full_precision_mm = True
    module.layout_type = LAYOUT_NAME
    qt = make_tensor(weight.to(device=device), scale.to(device=device, dtype=torch.float32), b, compute_dtype)
    module.weight = torch.nn.Parameter(qt, requires_grad=False)
    if load_extra_params and input_scale is not None:
        module.register_parameter("input_scale", torch.nn.Parameter(input_scale.to(device=device),
                                                                    requires_grad=False))
        loaded.append(f"{prefix}input_scale")

    super_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    for key in loaded:
        if key in missing_keys:
            missing_keys.remove(key)
