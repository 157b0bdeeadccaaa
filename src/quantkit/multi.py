"""Learned rounding spread over several devices: one worker process per device, layers largest first.

Learned rounding is the slow part of a conversion and its layers are independent, so
:func:`precompute` runs it for every learned layer *before* the streaming write pass, in worker
processes started with ``torch.multiprocessing`` (spawn context: CUDA cannot be forked), and hands the
results to the :class:`~quantkit.refine.Refiner` (``refiner.precomputed``). The reader, the writer
thread and the file layout of :mod:`quantkit.convert` are unchanged, and each layer is computed by the
same function (:func:`quantkit.learned.learn`) on the same inputs as in one process, so the output
bytes are the same as a single-process run with the same options (tested on CPU).

Protocol (``torch.multiprocessing`` spawn context; only small messages cross between processes):

* each worker has its own duplex ``Pipe`` (jobs in, answers out), so a worker killed in the middle
  of an answer cannot leave a lock held that other workers need (a single shared result ``Queue``
  can: its writers share one lock, and this hung a test run); the scheduler waits on the pipes and
  on the processes' sentinels together;
* each worker opens the input checkpoint and the calibration file itself (mmap, by tensor name), so
  no weight or K x K statistics matrix is copied between processes (Flux-size ``hessian``s are up to
  600 MB, more than a container's default /dev/shm of 64 MB);
* the scheduler keeps one job in flight per worker and gives the next-largest layer to whichever
  worker is idle;
* a worker writes its result (q, then its fp32 scale) with ``pwrite`` at offsets planned up front in
  one scratch file beside the output, and answers ``done`` with the note; the converter later reads
  each layer back when the writer reaches it. Memory therefore stays bounded by one layer per worker
  whatever the model size, at the cost of writing the quantized weights to disk twice (the scratch
  file is about the size of the quantized part of the output, and is removed when the conversion
  ends, successful or not).

Spawned workers re-import the caller's main module, so a script calling ``convert(..., devices=...)``
needs the usual ``if __name__ == "__main__":`` guard (the ``quantkit`` command and ``python -m
quantkit`` have it); without it the workers die at start and the run stops with that error.

Failures: a worker that raises (out of memory, any error) answers with the layer name and the error,
and a worker that dies (killed, segfault, ``os._exit``) or exceeds ``layer_timeout`` on one layer is
noticed through its process sentinel; either way that layer is retried once on another live worker, and if
that fails too (or none is left) the run stops with a :class:`QuantkitError` naming the layer, the
device and what happened. A :class:`QuantkitError` raised by learned rounding itself (statistics not
positive definite, ...) is deterministic, so it stops the run at once. Workers are always stopped
(and killed after a grace period) before :func:`precompute` returns or raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from multiprocessing.connection import wait
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import interrupts, learned, tempfiles
from .calibration import KEYS
from .errors import QuantkitError, UsageError
from .fileio import pread_full, pwrite_all
from .formats import FORMATS
from .refine import Refiner
from .safetensors_io import SafetensorsReader, tensor_bytes

START_TIMEOUT = 300.0  # seconds for a worker to import torch and open its files
LAYER_TIMEOUT = 3600.0  # seconds for one layer on one device before that worker is killed
STOP_TIMEOUT = 10.0  # grace period for workers to exit before they are killed
POLL = 0.05  # seconds between timeout checks while waiting for answers
MAX_ATTEMPTS = 2  # a layer runs on at most this many workers
_ALIGN = 64


def parse_devices(spec: str | Sequence[str]) -> list[torch.device]:
    """``cuda:0,cuda:1`` / ``all`` (every visible GPU) / ``cpu,cpu`` (one CPU worker per entry; for
    tests and for measuring the overhead of the multi-process path) -> one device per worker."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    if items == ["all"]:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError("--devices all: CUDA is not available here, so there are no GPUs to spread over",
                             fix="drop --devices (one process), or list CPU workers with --devices cpu,cpu")
        return [torch.device("cuda", i) for i in range(n)]
    out: list[torch.device] = []
    for s in items:
        try:
            dev = torch.device(s)
        except (RuntimeError, ValueError):
            raise UsageError(f"--devices: {s!r} is not a device", fix="use cuda:0,cuda:1,... or all") from None
        if dev.type == "cuda":
            if dev.index is None:
                raise UsageError(f"--devices: {s!r} names no GPU index", fix="use cuda:0,cuda:1,... or all")
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if dev.index >= count:
                raise UsageError(f"--devices: {s} does not exist here ({count} CUDA devices)",
                                 fix="use all, or indices 0 .. count - 1")
            if dev in out:
                raise UsageError(f"--devices: {s} is listed twice", fix="name each GPU once")
        elif dev.type != "cpu":
            raise UsageError(f"--devices: {s!r}: only cuda:N and cpu are supported", fix="use cuda:0,cuda:1,... or all")
        out.append(dev)
    if not out:
        raise UsageError("--devices lists no device", fix="use cuda:0,cuda:1,... or all")
    return out


