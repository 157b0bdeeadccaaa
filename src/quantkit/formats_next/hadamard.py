"""Moved to :mod:`quantkit.formats._hadamard`; this import path stays (it is the same module object)."""

import sys

from quantkit.formats import _hadamard as _moved

sys.modules[__name__] = _moved
