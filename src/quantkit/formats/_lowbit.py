"""Shared pieces of the 4-bit formats stock ComfyUI loads (:mod:`.w4a8`, :mod:`.int4_convrot`,
:mod:`.awq4`): input checks, the per-layer ConvRot group size, nibble packing, a summation order
fixed by the spec (so the quantizers' choices are the same bytes on any machine and thread count),
and the contract checks they share. Importing it does not import torch (the registry is torch-free);
its tensor helpers import it when called.

Device independence: the quantizers use only elementwise IEEE fp32/fp64 operations (each result
rounded once, so CPU and CUDA agree), order-free reductions (``amax``/``amin``, integer counts),
exact comparisons and lookups, and :func:`tree_sum`; a division by a constant goes through
:func:`quantkit.formats._common.div`. No matmul, no float ``sum``/``mean``, no transcendental function
(``tests/test_lowbit_exact.py`` holds them to that list).

Every reduction a quantizer *decides* with (a per-group error, a least-squares scale) goes through
:func:`tree_sum`: the last dimension is zero-padded to a power of two and halved pairwise, each step
an elementwise add. torch's own ``sum`` splits work across threads in an unspecified order, so two
runs with different thread counts could round a near-tie the other way and write other bytes.
"""

from __future__ import annotations

from ..errors import QuantkitError
from .base import Violation

CONVROT_GROUPS = (1024, 256, 64, 16)  # the powers of 4 stock ComfyUI's rotation takes, largest first
DEFAULT_CONVROT = 256  # kitchen's default; the largest group its fused CUDA rotation runs


def as_fp32(w, fmt: str, layer: str = ""):
    """W as a contiguous fp32 [N, K] copy (the quantizers work in fp32); raises on a dtype or shape
    the format cannot take or on NaN/Inf (no scale represents them)."""
    import torch
    where = {"tensor": f"{layer}.weight"} if layer else {}
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise QuantkitError(f"{fmt}: weight dtype {w.dtype} is not bf16/fp16/fp32",
                            fix="quantize floating-point weights only", **where)
    if w.dim() != 2 or 0 in w.shape:
        raise QuantkitError(f"{fmt}: weight shape {tuple(w.shape)} is not a non-empty 2-D [N, K]",
                            fix="keep this tensor unquantized", **where)
    wf = w.to(torch.float32).contiguous()
    if not bool(torch.isfinite(wf).all()):
        raise QuantkitError(f"{fmt}: weight holds NaN or Inf values",
                            fix="repair the checkpoint or keep this tensor unquantized", **where)
    return wf


def convrot_group(k: int, cap: int = DEFAULT_CONVROT) -> int | None:
    """The largest ConvRot group size <= ``cap`` (a power of 4, 16..1024) that divides K; None if none.
    Every layer gets its own, written in its marker: a K = 384 layer rotates in groups of 64."""
    for g in CONVROT_GROUPS:
        if g <= cap and k % g == 0:
            return g
    return None


def tree_sum(x):
    """Sum over the last dimension in a fixed order (zero-pad to a power of two, add halves)."""
    import torch
    n = x.shape[-1]
    p = 1 << max(0, (n - 1).bit_length())
    if p != n:
        x = torch.nn.functional.pad(x, (0, p - n))
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def total_sq_error(err) -> float:
    """Sum of all of ``err``'s elements (already squared errors), fp64, in a fixed order."""
    return float(tree_sum(err.double().reshape(-1)))


def pack_nibbles(codes):
    """int [N, K] codes in 0..15 (or -8..7) -> int8 [N, K/2], even column in the low nibble."""
    import torch
    c = codes.to(torch.int32) & 0xF
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_nibbles(packed):
    """int8 [N, K/2] -> int32 [N, K] unsigned nibbles 0..15 (inverse of :func:`pack_nibbles`)."""
    import torch
    b = packed.view(torch.uint8).to(torch.int32)
    out = torch.empty(b.shape[0], b.shape[1] * 2, dtype=torch.int32, device=b.device)
    out[:, 0::2] = b & 0xF
    out[:, 1::2] = b >> 4
    return out


def marker_int(marker: dict, key: str, default: int, fmt: str, layer: str) -> int:
    v = marker.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise QuantkitError(f"{fmt}: .comfy_quant {key} {v!r} is not a positive integer",
                            tensor=f"{layer}.comfy_quant", fix="re-convert the layer with quantkit")
    return v


def bad(layer: str, suffix: str, fmt: str, what: str) -> QuantkitError:
    return QuantkitError(f"{fmt}: {what}", tensor=f"{layer}.{suffix}", fix="re-convert the layer with quantkit")


def check_tensor(out: list[Violation], layer: str, T: dict, suffix: str, dtypes: tuple[str, ...],
                 shape: tuple[int, ...] | None, fmt: str, missing_rule: str = "missing-scale") -> bool:
    """Append the violations of ``L.suffix`` (absent, wrong dtype, wrong shape); True when present."""
    name = f"{layer}.{suffix}"
    t = T.get(name)
    if t is None:
        out.append(Violation(missing_rule, name, f"{fmt} needs {name}; ComfyUI's loader raises without it"))
        return False
    if t.dtype not in dtypes:
        out.append(Violation("wrong-scale-dtype" if suffix != "weight" else "wrong-weight-dtype", name,
                             f"{fmt} {suffix} is {t.dtype}, must be {' or '.join(dtypes)}"))
    if shape is not None and tuple(t.shape) != tuple(shape):
        out.append(Violation("wrong-scale-shape" if suffix != "weight" else "wrong-weight-shape", name,
                             f"{fmt} {suffix} must be {list(shape)}, not {list(t.shape)}"))
    return True


def check_convrot_group(out: list[Violation], layer: str, m: dict, k: int, fmt: str) -> None:
    g = m.get("convrot_groupsize", DEFAULT_CONVROT)
    if not isinstance(g, int) or isinstance(g, bool) or g not in (4, *CONVROT_GROUPS, 4096):
        out.append(Violation("bad-marker", f"{layer}.comfy_quant",
                             f"{fmt} convrot_groupsize {g!r} is not a power of 4"))
    elif k % g:
        out.append(Violation("bad-convrot-group", f"{layer}.comfy_quant",
                             f"{fmt} convrot_groupsize {g} does not divide K={k}"
                             + ("" if "convrot_groupsize" in m else " (absent: ComfyUI uses 256)")))
