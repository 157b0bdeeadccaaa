"""quantkit: quantize diffusion-model checkpoints to FP8/INT8 files that ComfyUI loads."""

from .convert import convert
from .errors import QuantkitError, UsageError
from .formats import DEFAULT_BLOCK_SIZE, DEFAULT_FORMAT, FORMATS, FormatSpec
from .report import ConvertReport, LayerReport

__version__ = "0.1.0"

__all__ = ["convert", "QuantkitError", "UsageError", "FORMATS", "FormatSpec", "DEFAULT_FORMAT",
           "DEFAULT_BLOCK_SIZE", "ConvertReport", "LayerReport", "__version__"]
