"""SDXL UNet (LDM key names as in the original and ComfyUI checkpoints)."""

from . import Family

FAMILY = Family(
    name="sdxl",
    title="SDXL UNet",
    detect=(r"^label_emb\.0\.0\.weight$",
            r"^input_blocks\.\d+\.1\.transformer_blocks\.\d+\.attn2\.to_k\.weight$",
            r"^middle_block\.1\.proj_in\.weight$"),
    keep=(
        (r"^time_embed\.[02]$", "timestep embedding MLP"),
        (r"^label_emb\.0\.[02]$", "size / crop / pooled-text embedding MLP"),
        (r"^(input_blocks|middle_block|output_blocks)\.(\d+\.)?\d+\.emb_layers\.1$",
         "timestep projection into each ResBlock"),
    ),
)
