"""What safetensors 0.8 itself makes of a file, and what quantkit's reader makes of it, in one shape
so the two can be compared: ``{"metadata": ..., "tensors": {name: (torch dtype, torch shape, bytes)}}``,
or a refusal (None, or the QuantkitError)."""

from __future__ import annotations

import torch
from safetensors import safe_open

from quantkit.errors import QuantkitError
from quantkit.safetensors_io import SafetensorsReader


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def safetensors_view(path) -> dict | None:
    """safe_open(path, "pt") and get_tensor of every tensor; None where any of it raises."""
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {}
            for k in f.keys():
                t = f.get_tensor(k)
                tensors[k] = (t.dtype, tuple(t.shape), _as_bytes(t))
            return {"metadata": f.metadata(), "tensors": tensors}
    except Exception:  # noqa: BLE001 - any refusal is a refusal (SafetensorError, TypeError, RuntimeError)
        return None


def quantkit_view(path) -> dict | QuantkitError:
    """SafetensorsReader(path) and every tensor; the QuantkitError where it refuses (anything else
    escapes: that is a bug the tests must see)."""
    try:
        with SafetensorsReader(path) as r:
            tensors = {}
            for k in r.tensors:
                t = r.tensor(k)
                tensors[k] = (t.dtype, tuple(t.shape), _as_bytes(t))
            return {"metadata": r.metadata, "tensors": tensors}
    except QuantkitError as e:
        return e
