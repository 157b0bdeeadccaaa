"""Entry module mirroring ComfyUI's ``comfy.quant_ops`` names; re-exports quantkit (no logic here)."""

from quantkit.formats import FORMATS, Format  # noqa: F401
from quantkit.formats.scaled import compute_scale, dequantize, quantize, quantize_with_scale  # noqa: F401
from quantkit.runtime import (  # noqa: F401
    LAYOUTS,
    QUANT_ALGOS,
    AsymW4A8Int8Layout,
    BlockWiseINT8Layout,
    QuantizedLayout,
    QuantizedTensor,
    TensorCoreFP8E4M3Layout,
    TensorCoreFP8E5M2Layout,
    TensorCoreAWQW4A16Layout,
    TensorCoreConvRotW4A4Layout,
    TensorCoreFP8Layout,
    TensorCoreMXFP8Layout,
    TensorCoreNVFP4Layout,
    TensorWiseINT8Layout,
    get_layout_class,
    load_quantized,
    mixed_precision_ops,
    register_layout_class,
    register_layout_op,
    supports_fp8_compute,
)
