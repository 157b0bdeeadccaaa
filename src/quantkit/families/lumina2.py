"""Lumina Image 2.0 (NextDiT; ComfyUI key names), text from Gemma-2-2B (2304 wide)."""

from . import Family
from ._nextdit import KEEP

FAMILY = Family(
    name="lumina2",
    title="Lumina 2",
    detect=((r"^cap_embedder\.1\.weight$", (None, 2304)),
            r"^noise_refiner\.\d+\.attention\.k_norm\.weight$",
            r"^layers\.\d+\.attention\.qkv\.weight$"),
    keep=KEEP,
)
