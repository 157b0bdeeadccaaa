"""Moved to :mod:`quantkit.formats._common`; this import path stays (it is the same module object)."""

import sys

from quantkit.formats import _common as _moved

sys.modules[__name__] = _moved
