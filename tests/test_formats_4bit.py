"""The 4-bit formats stock ComfyUI loads (w4a8, w4a8-6bit, int4-convrot, awq4): dequantization bit for
bit against comfy-kitchen 0.2.40's layout classes (the oracle: what ComfyUI computes), the stored
tensors against kitchen's own quantizer where ours is defined to equal it, quality against kitchen's
quantizer per layer on all-MiniLM-L6-v2 and on held-out sentence embeddings, determinism across
thread counts, the markers ComfyUI's loader reads, contract checks and error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, LayerOpts, _lowbit, encode_comfy_quant, format_of_marker
from quantkit.formats import awq4, int4_convrot, w4a8
from quantkit.formats.scaled import sqnr
from quantkit.formats_next import hadamard
from quantkit.inspection import inspect_file

from conftest import ROOT, SAMPLE, minilm_path

ck_tensor = pytest.importorskip("comfy_kitchen.tensor")
from comfy_kitchen.backends.eager import w4a8_int8 as ck_w4a8  # noqa: E402
from comfy_kitchen.backends.eager.convrot_w4a4 import quantize_signed_int4_rowwise  # noqa: E402
from comfy_kitchen.tensor import (AsymW4A8Int8Layout, QuantizedTensor, TensorCoreAWQW4A16Layout,  # noqa: E402
                                  TensorCoreConvRotW4A4Layout)

NAMES = ("w4a8", "w4a8-6bit", "int4-convrot", "awq4")
OPTS = LayerOpts()
N_ODD = 37  # an odd row count everywhere


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _marker(name: str, shape, **over) -> dict:
    return {**FORMATS[name].marker(tuple(shape), torch.float32, OPTS), **over}


# ---------------------------------------------------------------- dequantization vs kitchen's layouts

def _kitchen_w4a8(t: dict, m: dict, dtype, n: int, k: int) -> torch.Tensor:
    s_rel = t["weight_s_rel"]
    s_rel = s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel  # as ComfyUI's loader
    p = AsymW4A8Int8Layout.Params(scale=s_rel, s_channel=t["weight_s_channel"], codebook=t.get("weight_codebook"),
                                  orig_dtype=dtype, orig_shape=(n, k), group_size=m["group_size"],
                                  convrot_groupsize=m["convrot_groupsize"])
    return QuantizedTensor(t["weight"], "AsymW4A8Int8Layout", p).dequantize()


def _random_w4a8(bits: int, n: int, k: int, seed: int, codebook: str = "lut") -> dict:
    g = _gen(seed)
    t = {"weight": torch.randint(-128, 128, (n, k * bits // 8), generator=g, dtype=torch.int8),
         "weight_s_rel": (torch.rand(n, k // 16, generator=g) * 120 + 0.01).to(torch.float8_e4m3fn),
         "weight_s_channel": torch.rand(n, generator=g) * 1e-3 + 1e-5}
    if bits == 4:
        t["weight_codebook"] = (torch.tensor(w4a8.LLOYD_MAX_16) if codebook == "lut"
                                else torch.sort(torch.randn(16, generator=g)).values)
    return t


@pytest.mark.parametrize("bits, k, group", [(4, 48, 16), (4, 192, 64), (4, 768, 256), (4, 1024, 1024),
                                            (6, 64, 16), (6, 192, 64), (6, 768, 256), (6, 1024, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a8_dequantize_is_kitchens_layout(bits, k, group, dtype):
    fmt = w4a8.W4A8 if bits == 4 else w4a8.W4A8_6BIT
    for seed, codebook in ((0, "lut"), (1, "random")):
        t = _random_w4a8(bits, N_ODD, k, seed, codebook)
        m = {"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": group}
        assert format_of_marker(m, {s: tuple(v.shape) for s, v in t.items()}) is fmt
        ours = fmt.dequantize(t, m, dtype, "L")
        assert ours.dtype == dtype and ours.shape == (N_ODD, k)
        assert torch.equal(ours, _kitchen_w4a8(t, m, dtype, N_ODD, k))
        # ComfyUI views a uint8-stored s_rel as fp8; so do we
        t8 = {**t, "weight_s_rel": t["weight_s_rel"].view(torch.uint8)}
        assert torch.equal(fmt.dequantize(t8, m, dtype, "L"), ours)


@pytest.mark.parametrize("k, group", [(64, 16), (192, 64), (768, 256), (1024, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_convrot_dequantize_is_kitchens_layout(k, group, dtype):
    g = _gen(k)
    t = {"weight": torch.randint(-128, 128, (N_ODD, k // 2), generator=g, dtype=torch.int8),
         "weight_scale": torch.rand(N_ODD, generator=g) * 0.01}
    m = {"format": "convrot_w4a4", "convrot_groupsize": group, "linear_dtype": "int4"}
    ours = int4_convrot.INT4_CONVROT.dequantize(t, m, dtype, "L")
    p = TensorCoreConvRotW4A4Layout.Params(scale=t["weight_scale"], orig_dtype=dtype, orig_shape=(N_ODD, k),
                                           convrot_groupsize=group, quant_group_size=64, linear_dtype="int4")
    assert ours.dtype == dtype
    assert torch.equal(ours, QuantizedTensor(t["weight"], "TensorCoreConvRotW4A4Layout", p).dequantize())


@pytest.mark.parametrize("k", [64, 192, 320])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_awq4_dequantize_is_kitchens_layout(k, dtype):
    g = _gen(k)
    t = {"weight": torch.randint(-128, 128, (N_ODD, k // 2), generator=g, dtype=torch.int8),
         "weight_scale": (torch.rand(k // 64, N_ODD, generator=g) * 0.01).to(torch.bfloat16),
         "weight_zeros": (torch.randn(k // 64, N_ODD, generator=g) * 0.01).to(torch.bfloat16)}
    m = {"format": "awq_w4a16", "group_size": 64}
    ours = awq4.AWQ4.dequantize(t, m, dtype, "L")
    p = TensorCoreAWQW4A16Layout.Params(scale=t["weight_scale"], zeros=t["weight_zeros"], orig_dtype=dtype,
                                        orig_shape=(N_ODD, k), group_size=64)
    theirs = QuantizedTensor(t["weight"], "TensorCoreAWQW4A16Layout", p).dequantize()
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)  # fp16 x bf16 promotes to fp32 in both


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layers_dequantize_as_kitchen(name, dtype):
    """What our quantizer writes, read back by kitchen's layout as ComfyUI's loader builds it."""
    fmt = FORMATS[name]
    w = torch.randn(N_ODD, 384, generator=_gen(3)).to(torch.bfloat16)
    t, m = fmt.quantize(w, OPTS), fmt.marker((N_ODD, 384), w.dtype, OPTS)
    ours = fmt.dequantize(t, m, dtype, "L")
    if name.startswith("w4a8"):
        theirs = _kitchen_w4a8(t, m, dtype, N_ODD, 384)
    elif name == "int4-convrot":
        p = TensorCoreConvRotW4A4Layout.Params(scale=t["weight_scale"], orig_dtype=dtype, orig_shape=(N_ODD, 384),
                                               convrot_groupsize=m["convrot_groupsize"],
                                               linear_dtype=m["linear_dtype"])
        theirs = QuantizedTensor(t["weight"], "TensorCoreConvRotW4A4Layout", p).dequantize()
    else:
        p = TensorCoreAWQW4A16Layout.Params(scale=t["weight_scale"], zeros=t["weight_zeros"], orig_dtype=dtype,
                                            orig_shape=(N_ODD, 384), group_size=m["group_size"])
        theirs = QuantizedTensor(t["weight"], "TensorCoreAWQW4A16Layout", p).dequantize()
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- markers and stored tensors

@pytest.mark.parametrize("k, want", [(384, 64), (1536, 256), (768, 256), (48, 16), (4096, 256)])
def test_convrot_group_is_per_layer_and_divides_k(k, want):
    """K = 384 (all-MiniLM-L6-v2) takes 64: kitchen's default 256 raises there, and a layer is never
    written unrotated under a rotated label."""
    for name in ("w4a8", "int4-convrot"):
        if FORMATS[name].cannot_take((8, k), OPTS):
            continue
        m = FORMATS[name].marker((8, k), torch.bfloat16, OPTS)
        assert m["convrot_groupsize"] == want and k % want == 0
    with pytest.raises(ValueError, match="convrot_groupsize"):
        AsymW4A8Int8Layout.quantize(torch.randn(8, 384))  # kitchen's own default on MiniLM's K


@pytest.mark.parametrize("name", NAMES)
def test_every_marker_names_its_format_and_the_keys_comfy_reads(name):
    fmt = FORMATS[name]
    m = fmt.marker((N_ODD, 384), torch.bfloat16, OPTS)
    assert m["format"] == fmt.comfy_format and fmt.stock_comfy
    want = {"w4a8": {"group_size": 16, "convrot_groupsize": 64}, "w4a8-6bit": {"group_size": 16, "convrot_groupsize": 64},
            "int4-convrot": {"convrot_groupsize": 64, "linear_dtype": "int4"}, "awq4": {"group_size": 64}}[name]
    assert {k: m[k] for k in want} == want
    names = [s.suffix for s in fmt.stored((N_ODD, 384), torch.bfloat16, OPTS)]
    assert names == {"w4a8": ["weight", "weight_s_rel", "weight_s_channel", "weight_codebook"],
                     "w4a8-6bit": ["weight", "weight_s_rel", "weight_s_channel"],
                     "int4-convrot": ["weight", "weight_scale"],
                     "awq4": ["weight", "weight_scale", "weight_zeros"]}[name]


def test_int4_round_to_nearest_is_kitchens():
    """``search=False`` is kitchen's quantizer on the rotated weight, byte for byte."""
    r = torch.randn(N_ODD, 512, generator=_gen(4))
    q, s = int4_convrot.quantize_rotated(r, search=False)
    kq, ks = quantize_signed_int4_rowwise(r.clone())
    assert torch.equal(_lowbit.pack_nibbles(q.to(torch.int32)), kq) and torch.equal(s, ks)
    q2, s2 = int4_convrot.quantize_rotated(r)  # the search: never worse on any row
    e1 = ((q * s[:, None] - r) ** 2).sum(1)
    e2 = ((q2 * s2[:, None] - r) ** 2).sum(1)
    assert bool((e2 <= e1 * (1 + 1e-6)).all()) and float(e2.sum()) < 0.8 * float(e1.sum())


