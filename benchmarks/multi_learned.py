"""Learned rounding over several devices (issue 8): wall time of ``quantkit.convert`` with
``--learned-rounding`` in one process, and with ``devices=`` one worker process per device, on the
same synthetic Flux-shaped checkpoint and calibration file, in the same run. Every output is checked
byte for byte against the single-process one.

Shapes per block are Flux.1's (qkv 3H x H, proj H x H, mlp.0 4H x H, mlp.2 H x 4H); ``--hidden 3072``
is Flux size (a multi-GPU host), ``--hidden 256`` fits a 2-core CPU box. Calibration statistics come
from synthetic activations (low rank + noise + a few outlier channels) through
``quantkit.calibration.LayerStats``.

    PYTHONPATH=src python benchmarks/multi_learned.py --hidden 256 --blocks 2 --runs single cpu cpu,cpu
    PYTHONPATH=src python benchmarks/multi_learned.py --hidden 3072 --blocks 2 --runs single cuda:0 cuda:0,cuda:1 all
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import quantkit
from quantkit import calibration


def build(d: Path, hidden: int, blocks: int, rows: int) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    sd, cal = {}, calibration.Calibration()
    for i in range(blocks):
        for name, (n, k) in ((f"double_blocks.{i}.img_attn.qkv", (3 * hidden, hidden)),
                             (f"double_blocks.{i}.img_attn.proj", (hidden, hidden)),
                             (f"double_blocks.{i}.img_mlp.0", (4 * hidden, hidden)),
                             (f"double_blocks.{i}.img_mlp.2", (hidden, 4 * hidden))):
            w = torch.randn(n, k, generator=g) / k ** 0.5
            w[:, torch.randperm(k, generator=g)[:4]] *= 8
            sd[f"{name}.weight"] = w.to(torch.bfloat16)
            sd[f"{name}.bias"] = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)
            r = max(8, k // 16)
            x = torch.randn(rows, r, generator=g) @ torch.randn(r, k, generator=g) / r ** 0.5
            x += 0.1 * torch.randn(rows, k, generator=g)
            x[:, :4] *= 10
            st = calibration.LayerStats(k)
            st.add(x, True)
            cal.layers[name] = st.tensors()
    ck, stats = d / "flux-shaped.safetensors", d / "stats.safetensors"
    save_file(sd, str(ck))
    cal.save(stats)
    return ck, stats


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished (joined) children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--format", default="fp8")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--main-threads", type=int, default=0, help="torch threads of this process (0: torch's default)")
    ap.add_argument("--runs", nargs="+", default=["single", "cpu", "cpu,cpu"])
    a = ap.parse_args()
    if a.main_threads:
        torch.set_num_threads(a.main_threads)
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        ck, stats = build(d, a.hidden, a.blocks, a.rows)
        base = None
        times: dict[str, list[float]] = {r: [] for r in a.runs}
        starts: dict[str, list[float]] = {r: [] for r in a.runs}
        cpu: dict[str, list[float]] = {r: [] for r in a.runs}  # user + sys of this process and its workers
        for _ in range(a.repeat):
            for run in a.runs:  # interleaved, so machine load affects every configuration alike
                out = d / f"out-{run.replace(',', '_').replace(':', '')}.safetensors"
                t0, c0 = time.perf_counter(), _cpu_seconds()
                rep = quantkit.convert(ck, out, format=a.format, preset="none", learned_rounding=True, calibration=stats,
                                 bias_correction=True, devices=None if run == "single" else run, overwrite=True)
                times[run].append(time.perf_counter() - t0)
                cpu[run].append(_cpu_seconds() - c0)
                starts[run].append(rep.detail_seconds.get("learned workers start", 0.0))
                data = out.read_bytes()
                base = data if base is None and run == a.runs[0] else base
                assert data == base, f"{run}: output differs from {a.runs[0]}"
        ref = statistics.median(times[a.runs[0]])
        print(f"hidden {a.hidden}, {a.blocks} blocks ({4 * a.blocks} layers), {a.format}, median of {a.repeat}, "
              f"{torch.get_num_threads()} torch threads in the main process")
        c_ref = statistics.median(cpu[a.runs[0]])
        print(f"| run | wall s (each) | median s | speed-up vs {a.runs[0]} | CPU s (median, workers included) | "
              f"CPU vs {a.runs[0]} | worker start-up s (median) |")
        print("|---|---|---|---|---|---|---|")
        for run, ts in times.items():
            m, c = statistics.median(ts), statistics.median(cpu[run])
            st = "-" if run == "single" else f"{statistics.median(starts[run]):.1f}"
            print(f"| {run} | {', '.join(f'{t:.1f}' for t in ts)} | {m:.1f} | {ref / m:.2f}x | {c:.1f} | "
                  f"{c / c_ref:.2f}x | {st} |")
        print("outputs byte-identical: yes")


if __name__ == "__main__":
    main()
