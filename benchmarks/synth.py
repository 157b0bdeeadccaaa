"""Build a synthetic Flux-shaped bf16 checkpoint of a requested size, streamed to disk (bounded RAM).

Each block holds Flux.1's big linear shapes (3072x3072 attention, 12288x3072 and 3072x12288 MLP),
with biases and 1-D norm scales; weights are N(0, 1/K) with a few 8x outlier input channels.

    python benchmarks/synth.py OUT.safetensors --gb 4
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from quantkit.dtypes import name_of
from quantkit.safetensors_io import PlannedTensor, SafetensorsWriter

H, MLP = 3072, 12288


def block_shapes(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"double_blocks.{i}"
    out = []
    for name, shape in ((f"{p}.img_attn.qkv", (3 * H, H)), (f"{p}.img_attn.proj", (H, H)),
                        (f"{p}.img_mlp.0", (MLP, H)), (f"{p}.img_mlp.2", (H, MLP))):
        out += [(f"{name}.weight", shape), (f"{name}.bias", (shape[0],))]
    out += [(f"{p}.img_attn.norm.query_norm.scale", (128,)), (f"{p}.img_attn.norm.key_norm.scale", (128,))]
    return out


def plan(gb: float) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("img_in.weight", (H, 64)), ("img_in.bias", (H,))]
    total, i = 0, 0
    while total < gb * 1e9:
        b = block_shapes(i)
        shapes += b
        total += sum(2 * torch.Size(s).numel() for _, s in b)
        i += 1
    return shapes


def tensor_for(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return (torch.randn(shape, generator=g) * 0.01 + (1.0 if "norm" in name else 0.0)).to(torch.bfloat16)
    n, k = shape
    w = torch.randn(shape, generator=g).mul_(k ** -0.5)
    w[:, torch.randint(0, k, (8,), generator=g)] *= 8.0
    return w.to(torch.bfloat16)


def build(path: Path, gb: float, seed: int = 0) -> Path:
    shapes = plan(gb)
    planned = [PlannedTensor(n, name_of(torch.bfloat16), s) for n, s in shapes]
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = SafetensorsWriter(fd, planned, {"format": "pt"})
        for n, s in shapes:
            w.write(n, tensor_for(n, s, g))
        w.finish()
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--gb", type=float, default=4.0)
    a = ap.parse_args()
    p = build(a.out, a.gb)
    print(p, p.stat().st_size / 1e9, "GB")