def test_rotation_differs_from_kitchens_only_in_last_bits():
    """Where we deliberately differ: W is rotated in fp32 by a fixed butterfly, kitchen's quantizer
    multiplies by H in the weight's dtype with BLAS. On an fp32 weight, kitchen's round-to-nearest
    of its own rotation and ours of ours agree on all but a few near-tie codes."""
    w = torch.randn(N_ODD, 768, generator=_gen(12))
    kq, p = TensorCoreConvRotW4A4Layout.quantize(w, convrot_groupsize=256)
    q, s = int4_convrot.quantize_rotated(hadamard.rotate(w, 256), search=False)
    same = (_lowbit.unpack_nibbles(_lowbit.pack_nibbles(q.to(torch.int32))) == _lowbit.unpack_nibbles(kq))
    assert float(same.float().mean()) > 0.999
    torch.testing.assert_close(s, p.scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [4, 6])
def test_w4a8_without_search_is_kitchens_quantizer(bits):
    """``search=False`` runs kitchen's algorithm on the rotated weight: the same codes and fp8 group
    scales; s_channel within 1e-6 (we sum the least-squares scale in a fixed order, kitchen in torch's)."""
    r = hadamard.rotate(torch.randn(N_ODD, 512, generator=_gen(5)), 256)
    codes, s_rel, s_ch, cb = w4a8.quantize_rotated(r, bits, search=False)
    lut = torch.tensor(w4a8.LLOYD_MAX_16) if bits == 4 else None
    kq, ks, kc, corr, kcb = ck_w4a8._quantize_rotated_w4a8_int8_weight(r, codebook_override=lut, bits=bits,
                                                                       scale_search=False)
    assert corr is None
    assert torch.equal(w4a8.pack_codes(codes, bits), kq)
    assert torch.equal(s_rel.view(torch.uint8), ks.view(torch.uint8))
    torch.testing.assert_close(s_ch, kc, rtol=1e-6, atol=0)
    assert (cb is None) == (kcb is None) and (cb is None or torch.equal(cb, kcb))


