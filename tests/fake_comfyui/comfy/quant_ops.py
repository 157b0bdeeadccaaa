"""Stand-in for ``comfy.quant_ops``: comfy-kitchen's registry re-exported, ComfyUI's FP8 layout
names, and the stock ``QUANT_ALGOS`` entries quantkit's formats map to."""

import torch
from comfy_kitchen.tensor import (AsymW4A8Int8Layout, QuantizedLayout, QuantizedTensor, TensorCoreAWQW4A16Layout,
                                  TensorCoreConvRotW4A4Layout, TensorCoreFP8Layout, TensorCoreMXFP8Layout,
                                  TensorCoreNVFP4Layout, TensorWiseINT8Layout, get_layout_class,
                                  register_layout_class, register_layout_op)

_CK_AVAILABLE = True


class TensorCoreFP8E4M3Layout(TensorCoreFP8Layout):
    FP8_DTYPE = torch.float8_e4m3fn


class TensorCoreFP8E5M2Layout(TensorCoreFP8Layout):
    FP8_DTYPE = torch.float8_e5m2


register_layout_class("TensorCoreFP8E4M3Layout", TensorCoreFP8E4M3Layout)
register_layout_class("TensorCoreFP8E5M2Layout", TensorCoreFP8E5M2Layout)

QUANT_ALGOS = {
    "float8_e4m3fn": {"storage_t": torch.float8_e4m3fn, "parameters": {"weight_scale", "input_scale"},
                      "comfy_tensor_layout": "TensorCoreFP8E4M3Layout"},
    "float8_e5m2": {"storage_t": torch.float8_e5m2, "parameters": {"weight_scale", "input_scale"},
                    "comfy_tensor_layout": "TensorCoreFP8E5M2Layout"},
    "int8_tensorwise": {"storage_t": torch.int8, "parameters": {"weight_scale"},
                        "comfy_tensor_layout": "TensorWiseINT8Layout", "quantize_input": False},
    "mxfp8": {"storage_t": torch.float8_e4m3fn, "parameters": {"weight_scale", "input_scale"},
              "comfy_tensor_layout": "TensorCoreMXFP8Layout", "group_size": 32},
    "nvfp4": {"storage_t": torch.uint8, "parameters": {"weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale"},
              "comfy_tensor_layout": "TensorCoreNVFP4Layout", "group_size": 16},
    # weight-only in ComfyUI's forward (quantize_input False); "parameters" as ComfyUI lists them
    "convrot_w4a4": {"storage_t": torch.int8, "parameters": {"weight_scale"},
                     "comfy_tensor_layout": "TensorCoreConvRotW4A4Layout", "quantize_input": False},
    "asym_w4a8_int8": {"storage_t": torch.int8, "parameters": {"weight_scale"},
                       "comfy_tensor_layout": "AsymW4A8Int8Layout", "quantize_input": False},
    "awq_w4a16": {"storage_t": torch.int8, "parameters": {"weight_scale"},
                  "comfy_tensor_layout": "TensorCoreAWQW4A16Layout", "quantize_input": False},
}

__all__ = ["QuantizedTensor", "QuantizedLayout", "TensorCoreFP8Layout", "TensorWiseINT8Layout", "TensorCoreMXFP8Layout",
           "TensorCoreNVFP4Layout", "TensorCoreConvRotW4A4Layout", "AsymW4A8Int8Layout", "TensorCoreAWQW4A16Layout",
           "QUANT_ALGOS",
           "register_layout_op", "register_layout_class", "get_layout_class"]
