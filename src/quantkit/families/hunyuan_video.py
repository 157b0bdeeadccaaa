"""HunyuanVideo (Tencent key names as ComfyUI loads them): Flux-like, but ``img_attn_qkv`` with an
underscore and a token refiner on the text side."""

from . import Family

FAMILY = Family(
    name="hunyuan-video",
    aliases=("hunyuan",),
    title="HunyuanVideo",
    detect=(r"^double_blocks\.\d+\.img_attn_qkv\.weight$",
            r"^single_blocks\.\d+\.linear1\.weight$",
            r"^txt_in\.input_embedder\.weight$"),
    keep=(
        (r"^txt_in\.input_embedder$", "entry projection of the text features"),
        (r"^txt_in\.(t_embedder\.mlp\.[02]|c_embedder\.linear_[12])$", "token-refiner timestep / pooled-text embedding"),
        (r"^txt_in\.individual_token_refiner\.blocks\.\d+\.adaLN_modulation\.1$", "token-refiner modulation"),
        (r"^(time_in|guidance_in)\.mlp\.[02]$", "timestep / guidance embedding MLP"),
        (r"^vector_in\.(in|out)_layer$", "pooled-text embedding MLP"),
        (r"^double_blocks\.\d+\.(img|txt)_mod\.linear$", "modulation (adaLN shift/scale/gate)"),
        (r"^single_blocks\.\d+\.modulation\.linear$", "modulation (adaLN shift/scale/gate)"),
        (r"^final_layer\.adaLN_modulation\.1$", "final modulation"),
        (r"^final_layer\.linear$", "exit projection to latent patches"),
    ),
)
