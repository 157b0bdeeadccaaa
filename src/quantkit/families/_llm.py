"""Rules shared by decoder-only text encoders in HF key names (Llama, Mistral, Qwen, Gemma)."""

KEEP = (
    (r"^model\.embed_tokens$", "token embedding table"),
    (r"^lm_head$", "output head (exit projection; unused when only hidden states are read)"),
)
DETECT = r"^model\.layers\.\d+\.self_attn\.q_proj\.weight$"
