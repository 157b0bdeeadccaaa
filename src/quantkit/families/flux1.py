"""Flux.1 (dev / schnell / Kontext / Fill), BFL key names as ComfyUI loads them."""

from . import Family

FAMILY = Family(
    name="flux1",
    aliases=("flux",),
    title="Flux.1",
    detect=(r"^double_blocks\.\d+\.img_mod\.lin\.weight$",
            r"^single_blocks\.\d+\.linear1\.weight$",
            r"^single_blocks\.\d+\.modulation\.lin\.weight$"),
    keep=(
        (r"^img_in$", "entry projection of the latent patches"),
        (r"^txt_in$", "entry projection of the T5 features"),
        (r"^(time_in|vector_in|guidance_in)\.(in|out)_layer$", "timestep / pooled-text / guidance embedding MLP"),
        (r"^double_blocks\.\d+\.(img|txt)_mod\.lin$", "modulation (adaLN shift/scale/gate)"),
        (r"^single_blocks\.\d+\.modulation\.lin$", "modulation (adaLN shift/scale/gate)"),
        (r"^final_layer\.adaLN_modulation\.1$", "final modulation"),
        (r"^final_layer\.linear$", "exit projection to latent patches"),
    ),
)
