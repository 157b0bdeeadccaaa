"""LTX-Video (0.9.x; ComfyUI key names). LTX-2 (audio + video) is not covered."""

from . import Family

FAMILY = Family(
    name="ltxv",
    title="LTX-Video",
    detect=(r"^patchify_proj\.weight$",
            r"^adaln_single\.linear\.weight$",
            r"^transformer_blocks\.\d+\.attn1\.to_q\.weight$"),
    keep=(
        (r"^patchify_proj$", "entry projection of the latent patches"),
        (r"^adaln_single\.emb\.timestep_embedder\.linear_[12]$", "timestep embedding MLP"),
        (r"^adaln_single\.linear$", "timestep -> modulation projection"),
        (r"^caption_projection\.linear_[12]$", "entry projection of the T5 features"),
        (r"^proj_out$", "exit projection to latent patches"),
    ),
)