@dataclass(frozen=True)
class Job:
    """One layer for a worker: where its weight and statistics are, where its result goes."""

    layer: str
    tensor: str  # the weight's name in the input file
    stats: str  # the layer's name in the calibration file
    format: str
    block_size: int
    bias_corrected: bool  # objective is the covariance (bias correction folds the mean error away)
    shape: tuple[int, int]
    q_offset: int
    scale_offset: int
    scale_shape: tuple[int, ...]
    nbytes: int  # of the input weight: the scheduling key


@dataclass(frozen=True)
class WorkerSetup:
    rank: int
    device: str
    src: str
    calibration: str
    scratch: str
    options: learned.LearnedOptions
    threads: int  # torch intra-op threads (CPU workers; 0 keeps torch's default)


class Files:
    """What a worker opens once: the input checkpoint, the calibration file, the scratch file."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.src = SafetensorsReader(setup.src)
        self.cal = SafetensorsReader(setup.calibration)
        self.fd = os.open(setup.scratch, os.O_WRONLY)

    def stats(self, name: str) -> dict[str, torch.Tensor]:
        # the same values Calibration.load holds (owned copies read from the file)
        return {k: self.cal.read(f"{name}.{k}") for k in KEYS if f"{name}.{k}" in self.cal.tensors}

    def close(self) -> None:
        self.src.close()
        self.cal.close()
        os.close(self.fd)


def learn_layer(job: Job, files: Files) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The work of one job: exactly what ``Refiner`` computes for a learned layer in one process."""
    spec = FORMATS[job.format]
    h = learned.objective_matrix(files.stats(job.stats), job.bias_corrected)
    w = files.src.tensor(job.tensor)
    opts = dataclasses.replace(files.setup.options, device=files.setup.device)
    r = learned.learn(w, h, spec, job.block_size, opts, name=job.layer)
    files.src.release(job.tensor)
    return r.q, r.scale, r.note


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it dies (even by SIGKILL),
    so no worker outlives an interrupted or killed conversion."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    import multiprocessing
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the call above
        os._exit(1)


