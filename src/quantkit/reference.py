"""The scaled-grid reference quantizers, re-exported from :mod:`quantkit.formats.scaled` (where the
numerical spec of fp8, fp8-e5m2, int8-tensor, int8-row and int8-block lives) for callers of the old
module path. New code imports :mod:`quantkit.formats.scaled`, or calls a format's own
``quantize`` / ``dequantize``."""

from .formats.scaled import (SQNR_ROWS, compute_scale, dequantize, expand_scale, quantize,  # noqa: F401
                             quantize_with_scale, region_amax, scale_from_amax, sqnr, sqnr_db)
