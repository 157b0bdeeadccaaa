"""Work functions for the worker processes of tests/test_multi.py (imported by name in each spawned
worker, so they live in a module of their own). Each does the real work except where it fails on
purpose; the failing layer, and a file for the once-only faults, come from environment variables the
test sets before the workers start."""

from __future__ import annotations

import os
import signal
import time

import torch

from quantkit.errors import QuantkitError
from quantkit.multi import learn_layer


def _hit(job) -> bool:
    return job.layer == os.environ["QK_FAULT_LAYER"]


def _first_time() -> bool:
    """True once per test: the first caller creates the marker file (O_EXCL, so exactly one wins)."""
    try:
        os.close(os.open(os.environ["QK_FAULT_ONCE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def logged(job, files):
    with open(os.environ["QK_FAULT_LOG"], "a") as f:
        f.write(f"{job.layer}\n")
    return learn_layer(job, files)


def sigkill_once(job, files):
    if _hit(job) and _first_time():
        os.kill(os.getpid(), signal.SIGKILL)
    return learn_layer(job, files)


def exit_always(job, files):
    if _hit(job):
        os._exit(3)
    return learn_layer(job, files)


def oom_once(job, files):
    if _hit(job) and _first_time():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
    return learn_layer(job, files)


def quantkit_error(job, files):
    if _hit(job):
        raise QuantkitError("calibration statistics are not positive definite even after damping",
                            fix="capture over more rows, or raise the damping")
    return learn_layer(job, files)


def hang(job, files):
    if _hit(job):
        time.sleep(3600)
    return learn_layer(job, files)


def wrong_shape(job, files):
    q, scale, note = learn_layer(job, files)
    return (q[:1], scale, note) if _hit(job) else (q, scale, note)



