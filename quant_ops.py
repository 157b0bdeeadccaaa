"""Entry module mirroring ComfyUI's ``comfy.quant_ops`` names; re-exports quantkit (no logic here)."""

from quantkit.formats import FORMATS, FormatSpec  # noqa: F401
from quantkit.reference import compute_scale, dequantize, quantize, quantize_with_scale  # noqa: F401