def _worker(setup: WorkerSetup, conn, work: Callable[[Job, Files], tuple]) -> None:
    """Worker process main loop: one job at a time from ``conn`` until ``None``; answers on ``conn``."""
    _die_with_parent()
    interrupts.ignore_sigint_in_worker()  # Ctrl-C reaches the whole process group; the parent stops us
    import quantkit
    dev = torch.device(setup.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif setup.threads > 0:
        torch.set_num_threads(setup.threads)
    try:
        files = Files(setup)
    except BaseException as e:  # noqa: BLE001 - reported to the scheduler, which names the worker
        conn.send(("fatal", setup.rank, None, f"cannot open its files: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", setup.rank, os.getpid(), quantkit.__file__))
    try:
        while True:
            job = conn.recv()
            if job is None:
                return
            try:
                q, scale, note = work(job, files)
                if tuple(q.shape) != job.shape or tuple(scale.shape) != job.scale_shape:
                    raise RuntimeError(f"result shapes {tuple(q.shape)}, {tuple(scale.shape)} differ from the plan")
                pwrite_all(files.fd, tensor_bytes(q.cpu()), job.q_offset)
                pwrite_all(files.fd, tensor_bytes(scale.cpu().float()), job.scale_offset)
                conn.send(("done", setup.rank, job.layer, note))
            except QuantkitError as e:
                conn.send(("stop", setup.rank, job.layer, e.one_line()))
            except torch.OutOfMemoryError as e:
                conn.send(("error", setup.rank, job.layer, f"out of memory: {str(e).splitlines()[0]}"))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - any other failure is retried elsewhere
                conn.send(("error", setup.rank, job.layer, f"{type(e).__name__}: {e}"))
    finally:
        files.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"died (signal {signal.Signals(-code).name})"
        except ValueError:
            return f"died (signal {-code})"
    return f"died (exit code {code})"


@dataclass
class _Slot:
    setup: WorkerSetup
    proc: object
    conn: object  # the scheduler's end of the worker's duplex pipe
    eof: bool = False
    ready: bool = False
    alive: bool = True
    job: Job | None = None
    since: float = 0.0


@dataclass
class RunLog:
    """What the scheduler did: the module file the workers imported, and one line per failure."""

    worker_module: list[str] = dataclasses.field(default_factory=list)
    events: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # layer -> what happened
    ran_on: dict[str, str] = dataclasses.field(default_factory=dict)  # layer -> device that finished it
    start_seconds: float = 0.0  # until the last worker was ready (spawn, torch import, files opened)
    seconds: float = 0.0  # the whole run, start-up and shut-down included


def run_jobs(jobs: list[Job], devices: list[torch.device], src: str, calibration: str, scratch: str,
             options: learned.LearnedOptions, *, work: Callable[[Job, Files], tuple] | None = None,
             layer_timeout: float | None = None, start_timeout: float | None = None,
             threads: int | None = None) -> tuple[dict[str, str], RunLog]:
    """Run ``jobs`` largest first over one worker process per entry of ``devices``; results land in
    ``scratch`` at the jobs' offsets. Returns {layer: note} and the :class:`RunLog`; raises
    :class:`QuantkitError` naming the layer when one cannot be computed."""
    work = work or learn_layer
    layer_timeout = LAYER_TIMEOUT if layer_timeout is None else layer_timeout
    start_timeout = START_TIMEOUT if start_timeout is None else start_timeout
    if threads is None:
        n_cpu = sum(d.type == "cpu" for d in devices)
        threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else 0
    ctx = torch.multiprocessing.get_context("spawn")
    slots: list[_Slot] = []
    log = RunLog()
    notes: dict[str, str] = {}
    pending = sorted(jobs, key=lambda j: (-j.nbytes, j.layer))
    failed_on: dict[str, set[int]] = {}
    t0 = time.monotonic()

    def fail(slot: _Slot, job: Job, why: str) -> None:
        where = f"worker {slot.setup.rank} ({slot.setup.device})"
        log.events.setdefault(job.layer, []).append(f"{where} {why}")
        failed_on.setdefault(job.layer, set()).add(slot.setup.rank)
        others = [s for s in slots if s.alive and s.setup.rank not in failed_on[job.layer]]
        if len(failed_on[job.layer]) >= MAX_ATTEMPTS or not others:
            tried = "; ".join(log.events[job.layer])
            raise QuantkitError(f"learned rounding failed: {tried}" + ("" if others else "; no other worker left"),
                                file=src, tensor=job.layer,
                                fix=f"free memory on the devices (host RAM too, if a worker was killed), or keep this "
                                    f"layer round-to-nearest with --exclude '^{job.layer}$'")
        pending.insert(0, job)

    try:
        for rank, dev in enumerate(devices):
            setup = WorkerSetup(rank, str(dev), src, calibration, scratch, options, threads if dev.type == "cpu" else 0)
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(setup, theirs, work), daemon=True, name=f"quantkit-learn-{rank}")
            p.start()
            theirs.close()  # so a dead worker reads as EOF here
            slots.append(_Slot(setup, p, mine, since=time.monotonic()))
        while pending or any(s.job is not None for s in slots):
            for s in slots:
                if s.alive and s.ready and s.job is None:
                    job = next((j for j in pending if s.setup.rank not in failed_on.get(j.layer, ())), None)
                    if job is not None:
                        pending.remove(job)
                        s.job, s.since = job, time.monotonic()
                        try:
                            s.conn.send(job)
                        except OSError:  # it died just now: noticed below through its sentinel
                            pass
            live = [s for s in slots if s.alive]
            ready = wait([s.conn for s in live] + [s.proc.sentinel for s in live], timeout=POLL)
            for s in live:  # answers first: a worker may answer and then die
                if s.conn not in ready:
                    continue
                try:
                    msg = s.conn.recv()
                except (EOFError, OSError):  # it died (mid-answer at worst): handled below
                    s.eof = True
                    s.proc.join(STOP_TIMEOUT)
                    continue
                kind, rank, what, text = msg
                if kind == "ready":
                    s.ready = True
                    log.start_seconds = time.monotonic() - t0
                    log.worker_module.append(text)
                elif kind == "fatal":
                    s.alive = False
                    raise QuantkitError(f"learned-rounding worker {rank} ({s.setup.device}) {text}", file=src,
                                        fix="check the input and calibration files are readable")
                elif s.job is not None and s.job.layer == what:  # else: stale answer of a job given up on
                    job, s.job = s.job, None
                    if kind == "done":
                        notes[job.layer] = text
                        log.ran_on[job.layer] = s.setup.device
                    elif kind == "stop":
                        raise QuantkitError(f"learned rounding stopped on worker {rank} ({s.setup.device}): {text}",
                                            file=src, tensor=job.layer,
                                            fix=f"keep this layer round-to-nearest with --exclude '^{job.layer}$'")
                    else:
                        fail(s, job, f"failed: {text}")
            now = time.monotonic()
            for s in slots:
                if not s.alive:
                    continue
                if not s.proc.is_alive() and (s.eof or not s.conn.poll()):  # dead, nothing left to read
                    s.alive = False
                    job, s.job = s.job, None
                    what = _exit_text(s.proc.exitcode)
                    if job is not None:
                        fail(s, job, what)
                    elif not s.ready:
                        raise QuantkitError(f"learned-rounding worker {s.setup.rank} ({s.setup.device}) {what} "
                                            f"while starting", file=src, fix="check that torch imports in a fresh process")
                elif not s.ready and now - s.since > start_timeout:
                    raise QuantkitError(f"learned-rounding worker {s.setup.rank} ({s.setup.device}) did not start "
                                        f"in {start_timeout:.0f} s", file=src, fix="check the machine's load and retry")
                elif s.job is not None and now - s.since > layer_timeout:
                    job, s.job = s.job, None
                    s.proc.kill()
                    s.proc.join(STOP_TIMEOUT)
                    s.alive = False
                    fail(s, job, f"did not finish the layer in {layer_timeout:g} s and was killed")
            if pending and not any(s.alive for s in slots):
                raise QuantkitError(f"every learned-rounding worker died ({len(pending)} layers left)", file=src,
                                    tensor=pending[0].layer, fix="see the error above; retry with fewer layers")
        return notes, log
    except (KeyboardInterrupt, interrupts.Interrupted):
        _stop(slots, grace=0.0)  # the user stopped the run: no layer is worth waiting for
        raise
    finally:
        _stop(slots)
        log.seconds = time.monotonic() - t0


