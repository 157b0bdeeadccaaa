"""The runtime: quantized files run in PyTorch, through the interface ComfyUI's ``comfy.quant_ops``
and ``comfy.ops`` expose (see ``quant_ops.py`` at the repository root). Needs no ComfyUI; triton
only for the CUDA W8A8 paths.

* :mod:`.layouts` -- ``QuantizedLayout`` per format (int8-convrot, mxfp8, nvfp4, w4a8, int4-convrot, awq4: dequantize + matmul
  in plain PyTorch on every device), the layout registry, ``QUANT_ALGOS``
* :mod:`.tensor` -- ``QuantizedTensor`` and ``register_layout_op`` dispatch
* :mod:`.linear` -- ``F.linear`` per layout (``torch._scaled_mm``, ``torch._int_mm``, Triton W8A8)
* :mod:`.activations` -- torch reference for activation quantization and the W8A8 block matmul
* :mod:`.triton_w8a8` -- the Triton kernels (import only where triton is installed)
* :mod:`.gluon_w8a8` -- the int8-block GEMM for sm_90 (Gluon), used by ``triton_w8a8`` where faster
* :mod:`.triton_w4` -- fused GEMMs for awq4 and 4-bit w4a8 (CUDA, up to the token counts of ``linear.W4_TRITON_MAX_M``)
* :mod:`.ops` -- ``mixed_precision_ops`` (its ``Linear`` loads quantized state dicts)
* :mod:`.swap` -- ``load_quantized``: put a quantized file into an existing ``nn.Module``
"""

from .layouts import (LAYOUTS, QUANT_ALGOS, AsymW4A8Int8Layout, BlockWiseINT8Layout, LayoutParams, QuantizedLayout,
                      StoredLayout, TensorCoreAWQW4A16Layout, TensorCoreConvRotW4A4Layout, TensorCoreFP8E4M3Layout, TensorCoreFP8E5M2Layout, TensorCoreFP8Layout, TensorCoreMXFP8Layout,
                      TensorCoreNVFP4Layout, TensorWiseINT8Layout, get_layout_class, register_layout_class)
from .tensor import QuantizedTensor, dequantize_args, register_layout_op
from .linear import supports_fp8_compute  # noqa: E402  (registers the linear handlers)
from .ops import mixed_precision_ops
from .swap import SwapResult, load_quantized

__all__ = ["LAYOUTS", "QUANT_ALGOS", "BlockWiseINT8Layout", "LayoutParams", "QuantizedLayout", "QuantizedTensor",
           "TensorCoreFP8E4M3Layout", "TensorCoreFP8E5M2Layout", "TensorCoreFP8Layout", "TensorWiseINT8Layout",
           "TensorCoreMXFP8Layout", "TensorCoreNVFP4Layout", "StoredLayout", "AsymW4A8Int8Layout",
           "TensorCoreConvRotW4A4Layout", "TensorCoreAWQW4A16Layout",
           "get_layout_class", "register_layout_class", "register_layout_op", "dequantize_args",
           "supports_fp8_compute", "mixed_precision_ops", "load_quantized", "SwapResult"]
