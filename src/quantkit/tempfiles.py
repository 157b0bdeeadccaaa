"""Temporary files beside an output: names that say whose they are, a lock held while they are
written, reclaiming those that killed runs left behind, and the final rename that never replaces
a file another process wrote meanwhile.

Every file quantkit writes goes first to a temporary file in the target's directory, named

    .<target name>.quantkit-<pid>-<random>[.<kind>].partial

(``kind``: ``learned`` / ``calibration`` for the scratch files of ``--devices``), and renamed over
the target when it is complete. The writing process holds an exclusive ``flock`` on the file from
the moment it exists until it is renamed or removed. A run killed with SIGKILL (or by the OOM
killer, or a power cut) cannot remove its file, but the kernel drops its lock, so:

A temporary file is **in use** when a non-blocking ``flock`` on a fresh descriptor fails (its
writer holds the lock), or when the pid in its name is alive and the file is younger than
``GRACE`` seconds (the instant between its creation and the lock; after that every live writer
holds the lock, so a reused pid does not keep a file forever). Otherwise it is **stale**: its
writer is gone. Stale files are removed while holding their lock, so a file cannot be taken from
under a live writer. The lock is the test that matters (it works across pid namespaces and on NFS,
where ``flock`` is a whole-file POSIX lock); the pid is only the name's hint and the fallback for
that instant.

``reclaim(target)`` (called by :func:`quantkit.convert` before it writes) removes the stale files
of that target only; ``scan(directory)`` lists all of a directory's (``quantkit clean``).

No torch import: the ``clean`` command uses this without loading torch.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MARK = "quantkit"
GRACE = 60.0  # seconds: a live pid's unlocked file younger than this may be between creation and lock
_NAME_MAX = 255
_RANDOM = 8  # characters tempfile.mkstemp puts between prefix and suffix
_RE = re.compile(rf"^\.(?P<target>.+)\.{MARK}-(?P<pid>[0-9]+)-[a-z0-9_]{{{_RANDOM}}}(?:\.(?P<kind>[a-z]+))?\.partial$")


def _prefix_target(name: str, extra: int) -> str:
    """``name`` cut (on a character boundary) so that the temporary name fits in NAME_MAX bytes."""
    room = _NAME_MAX - extra
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    return raw[:max(room, 1)].decode("utf-8", "ignore")


def _affixes(target: Path, kind: str, pid: int) -> tuple[str, str]:
    suffix = f".{kind}.partial" if kind else ".partial"
    head = f".{MARK}-{pid}-"
    extra = 1 + len(head) + _RANDOM + len(suffix)
    return f".{_prefix_target(target.name, extra)}{head}", suffix


def create(target: str | os.PathLike, kind: str = "", mode: int | None = 0o666) -> tuple[int, Path]:
    """Create and lock a temporary file beside ``target``: returns ``(fd, path)``. The lock lasts
    while ``fd`` is open; close it only after the file is renamed or removed. ``mode`` (before the
    umask; None keeps mkstemp's 0600) makes the result an ordinary file once renamed."""
    target = Path(target)
    prefix, suffix = _affixes(target, kind, os.getpid())
    fd, name = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=prefix, suffix=suffix)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks at most for a checker's instant (it never keeps the lock)
        if mode is not None:
            os.fchmod(fd, mode & ~_umask())
    except BaseException:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise
    _own.append(Path(name))
    return fd, Path(name)


_own: list[Path] = []  # every temporary file this process created (renamed or removed ones no longer exist)


def remove_own() -> None:
    """Remove this process's temporary files that still exist (a second signal's immediate exit)."""
    for p in _own:
        try:
            os.unlink(p)
        except OSError:
            pass


@dataclass(frozen=True)
class Leftover:
    path: Path
    target: str  # the target's file name (cut to fit, for very long names)
    pid: int
    kind: str  # "" for an output, else the scratch file's kind
    bytes: int  # disk space it takes (allocated blocks; a pre-allocated output counts in full)
    in_use: bool


def parse(name: str) -> tuple[str, int, str] | None:
    """(target name, pid, kind) of a quantkit temporary file name, else None."""
    m = _RE.match(name)
    return None if m is None else (m["target"], int(m["pid"]), m["kind"] or "")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True


def _probe(path: Path, pid: int, remove: bool) -> tuple[bool, int] | None:
    """(in use, allocated bytes) of one temporary file; with ``remove``, a stale one is unlinked
    while its lock is held. None when it vanished meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError:
        return (True, 0)  # cannot look: treat as in use
    try:
        st = os.fstat(fd)
        size = st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return (True, size)
            return (True, size)  # locking unsupported here: never remove what cannot be checked
        if pid_alive(pid) and time.time() - st.st_mtime < GRACE:
            return (True, size)
        if remove:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return None
        return (False, size)
    finally:
        os.close(fd)  # drops the lock


def scan(directory: str | os.PathLike, target: str | None = None, *, remove_stale: bool = False) -> list[Leftover]:
    """quantkit temporary files in ``directory`` (of ``target``'s name only, if given), sorted by
    name; with ``remove_stale``, the stale ones are removed (and returned, marked not in use)."""
    directory = Path(directory)
    found = []
    with os.scandir(directory) as it:
        names = sorted(e.name for e in it if e.name.startswith(".") and e.name.endswith(".partial"))
    for name in names:
        parsed = parse(name)
        if parsed is None:
            continue
        tname, pid, kind = parsed
        if target is not None and _affixes(Path(target), kind, pid)[0] != f".{tname}.{MARK}-{pid}-":
            continue  # another target's (a long name is matched as cut to fit)
        path = directory / name
        probed = _probe(path, pid, remove_stale)
        if probed is None:
            continue
        found.append(Leftover(path, tname, pid, kind, probed[1], probed[0]))
    return found


def reclaim(target: str | os.PathLike) -> list[Leftover]:
    """Remove the stale temporary files of ``target`` (runs for it that were killed); returns them.
    Best effort: an unreadable directory reclaims nothing."""
    target = Path(target)
    try:
        return [f for f in scan(target.parent if str(target.parent) else ".", target.name, remove_stale=True)
                if not f.in_use]
    except OSError:
        return []


def reclaim_note(removed: list[Leftover]) -> str | None:
    """One line saying what :func:`reclaim` removed (None if nothing)."""
    if not removed:
        return None
    pids = ", ".join(sorted({str(f.pid) for f in removed}, key=int))
    n = len(removed)
    return (f"removed {n} stale temporary file{'s' if n > 1 else ''} of killed runs for this output "
            f"({sum(f.bytes for f in removed) / 1e9:.2f} GB; pid {pids})")


# --- the final rename ---------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2 = None


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):  # glibc < 2.28, musl, not Linux
            _renameat2 = False
    return _renameat2 or None


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists, atomically:
    ``renameat2(RENAME_NOREPLACE)``; where the kernel or file system lacks it, ``link`` + ``unlink``
    (also atomic: link fails if ``dst`` exists); where hard links are refused too (FAT, some FUSE
    file systems), a check then ``rename``, which leaves a window of one system call."""
    s, d = os.fsencode(src), os.fsencode(dst)
    fn = _libc_renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, s, _AT_FDCWD, d, _RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(e, os.strerror(e), os.fsdecode(d))
    try:
        os.link(s, d)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(d):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(d)) from None
        os.rename(s, d)
        return
    os.unlink(s)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["create", "scan", "reclaim", "reclaim_note", "rename_noreplace", "remove_own", "parse", "pid_alive", "Leftover",
           "GRACE", "MARK"]
