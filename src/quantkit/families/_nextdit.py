"""Rules shared by the NextDiT models (Lumina 2, Z-Image): same body, different text encoder."""

KEEP = (
    (r"^x_embedder$", "entry projection of the latent patches"),
    (r"^cap_embedder\.1$", "entry projection of the text features"),
    (r"^t_embedder\.mlp\.[02]$", "timestep embedding MLP"),
    (r"^(layers|noise_refiner|context_refiner)\.\d+\.adaLN_modulation\.0$", "modulation (adaLN)"),
    (r"^final_layer\.adaLN_modulation\.1$", "final modulation"),
    (r"^final_layer\.linear$", "exit projection to latent patches"),
)
