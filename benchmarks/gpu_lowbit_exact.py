"""CPU against CUDA bytes of the 4-bit quantizers (w4a8, w4a8-6bit, int4-convrot), with a diagnosis
of any difference and the time each device takes.

    python3 benchmarks/gpu_lowbit_exact.py            # from the repo root, src/ on sys.path
    python3 benchmarks/gpu_lowbit_exact.py --device cpu   # a dry run of the harness (CPU against CPU)
    python3 benchmarks/gpu_lowbit_exact.py --device cpu --emulate-cuda-div   # the "device" divides
        # by a Python number as CUDA does (a multiply by the fp32 reciprocal): the harness's own check

For every case (shape, dtype, seed, weight kind) and format it runs the format's own torch
``quantize`` on the CPU and on CUDA and compares every stored tensor byte for byte. On a difference it prints:

1. stages, each run on both devices from the CPU's input of that stage (so a stage is judged on
   identical input): the rotation (``hadamard.rotate``), then the fit of the rotated weight
   (w4a8: the ALS group scales ``_als``, the searched scales and codes ``_fit``; int4-convrot:
   ``quantize_rotated``), then the packing;
2. an op trace (once a format, on up to 4 of the differing rows: rows are quantized independently):
   every torch call of the quantizer on each device with an exact integer digest of its outputs; the
   first call whose output differs is printed with its source line, how many elements differ, and
   the first of them on both devices with the operands at that index.

Then the CPU and CUDA quantize times per format (the CUDA one after a warm-up, synchronized).
Exit status 1 on any byte difference, 0 when every stored tensor matches.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

if importlib.util.find_spec("quantkit") is None:  # a checkout without the .pth: its own src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantkit.formats import FORMATS, LayerOpts, _lowbit as lb, w4a8  # noqa: E402
from quantkit.formats import int4_convrot  # noqa: E402
from quantkit.formats_next import hadamard  # noqa: E402

NAMES = ("w4a8", "w4a8-6bit", "int4-convrot")
OPTS = LayerOpts()


def make_weight(n: int, k: int, dtype, seed: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if kind == "outliers":  # LLM-like: a few input channels and single weights far out
        cols = torch.randint(0, k, (max(1, k // 256),), generator=g)
        w[:, cols] *= 30.0
        w[torch.randint(0, n, (64,), generator=g), torch.randint(0, k, (64,), generator=g)] = 4.0
    elif kind == "zero-tiny":  # all-zero rows, rows near fp32's smallest normals, a constant row
        w[0::7] = 0.0
        w[1::7] *= 1e-36
        w[2::7] = 0.25
    return w.to(dtype)


CASES = [  # (n, k, dtype, seed, kind)
    (384, 384, torch.bfloat16, 0, "normal"),  # all-MiniLM-L6-v2 attention (K = 384: ConvRot group 64)
    (1536, 384, torch.bfloat16, 1, "normal"),  # its FFN up
    (384, 1536, torch.bfloat16, 2, "normal"),  # its FFN down (group 256)
    (96, 1536, torch.bfloat16, 13, "outliers"),
    (256, 1088, torch.float16, 3, "normal"),  # K = 64 * 17: group 64
    (128, 768, torch.float32, 4, "outliers"),
    (64, 4096, torch.float32, 5, "zero-tiny"),
    (3072, 3072, torch.bfloat16, 6, "outliers"),
]


class CudaScalarDivision(TorchFunctionMode):
    """CUDA's arithmetic for a floating tensor divided by a Python number (or a 0-dim tensor): torch
    there multiplies by the divisor's fp32 reciprocal (``inv = 1.0f / float(b)``; ``a * inv``)."""

    OPS = {"div", "div_", "__truediv__", "__itruediv__", "true_divide"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        a = args[0] if args else None
        if (getattr(func, "__name__", "") in self.OPS and len(args) == 2 and not kwargs
                and isinstance(a, torch.Tensor) and a.dtype == torch.float32
                and (isinstance(args[1], (int, float)) or (isinstance(args[1], torch.Tensor) and args[1].dim() == 0))):
            inv = (torch.ones((), dtype=torch.float32) / torch.tensor(float(args[1]), dtype=torch.float32)).item()
            return a.mul_(inv) if func.__name__ in ("div_", "__itruediv__") else a.mul(inv)
        return func(*args, **kwargs)


DEV_MODE = contextlib.nullcontext  # the context every device-side call runs in (--emulate-cuda-div: the above)


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return (t.to(torch.uint8) if t.dtype == torch.bool else t).view(torch.uint8).reshape(-1).cpu()


def digest(t: torch.Tensor) -> tuple:
    """An exact, order-free integer digest of ``t``'s bits (wrapping int64 arithmetic), on its device."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    size = t.element_size()
    ints = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).reshape(-1).to(torch.int64)
    pos = torch.arange(ints.numel(), device=t.device, dtype=torch.int64) * 2654435761 + 97
    return str(t.dtype), tuple(t.shape), int((ints * pos).sum()), int((ints ^ pos).sum())


SKIP = {"__get__", "dim", "numel", "__bool__", "size", "item", "tolist", "__len__", "__iter__"}


def caller() -> str:
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "quantkit" in name and "torch" not in name and not name.endswith("gpu_lowbit_exact.py"):
            return f"{Path(name).name}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


class Trace(TorchFunctionMode):
    """Records (op, source line, digest of its tensor outputs) for every torch call; at call ``keep``
    also keeps CPU copies of its operands and outputs."""

    def __init__(self, keep: int | None = None) -> None:
        super().__init__()
        self.sigs: list[tuple] = []
        self.keep, self.kept = keep, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name in SKIP:
            return out
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        if not outs:
            return out
        if self.keep == len(self.sigs):
            def cp(x):
                return x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x
            self.kept = ([cp(a) for a in args], {k: cp(v) for k, v in kwargs.items()}, [cp(o) for o in outs])
        self.sigs.append((name, caller(), tuple(digest(o) for o in outs)))
        return out


def fmt_value(t: torch.Tensor, i: int) -> str:
    v = t.reshape(-1)[i]
    if t.is_floating_point() and t.element_size() in (2, 4, 8):
        iv = v.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).item()
        return f"{v.item()!r} (0x{iv & ((1 << (8 * t.element_size())) - 1):0{2 * t.element_size()}x})"
    return repr(v.item())


def trace_diff(fn, w_cpu: torch.Tensor, dev: str) -> None:
    """Runs ``fn(w)`` traced on the CPU and on ``dev``; prints the first op whose output differs."""
    def run(side: str, keep: int | None = None) -> Trace:
        tr = Trace(keep)
        with (DEV_MODE() if side == "dev" else contextlib.nullcontext()), tr:
            fn(w_cpu.to(dev if side == "dev" else "cpu"))
        return tr

    a, b = run("cpu").sigs, run("dev").sigs
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None:
        print(f"    op trace: {len(a)} / {len(b)} calls, no output differs" + ("" if len(a) == len(b) else " (lengths differ)"))
        return
    if a[first][:2] != b[first][:2]:
        print(f"    op trace: the calls diverge at #{first}: cpu {a[first][:2]} vs {dev} {b[first][:2]}")
        return
    args, kwargs, outs_c = run("cpu", first).kept
    outs_d = run("dev", first).kept[2]
    print(f"    op trace: first differing call #{first} of {len(a)}: {a[first][0]} at {a[first][1]}")
    for j, (oc, od) in enumerate(zip(outs_c, outs_d)):
        if oc.shape != od.shape or oc.dtype != od.dtype:
            print(f"      output {j}: cpu {oc.dtype} {list(oc.shape)} vs {dev} {od.dtype} {list(od.shape)}")
            continue
        diff = (as_bytes(oc).view(-1, oc.element_size()) != as_bytes(od).view(-1, oc.element_size())).any(dim=1)
        n = int(diff.sum())
        if not n:
            continue
        i = int(diff.nonzero()[0])
        print(f"      output {j} {oc.dtype} {list(oc.shape)}: {n} of {oc.numel()} elements differ; "
              f"first at flat index {i}: cpu {fmt_value(oc, i)} vs {dev} {fmt_value(od, i)}")
        for k, x in enumerate(args):
            if isinstance(x, torch.Tensor):
                xb = x.expand(oc.shape) if x.dim() <= oc.dim() and _broadcasts(x.shape, oc.shape) else None
                shown = fmt_value(xb.contiguous(), i) if xb is not None else f"shape {list(x.shape)}"
                print(f"        operand {k} {x.dtype} {list(x.shape)}: {shown}")
            else:
                print(f"        operand {k}: {x!r}"[:200])
        if kwargs:
            print(f"        kwargs: {kwargs!r}"[:200])


def _broadcasts(src, dst) -> bool:
    src = (1,) * (len(dst) - len(src)) + tuple(src)
    return all(s in (1, d) for s, d in zip(src, dst))


def differing_rows(c: dict, d: dict, n: int) -> list[int]:
    """Rows where any stored [N, ...] tensor of ``c`` and ``d`` differs."""
    rows = torch.zeros(n, dtype=torch.bool)
    for key, a in c.items():
        if a.dim() and a.shape[0] == n and d[key].shape == a.shape:
            ab, bb = as_bytes(a).view(n, -1), as_bytes(d[key]).view(n, -1)
            rows |= (ab != bb).any(dim=1)
    return rows.nonzero().reshape(-1).tolist()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def stage_report(name: str, w_cpu: torch.Tensor, dev: str) -> None:
    """Each stage on both devices from the CPU's input of that stage."""
    fmt = FORMATS[name]
    wf = lb.as_fp32(w_cpu, name)
    g = lb.convrot_group(wf.shape[1])
    stages = [("rotation", lambda x: hadamard.rotate(x, g), wf)]
    r = hadamard.rotate(wf, g)
    if name == "int4-convrot":
        stages += [("fit (quantize_rotated: scale search, codes)", int4_convrot.quantize_rotated, r)]
        q = int4_convrot.quantize_rotated(r)[0]
        stages += [("pack", lambda x: lb.pack_nibbles(x.to(torch.int32)), q)]
    else:
        bits = fmt.bits
        n, k = r.shape
        x = r.reshape(n * (k // w4a8.GROUP), w4a8.GROUP)

        def table(d):
            if bits == 6:
                return torch.arange(-w4a8.W6_LEVELS, w4a8.W6_LEVELS + 1, dtype=torch.float32, device=d)
            return torch.tensor(w4a8.LLOYD_MAX_16, dtype=torch.float32, device=d)

        stages += [("ALS group scales (_als)", lambda x: w4a8._als(x, table(x.device), bits), x),
                   ("search: s_rel, s_channel, codes (_fit)", lambda x: w4a8._fit(x, table(x.device), n), x)]
        codes = w4a8.quantize_rotated(r, bits)[0]
        stages += [("pack", lambda c: w4a8.pack_codes(c, bits), codes)]
    for label, fn, inp in stages:
        oc = fn(inp)
        with DEV_MODE():
            od = fn(inp.to(dev))
        oc = oc if isinstance(oc, tuple) else (oc,)
        od = od if isinstance(od, tuple) else (od,)
        flags = ["same" if same(a, b) else "DIFFERS" for a, b in zip(oc, od)]
        print(f"    stage {label}: {', '.join(flags)}")


def timed(fn, dev: str, reps: int = 1) -> float:
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (default cuda)")
    ap.add_argument("--emulate-cuda-div", action="store_true",
                    help="the device side divides by Python numbers as CUDA does (to check the harness on a CPU)")
    ap.add_argument("--max-n", type=int, default=0, help="skip cases with more rows (a quick dry run)")
    args = ap.parse_args()
    dev = args.device
    global DEV_MODE
    if args.emulate_cuda_div:
        DEV_MODE = CudaScalarDivision
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{torch.cuda.get_device_name() if dev.startswith('cuda') else dev}")
    for name in NAMES:  # warm-up (CUDA context, kernels)
        FORMATS[name].quantize(make_weight(64, 384, torch.bfloat16, 99, "normal").to(dev), OPTS)
    bad = 0
    times: dict[str, list[tuple[str, float, float]]] = {n: [] for n in NAMES}
    traced: set[str] = set()
    for n, k, dtype, seed, kind in CASES:
        if args.max_n and n > args.max_n:
            continue
        w = make_weight(n, k, dtype, seed, kind)
        wd = w.to(dev)
        label = f"[{n}x{k}] {str(dtype).replace('torch.', '')} seed {seed} {kind}"
        for name in NAMES:
            fmt = FORMATS[name]
            if fmt.cannot_take((n, k), OPTS):
                print(f"{label} {name}: skipped ({fmt.cannot_take((n, k), OPTS)})")
                continue
            res = {}
            t_cpu = timed(lambda: res.__setitem__("cpu", fmt.quantize(w, OPTS)), "cpu")
            with DEV_MODE():
                t_dev = timed(lambda: res.__setitem__("dev", fmt.quantize(wd, OPTS)), dev)
            times[name].append((label, t_cpu, t_dev))
            c, d = res["cpu"], res["dev"]
            verdict = {key: same(c[key], d[key]) for key in c}
            ok = all(verdict.values()) and c.keys() == d.keys()
            print(f"{label} {name}: " + ("all bytes equal" if ok else "MISMATCH") + " | "
                  + ", ".join(f"{key} {'ok' if v else 'DIFFERS'}" for key, v in verdict.items())
                  + f" | cpu {t_cpu:.3f}s {dev} {t_dev:.3f}s")
            if not ok:
                bad += 1
                for key, v in verdict.items():
                    if not v:
                        nb = int((as_bytes(c[key]) != as_bytes(d[key])).sum())
                        print(f"    {key}: {nb} of {c[key].numel() * c[key].element_size()} bytes differ")
                stage_report(name, w, dev)
                if name not in traced:  # the op trace once a format, on a few differing rows (rows
                    traced.add(name)  # are quantized independently, so they differ alone too)
                    rows = differing_rows(c, d, n)
                    print(f"    {len(rows)} rows differ (first {rows[:8]}); op trace on rows {rows[:4]}")
                    trace_diff(lambda x: fmt.quantize(x, OPTS), w[rows[:4]], dev)
    print("\ntimes (quantize, s):")
    for name in NAMES:
        tc = sum(t[1] for t in times[name])
        td = sum(t[2] for t in times[name])
        big = [t for t in times[name] if t[0].startswith("[3072x3072]")]
        extra = f"; 3072x3072: cpu {big[0][1]:.2f} {dev} {big[0][2]:.2f} ({big[0][1] / big[0][2]:.1f}x)" if big else ""
        print(f"  {name}: all cases cpu {tc:.2f} {dev} {td:.2f} ({tc / td:.1f}x){extra}")
    print(f"\n{bad} mismatching (case, format) pairs" if bad else "\nevery stored tensor matches the CPU's bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
