"""Real-model proof: all-MiniLM-L6-v2 quantized by ``quantkit.convert`` in each format, loaded into
the reference BERT through ``load_quantized``, compared with the fp32 model on real sentences.

Floors are the measured values (DEVELOPMENT.md, "Issue 3") rounded down at the 4th decimal."""

import pytest
import torch

import quantkit
from quantkit.models.bert import BertConfig, BertModel, load_bert, minilm_dir, tokenize
from quantkit.models.sentences import EVALUATION
from quantkit.runtime import QuantizedTensor, load_quantized

# format -> (mean, worst) cosine floors: runtime path on CPU (W8A8 for int8), then dequantize path
FLOORS = {
    "fp8": ((0.9985, 0.9980), (0.9985, 0.9980)),
    "fp8-e5m2": ((0.9943, 0.9915), (0.9943, 0.9915)),
    "int8-tensor": ((0.9717, 0.9575), (0.9734, 0.9629)),
    "int8-row": ((0.9972, 0.9963), (0.9996, 0.9994)),
    "int8-block": ((0.9970, 0.9959), (0.9979, 0.9969)),
}


@pytest.fixture(scope="module")
def reference_embeddings(minilm_fp32):
    ids, mask = tokenize(EVALUATION)
    with torch.no_grad():
        return ids, mask, load_bert().sentence_embeddings(ids, mask)


@pytest.mark.parametrize("fmt", list(FLOORS))
def test_minilm_embeddings_per_format(fmt, reference_embeddings, tmp_path):
    ids, mask, e0 = reference_embeddings
    out = tmp_path / f"minilm-{fmt}.safetensors"
    quantkit.convert(minilm_dir() / "model.safetensors", out, format=fmt)
    for full_precision, (mean_floor, worst_floor) in zip((False, True), FLOORS[fmt]):
        model = BertModel(BertConfig.from_json(minilm_dir() / "config.json")).eval()
        result = load_quantized(model, out, full_precision_mm=full_precision)
        assert len(result.quantized) == 37 and result.unexpected == ["embeddings.position_ids"]
        assert isinstance(model.encoder.layer[0].output.dense.weight, QuantizedTensor)
        with torch.no_grad():
            e = model.sentence_embeddings(ids, mask)
        cos = torch.nn.functional.cosine_similarity(e, e0, dim=-1)
        assert float(cos.mean()) >= mean_floor, (fmt, full_precision, float(cos.mean()))
        assert float(cos.min()) >= worst_floor, (fmt, full_precision, float(cos.min()))
