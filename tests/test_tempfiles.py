"""Temporary files: named for target and pid, locked while written, stale ones of killed runs
reclaimed (never a live writer's), ``quantkit clean``. Real processes, real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantkit
from typer.testing import CliRunner

from quantkit import tempfiles
from quantkit.cli import app

runner = CliRunner()

QK = [sys.executable, "-m", "quantkit"]
# a process that creates and locks a temporary file for TARGET, says its path, then sleeps
# (tempfiles.py loaded by path: no torch import, so the process is ready in milliseconds)
HOLDER = ("import importlib.util as u, sys, time; s = u.spec_from_file_location('t', sys.argv[2]); "
          "t = sys.modules['t'] = u.module_from_spec(s); s.loader.exec_module(t); fd, p = t.create(sys.argv[1]); "
          "print(p, flush=True); time.sleep(60)")


def _holder(target: Path) -> tuple[subprocess.Popen, Path]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), tempfiles.__file__], stdout=subprocess.PIPE,
                         text=True)
    path = Path(p.stdout.readline().strip())
    assert path.exists()
    return p, path


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_name_carries_target_pid_and_marker(tmp_path):
    fd, path = tempfiles.create(tmp_path / "model-fp8.safetensors")
    try:
        assert path.parent == tmp_path
        assert tempfiles.parse(path.name) == ("model-fp8.safetensors", os.getpid(), "")
        assert path.name.startswith(f".model-fp8.safetensors.quantkit-{os.getpid()}-") and path.name.endswith(".partial")
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    finally:
        os.close(fd)
        path.unlink()
    fd, path = tempfiles.create(tmp_path / "m.safetensors", "learned", mode=None)
    os.close(fd)
    assert tempfiles.parse(path.name) == ("m.safetensors", os.getpid(), "learned")
    assert path.stat().st_mode & 0o777 == 0o600
    assert tempfiles.parse(".m.safetensors.abcd1234.partial") is None  # mkstemp's name without marker
    assert tempfiles.parse(".m.safetensors.quantkit-12-abc.partial") is None  # not mkstemp's 8 characters


def test_long_target_name_fits_and_matches(tmp_path):
    target = tmp_path / ("é" * 120 + ".safetensors")  # 252 bytes: no room for the affixes
    fd, path = tempfiles.create(target, "calibration")
    assert len(os.fsencode(path.name)) <= 255
    assert [f.path for f in tempfiles.scan(tmp_path, target.name)] == [path]
    assert tempfiles.scan(tmp_path, "é" * 10 + ".safetensors") == []
    os.close(fd)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_live_lock_kept_dead_lock_reclaimed(tmp_path):
    """A running process's file is in use; once SIGKILLed its lock is gone and the file is stale.
    Other targets' files and another tool's files are never touched."""
    target = tmp_path / "o.safetensors"
    p, path = _holder(target)
    q, other = _holder(tmp_path / "other.safetensors")
    foreign = tmp_path / ".o.safetensors.x1y2z3w4.partial"
    foreign.write_bytes(b"x")
    try:
        [f] = tempfiles.scan(tmp_path, target.name)
        assert f.in_use and f.pid == p.pid
        assert tempfiles.reclaim(target) == [] and path.exists()
        _kill(p)
        [f] = tempfiles.scan(tmp_path, target.name)
        assert not f.in_use
        [gone] = tempfiles.reclaim(target)
        assert gone.path == path and not path.exists()
        assert other.exists() and foreign.exists()
        assert [f.in_use for f in tempfiles.scan(tmp_path)] == [True]  # the other target's holder lives
    finally:
        for x in (p, q):
            if x.poll() is None:
                _kill(x)


def test_pid_rules_without_lock(tmp_path):
    """Unlocked (its writer is gone) but the pid in the name is alive: in use only for GRACE seconds
    after its last change (the instant between creation and lock); a dead pid's is stale at once."""
    target = tmp_path / "o.safetensors"
    live = tmp_path / f".o.safetensors.quantkit-{os.getpid()}-aaaaaaaa.partial"
    live.write_bytes(b"\0" * 8192)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    assert not tempfiles.pid_alive(dead_pid)
    gone = tmp_path / f".o.safetensors.quantkit-{dead_pid}-bbbbbbbb.partial"
    gone.write_bytes(b"\0" * 4096)
    by_name = {f.path.name: f for f in tempfiles.scan(tmp_path, target.name)}
    assert by_name[live.name].in_use and not by_name[gone.name].in_use
    assert by_name[gone.name].bytes == 4096
    old = time.time() - tempfiles.GRACE - 5
    os.utime(live, (old, old))  # a reused pid: the file is older than any creation instant
    assert sorted(f.path.name for f in tempfiles.reclaim(target)) == sorted([live.name, gone.name])
    assert list(tmp_path.iterdir()) == []


def _wait_for_temp(d: Path, name: str, pid: int, timeout: float = 60.0) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in d.iterdir():
            if p.name.startswith(f".{name}.quantkit-{pid}-"):
                return p
        time.sleep(0.002)
    raise AssertionError("no temporary file appeared")


