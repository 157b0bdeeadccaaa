"""Flux.2 (dev / Klein): one shared modulation per stream instead of one per block."""

from . import Family

FAMILY = Family(
    name="flux2",
    title="Flux.2",
    detect=(r"^double_stream_modulation_img\.lin\.weight$",
            r"^single_stream_modulation\.lin\.weight$",
            r"^double_blocks\.\d+\.img_attn\.qkv\.weight$"),
    keep=(
        (r"^img_in$", "entry projection of the latent patches"),
        (r"^txt_in$", "entry projection of the text-encoder features"),
        (r"^(time_in|guidance_in)\.(in|out)_layer$", "timestep / guidance embedding MLP"),
        (r"^double_stream_modulation_(img|txt)\.lin$", "shared modulation of the double blocks"),
        (r"^single_stream_modulation\.lin$", "shared modulation of the single blocks"),
        (r"^final_layer\.adaLN_modulation\.1$", "final modulation"),
        (r"^final_layer\.linear$", "exit projection to latent patches"),
    ),
)
