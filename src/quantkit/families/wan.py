"""Wan 2.1 / 2.2 video DiT (original Wan key names, as ComfyUI loads them)."""

from . import Family

FAMILY = Family(
    name="wan",
    title="Wan 2.x",
    detect=(r"^blocks\.\d+\.self_attn\.q\.weight$",
            r"^blocks\.\d+\.cross_attn\.k\.weight$",
            r"^head\.head\.weight$"),
    keep=(
        (r"^text_embedding\.[02]$", "entry projection of the umT5 features"),
        (r"^time_embedding\.[02]$", "timestep embedding MLP"),
        (r"^time_projection\.1$", "timestep -> modulation projection"),
        (r"^img_emb\.proj\.\d+$", "CLIP-vision image embedding (i2v)"),
        (r"^head\.head$", "exit projection to latent patches"),
    ),
)
