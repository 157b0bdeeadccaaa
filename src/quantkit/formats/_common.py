"""Input checks and marker fields shared by the format modules."""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def div(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` as an IEEE fp32 division on any device. torch turns the division of a CUDA tensor by a
    Python number (or a CPU scalar tensor) into a multiply by the divisor's reciprocal, which rounds
    some quotients one ulp off; a divisor tensor on x's device keeps the true division (the CPU's)."""
    return x / torch.full_like(x, c)


def as_fp32(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """W as a contiguous fp32 [N, K] copy; raises on a dtype or shape the format cannot take or on
    non-finite values (a NaN/Inf weight has no scale that represents it)."""
    if w.dtype not in FLOAT_INPUTS:
        raise QuantkitError(f"{fmt}: weight dtype {w.dtype} is not bf16/fp16/fp32",
                            fix="quantize floating-point weights only")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise QuantkitError(f"{fmt}: weight shape {tuple(w.shape)} is not a non-empty 2-D [N, K]",
                            fix="keep this tensor unquantized")
    wf = w.to(torch.float32).contiguous()
    if not bool(torch.isfinite(wf).all()):
        raise QuantkitError(f"{fmt}: weight holds NaN or Inf values",
                            fix="repair the checkpoint or keep this tensor unquantized")
    return wf


def orig_shape_of(marker: dict, fmt: str) -> tuple[int, int]:
    shape = marker.get("orig_shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2
            and all(isinstance(s, int) and s > 0 for s in shape)):
        raise QuantkitError(f"{fmt}: .comfy_quant has no valid orig_shape [N, K] ({shape!r})",
                            fix="re-convert the layer with quantkit")
    return int(shape[0]), int(shape[1])


def roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_to(wf: torch.Tensor, mult: int) -> torch.Tensor:
    """Zero-pad both dims of fp32 [N, K] up to multiples of ``mult``."""
    n, k = wf.shape
    np_, kp = roundup(n, mult), roundup(k, mult)
    if (np_, kp) == (n, k):
        return wf
    out = torch.zeros(np_, kp, dtype=torch.float32, device=wf.device)
    out[:n, :k] = wf
    return out


def tree_sum_fp64(err: torch.Tensor) -> torch.Tensor:
    """Sum of squares over the last dim (a power of 2 long) of exact fp32 errors, in fp64, by a fixed
    pairwise tree (halves added elementwise), so any implementation can reproduce it bit for bit."""
    s = err.double() ** 2  # an fp32 value squared is exact in fp64
    while s.shape[-1] > 1:
        h = s.shape[-1] // 2
        s = s[..., :h] + s[..., h:]
    return s[..., 0]


def layer_dequantize(fn, tensors: dict, marker: dict, dtype, layer: str, stored_shape: tuple[int, int]):
    """A format's ``dequantize(tensors, marker, dtype)`` for a layer read from a file: a marker
    without ``orig_shape`` (a state dict ComfyUI saved) takes ``stored_shape``; an error names the
    layer's marker."""
    if "orig_shape" not in marker:
        marker = {**marker, "orig_shape": [int(s) for s in stored_shape]}
    try:
        return fn(tensors, marker, dtype)
    except QuantkitError as e:
        if not layer or e.tensor:
            raise
        raise QuantkitError(e.message, tensor=f"{layer}.comfy_quant", fix=e.fix) from None
