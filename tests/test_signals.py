"""SIGINT, SIGTERM and SIGHUP sent to a real `quantkit convert` process at any moment: exit 130 /
143 / 129, exactly one line on stderr (no traceback), nothing at the target, no temporary file.

Moments: while torch imports (the process has mapped libtorch, no temporary file exists yet), while
the output is being written (its temporary file is pre-allocated), and at fixed delays from launch
(slow sweep). A signal in the first few tens of milliseconds, before the interpreter runs any of
quantkit's code, gets Python's default handling; the sweep starts after that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the console script's own call (argv[0] "quantkit", as the installed entry point has it)
CONSOLE = [sys.executable, "-c", 'import sys; sys.argv[0] = "quantkit"; from quantkit.cli import main; main()']
SIGS = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}


def _start(src: Path, out: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CONSOLE, "convert", str(src), "-o", str(out), "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _temps(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.endswith(".partial")]


def _mapped(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return needle in f.read()
    except OSError:
        return False


def _wait(cond, timeout: float = 120.0, step: float = 0.002) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(step)


def _check(p: subprocess.Popen, name: str | tuple[str, ...], out: Path, t_sig: float | None = None) -> float:
    o, e = p.communicate(timeout=120)
    took = time.monotonic() - t_sig if t_sig is not None else 0.0
    names = (name,) if isinstance(name, str) else name
    assert p.returncode in [SIGS[n] for n in names], (p.returncode, e[-2000:])
    [got] = [n for n in names if SIGS[n] == p.returncode]
    assert e == f"interrupted ({got})\n", e[-2000:]
    assert o == ""
    assert not out.exists()
    assert _temps(out.parent) == []
    return took


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")


@needs_proc
@pytest.mark.parametrize("name", list(SIGS))
def test_signal_while_torch_imports(big_checkpoint, tmp_path, name):
    out = tmp_path / "o.safetensors"
    p = _start(big_checkpoint, out)
    _wait(lambda: _mapped(p.pid, "libtorch") or p.poll() is not None, step=0.001)
    assert _temps(tmp_path) == []  # still starting: nothing written yet
    p.send_signal(getattr(signal, name))
    _check(p, name, out)


@pytest.mark.parametrize("name", list(SIGS))
def test_signal_while_writing(big_checkpoint, tmp_path, name):
    """The writer, readahead and quantizer threads do not hold the exit up (0.06-0.17 s from signal to
    exit measured on the 2-core dev box under a load of 8)."""
    out = tmp_path / "o.safetensors"
    p = _start(big_checkpoint, out)
    _wait(lambda: any(t.stat().st_blocks * 512 >= 151e6 for t in _temps(tmp_path)) or p.poll() is not None)
    assert p.poll() is None, "finished before the signal could be sent"
    t = time.monotonic()
    p.send_signal(getattr(signal, name))
    took = _check(p, name, out, t)
    assert took < 5.0  # a tensor's write at most; 0.02-0.3 s measured on a loaded 2-core box


def test_second_signal_during_cleanup_exits_at_once(big_checkpoint, tmp_path):
    out = tmp_path / "o.safetensors"
    p = _start(big_checkpoint, out)
    _wait(lambda: any(t.stat().st_blocks * 512 >= 151e6 for t in _temps(tmp_path)) or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.001)
    p.send_signal(signal.SIGINT)  # the first handled one's code and line (Python may run SIGINT's first)
    _check(p, ("SIGTERM", "SIGINT"), out)


def test_signal_after_the_line_is_announced_adds_nothing():
    """A second signal that arrives while the first one's line is being written (CI caught the
    line printed twice: the second signal's handler wrote it again) is ignored."""
    code = (
        "import os, signal, time\n"
        "from quantkit import interrupts\n"
        "interrupts.install_raising()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "except interrupts.Interrupted as e:\n"
        "    rc = interrupts.announce(e)\n"
        "    os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGHUP); time.sleep(0.2)\n"
        "    os._exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert (r.returncode, r.stderr) == (143, "interrupted (SIGTERM)\n")


def test_devices_workers_stopped_with_the_parent(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group, --devices workers included: the parent
    alone answers (one line), and its workers (one hung on a layer) are gone right after it."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_multi import Blocks  # noqa: F401 - the model the multi tests use
    finally:
        sys.path.pop(0)
    import torch
    from safetensors.torch import save_file

    from quantkit import calibration
    torch.manual_seed(0)
    m = Blocks()
    with torch.no_grad(), calibration.capture(m) as cap:
        for b in m.blocks:
            b.fc(torch.randn(64, b.fc.in_features))
    stats, ck = tmp_path / "stats.safetensors", tmp_path / "ck.safetensors"
    cap.save(stats)
    save_file({k: v.detach().to(torch.bfloat16) for k, v in m.state_dict().items()}, str(ck))
    work = tmp_path / "w"
    work.mkdir()
    out = work / "o.safetensors"
    code = ("import sys; sys.argv[0] = 'quantkit'; sys.path.insert(0, sys.argv.pop(1)); import multi_faults; "
            "from quantkit import multi; multi.learn_layer = multi_faults.hang; from quantkit.cli import main; main()")
    env = {**os.environ, "QK_FAULT_LAYER": "blocks.0.fc"}
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "tests"), "convert", str(ck), "-o", str(out),
                          "--preset", "none", "--learned-rounding", "--calibration", str(stats), "--devices", "cpu,cpu",
                          "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    kids: list[int] = []

    def workers_busy() -> bool:
        kids[:] = _children(p.pid)
        return (len(kids) >= 2 and any(t.name.endswith(".learned.partial") for t in _temps(work))
                and all(_ignores_sigint(k) for k in kids)) or p.poll() is not None
    _wait(workers_busy, timeout=180)
    time.sleep(0.5)  # the workers import torch (or one is hung in its layer)
    os.killpg(p.pid, signal.SIGINT)
    _check(p, "SIGINT", out)
    assert kids
    _wait(lambda: not any(_alive(k) for k in kids), timeout=5)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    # the spawn context's resource tracker is a child too; workers are the ones running the spawn main
    return [k for k in kids if "spawn_main" in _cmdline(k)]


def _ignores_sigint(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            ign = next(int(x.split()[1], 16) for x in f if x.startswith("SigIgn:"))
    except (OSError, StopIteration):
        return False
    return bool(ign & (1 << (signal.SIGINT - 1)))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIGS))