def _stop(slots: list[_Slot], grace: float = STOP_TIMEOUT) -> None:
    for s in slots:
        if s.proc.is_alive():
            with contextlib.suppress(OSError):
                s.conn.send(None)
    deadline = time.monotonic() + grace
    for s in slots:
        s.proc.join(max(0.0, deadline - time.monotonic()))
        if s.proc.is_alive():
            s.proc.kill()
            s.proc.join(STOP_TIMEOUT)
        s.conn.close()


class LearnedStore:
    """Results of the worker processes, read back from the scratch file one layer at a time."""

    def __init__(self, path: Path, jobs: dict[str, Job], notes: dict[str, str], log: RunLog) -> None:
        self.path, self.jobs, self.notes, self.log = path, jobs, notes, log
        self._fd = os.open(path, os.O_RDONLY)

    def get(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        job = self.jobs.get(layer)
        if job is None:
            return None
        spec = FORMATS[job.format]
        q = self._read(job.q_offset, spec.weight_dtype, job.shape)
        scale = self._read(job.scale_offset, torch.float32, job.scale_shape)
        note = self.notes[layer]
        if layer in self.log.events:
            note += f" (after: {'; '.join(self.log.events[layer])}; done on {self.log.ran_on[layer]})"
        return q, scale, note

    def _read(self, pos: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        buf = torch.empty(torch.Size(shape).numel() * dtype.itemsize, dtype=torch.uint8)
        if pread_full(self._fd, memoryview(buf.numpy()), pos) < buf.numel():
            raise QuantkitError("scratch file of learned rounding is shorter than planned", file=self.path,
                                fix="report this as a quantkit bug")
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        os.close(self._fd)


def _plan_jobs(refiner: Refiner) -> tuple[list[Job], int]:
    jobs, pos = [], 0
    for lp, stats_name, bias_corrected in refiner.learned_layers():
        spec = lp.spec
        assert spec is not None
        n, k = lp.shape
        scale_shape = tuple(spec.scale_shape((n, k), lp.block_size))
        q_off = pos
        pos += -(-n * k * torch.empty((), dtype=spec.weight_dtype).element_size() // _ALIGN) * _ALIGN
        s_off = pos
        pos += -(-max(1, torch.Size(scale_shape).numel()) * 4 // _ALIGN) * _ALIGN
        info = refiner.reader.tensors[lp.tensor]
        jobs.append(Job(lp.layer, lp.tensor, stats_name, spec.name, lp.block_size, bias_corrected, (n, k),
                        q_off, s_off, scale_shape, info.nbytes))
    return jobs, pos


@contextlib.contextmanager
def precompute(refiner: Refiner | None, devices: str | Sequence[str] | None, output: Path, *,
               work: Callable[[Job, Files], tuple] | None = None, layer_timeout: float | None = None,
               start_timeout: float | None = None, threads: int | None = None) -> Iterator[LearnedStore | None]:
    """Compute every learned layer of ``refiner`` in worker processes over ``devices`` and serve the
    results through ``refiner.precomputed`` inside the ``with`` block; the scratch file (beside
    ``output``, named for it: :mod:`quantkit.tempfiles`) is removed on exit. Yields None when
    ``devices`` is None."""
    if devices is None:
        yield None
        return
    devs = parse_devices(devices)
    if refiner is None or not refiner.learned_rounding:
        raise UsageError("--devices spreads learned rounding over worker processes, and learned rounding is off",
                         fix="add --learned-rounding --calibration FILE, or drop --devices")
    jobs, size = _plan_jobs(refiner)
    if not jobs:  # no layer ran during calibration: nothing to spread
        yield None
        return
    output = Path(output)
    made: list[tuple[int, Path]] = []  # (locked fd, path): the locks last until the files are removed
    store = None
    try:
        try:
            cal_path = refiner.calibration_path
            if cal_path is None:  # an in-memory Calibration: the workers read a copy
                made.append(tempfiles.create(output, "calibration", mode=None))
                assert refiner.calibration is not None
                refiner.calibration.save(str(made[-1][1]))
                cal_path = str(made[-1][1])
            made.append(tempfiles.create(output, "learned", mode=None))
            fd, scratch = made[-1]
            name = str(scratch)
            os.ftruncate(fd, size)
        except OSError as e:
            raise QuantkitError(f"cannot write the scratch file of learned rounding: {e.strerror or e}",
                                file=output.parent, fix="free space beside the output or write elsewhere with -o") from None
        notes, log = run_jobs(jobs, devs, str(refiner.reader.path), str(cal_path), name, refiner.options,
                              work=work, layer_timeout=layer_timeout, start_timeout=start_timeout, threads=threads)
        store = LearnedStore(Path(name), {j.layer: j for j in jobs}, notes, log)
        refiner.precomputed = store.get
        yield store
    finally:
        refiner.precomputed = None
        if store is not None:
            store.close()
        for fd, p in made:
            p.unlink(missing_ok=True)
            os.close(fd)
