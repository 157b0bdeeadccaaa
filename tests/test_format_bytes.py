"""The bytes every existing format writes, pinned: sha256 of whole output files on the bundled sample,
on all-MiniLM-L6-v2 and through calibration + learned rounding + bias correction. The values were
measured from the code at commit db982d7 (before formats became one module each); a change to any
of them changes what users' files hold, so it must be deliberate and recorded here."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import quantkit
from quantkit import calibration

from conftest import SAMPLE, minilm_path, sha

SAMPLE_SHA = {
    "fp8": "76b236bc7178432275feb8e4f050f95ee25bf6bb3d212b34bf0e72334342bbc5",
    "fp8-e5m2": "fad483d020db8bdfd50f8cb752873d89b1fc432872201a19fe956ee9770f0d51",
    "int8-tensor": "2460e0609ca959cae45f7fc41cf2af7446dce52bcabf868835baeb01887c4e23",
    "int8-row": "451fa1c75afe457efad4cc1ee1507521f0843bbcb73cf9c14fa4e559d518c882",
    "int8-block": "a31c78eaef7f628587b6137fac9160aa3606c8a41146b2a62c184e9cb350d07b",
    # the 4-bit formats, pinned when they landed
    "w4a8": "384f23eae1b2bf89fba2a06d69ec03196439840a7e11b4ff5b76948ce3c1c55c",
    "w4a8-6bit": "949b1aab9f4e39f148550c3941ce4ef68727083ff83bd867c107b8b1eadd835d",
    "int4-convrot": "809e06382b469d1446c00013b3c052577a540082d8594d191c1a4c1e3a8f9629",
    "awq4": "74ac8928257e533363a6804a803495b08da0b5020af0e2c58f53ced82d95cc69",
}
SAMPLE_NO_PRESET_BLOCK64_SHA = {
    "fp8": "cb51d6dd418fcdcd94b542bfd2642a3665efe59e41b0834f7d1a91e25075477e",
    "int8-row": "455062eeddb81eb66838cbc8537e6ab0ec6d32c2cb85e19a1111f015d89ed140",
    "int8-block": "29cb6d1cae6b867c645cc18f1427ef847099c9394925261350126982783e7bf6",
}
MINILM_SHA = {
    "fp8": "a882c2c52b3e7892e37f38044da2b190da28067142bea399067d779a7db1fe7e",
    "fp8-e5m2": "62c5b525de367c474a1062ffab6cc2ac618b35d8cf74ad655194e17633b3bf05",
    "int8-tensor": "933c42a8ee8d0e6537ca18933e11a80b5b1207d4217605f3fcabc316ab5a9109",
    "int8-row": "c1baeba3a6a39162eb2e35dc9abd53a0def05076ff586bc908167297cb3c9a16",
    "int8-block": "21d8e34a010a23234847a25f851eba26ccf9e3e34763d76d891cd84864ad7407",
    "int4-convrot": "a3b6d81ace5237601b29a7ff84dbd01afd8c7dca34d6523ef281391a41471af7",
    "awq4": "22bb99a306a41993951c7f8c66263e7f4cc2db2a005c352ca116487ff2b17dee",
}
MINILM_SLOW_SHA = {  # their search makes a whole-MiniLM convert take 15-40 s on 2 cores
    "w4a8": "8a18fbfc1de8b27c87ecebc7b6b538ecc89351039fba20084201799fde99e0a2",
    "w4a8-6bit": "91f86acc9fe5fe4e9b8a32b32ec03e0e1199e4f5cb92537b2b18b319023c71a6",
}
LEARNED_SHA = {
    # fp8 re-pinned when GPTQ's trailing update became a fixed-order chain and its damping mean a
    # fixed-order sum (the same bytes on every device and thread count since; int8 unchanged)
    "fp8": "f5ab0ca1c8f652afb74732dd603f5f2e635d744e46f7151af9403a0f6a907894",
    "int8-row": "ba5ce88729f12b6b855a2e875ed57b0cab8c486f479dacec6b0fa2a06cfdced0",
    "int8-block": "61b0394691e1577e12e4e1a8dbd043e2907bd4fb9c0f9d9277284f54fb4a156a",
}


@pytest.mark.parametrize("fmt", SAMPLE_SHA)
def test_sample_bytes(tmp_path, fmt):
    out = tmp_path / "out.safetensors"
    quantkit.convert(SAMPLE, out, format=fmt)
    assert sha(out) == SAMPLE_SHA[fmt]


@pytest.mark.parametrize("fmt", SAMPLE_NO_PRESET_BLOCK64_SHA)
def test_sample_bytes_no_preset_block64(tmp_path, fmt):
    out = tmp_path / "out.safetensors"
    quantkit.convert(SAMPLE, out, format=fmt, preset="none", block_size=64)
    assert sha(out) == SAMPLE_NO_PRESET_BLOCK64_SHA[fmt]


@pytest.mark.parametrize("fmt", MINILM_SHA)
def test_minilm_bytes(tmp_path, fmt):
    out = tmp_path / "out.safetensors"
    quantkit.convert(minilm_path(), out, format=fmt)
    assert sha(out) == MINILM_SHA[fmt]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", MINILM_SLOW_SHA)
def test_minilm_bytes_slow(tmp_path, fmt):
    out = tmp_path / "out.safetensors"
    quantkit.convert(minilm_path(), out, format=fmt)
    assert sha(out) == MINILM_SLOW_SHA[fmt]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 256)
        self.down = nn.Linear(256, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("fmt", LEARNED_SHA)
def test_learned_bytes(tmp_path, fmt):
    torch.manual_seed(0)
    m = _Tiny()
    with torch.no_grad(), calibration.capture(m) as cap:
        for _ in range(4):
            m(torch.randn(64, 16) * 2 + 1)
    stats = tmp_path / "stats.safetensors"
    cap.save(stats)
    ck = tmp_path / "tiny.safetensors"
    save_file({k: v.detach().to(torch.bfloat16) for k, v in m.state_dict().items()}, str(ck))
    out = tmp_path / "out.safetensors"
    quantkit.convert(ck, out, format=fmt, learned_rounding=True, calibration=stats, bias_correction=True)
    assert sha(out) == LEARNED_SHA[fmt]
