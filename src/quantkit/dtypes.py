"""safetensors dtype names, their torch dtypes, sizes and the writer's ordering rank.

RANK reproduces the order ``safetensors.torch.save_file`` lays tensors out in: descending rank,
then name. It was read off safetensors 0.8's output for every dtype torch can store (see
tests/test_safetensors_io.py::test_dtype_order_matches_save_file).
"""

from __future__ import annotations

import torch

# name -> (torch dtype or None when torch lacks it, bytes per element)
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1),
    "I16": (torch.int16, 2),
    "U16": (getattr(torch, "uint16", None), 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (getattr(torch, "uint32", None), 4),
    "F32": (torch.float32, 4),
    "C64": (torch.complex64, 8),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (getattr(torch, "uint64", None), 8),
}

# Higher rank is written first (ties broken by name), as save_file does.
RANK: dict[str, int] = {name: i for i, name in enumerate(DTYPES)}

TORCH_TO_NAME: dict[torch.dtype, str] = {dt: name for name, (dt, _) in DTYPES.items() if dt is not None}

FLOAT_WEIGHT_DTYPES = frozenset({"F32", "F16", "BF16"})


def itemsize(name: str) -> int:
    return DTYPES[name][1]


def torch_dtype(name: str) -> torch.dtype:
    dt = DTYPES[name][0]
    if dt is None:
        raise KeyError(f"this torch build has no dtype for safetensors {name}")
    return dt


def name_of(dtype: torch.dtype) -> str:
    return TORCH_TO_NAME[dtype]
