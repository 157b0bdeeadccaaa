"""safetensors dtype names, their torch dtypes, sizes and the writer's ordering rank.

DTYPES lists every dtype safetensors 0.8 reads, in the order of its ``Dtype`` enum. RANK reproduces
the order ``safetensors.torch.save_file`` lays tensors out in: descending rank, then name. It was read
off safetensors 0.8's output for every dtype torch can store (see
tests/test_safetensors_io.py::test_dtype_order_matches_save_file).

Sizes are in bits: F4 packs two elements per byte (torch holds it as ``float4_e2m1fn_x2``, whose
last dimension is half the safetensors one), the F6 types four elements per three bytes (torch has
no dtype for them, and safetensors' own torch loader refuses them).
"""

from __future__ import annotations

import torch

# name -> (torch dtype or None when torch lacks it, bits per element)
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8),
    "F4": (getattr(torch, "float4_e2m1fn_x2", None), 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "I16": (torch.int16, 16),
    "U16": (getattr(torch, "uint16", None), 16),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "I32": (torch.int32, 32),
    "U32": (getattr(torch, "uint32", None), 32),
    "F32": (torch.float32, 32),
    "C64": (torch.complex64, 64),
    "F64": (torch.float64, 64),
    "I64": (torch.int64, 64),
    "U64": (getattr(torch, "uint64", None), 64),
}

# Higher rank is written first (ties broken by name), as save_file does.
RANK: dict[str, int] = {name: i for i, name in enumerate(DTYPES)}

TORCH_TO_NAME: dict[torch.dtype, str] = {dt: name for name, (dt, _) in DTYPES.items() if dt is not None}

FLOAT_WEIGHT_DTYPES = frozenset({"F32", "F16", "BF16"})

PACKED_X2 = frozenset({"F4"})  # two elements per torch element: torch's last dimension is halved


def bitsize(name: str) -> int:
    return DTYPES[name][1]


def itemsize(name: str) -> int:
    """Bytes per torch element (1 for F4's packed pairs)."""
    return max(1, DTYPES[name][1] // 8)


def torch_dtype(name: str) -> torch.dtype:
    dt = DTYPES[name][0]
    if dt is None:
        raise KeyError(f"this torch build has no dtype for safetensors {name}")
    return dt


def torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a safetensors ``shape`` of dtype ``name`` (F4: last dimension halved)."""
    if name in PACKED_X2:
        return (*shape[:-1], shape[-1] // 2)
    return tuple(shape)


def file_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The safetensors shape of a torch tensor's ``shape`` (inverse of :func:`torch_shape`)."""
    if name in PACKED_X2:
        return (*shape[:-1], shape[-1] * 2)
    return tuple(shape)


def name_of(dtype: torch.dtype) -> str:
    return TORCH_TO_NAME[dtype]
