"""Family detection and keep rules on key sets that mirror each family's real tensor names."""

from __future__ import annotations

import re

import pytest

from familykeys import BUILDERS, clip_l, flux1, t5xxl, wan
from quantkit import families, policy
from quantkit.errors import UsageError
from quantkit.safetensors_io import TensorInfo


def kept_layers(keys: dict, detected) -> dict[str, str]:
    """layer -> reason, for every 2-D float weight the policy keeps."""
    sel = policy.Selection(families=tuple(detected))
    out = {}
    for name, shape in keys.items():
        t = TensorInfo(name, "BF16", tuple(shape), 0, 0)
        if policy.is_candidate(t) is None and len(shape) == 2:
            why = policy.decide(t, sel)
            if why is not None:
                out[policy.layer_name(name)] = why
    return out


def test_every_family_has_a_key_set():
    assert set(BUILDERS) == {f.name for f in families.FAMILIES}


def test_patterns_are_anchored_and_compile():
    for fam in families.FAMILIES:
        pats = [e if isinstance(e, str) else e[0] for e in fam.detect] + [p for p, _ in fam.keep]
        for p in pats:
            assert p.startswith("^") and p.endswith("$"), (fam.name, p)
            re.compile(p)
        assert all(why and len(why) < 90 for _, why in fam.keep), fam.name


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_detects_exactly_its_family(name, prefix):
    keys, _ = BUILDERS[name]()
    keys = {prefix + k: v for k, v in keys.items()}
    found = families.detect(keys)
    assert [(d.family.name, d.prefix) for d in found] == [(name, prefix)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keeps_exactly_the_listed_layers(name):
    keys, expect = BUILDERS[name]()
    kept = kept_layers(keys, families.detect(keys))
    assert set(kept) == expect
    fam = families.BY_NAME[name]
    assert all(why.startswith(f"{fam.title}: ") for layer, why in kept.items()), kept
    # no dead rule: every keep rule hits at least one layer of the real-name key set
    layers = {policy.layer_name(k) for k in keys}
    for pat, _ in fam.keep:
        assert any(re.fullmatch(pat, layer) for layer in layers), (name, pat)


def test_block_counts_come_from_the_file():
    for nd, ns in ((1, 1), (19, 38), (57, 3)):
        keys, expect = flux1(nd, ns)
        assert [d.family.name for d in families.detect(keys)] == ["flux1"]
        assert set(kept_layers(keys, families.detect(keys))) == expect
    for n in (1, 40):
        keys, expect = wan(n, i2v=False)
        assert set(kept_layers(keys, families.detect(keys))) == expect


def test_full_checkpoint_with_several_components():
    keys = {}
    for prefix, (k, _) in (("model.diffusion_model.", flux1()), ("text_encoders.t5xxl.transformer.", t5xxl()),
                           ("text_encoders.clip_l.transformer.", clip_l())):
        keys.update({prefix + n: s for n, s in k.items()})
    found = families.detect(keys)
    assert [(d.family.name, d.prefix) for d in found] == [
        ("flux1", "model.diffusion_model."), ("clip-l", "text_encoders.clip_l.transformer."),
        ("t5xxl", "text_encoders.t5xxl.transformer.")]
    kept = kept_layers(keys, found)
    assert kept["model.diffusion_model.img_in"].startswith("Flux.1: ")
    assert kept["text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo"].startswith("T5 encoder: ")
    assert kept["text_encoders.clip_l.transformer.text_projection"].startswith("CLIP-L: ")
    assert "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.q" not in kept


def test_shapes_tell_apart_families_with_the_same_names():
    for name in ("clip-l", "clip-g", "z-image", "lumina2"):
        keys, _ = BUILDERS[name]()
        assert [d.family.name for d in families.detect(keys)] == [name]
    keys, _ = BUILDERS["clip-l"]()
    keys["text_model.embeddings.token_embedding.weight"] = (64, 1024)  # CLIP-H width: neither L nor G
    assert families.detect(keys) == []


def test_resolve_explicit_preset_and_errors():
    keys, _ = flux1()
    assert families.resolve("none", keys) == []
    assert [d.family.name for d in families.resolve("flux", keys)] == ["flux1"]  # alias
    with pytest.raises(UsageError, match=r"--preset wan: this file does not look like Wan 2.x \(it needs tensors "
                                         r"matching '\^blocks"):
        families.resolve("wan", keys)
    with pytest.raises(UsageError, match="unknown --preset 'flux3'"):
        families.resolve("flux3", keys)


def test_include_and_exclude_beat_family_rules():
    keys, _ = flux1()
    det = families.detect(keys)
    t = TensorInfo("img_in.weight", "BF16", (64, 64), 0, 0)
    assert policy.decide(t, policy.Selection(families=tuple(det))) == "Flux.1: entry projection of the latent patches"
    sel = policy.Selection.from_patterns(include=["^img_in$"], families=det)
    assert policy.decide(t, sel) is None
    sel = policy.Selection.from_patterns(include=["^img_in$"], exclude=["img"], families=det)
    assert policy.decide(t, sel) == "excluded by --exclude"
