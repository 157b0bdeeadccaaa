"""The Gluon int8-block kernel (Hopper): compiled for sm_90 without a GPU, checked with ptxas for
what would make it slow (spills, serialised wgmma), and on an sm_90 GPU against the torch reference
(quantkit.runtime.activations) for every config. Triton's interpreter cannot run Gluon, so on CPU
only the compile checks run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from quantkit import reference  # noqa: E402
from quantkit.formats import FORMATS  # noqa: E402
from quantkit.runtime import activations, gluon_w8a8  # noqa: E402

if not gluon_w8a8.HAVE_GLUON:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

INT8 = FORMATS["int8-block"]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _operands(m, n, k, device, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[:, 5] *= 40  # an outlier channel
    xq, xs = activations.quantize_activations(x, INT8, 128)
    wq, ws = reference.quantize(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g), INT8, 128)
    b = torch.randn(n, generator=g) if bias else None
    return [t if t is None else t.to(device) for t in (xq, xs, wq, ws, b)]


def test_not_used_off_hopper():
    xq, xs, wq, ws, _ = _operands(64, 128, 256, "cpu")
    assert not gluon_w8a8.usable(xq, wq, 128)


def test_tuner_keeps_the_fastest_and_survives_a_kernel_that_does_not_build(monkeypatch):
    """The per-shape choice (timings faked: CPU only here): the fastest entry wins; a Gluon kernel
    that raises while building leaves the Triton kernel in use, with one warning."""
    xq, xs, wq, ws, _ = _operands(64, 128, 256, "cpu")
    speed = {gluon_w8a8.CONFIGS[1]: 0.5, None: 1.0}
    calls = []

    def fake_bench(fn, warmup, rep):
        calls.append(fn())
        return speed.get(calls[-1], 2.0)
    monkeypatch.setattr(gluon_w8a8.triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(gluon_w8a8, "_choice", {})
    monkeypatch.setattr(gluon_w8a8, "w8a8_block_matmul", lambda *a: a[-1])  # returns the config it ran
    assert gluon_w8a8.tuned_block_matmul(xq, xs, wq, ws, None, torch.float32, lambda: None) == gluon_w8a8.CONFIGS[1]
    assert list(gluon_w8a8._choice.values()) == [gluon_w8a8.CONFIGS[1]]

    def broken(*a):
        raise RuntimeError("tma has no attribute async_load\nmore")
    monkeypatch.setattr(gluon_w8a8, "w8a8_block_matmul", broken)
    monkeypatch.setattr(gluon_w8a8, "_warned", set())
    with pytest.warns(RuntimeWarning, match="did not build here .RuntimeError: tma has no attribute async_load.; "
                                            "using the Triton kernel"):
        assert gluon_w8a8.tuned_block_matmul(xq, xs, wq, ws, None, torch.bfloat16, lambda: "triton") == "triton"
    assert gluon_w8a8._choice[(64, 128, 256, torch.bfloat16, True, None)] is None


def _ptxas() -> Path:
    """The ptxas Triton itself uses for sm_90 (newer Triton ships two)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(90).path)
    except (ImportError, AttributeError, TypeError):
        return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def write_ptx(out_dir: str) -> None:
    """Compile every config for sm_90 (no GPU needed) and write ``<i>.ptx`` into ``out_dir``."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    xq, xs, wq, ws, b = _operands(512, 384, 640, "cpu", bias=True)  # 5 groups: a step and a tail
    c = torch.empty(512, 384, dtype=torch.bfloat16)
    for i, config in enumerate(gluon_w8a8.CONFIGS):
        _, args, kw = gluon_w8a8.kernel_args(xq, xs, wq, ws, b, c, config)
        fn = gluon_w8a8._block_kernel
        sig = {name: mangle_type(a) for name, a in zip(fn.arg_names, args)}
        sig.update({name: "constexpr" for name in kw})
        src = GluonASTSource(fn, sig, dict(kw))
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": kw["num_warps"]}).asm["ptx"]
        (Path(out_dir) / f"{i}.ptx").write_text(ptx)


@pytest.fixture(scope="module")
def ptx_dir(tmp_path_factory) -> Path:
    """The configs' PTX, compiled in a fresh process: Triton 3.9's interpreter leaves the language
    patched after a kernel calls a jit helper (other tests run kernels interpreted), and a real
    compile in that process then fails. (With a warm Triton cache the compile is skipped and the
    failure hidden.)"""
    d = tmp_path_factory.mktemp("ptx")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_gluon_w8a8 as t; t.write_ptx({str(d)!r})"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return d


@pytest.mark.skipif(not _ptxas().exists(), reason="this Triton ships no ptxas")
@pytest.mark.parametrize("i", range(len(gluon_w8a8.CONFIGS)), ids=[str(c) for c in gluon_w8a8.CONFIGS])
def test_compiles_for_sm90_without_spills_or_serialised_wgmma(i, ptx_dir, tmp_path):
    """What the overlap depends on: ptxas serialises every wgmma of a kernel (C7512/C7514) when the
    registers run out or an accumulator is read (or copied) while its dot is in flight, and then the
    scaling no longer overlaps the tensor cores."""
    ptx_file = ptx_dir / f"{i}.ptx"
    ptx = ptx_file.read_text()
    out = subprocess.run([str(_ptxas()), "-arch=sm_90a", "-v", str(ptx_file), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, env={**os.environ, "LANG": "C"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx  # the overlapped wait
    assert not re.search(r"C751[247]", log), log
    assert re.search(r"\b0 bytes spill stores", log), log


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", gluon_w8a8.CONFIGS)
@pytest.mark.parametrize("m,n,k,bias", [(45, 256, 128, True), (1000, 384, 640, False), (300, 512, 12288, True),
                                        (4096, 3072, 3072, False)])
def test_matches_reference_on_hopper(config, m, n, k, bias):
    xq, xs, wq, ws, b = _operands(m, n, k, "cuda", seed=m + k, bias=bias)
    assert gluon_w8a8.usable(xq, wq, 128)
    r = activations.w8a8_block_matmul(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), 128,
                                      None if b is None else b.cpu(), torch.float32)
    y = gluon_w8a8.w8a8_block_matmul(xq, xs, wq, ws, b, torch.float32, config)
    rel = float((y.cpu().double() - r.double()).norm() / r.double().norm())
    assert rel < 1e-6  # FMA contraction in the fp32 epilogue only
    yb = gluon_w8a8.w8a8_block_matmul(xq, xs, wq, ws, b, torch.bfloat16, config)
    assert float((yb.cpu().double() - r.double()).norm() / r.double().norm()) < 2 ** -7


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_tuned_dispatch_gives_the_same_result():
    from quantkit.runtime import triton_w8a8
    xq, xs, wq, ws, b = _operands(777, 640, 1024, "cuda", bias=True)
    y = triton_w8a8.w8a8_block_matmul(xq, xs, wq, ws, 128, b, torch.float32)
    key = next(k for k in gluon_w8a8._choice if k[:3] == (777, 640, 1024))
    assert gluon_w8a8._choice[key] in gluon_w8a8.CONFIGS + [None]
    r = activations.w8a8_block_matmul(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), 128, b.cpu(), torch.float32)
    assert float((y.cpu().double() - r.double()).norm() / r.double().norm()) < 1e-6