def test_w4a8_codebook_is_kitchens_table():
    from comfy_kitchen.tensor.w4a8_packed import default_w4a8_codebook
    t = w4a8.W4A8.quantize(torch.randn(16, 256, generator=_gen(6)), OPTS)
    assert torch.equal(t["weight_codebook"], default_w4a8_codebook())  # keeps kitchen's GEMV packing


def test_w4a8_6bit_packing_round_trips():
    codes = torch.randint(0, 64, (N_ODD, 96), generator=_gen(7), dtype=torch.int32)
    packed = w4a8.pack_codes(codes, 6)
    from comfy_kitchen.tensor.w4a8_packed import _pack_codes
    assert torch.equal(packed, _pack_codes(codes, 6)) and torch.equal(w4a8.unpack_codes(packed, 96, 6), codes)


def test_awq4_baseline_is_min_max_and_kitchen_has_no_quantizer():
    with pytest.raises(NotImplementedError):
        TensorCoreAWQW4A16Layout.quantize(torch.randn(8, 64))
    x = torch.randn(N_ODD, 64, generator=_gen(8))
    q, s, z = awq4.quantize_grouped(x, search=False)
    mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    s_want = ((mx - mn) / 15).to(torch.bfloat16).float()
    assert torch.equal(s, s_want) and torch.equal(z, (mn + 8 * s_want).to(torch.bfloat16).float())
    q2, s2, z2 = awq4.quantize_grouped(x)
    e1 = (((q - 8) * s + z - x) ** 2).sum(1)
    e2 = (((q2 - 8) * s2 + z2 - x) ** 2).sum(1)
    assert bool((e2 <= e1).all()) and float(e2.sum()) < 0.9 * float(e1.sum())


