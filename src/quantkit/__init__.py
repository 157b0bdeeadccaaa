"""quantkit: quantize diffusion-model checkpoints to FP8/INT8 files that ComfyUI loads."""

import os as _os
import sys as _sys

# `quantkit convert` from the command line (console script, or `python -m quantkit`, whose argv[0]
# is "-m" while this package is imported): start reading the input now, before torch is imported.
if _sys.argv and (_sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]) == "quantkit"):
    from .readahead import start_for_cli as _start_for_cli
    _start_for_cli()

from .convert import convert
from .errors import QuantkitError, UsageError
from .formats import DEFAULT_BLOCK_SIZE, DEFAULT_FORMAT, FORMATS, Format
from .report import ConvertReport, LayerReport

__version__ = "0.1.0"

__all__ = ["convert", "QuantkitError", "UsageError", "FORMATS", "Format", "DEFAULT_FORMAT",
           "DEFAULT_BLOCK_SIZE", "ConvertReport", "LayerReport", "__version__"]
