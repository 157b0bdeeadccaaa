"""Moved to :mod:`quantkit.formats._e2m1`; this import path stays (it is the same module object)."""

import sys

from quantkit.formats import _e2m1 as _moved

sys.modules[__name__] = _moved
