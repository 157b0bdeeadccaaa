"""Z-Image (NextDiT body; ComfyUI key names). Told apart from Lumina 2 by its caption embedder's
input width: Z-Image reads Qwen3-4B features (2560 wide), Lumina 2 Gemma-2-2B features (2304)."""

from . import Family
from ._nextdit import KEEP

FAMILY = Family(
    name="z-image",
    aliases=("zimage",),
    title="Z-Image",
    detect=((r"^cap_embedder\.1\.weight$", (None, 2560)),
            r"^noise_refiner\.\d+\.attention\.k_norm\.weight$",
            r"^layers\.\d+\.attention\.qkv\.weight$"),
    keep=KEEP,
)
