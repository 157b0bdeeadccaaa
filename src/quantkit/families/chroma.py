"""Chroma: Flux.1-shaped blocks without per-block modulation; a distilled guidance network computes
all modulation vectors instead."""

from . import Family

FAMILY = Family(
    name="chroma",
    title="Chroma",
    detect=(r"^distilled_guidance_layer\.in_proj\.weight$",
            r"^double_blocks\.\d+\.img_attn\.qkv\.weight$"),
    keep=(
        (r"^distilled_guidance_layer\..*$", "distilled guidance network: produces every modulation vector"),
        (r"^img_in$", "entry projection of the latent patches"),
        (r"^txt_in$", "entry projection of the T5 features"),
        (r"^final_layer\.linear$", "exit projection to latent patches"),
    ),
)
