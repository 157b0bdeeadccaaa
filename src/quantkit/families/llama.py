"""Llama and Mistral text encoders (HF names). The two share every key name, so quantkit cannot tell
them apart and treats them as one family; checked after Qwen and Gemma, whose keys are a superset."""

from . import Family
from ._llm import DETECT, KEEP

FAMILY = Family(
    name="llama",
    aliases=("mistral",),
    title="Llama / Mistral",
    detect=(DETECT, r"^model\.layers\.\d+\.mlp\.gate_proj\.weight$"),
    keep=KEEP,
)
