"""A fresh copy of the ComfyUI stand-ins in tests/fake_comfyui for each test (their module state --
QUANT_ALGOS, the wrapped loader -- must not leak between tests)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

FAKE_ROOT = Path(__file__).resolve().parent / "fake_comfyui"
NAMES = ("comfy", "folder_paths")


def _purge():
    for name in list(sys.modules):
        if name in NAMES or name.startswith("comfy."):
            del sys.modules[name]


@pytest.fixture
def comfy(monkeypatch):
    pytest.importorskip("comfy_kitchen")
    _purge()
    monkeypatch.syspath_prepend(str(FAKE_ROOT))
    ns = SimpleNamespace(
        quant_ops=importlib.import_module("comfy.quant_ops"),
        ops=importlib.import_module("comfy.ops"),
        model_patcher=importlib.import_module("comfy.model_patcher"),
        utils=importlib.import_module("comfy.utils"),
        model_management=importlib.import_module("comfy.model_management"),
        folder_paths=importlib.import_module("folder_paths"),
    )
    ns.utils.ProgressBar.instances.clear()
    yield ns
    _purge()
