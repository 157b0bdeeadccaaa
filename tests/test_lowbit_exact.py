"""The 4-bit quantizers (w4a8, w4a8-6bit, int4-convrot) write the same bytes on any device and thread
count because their torch arithmetic is order-free: elementwise IEEE operations (each result rounded
once), ``amax``/``amin``, exact comparisons and lookups, fixed-order sums (``_lowbit.tree_sum``) and
divisions by device tensors (``_lowbit.div``: torch on CUDA turns a division by a Python number into a
multiply by its reciprocal, which wrote other ``weight_s_channel`` / ``weight_scale`` bytes on an
H200). These tests hold the quantizers to that on the CPU; benchmarks/gpu_lowbit_exact.py compares
CUDA with CPU bytes on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from quantkit.formats import FORMATS, LayerOpts

NAMES = ("w4a8", "w4a8-6bit", "int4-convrot")
# torch functions the quantizers may call on floating tensors: exact, or one IEEE rounding per element
# (the same on CPU and CUDA), or order-free reductions. ``__get__`` is attribute access (.shape, ...).
EXACT_OPS = frozenset("""
__get__ __getitem__ __setitem__ __bool__ dim numel contiguous reshape view unsqueeze unbind stack cat pad
repeat_interleave empty empty_like full_like ones_like zeros_like to float double isfinite all any
abs neg add add_ sub sub_ mul mul_ div div_ __truediv__ square square_ minimum maximum where clamp clamp_
round round_ floor ceil amax amin lt le gt ge eq take gather searchsorted
""".split())
DIVISIONS = frozenset({"div", "div_", "__truediv__", "true_divide"})


def _floats(xs) -> bool:
    return any(_floats(x) if isinstance(x, (list, tuple)) else isinstance(x, torch.Tensor) and x.is_floating_point()
               for x in xs)


class _Audit(TorchFunctionMode):
    """Records each torch call on a floating tensor outside :data:`EXACT_OPS`, and each division by a
    Python number or a 0-dim tensor (what CUDA computes as a reciprocal multiply)."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if _floats(args) or _floats(kwargs.values()):
            if name not in EXACT_OPS:
                self.bad.add(name)
            elif name in DIVISIONS and len(args) > 1 and not (isinstance(args[1], torch.Tensor) and args[1].dim()):
                self.bad.add(f"{name} by a scalar")
        return func(*args, **kwargs)


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.randint(0, n, (8,), generator=g), torch.randint(0, k, (8,), generator=g)] *= 40.0  # outliers
    return w.to(torch.bfloat16)


def _bytes(d: dict) -> dict:
    return {k: v.contiguous().view(torch.uint8).clone() for k, v in d.items()}


@pytest.mark.parametrize("name", NAMES)
def test_quantizer_uses_only_device_exact_ops(name):
    audit = _Audit()
    with audit:
        FORMATS[name].quantize(_weight(64, 384, 1), LayerOpts())
    assert audit.bad == set()


def test_audit_flags_order_dependent_ops_and_scalar_division():
    x = torch.ones(4, 8)
    audit = _Audit()
    with audit:
        _ = x / torch.full_like(x, 7.0)  # allowed: an IEEE division on every device
        _ = x / 7.0
        _ = x.sum(dim=1)
        _ = x @ x.T
        _ = torch.ones(3, dtype=torch.int64).sum()  # integer sums are exact
    assert audit.bad == {"div by a scalar", "sum", "matmul"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(128, 384), (64, 1536)])
def test_quantizer_bytes_do_not_depend_on_the_thread_count(name, shape):
    """torch splits an op over threads above ~32k elements: 1 and 2 threads must write the same bytes."""
    w = _weight(*shape, seed=shape[1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _bytes(FORMATS[name].quantize(w, LayerOpts()))
        torch.set_num_threads(2)
        two = _bytes(FORMATS[name].quantize(w, LayerOpts()))
    finally:
        torch.set_num_threads(threads)
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
