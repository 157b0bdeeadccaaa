"""Qwen text encoders (HF names): Qwen2 / 2.5 (-VL, Qwen-Image's encoder) have q/k/v biases;
Qwen3 (Z-Image's encoder) has per-head q/k norms instead."""

from . import Family
from ._llm import DETECT, KEEP

QWEN2 = Family(
    name="qwen2",
    title="Qwen2 / Qwen2.5",
    detect=(DETECT, r"^model\.layers\.\d+\.self_attn\.q_proj\.bias$"),
    keep=KEEP,
)

QWEN3 = Family(
    name="qwen3",
    title="Qwen3",
    detect=(DETECT, r"^model\.layers\.\d+\.self_attn\.q_norm\.weight$"),
    keep=KEEP,
)
