"""``--report report.json``: a machine-readable record of a convert or verify run. Plain JSON:
tool and library versions, and per file the sha256 of input and output, layer and tensor counts,
per-tensor action, format, input and output shapes, SQNR and timings (from :mod:`quantkit.report` / :mod:`quantkit.verify`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path

from . import tempfiles
from .errors import QuantkitError
from .report import ConvertReport
from .safetensors_io import SafetensorsReader

REPORT_VERSION = 2  # 2: per-tensor entries under "tensors" (was "layers"), "counts", timing parts


def environment() -> dict:
    import safetensors
    import torch

    from . import __version__
    return {"quantkit": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _finite(x: object) -> object:
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def convert_entry(report: ConvertReport) -> dict:
    """One converted file: the report plus hashes and the shapes actually written."""
    d = report.to_dict()
    d["status"] = "ok"
    d["input_sha256"] = sha256_file(report.input)
    d["output_sha256"] = sha256_file(report.output)
    with SafetensorsReader(report.output) as out:
        written = {t.name: t for t in out.tensors_in_order}
    for t in d["tensors"]:
        if t["format"] is not None:
            base = t["name"].removesuffix(".weight")
            t["outputs"] = {n: {"dtype": written[n].dtype, "shape": list(written[n].shape)}
                            for n in (f"{base}.weight", f"{base}.weight_scale", f"{base}.input_scale")
                            if n in written}
    return d


def failed_entry(input: str | os.PathLike, output: str | os.PathLike | None, error: QuantkitError) -> dict:
    return {"status": "failed", "input": str(input), "output": None if output is None else str(output),
            "error": error.one_line(), "exit_code": error.exit_code}


def write_report(path: str | os.PathLike, command: list[str], entries: list[dict]) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a report."""
    path = Path(path)
    doc = {"report_version": REPORT_VERSION, "environment": environment(), "command": command,
           "ok": all(e.get("status") == "ok" for e in entries), "files": entries}
    text = json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n"
    tmp = None
    try:
        fd, tmp = tempfiles.create(path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # the lock is held until the file is renamed
            f.write(text)
            f.flush()
            os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise QuantkitError(f"cannot write the report ({e.strerror or e})", file=path,
                            fix="choose a writable path for --report") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


__all__ = ["environment", "sha256_file", "convert_entry", "failed_entry", "write_report"]