# ---------------------------------------------------------------- quality on all-MiniLM-L6-v2

def _kitchen_dequant(name: str, w: torch.Tensor) -> torch.Tensor:
    """Kitchen's quantizer at the ConvRot group we write (its default 256 raises on K = 384); for
    awq_w4a16 kitchen has none, so the min/max round-to-nearest baseline stands in."""
    g = _lowbit.convrot_group(w.shape[1])
    if name.startswith("w4a8"):
        q, p = AsymW4A8Int8Layout.quantize(w, group_size=16, convrot_groupsize=g, bits=4 if name == "w4a8" else 6)
        return AsymW4A8Int8Layout.dequantize(q, p).float()
    if name == "int4-convrot":
        q, p = TensorCoreConvRotW4A4Layout.quantize(w, convrot_groupsize=g)
        return TensorCoreConvRotW4A4Layout.dequantize(q, p).float()
    t = awq4.AWQ4.quantize(w, OPTS, search=False)
    return awq4.AWQ4.dequantize(t, _marker("awq4", w.shape), torch.float32)


def _ours_dequant(name: str, w: torch.Tensor) -> torch.Tensor:
    fmt = FORMATS[name]
    return fmt.dequantize(fmt.quantize(w, OPTS), _marker(name, w.shape), torch.float32).float()


@pytest.fixture(scope="module")
def minilm() -> dict:
    return load_file(str(minilm_path()))


def _linears(sd: dict) -> list[str]:
    return [k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2 and k.startswith("encoder.")]


# Measured over all 36 encoder linears (test_minilm_every_layer_and_heldout; -m slow for w4a8*): the smallest
# per-layer margin ours - kitchen in dB: w4a8 0.287, w4a8-6bit 0.317, int4-convrot 1.450, awq4 0.832.
# Floors: those minus 0.06 dB (w4a8*) / 0.3 dB, covering BLAS and thread differences in kitchen's
# matmul rotation (ours is a fixed butterfly).
MARGIN_FLOOR = {"w4a8": 0.22, "w4a8-6bit": 0.25, "int4-convrot": 1.15, "awq4": 0.53}
FAST_LAYERS = ("encoder.layer.0.attention.self.query.weight",  # 384x384: ConvRot group 64
               "encoder.layer.3.output.dense.weight")  # 384x1536: group 256


