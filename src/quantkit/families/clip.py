"""CLIP text encoders in HF key names (clip_l / clip_g as ComfyUI stores them). L and G share
names; the token embedding's width tells them apart (768 vs 1280)."""

from . import Family

_KEEP = (
    (r"^text_model\.embeddings\.(token|position)_embedding$", "token / position embedding table"),
    (r"^text_projection$", "pooled-output projection (exit)"),
)

CLIP_L = Family(
    name="clip-l",
    title="CLIP-L",
    detect=((r"^text_model\.embeddings\.token_embedding\.weight$", (None, 768)),
            r"^text_model\.encoder\.layers\.\d+\.self_attn\.q_proj\.weight$"),
    keep=_KEEP,
)

CLIP_G = Family(
    name="clip-g",
    title="CLIP-G",
    detect=((r"^text_model\.embeddings\.token_embedding\.weight$", (None, 1280)),
            r"^text_model\.encoder\.layers\.\d+\.self_attn\.q_proj\.weight$"),
    keep=_KEEP,
)
