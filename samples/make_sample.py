"""Build samples/flux-mini.safetensors: a tiny bf16 checkpoint with Flux.1 key names and shapes
scaled down (hidden 128, 2 double + 2 single blocks). Deterministic: same bytes every run.

    python samples/make_sample.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

H, MLP, IN_CH, TXT, VEC = 128, 512, 64, 256, 128


def weight(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    w = torch.randn(n, k, generator=g) * (k ** -0.5)
    cols = torch.randint(0, k, (max(1, k // 64),), generator=g)  # a few outlier input channels
    w[:, cols] *= 8.0
    return w.to(torch.bfloat16)


def build() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20261125)
    sd: dict[str, torch.Tensor] = {}

    def linear(name: str, n: int, k: int) -> None:
        sd[f"{name}.weight"] = weight(g, n, k)
        sd[f"{name}.bias"] = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)

    linear("img_in", H, IN_CH)  # K=64: not divisible by 128, falls back in int8-block
    linear("txt_in", H, TXT)
    linear("time_in.in_layer", H, 256)
    linear("time_in.out_layer", H, H)
    linear("vector_in.in_layer", H, VEC)
    linear("vector_in.out_layer", H, H)
    for i in range(2):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            linear(f"{p}_mod.lin", 6 * H, H)
            linear(f"{p}_attn.qkv", 3 * H, H)
            linear(f"{p}_attn.proj", H, H)
            linear(f"{p}_mlp.0", MLP, H)
            linear(f"{p}_mlp.2", H, MLP)
            sd[f"{p}_attn.norm.query_norm.scale"] = torch.ones(H // 4, dtype=torch.bfloat16)
            sd[f"{p}_attn.norm.key_norm.scale"] = torch.ones(H // 4, dtype=torch.bfloat16)
    for i in range(2):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * H + MLP, H)
        linear(f"{p}.linear2", H, H + MLP)
        linear(f"{p}.modulation.lin", 3 * H, H)
        sd[f"{p}.norm.query_norm.scale"] = torch.ones(H // 4, dtype=torch.bfloat16)
        sd[f"{p}.norm.key_norm.scale"] = torch.ones(H // 4, dtype=torch.bfloat16)
    linear("final_layer.adaLN_modulation.1", 2 * H, H)
    linear("final_layer.linear", IN_CH, H)
    return sd


if __name__ == "__main__":
    out = Path(__file__).with_name("flux-mini.safetensors")
    save_file(build(), str(out), metadata={"format": "pt"})
    print(out, out.stat().st_size, "bytes")