@pytest.mark.parametrize("delay", [0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 1.6, 2.0, 2.5, 3.0])
def test_signal_sweep(big_checkpoint, tmp_path, name, delay):
    out = tmp_path / "o.safetensors"
    p = _start(big_checkpoint, out)
    time.sleep(delay)
    if p.poll() is not None:
        pytest.skip("finished before the signal")
    p.send_signal(getattr(signal, name))
    o, e = p.communicate(timeout=120)
    if out.exists():  # it landed after the rename (the last milliseconds): the output is complete
        from safetensors.torch import load_file
        assert len(load_file(str(out))) == 4 * 36 and _temps(tmp_path) == []
        pytest.skip("signal landed after the output was renamed into place")
    assert p.returncode == SIGS[name] and e == f"interrupted ({name})\n", (p.returncode, e[-2000:])
    assert not out.exists() and _temps(tmp_path) == []


def test_convert_to_quant_script_same_handling(big_checkpoint, tmp_path):
    """The drop-in script for the old command line ends the same way (after its 'equivalent:' line)."""
    out = tmp_path / "o.safetensors"
    p = subprocess.Popen([sys.executable, str(ROOT / "convert_to_quant.py"), "-i", str(big_checkpoint), "-o", str(out),
                          "--simple"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: any(t.stat().st_blocks * 512 >= 151e6 for t in _temps(tmp_path)) or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    o, e = p.communicate(timeout=120)
    assert p.returncode == 143, e[-2000:]
    lines = e.splitlines()
    assert len(lines) == 2 and lines[0].startswith("equivalent: quantkit convert") and lines[1] == "interrupted (SIGTERM)"
    assert not out.exists() and _temps(tmp_path) == []
