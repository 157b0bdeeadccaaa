"""Stable Diffusion 3 / 3.5 MMDiT (ComfyUI / Stability key names)."""

from . import Family

FAMILY = Family(
    name="sd3",
    aliases=("sd35",),
    title="SD3.x",
    detect=(r"^joint_blocks\.\d+\.x_block\.attn\.qkv\.weight$",
            r"^joint_blocks\.\d+\.context_block\.adaLN_modulation\.1\.weight$"),
    keep=(
        (r"^context_embedder$", "entry projection of the text features"),
        (r"^(t_embedder|y_embedder)\.mlp\.[02]$", "timestep / pooled-text embedding MLP"),
        (r"^joint_blocks\.\d+\.(x_block|context_block)\.adaLN_modulation\.1$", "modulation (adaLN)"),
        (r"^final_layer\.adaLN_modulation\.1$", "final modulation"),
        (r"^final_layer\.linear$", "exit projection to latent patches"),
    ),
)