@pytest.mark.parametrize("name", NAMES)
def test_minilm_layers_beat_kitchens_quantizer(minilm, name):
    for layer in FAST_LAYERS:
        w = minilm[layer]
        ours, theirs = sqnr(w, _ours_dequant(name, w)), sqnr(w, _kitchen_dequant(name, w))
        assert ours - theirs >= MARGIN_FLOOR[name], (layer, ours, theirs)


# Held-out mean 1 - cos of sentence embeddings against fp32 (models.sentences.EVALUATION, every
# encoder linear quantized), measured: ours / kitchen's quantizer
#   w4a8 1.712e-2 / 2.019e-2, w4a8-6bit 1.342e-3 / 1.651e-3, int4-convrot 4.995e-2 / 6.756e-2,
#   awq4 2.785e-2 / 3.499e-2 (min/max round-to-nearest). Ceilings: ours + 5 %.
HELDOUT_CEIL = {"w4a8": 1.80e-2, "w4a8-6bit": 1.41e-3, "int4-convrot": 5.25e-2, "awq4": 2.93e-2}
# mean SQNR over the 36 layers, measured w4a8 23.109, w4a8-6bit 34.266, int4-convrot 19.021, awq4 21.445
# (kitchen's quantizer: 22.781, 33.809, 17.394, min/max 20.563); floors 0.06 dB under
MEAN_SQNR_FLOOR = {"w4a8": 23.05, "w4a8-6bit": 34.2, "int4-convrot": 18.96, "awq4": 21.38}


def _heldout(minilm: dict, names: list[str], dequant) -> tuple[float, list[float]]:
    from quantkit.models import heldout, sentences
    sd = dict(minilm)
    db = []
    for n in names:
        sd[n] = dequant(minilm[n])
        db.append(sqnr(minilm[n], sd[n]))
    ref = heldout.model_from(minilm)
    return 1 - heldout.embedding_cosine(ref, heldout.model_from(sd), sentences.EVALUATION), db


@pytest.mark.parametrize("name", [pytest.param("w4a8", marks=pytest.mark.slow),  # 16 s on 2 cores (more when shared)
                                  pytest.param("w4a8-6bit", marks=pytest.mark.slow),  # 5 s
                                  "int4-convrot", "awq4"])  # 3 s each
def test_minilm_every_layer_and_heldout(minilm, name):
    names = _linears(minilm)
    assert len(names) == 36
    ours_cos, ours = _heldout(minilm, names, lambda w: _ours_dequant(name, w))
    theirs_cos, theirs = _heldout(minilm, names, lambda w: _kitchen_dequant(name, w))
    margins = [a - b for a, b in zip(ours, theirs)]
    print(f"{name}: mean SQNR {sum(ours) / 36:.3f} vs kitchen {sum(theirs) / 36:.3f} dB, min margin "
          f"{min(margins):.3f} dB, held-out 1-cos {ours_cos:.4e} vs {theirs_cos:.4e}")
    assert min(margins) >= MARGIN_FLOOR[name]
    assert sum(ours) / 36 >= MEAN_SQNR_FLOOR[name]
    assert ours_cos <= HELDOUT_CEIL[name] and ours_cos < theirs_cos


# ---------------------------------------------------------------- determinism

