"""T5 / umT5 encoders (HF T5EncoderModel key names: t5xxl for Flux/SD3, umt5-xxl for Wan)."""

from . import Family

FAMILY = Family(
    name="t5xxl",
    aliases=("t5", "umt5"),
    title="T5 encoder",
    detect=(r"^encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight$",
            r"^encoder\.block\.\d+\.layer\.1\.DenseReluDense\.wo\.weight$"),
    keep=(
        (r"^(shared|encoder\.embed_tokens)$", "token embedding table"),
        (r"^encoder\.block\.\d+\.layer\.0\.SelfAttention\.relative_attention_bias$", "relative position bias table"),
        (r"^encoder\.block\.\d+\.layer\.1\.DenseReluDense\.wo$",
         "FFN output projection: its inputs overflow fp16/fp8 (HF keeps T5 'wo' in fp32)"),
    ),
    note="a decoder, if present, is converted like the encoder; quantkit never drops tensors",
)
