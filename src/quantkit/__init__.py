"""quantkit: quantize diffusion-model checkpoints to FP8/INT8 files that ComfyUI loads.

The names below are imported on first use, so that ``import quantkit`` (and the command line's
``--version``, ``--help``, ``formats``, ``presets``) does not import torch."""

import os as _os
import sys as _sys
import types as _types

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

__version__ = "0.1.0"

_LAZY = {"QuantkitError": "errors", "UsageError": "errors", "FORMATS": "formats", "Format": "formats",
         "DEFAULT_FORMAT": "formats", "DEFAULT_BLOCK_SIZE": "formats", "ConvertReport": "report",
         "LayerReport": "report", "TensorReport": "report", "upgrade": "convert"}

__all__ = ["convert", "compare", "upgrade", "QuantkitError", "UsageError", "FORMATS", "Format", "DEFAULT_FORMAT",
           "DEFAULT_BLOCK_SIZE", "ConvertReport", "LayerReport", "TensorReport", "__version__"]


class _Package(_types.ModuleType):
    """``quantkit.convert`` and ``quantkit.compare`` are the functions, also once the submodules of the same names are imported
    (the import system binds a submodule on its package: that binding is ignored here)."""

    @property
    def convert(self):
        from .convert import convert
        return convert

    @convert.setter
    def convert(self, value) -> None:
        if not isinstance(value, _types.ModuleType):
            raise AttributeError("quantkit.convert is the library's entry point; patch quantkit.convert.convert")

    @property
    def compare(self):
        from .compare import compare
        return compare

    @compare.setter
    def compare(self, value) -> None:
        if not isinstance(value, _types.ModuleType):
            raise AttributeError("quantkit.compare is the library's entry point; patch quantkit.compare.compare")

    def __getattr__(self, name: str):
        if name not in _LAZY:
            raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        setattr(self, name, value)
        return value

    def __dir__(self):
        return sorted({*super().__dir__(), *__all__})


_sys.modules[__name__].__class__ = _Package