_DIGEST = r"""
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from quantkit.formats import FORMATS, LayerOpts
w = torch.randn(48, 768, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
h = hashlib.sha256()
for name in ("w4a8", "w4a8-6bit", "int4-convrot", "awq4"):
    for k, t in sorted(FORMATS[name].quantize(w, LayerOpts()).items()):
        h.update(k.encode()); h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_same_bytes_any_thread_count():
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    got = {n: subprocess.run([sys.executable, "-c", _DIGEST, str(n)], capture_output=True, text=True, check=True,
                             env=env).stdout.strip() for n in (1, 2, 3)}
    assert len(set(got.values())) == 1 and len(got[1]) == 64, got


def test_sample_converts_and_verifies_per_format(tmp_path):
    from quantkit.verify import verify
    for name in NAMES:
        out = tmp_path / f"{name}.safetensors"
        rep = quantkit.convert(SAMPLE, out, format=name)
        q = [lr for lr in rep.layers if lr.format == name]
        assert q and all(lr.sqnr_db > 17 for lr in q)
        sd = load_file(str(out))
        for lr in q:
            layer = lr.name.removesuffix(".weight")
            m = json.loads(sd[f"{layer}.comfy_quant"].numpy().tobytes())
            assert m["format"] == FORMATS[name].comfy_format
            for s in FORMATS[name].stored(tuple(lr.shape), torch.bfloat16, OPTS):
                assert f"{layer}.{s.suffix}" in sd
        v = verify(out, SAMPLE)
        assert not v.violations, [x.line() for x in v.violations]


# ---------------------------------------------------------------- contract checks and errors

def _layer_file(tmp_path, tensors: dict, marker: dict):
    p = tmp_path / "x.safetensors"
    save_file({**{f"L.{k}": v for k, v in tensors.items()},
               "L.comfy_quant": torch.tensor(list(encode_comfy_quant(marker)), dtype=torch.uint8)}, str(p))
    return {v.rule for v in inspect_file(p).violations}


def test_inspect_reports_each_violation(tmp_path):
    w = torch.randn(16, 384, generator=_gen(9))
    t = awq4.AWQ4.quantize(w, OPTS)
    m = _marker("awq4", w.shape)
    assert _layer_file(tmp_path, t, m) == set()
    bad = {**t, "weight_zero": t["weight_zeros"]}
    del bad["weight_zeros"]
    assert _layer_file(tmp_path, bad, m) == {"missing-scale", "misnamed-zeros"}
    assert _layer_file(tmp_path, {**t, "weight_scale": t["weight_scale"].t().contiguous()}, m) == {"wrong-scale-shape"}

    t = w4a8.W4A8_6BIT.quantize(w, OPTS)
    m = _marker("w4a8-6bit", w.shape)
    assert _layer_file(tmp_path, t, m) == set()
    assert _layer_file(tmp_path, {**t, "weight_codebook": torch.zeros(16)}, m) == {"codebook-on-6bit"}
    assert _layer_file(tmp_path, t, {**m, "convrot_groupsize": 256}) == {"bad-convrot-group"}
    assert _layer_file(tmp_path, t, {k: v for k, v in m.items() if k != "convrot_groupsize"}) == {"bad-convrot-group"}
    assert _layer_file(tmp_path, {**t, "weight_s_rel": t["weight_s_rel"].float()}, m) == {"wrong-scale-dtype"}
    assert _layer_file(tmp_path, {**t, "weight": t["weight"][:, :100].contiguous()}, m) == {"wrong-weight-shape"}
    t = int4_convrot.INT4_CONVROT.quantize(w, OPTS)
    m = _marker("int4-convrot", w.shape)
    assert _layer_file(tmp_path, t, m) == set()
    assert _layer_file(tmp_path, {"weight": t["weight"]}, m) == {"missing-scale"}
    assert _layer_file(tmp_path, t, {**m, "linear_dtype": "fp4"}) == {"bad-marker"}


def test_errors_name_the_tensor_and_the_fix():
    w = torch.randn(16, 384)
    w[3, 5] = float("nan")
    for name in NAMES:
        with pytest.raises(QuantkitError, match="NaN or Inf") as e:
            FORMATS[name].quantize(w, OPTS, layer="blk.0")
        assert e.value.tensor == "blk.0.weight" and e.value.fix
    assert FORMATS["int4-convrot"].cannot_take((16, 96), OPTS) == "in_features 96 is not a multiple of 64 (the INT4 kernel's group)"
    assert FORMATS["awq4"].cannot_take((16, 96), OPTS) == "in_features 96 is not a multiple of the group size 64"
    assert FORMATS["w4a8-6bit"].cannot_take((16, 48), OPTS) == "in_features 48 is not a multiple of 32"
    assert FORMATS["w4a8"].cannot_take((16, 40), OPTS) == "in_features 40 is not a multiple of 16"
    assert FORMATS["w4a8"].cannot_take((16, 48, 3), OPTS) == "3-D weight, format needs 2-D"
    with pytest.raises(QuantkitError, match="not a multiple of 64") as e:
        FORMATS["int4-convrot"].quantize(torch.randn(4, 96), OPTS, layer="L")
    assert e.value.tensor == "L.weight"
    t = awq4.AWQ4.quantize(torch.randn(4, 128), OPTS)
    with pytest.raises(QuantkitError, match="Missing AWQ W4A16 scale/zeros") as e:
        awq4.AWQ4.dequantize({"weight": t["weight"], "weight_scale": t["weight_scale"]}, {"group_size": 64},
                             torch.float32, "L")
    assert e.value.tensor == "L.weight_zeros"
    t = w4a8.W4A8.quantize(torch.randn(4, 384), OPTS)
    with pytest.raises(QuantkitError, match="convrot_groupsize 256 does not divide K=384") as e:
        w4a8.W4A8.dequantize(t, {"group_size": 16}, torch.float32, "L")  # absent: ComfyUI's default 256
    assert e.value.tensor == "L.comfy_quant"
    with pytest.raises(QuantkitError, match="neither K/2 nor 3K/4"):
        w4a8.W4A8.dequantize({**t, "weight": t["weight"][:, :100]}, _marker("w4a8", (4, 384)), torch.float32, "L")
    with pytest.raises(QuantkitError, match="6-bit storage takes no codebook"):
        t6 = w4a8.W4A8_6BIT.quantize(torch.randn(4, 384), OPTS)
        w4a8.W4A8_6BIT.dequantize({**t6, "weight_codebook": t["weight_codebook"]}, _marker("w4a8", (4, 384)),
                                  torch.float32, "L")


@pytest.mark.parametrize("name", NAMES)
def test_convert_of_a_nan_weight_names_file_and_tensor_and_leaves_nothing(tmp_path, name):
    src = tmp_path / "in.safetensors"
    w = torch.randn(32, 128, generator=_gen(14))
    w[1, 2] = float("nan")
    save_file({"blk.proj.weight": w}, str(src))
    with pytest.raises(QuantkitError, match="NaN or Inf") as e:
        quantkit.convert(src, tmp_path / "out.safetensors", format=name, preset="none")
    assert e.value.file == str(src) and e.value.tensor == "blk.proj.weight" and "--exclude" in e.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_convert_refuses_a_layer_it_cannot_take_without_leaving_output(tmp_path):
    """A layer whose K fits no group is kept as it is (planned), never written unrotated."""
    src = tmp_path / "in.safetensors"
    save_file({"blk.proj.weight": torch.randn(32, 96, generator=_gen(10)).to(torch.bfloat16)}, str(src))
    out = tmp_path / "out.safetensors"
    rep = quantkit.convert(src, out, format="int4-convrot", preset="none", fallback="keep")
    assert [lr.action for lr in rep.layers] == ["kept"]
    assert "blk.proj.comfy_quant" not in load_file(str(out))



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_quantizer_writes_the_cpu_bytes(name):
    """On a GPU (convert --device cuda) every format's quantizer writes the CPU's bytes there
    (elementwise IEEE fp32 ops, fixed-order sums, divisions by device tensors), and the tensors
    dequantize on the GPU to the CPU's values."""
    from quantkit.backend import quantize_stored
    fmt = FORMATS[name]
    w = torch.randn(96, 1536, generator=_gen(13)).to(torch.bfloat16)
    cpu = quantize_stored(w, fmt, OPTS)[0]
    gpu = quantize_stored(w.cuda(), fmt, OPTS)[0]  # its own quantize on the GPU
    for k, t in cpu.items():
        assert gpu[k].is_cuda and torch.equal(gpu[k].cpu().view(torch.uint8), t.view(torch.uint8)), k
    m = fmt.marker(tuple(w.shape), w.dtype, OPTS)
    d = fmt.dequantize(gpu, m, torch.float32, "L")
    assert d.is_cuda and sqnr(w.float(), d.cpu()) >= sqnr(w.float(), fmt.dequantize(cpu, m, torch.float32)) - 1e-3
