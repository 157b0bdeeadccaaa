"""Real-model proof: all-MiniLM-L6-v2 quantized by ``quantkit.convert`` in each format, loaded into
the reference BERT through ``load_quantized``, compared with the fp32 model on real sentences."""

import pytest
import torch

import quantkit
from conftest import at_least, cos_floor
from quantkit.models.bert import BertConfig, BertModel, load_bert, minilm_dir, tokenize
from quantkit.models.sentences import EVALUATION
from quantkit.runtime import QuantizedTensor, load_quantized

# format -> measured (mean, worst) cosine: runtime path on CPU (W8A8 for int8), then dequantize path.
# Lowest of: 2 machines (one reported 0.971660 for the int8-tensor runtime mean, 6e-5 under the value
# here), 1 and 2 threads, ATEN_CPU_CAPABILITY avx512 and default (MKL_ENABLE_INSTRUCTIONS=SSE4_2
# changes nothing more). Only the W8A8 path moves (int8 activation rounding turns one-ulp differences
# into other integers): 1 - cos of the mean by up to 0.8% (relative), of the worst sentence by up to
# 4.2% (int8-tensor: 0.957535 vs 0.959318). Floors let 1 - cos grow 25% for the mean and 50% for the
# worst sentence (30x and 12x those spreads); a quantizer one bit coarser (int8 q/2 at 2x scale, fp8
# with one mantissa bit fewer) grows it 1.8x (int8-row runtime mean) to 10x, and fails every floor.
MEASURED = {
    "fp8": ((0.998572, 0.998051), (0.998572, 0.998051)),
    "fp8-e5m2": ((0.994344, 0.991558), (0.994344, 0.991558)),
    "int8-tensor": ((0.971660, 0.957535), (0.973479, 0.962967)),
    "int8-row": ((0.997286, 0.996339), (0.999620, 0.999494)),
    "int8-block": ((0.997073, 0.995972), (0.997988, 0.996947)),
}
FLOORS = {fmt: tuple((cos_floor(mean), cos_floor(worst, slack=0.5)) for mean, worst in m)
          for fmt, m in MEASURED.items()}


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
        path = "dequantize" if full_precision else "runtime"
        at_least(float(cos.mean()), mean_floor, f"{fmt} {path} mean cosine")
        at_least(float(cos.min()), worst_floor, f"{fmt} {path} worst cosine")
