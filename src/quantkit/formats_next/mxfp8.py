"""Moved to :mod:`quantkit.formats.mxfp8`; this import path stays (it is the same module object)."""

import sys

from quantkit.formats import mxfp8 as _moved

sys.modules[__name__] = _moved
