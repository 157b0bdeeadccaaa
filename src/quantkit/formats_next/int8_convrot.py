"""Moved to :mod:`quantkit.formats.int8_convrot`; this import path stays (it is the same module object)."""

import sys

from quantkit.formats import int8_convrot as _moved

sys.modules[__name__] = _moved
