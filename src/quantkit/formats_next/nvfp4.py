"""Moved to :mod:`quantkit.formats.nvfp4`; this import path stays (it is the same module object)."""

import sys

from quantkit.formats import nvfp4 as _moved

sys.modules[__name__] = _moved
