"""The reference BERT forward reproduces all-MiniLM-L6-v2's published similarity."""

import torch

from conftest import record

from quantkit.models.bert import load_bert, tokenize


def test_minilm_forward_matches_published_similarity(minilm_fp32):
    model = load_bert()
    ids, mask = tokenize(["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."])
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.sentence_embeddings(ids, mask), dim=-1)
    # sentence-transformers documents 0.7553 for the first pair with this model
    record("similarity of the eating pair", float(e[0] @ e[1]))
    record("similarity eating / riding", float(e[0] @ e[2]))
    assert abs(float(e[0] @ e[1]) - 0.7553) < 2e-3
    assert float(e[0] @ e[2]) < 0.3
