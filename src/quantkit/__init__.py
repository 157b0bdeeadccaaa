"""quantkit: quantize diffusion-model checkpoints to FP8/INT8 files that ComfyUI loads."""

import os as _os
import sys as _sys

# `quantkit convert` from the command line (console script, or `python -m quantkit`, whose argv[0]
# is "-m" while this package is imported): start reading the input now, before torch is imported.
if _sys.argv and (_sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]) == "quantkit"):
    from . import interrupts as _interrupts
    # a --devices worker (spawn gives it our argv, and imports this package before its parent_process()
    # is set): its parent handles Ctrl-C and reads the input
    if "--multiprocessing-fork" in getattr(_sys, "orig_argv", ()):
        _interrupts.ignore_sigint_in_worker()
    else:
        _interrupts.install_startup()  # a signal before the command runs exits 128 + n at once, one line
        from .readahead import start_for_cli as _start_for_cli
        _start_for_cli()

from .convert import convert
from .errors import QuantkitError, UsageError
from .formats import DEFAULT_BLOCK_SIZE, DEFAULT_FORMAT, FORMATS, FormatSpec
from .report import ConvertReport, LayerReport

__version__ = "0.1.0"

__all__ = ["convert", "QuantkitError", "UsageError", "FORMATS", "FormatSpec", "DEFAULT_FORMAT",
           "DEFAULT_BLOCK_SIZE", "ConvertReport", "LayerReport", "__version__"]