def test_killed_convert_is_reclaimed_by_next_run(big_checkpoint, tmp_path):
    """SIGKILL a real `quantkit convert` while it writes: its pre-allocated temporary file stays, in
    use until it dies, stale after; `clean` lists it; the next convert to that target removes it and
    says so in one line; output correct."""
    out = tmp_path / "o.safetensors"
    p = subprocess.Popen([*QK, "convert", str(big_checkpoint), "-o", str(out), "--device", "cpu", "-q"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = _wait_for_temp(tmp_path, out.name, p.pid)
    while p.poll() is None and tmp.stat().st_blocks * 512 < 151e6:  # until it is pre-allocated in full
        time.sleep(0.002)
    [f] = tempfiles.scan(tmp_path)
    assert f.in_use
    _kill(p)
    assert p.returncode == -signal.SIGKILL
    size = tmp.stat().st_blocks * 512
    assert size >= 151014900  # the whole output's size
    r = runner.invoke(app, ["clean", str(tmp_path)], env={"COLUMNS": "300"})
    assert r.exit_code == 0 and tmp.name in r.stdout and "stale" in r.stdout and tmp.exists()
    r = subprocess.run([*QK, "convert", str(big_checkpoint), "-o", str(out), "--device", "cpu"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    notes = [x for x in r.stderr.splitlines() if "stale temporary file" in x]
    assert len(notes) == 1 and f"pid {p.pid}" in notes[0] and f"{size / 1e9:.2f} GB" in notes[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o.safetensors"]
    assert len(load_file(str(out))) == 4 * 36


def test_clean_command(tmp_path):
    target = tmp_path / "o.safetensors"
    p, live = _holder(target)
    q, stale = _holder(tmp_path / "b.safetensors")
    try:
        _kill(q)
        r = runner.invoke(app, ["clean", str(tmp_path)], env={"COLUMNS": "300"})
        assert r.exit_code == 0, r.output
        lines = r.stdout.splitlines()
        assert [x.split()[0] for x in lines[:2]] == ["stale", "in"]  # sorted by name: .b... before .o...
        assert lines[2].startswith("1 stale temporary files") and "1 in use" in lines[2]
        assert stale.exists() and live.exists()
        r = runner.invoke(app, ["clean", str(tmp_path), "--remove"])
        assert r.exit_code == 0 and not stale.exists() and live.exists()
        assert r.stdout.splitlines()[-1].startswith("removed 1 stale temporary files")
    finally:
        _kill(p)
    r = runner.invoke(app, ["clean", str(tmp_path), "--yes"])
    assert r.exit_code == 0 and list(tmp_path.iterdir()) == []
    r = runner.invoke(app, ["clean", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "cannot list the directory" in r.output and r.output.count("\n") == 1


def test_failed_convert_leaves_nothing_and_library_notes(sample, tmp_path):
    """The library reports a reclaimed file in ConvertReport.notes (it prints nothing)."""
    out = tmp_path / "o.safetensors"
    p, path = _holder(out)
    _kill(p)
    rep = quantkit.convert(sample, out)
    assert len(rep.notes) == 1 and f"pid {p.pid}" in rep.notes[0]
    assert not path.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["flux-mini.safetensors", "o.safetensors"]


# ---- the final rename never replaces a file another process wrote meanwhile ---------------------

@pytest.mark.parametrize("how", ["renameat2", "link"])
def test_rename_noreplace(tmp_path, monkeypatch, how):
    if how == "link":
        monkeypatch.setattr(tempfiles, "_libc_renameat2", lambda: None)
    elif tempfiles._libc_renameat2() is None:
        pytest.skip("no renameat2 in this C library")
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"new")
    b.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        tempfiles.rename_noreplace(a, b)
    assert a.read_bytes() == b"new" and b.read_bytes() == b"theirs"
    b.unlink()
    tempfiles.rename_noreplace(a, b)
    assert not a.exists() and b.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError):
        tempfiles.rename_noreplace(a, tmp_path / "c")


@pytest.mark.parametrize("overwrite", [False, True])
def test_target_written_during_run(sample, tmp_path, monkeypatch, overwrite):
    """Another process creates the target after this run checked it: without --overwrite the final
    rename fails with one line and leaves their file and no temporary file; with it, ours replaces it."""
    conv = sys.modules["quantkit.convert"]  # (the package attribute is the function)
    out = tmp_path / "o.safetensors"
    real = conv.verify_written

    def verify_then_race(path, plan, writer):
        real(path, plan, writer)
        out.write_bytes(b"theirs")
    monkeypatch.setattr(conv, "verify_written", verify_then_race)
    if overwrite:
        quantkit.convert(sample, out, overwrite=True)
        assert len(load_file(str(out))) > 0
    else:
        with pytest.raises(quantkit.QuantkitError) as ei:
            quantkit.convert(sample, out)
        msg = ei.value.one_line()
        assert msg.startswith(f"{out}: output file already exists (written by another process during this run)")
        assert "fix: pass --overwrite" in msg and "\n" not in msg
        assert out.read_bytes() == b"theirs"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["flux-mini.safetensors", "o.safetensors"]


def test_two_processes_one_target(big_checkpoint, tmp_path):
    """Two real converts to one target without --overwrite: exactly one writes it, the other exits 1
    with one line, and the file is the winner's (fp8 vs int8-row, told apart by its markers)."""
    out = tmp_path / "o.safetensors"
    procs = {fmt: subprocess.Popen([*QK, "convert", str(big_checkpoint), "-o", str(out), "--device", "cpu", "-q",
                                    "--format", fmt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for fmt in ("fp8", "int8-row")}
    res = {fmt: (p.wait(), p.stdout.read(), p.stderr.read()) for fmt, p in procs.items()}
    codes = sorted(r[0] for r in res.values())
    assert codes == [0, 1], res
    [won] = [f for f, r in res.items() if r[0] == 0]
    [lost] = [r for r in res.values() if r[0] == 1]
    assert lost[2].count("\n") == 1 and "output file already exists" in lost[2] and "Traceback" not in lost[2]
    sd = load_file(str(out))
    assert sd["blocks.0.linear.weight"].dtype == (torch.float8_e4m3fn if won == "fp8" else torch.int8)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o.safetensors"]
