"""Gemma 2 / 3 text encoders (HF names): extra norms around the MLP."""

from . import Family
from ._llm import DETECT, KEEP

FAMILY = Family(
    name="gemma",
    title="Gemma 2 / 3",
    detect=(DETECT, r"^model\.layers\.\d+\.pre_feedforward_layernorm\.weight$"),
    keep=KEEP,
)
