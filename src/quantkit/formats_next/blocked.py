"""Moved to :mod:`quantkit.formats._blocked`; this import path stays (it is the same module object)."""

import sys

from quantkit.formats import _blocked as _moved

sys.modules[__name__] = _moved
