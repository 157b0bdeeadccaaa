"""Qwen-Image (diffusers key names, which ComfyUI loads as they are)."""

from . import Family

FAMILY = Family(
    name="qwen-image",
    aliases=("qwen",),
    title="Qwen-Image",
    # (not txt_norm: later releases moved it to txt_in.text_norm)
    detect=(r"^transformer_blocks\.\d+\.img_mod\.1\.weight$",
            r"^transformer_blocks\.\d+\.attn\.add_q_proj\.weight$"),
    keep=(
        (r"^img_in$", "entry projection of the latent patches"),
        (r"^txt_in$", "entry projection of the Qwen2.5-VL features"),
        (r"^time_text_embed\.timestep_embedder\.linear_[12]$", "timestep embedding MLP"),
        (r"^transformer_blocks\.\d+\.(img|txt)_mod\.1$", "modulation (adaLN shift/scale/gate)"),
        (r"^norm_out\.linear$", "final modulation"),
        (r"^proj_out$", "exit projection to latent patches"),
    ),
)
