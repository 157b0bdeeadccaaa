"""Moved to :mod:`quantkit.formats._e8m0`; this import path stays (it is the same module object)."""

import sys

from quantkit.formats import _e8m0 as _moved

sys.modules[__name__] = _moved
