"""Rich views of a plan, an inspection, a verification and a conversion summary, for the CLI (the only
module besides cli.py that prints)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .formats import FORMATS
from .inspection import Inspection, Violation
from .plan import Plan
from .report import ConvertReport
from .verify import VerifyReport


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


def layers_text(c: dict[str, int]) -> str:
    """The layer counts of a plan or a report (:func:`quantkit.report.layer_counts`)."""
    return f"{c['layers']}: {c['quantized']} quantized, {c['fallback']} fell back, {c['kept']} kept"


def tensors_text(c: dict[str, int], planned: bool) -> str:
    return f"{c['tensors_in']} in, {c['tensors_out']} {'to write' if planned else 'written'}"


def round_parts(parts: dict[str, float], decimals: int) -> dict[str, float]:
    """``parts`` rounded to ``decimals`` so that the rounded values sum to the rounded total (largest
    remainder: each part is rounded down, then the units left over go to the largest remainders)."""
    unit = 10 ** decimals
    scaled = {k: max(0.0, v) * unit for k, v in parts.items()}
    floors = {k: int(v) for k, v in scaled.items()}
    left = round(sum(scaled.values())) - sum(floors.values())
    for k in sorted(scaled, key=lambda k: scaled[k] - floors[k], reverse=True)[:max(0, left)]:
        floors[k] += 1
    return {k: v / unit for k, v in floors.items()}


def time_text(report: ConvertReport) -> str:
    """"0.72 s = start-up 0.45 + plan 0.01 + ...": the parts as printed add up to the total as
    printed (parts that round to zero are left out)."""
    total = report.total_seconds
    decimals = 2 if total < 10 else 1
    parts = round_parts(report.time_parts(), decimals)
    shown = " + ".join(f"{k} {v:.{decimals}f}" for k, v in parts.items() if v)
    line = f"{sum(parts.values()):.{decimals}f} s" + (f" = {shown}" if shown else "")
    busy = report.detail_seconds.get("writer thread busy")
    if busy:
        line += f" (writer thread busy {busy:.{decimals}f} s alongside)"
    return line


def print_plan(plan: Plan, input_name: str, output_name: str | None, console: Console) -> None:
    t = Table(title=f"plan: {input_name}" + (f" -> {output_name}" if output_name else ""), title_justify="left")
    for col in ("tensor", "shape", "dtype", "->", "why"):
        t.add_column(col, overflow="fold")
    others = 0
    dropped = 0
    for lp in plan.layers:
        if lp.drop:
            dropped += 1  # a re-quantized layer's old scales and marker, a legacy scaled_fp8 marker
            continue
        if lp.source is None and lp.spec is None and (len(lp.shape) < 2 or not lp.tensor.endswith(".weight")):
            others += 1  # biases, norms, scalars: always copied; listed in --json
            continue
        if lp.source is not None and lp.spec is None:
            to = Text(f"kept {lp.source.label}", style="cyan")
        elif lp.spec is None:
            to = Text("kept", style="dim")
        else:
            to = Text((f"{lp.source.label} -> " if lp.source is not None else "") + lp.spec.name
                      + (f" b{lp.block_size}" if "block_size" in lp.spec.option_names else ""),
                      style="yellow" if lp.fallback else "green")
        t.add_row(lp.tensor, "x".join(map(str, lp.shape)), lp.dtype, to, lp.reason)
    console.print(t)
    if others:
        console.print(Text(f"and {others} other tensors (biases, norms, 1-D, scalars) copied unchanged"),
                      highlight=False)
    if dropped:
        console.print(Text(f"and {dropped} tensors not written (the old scales and markers of re-quantized layers, "
                           "a legacy scaled_fp8 marker; listed in --json)"), highlight=False)
    c = plan.counts()
    fams = ", ".join(f"{d.family.title} ({d.family.name}" + (f" at '{d.prefix}')" if d.prefix else ")")
                     for d in plan.families) or "none"
    s = Table(show_header=False, box=None, pad_edge=False)
    s.add_column(style="bold")
    s.add_column()
    s.add_row("family", f"{fams} (--preset {plan.options.preset})")
    s.add_row("layers", layers_text(c))
    s.add_row("tensors", tensors_text(c, planned=True))
    ratio = plan.output_size / plan.input_size if plan.input_size else 0
    s.add_row("size", f"{gb(plan.input_size)} -> {gb(plan.output_size)} ({ratio:.0%}) expected")
    s.add_row("ComfyUI", loads_line(plan.needs_node))
    if plan.requantized or plan.kept_quantized:
        s.add_row("quantized input", f"{len(plan.requantized)} layers re-quantized, "
                                     f"{len(plan.kept_quantized)} kept as they are quantized")
    console.print(s)
    for note in plan.notes:
        console.print(Text(f"note: {note}"), highlight=False, soft_wrap=True)


def print_inspection(ins: Inspection, console: Console) -> None:
    s = Table(title=ins.path, title_justify="left", show_header=False, box=None, pad_edge=False)
    s.add_column(style="bold")
    s.add_column(overflow="fold")
    s.add_row("size", f"{gb(ins.file_size)}, {ins.tensors} tensors, header {ins.header_bytes} bytes")
    s.add_row("dtypes", ", ".join(f"{k} {c} ({gb(b)})" for k, (c, b) in ins.dtypes.items()) or "-")
    fmts = ", ".join(f"{f} {c}" for f, c in ins.formats.items())
    s.add_row("quantized", f"{len(ins.markers)} layers" + (f": {fmts}" if fmts else "")
              + f"; {ins.float_weights} float 2-D weights unquantized")
    fams = ", ".join(d.family.title + (f" at '{d.prefix}'" if d.prefix else "") for d in ins.families)
    s.add_row("family", fams or "not recognised")
    for k, val in sorted((ins.metadata or {}).items()):
        shown = val if len(val) <= 120 else f"<{len(val)} bytes>"
        s.add_row(f"metadata {k}", Text(shown))
    s.add_row("ComfyUI", ins.loads)
    console.print(s)
    print_notes(ins.notes, console)
    print_violations(ins.violations, console)


def print_notes(notes: list[Violation], console: Console, shown: int = 3) -> None:
    if not notes:
        return
    console.print(Text(f"{len(notes)} note(s) (not violations):", style="bold"))
    for n in notes[:shown]:
        console.print(Text(f"  {n.line()}"), highlight=False, soft_wrap=True)
    if len(notes) > shown:
        console.print(Text(f"  ... and {len(notes) - shown} more like these (all in --json / --report)"))


def print_violations(violations: list[Violation], console: Console) -> None:
    if not violations:
        return
    console.print(Text(f"{len(violations)} violation(s):", style="bold red"))
    for v in violations:
        console.print(Text(f"  {v.line()}"), highlight=False, soft_wrap=True)


def print_verify(rep: VerifyReport, console: Console, worst: int = 10) -> None:
    ins = rep.inspection
    s = Table(title=f"verify: {rep.path}" + (f" against {rep.against}" if rep.against else ""),
              title_justify="left", show_header=False, box=None, pad_edge=False)
    s.add_column(style="bold")
    s.add_column(overflow="fold")
    fmts = ", ".join(f"{f} {c}" for f, c in ins.formats.items())
    s.add_row("quantized", f"{len(ins.markers)} layers" + (f": {fmts}" if fmts else ""))
    s.add_row("ComfyUI", ins.loads)
    measured = [c for c in rep.layers if c.sqnr_db is not None]
    if rep.against:
        s.add_row("unchanged", f"{rep.identical} tensors bit-identical to the original")
        if measured:
            vals = sorted(c.sqnr_db for c in measured)
            s.add_row("SQNR", f"min {db(vals[0])}, median {db(vals[len(vals) // 2])} over {len(vals)} layers"
                      + (f" (floor {rep.min_sqnr:g} dB)" if rep.min_sqnr is not None else ""))
        skipped = len(rep.layers) - len(measured)
        if skipped:
            s.add_row("not measured", f"{skipped} layers (see the report)")
    console.print(s)
    if measured:
        t = Table(title=f"lowest SQNR ({min(worst, len(measured))} of {len(measured)})", title_justify="left")
        t.add_column("layer", overflow="fold")
        t.add_column("format")
        t.add_column("SQNR", justify="right")
        for c in sorted(measured, key=lambda c: c.sqnr_db)[:worst]:
            t.add_row(c.name, c.format or "(unquantized)", db(c.sqnr_db))
        console.print(t)
    print_notes(ins.notes, console)
    print_violations(rep.violations, console)
    console.print(Text("OK" if rep.ok else f"FAILED: {len(rep.violations)} violation(s)",
                       style="bold green" if rep.ok else "bold red"))


def print_summary(report: ConvertReport, console: Console) -> None:
    t = Table(title=f"{Path(report.output).name}", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    c = report.counts()
    t.add_row("layers", layers_text(c))
    t.add_row("tensors", tensors_text(c, planned=False))
    ratio = report.bytes_out / report.bytes_in if report.bytes_in else 0
    t.add_row("size", f"{gb(report.bytes_in)} -> {gb(report.bytes_out)} ({ratio:.0%}), "
                      f"{report.bytes_in / max(report.seconds, 1e-9) / 1e9:.2f} GB/s through convert()")
    t.add_row("time", time_text(report))
    for fmt, (lo, med, n) in report.sqnr_by_format().items():
        stock = "stock ComfyUI" if FORMATS[fmt].stock_comfy else "needs the quantkit node"
        t.add_row(f"SQNR {fmt}", f"min {db(lo)}, median {db(med)} over {n} layers ({stock})")
    learned = [lay.reason for lay in report.tensors if "objective" in lay.reason]
    if learned:
        kept = sum("rtn (learned not better)" in r for r in learned)
        t.add_row("learned", f"{len(learned) - kept} improved, {kept} kept RTN (calibration objective)")
    corrected = sum(t.reason.startswith("bias corrected") for t in report.tensors)
    if corrected:
        t.add_row("bias", f"{corrected} biases corrected")
    console.print(t)
    fallen: dict[str, list[str]] = {}
    for lay in report.layers:
        if lay.action == "fallback" or (lay.action == "kept" and "--fallback keep" in lay.reason):
            fallen.setdefault(lay.format or "keep (unquantized)", []).append(f"{lay.name} {list(lay.shape)}")
    for fmt, names in fallen.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        console.print(Text(f"fallback -> {fmt}: {len(names)} layers the requested format cannot take: {shown}"),
                      highlight=False)
