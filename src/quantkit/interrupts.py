"""SIGINT, SIGTERM and SIGHUP at the command line: every one ends the run the same way, at any
moment: exit 128 + the signal's number (130, 143, 129), one line on stderr, nothing at the target,
no temporary file left.

Two phases (the command line only; a library caller keeps Python's own handling):

* **start-up** (:func:`install_startup`, first thing in ``quantkit/__init__`` when it is the
  ``quantkit`` command): until the command's code runs, nothing has been written, so a signal ends
  the process at once (``os._exit``). Raising an exception there is not enough: it lands inside
  ``import torch``, and once it lands in C code that clears errors (numpy's extension module
  importing its Python parts, while ``torch.storage`` imports numpy) it is swallowed and the
  conversion runs on to exit 0; elsewhere it gave a ``KeyboardInterrupt`` traceback and exit -2.
* **running** (:func:`install_raising`, by ``cli.main`` inside its ``try``): a signal raises
  :class:`Interrupted` in the main thread, so every ``finally`` runs (the writer thread stops after
  its current tensor, the temporary file is removed, worker processes are killed, the progress bar
  restores the terminal) and ``main`` prints the one line. :class:`Interrupted` is a
  ``BaseException`` and no ``KeyboardInterrupt``, so no ``except Exception`` and no handler in typer
  or click takes it for something else. The signal is also remembered: :func:`check`, called by
  ``convert`` per tensor and before its final rename, raises it again if some C code swallowed the
  exception. A second signal while the first one's clean-up runs removes this process's temporary
  files and exits at once (that clean-up waits at most for one tensor's write).

No torch import: this runs before anything heavy is loaded.
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)

_received: int | None = None


class Interrupted(BaseException):
    """A signal asked the process to stop (the command line raises it from its signal handler)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(message(signum))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def message(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"interrupted ({name})"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _exit_now(signum: int) -> None:
    # no import here: the signal may land inside an import, and importing then fails half-way
    tempfiles = sys.modules.get(__name__.rpartition(".")[0] + ".tempfiles")
    if tempfiles is not None:
        tempfiles.remove_own()
    _flush()
    try:
        os.write(2, (message(signum) + "\n").encode())
    except OSError:
        pass
    os._exit(128 + signum)


def _on_startup_signal(signum, frame) -> None:
    _exit_now(signum)


def _on_signal(signum, frame) -> None:
    global _received
    if _received is not None:  # again, while the first one's clean-up runs
        _exit_now(_received)
    _received = signum
    raise Interrupted(signum)


def _install(handler) -> None:
    for s in SIGNALS:
        try:
            signal.signal(s, handler)
        except (OSError, ValueError):  # not the main thread, or not settable here
            pass


def announce(e: Interrupted) -> int:
    """The end of an interrupted command: further signals are ignored from here (a second one
    arriving now would otherwise print the line a second time), the one line goes to stderr, and
    the exit code is returned."""
    _install(signal.SIG_IGN)
    _flush()
    try:
        os.write(2, (str(e) + "\n").encode())
    except OSError:
        pass
    return e.exit_code


def install_startup() -> None:
    """From now until :func:`install_raising`: a signal exits the process at once."""
    _install(_on_startup_signal)


def install_raising() -> None:
    """From now on: a signal raises :class:`Interrupted` in the main thread."""
    _install(_on_signal)


def received() -> int | None:
    """The signal that arrived (with :func:`install_raising` in effect), if any."""
    return _received


def check() -> None:
    """Raise :class:`Interrupted` if a signal arrived and its exception was swallowed."""
    if _received is not None:
        raise Interrupted(_received)


def ignore_sigint_in_worker() -> None:
    """In a worker process: Ctrl-C goes to the whole foreground process group, and the parent
    handles it (it kills its workers); a worker printing its own traceback would add noise."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (OSError, ValueError):
        pass


__all__ = ["Interrupted", "SIGNALS", "announce", "install_startup", "install_raising", "check", "received", "message",
           "ignore_sigint_in_worker"]
