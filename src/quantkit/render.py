"""Rich views of a plan, an inspection and a verification, for the CLI (the only module besides
cli.py that prints)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .plan import Plan


def gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def db(x: float | None) -> str:
    if x is None:
        return "-"
    return "exact" if x == float("inf") else f"{x:.1f} dB"


def loads_line(needs: list[str]) -> str:
    if not needs:
        return "yes: stock ComfyUI loads it"
    return f"no: needs a node that registers {', '.join(needs)} (the quantkit node or ComfyUI-QuantOps)"


def print_plan(plan: Plan, input_name: str, output_name: str | None, console: Console) -> None:
    t = Table(title=f"plan: {input_name}" + (f" -> {output_name}" if output_name else ""), title_justify="left")
    for col in ("tensor", "shape", "dtype", "->", "why"):
        t.add_column(col, overflow="fold")
    others = 0
    for lp in plan.layers:
        if lp.spec is None and (len(lp.shape) < 2 or not lp.tensor.endswith(".weight")):
            others += 1  # biases, norms, scalars: always copied; listed in --json
            continue
        if lp.spec is None:
            to = Text("kept", style="dim")
        else:
            to = Text(lp.spec.name + (f" b{lp.block_size}" if lp.spec.granularity == "block" else ""),
                      style="yellow" if lp.fallback else "green")
        t.add_row(lp.tensor, "x".join(map(str, lp.shape)), lp.dtype, to, lp.reason)
    console.print(t)
    if others:
        console.print(Text(f"and {others} other tensors (biases, norms, 1-D, scalars) copied unchanged"),
                      highlight=False)
    c = plan.counts()
    fams = ", ".join(f"{d.family.title} ({d.family.name}" + (f" at '{d.prefix}')" if d.prefix else ")")
                     for d in plan.families) or "none"
    s = Table(show_header=False, box=None, pad_edge=False)
    s.add_column(style="bold")
    s.add_column()
    s.add_row("family", f"{fams} (--preset {plan.options.preset})")
    s.add_row("layers", f"{c['quantized']} quantized, {c['fallback']} fell back, {c['kept']} kept")
    ratio = plan.output_size / plan.input_size if plan.input_size else 0
    s.add_row("size", f"{gb(plan.input_size)} -> {gb(plan.output_size)} ({ratio:.0%}) expected")
    s.add_row("ComfyUI", loads_line(plan.needs_node))
    console.print(s)
