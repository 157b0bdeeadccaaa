"""Overlap of the three conversion stages on the CPU.

* read: the kernel reads ahead; the converter asks for the next tensor's pages with
  ``madvise(WILLNEED)`` (``SafetensorsReader.prefetch``) while it quantizes the current one, and drops
  each tensor's pages from the process once done (``release``), so RSS stays bounded;
* quantize: the calling thread (torch uses all cores inside each op);
* write: one writer thread takes finished tensors from a bounded queue and writes them at their
  planned offsets, with O_DIRECT where the file system allows it (:class:`quantkit.fileio.DirectWriter`,
  whose own I/O thread keeps the disk busy while the next buffer fills), else buffered with
  writeback started as it goes, so the final fsync has little left to do.

At most ``depth`` finished tensors wait for the writer, so memory in flight is bounded by
``(depth + 2) x`` the largest quantized tensor (one being written, ``depth`` queued, one being
produced). Every write lands at a planned offset, so the bytes do not depend on timing: the
threaded and inline (``threaded=False``) paths produce identical files (tested).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

DEFAULT_DEPTH = 2


class BackgroundWriter:
    def __init__(self, threaded: bool = True, depth: int = DEFAULT_DEPTH) -> None:
        self._threaded = threaded
        self._error: BaseException | None = None
        if threaded:
            self._q: queue.Queue = queue.Queue(maxsize=depth)
            self._t = threading.Thread(target=self._run, name="quantkit-writer", daemon=True)
            self._t.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            job, on_skip = item
            if self._error is None:
                try:
                    job()
                except BaseException as e:  # handed to the producer at its next submit/close
                    self._error = e
            elif on_skip is not None:
                on_skip()  # release what the job held (e.g. a pinned buffer), so nobody waits on it

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def submit(self, job: Callable[[], None], on_skip: Callable[[], None] | None = None) -> None:
        """Run ``job`` on the writer thread (blocks while the queue is full). If an earlier job
        failed, ``job`` is skipped and ``on_skip`` runs instead."""
        try:
            self._raise()
        except BaseException:
            if on_skip is not None:
                on_skip()
            raise
        if self._threaded:
            self._q.put((job, on_skip))
        else:
            job()

    def close(self) -> None:
        """Wait for every queued job; re-raise the first failure."""
        if self._threaded and self._t.is_alive():
            self._q.put(None)
            self._t.join()
        self._raise()

    def abort(self) -> None:
        """Stop after the job in progress, dropping queued ones (used on failure)."""
        if self._threaded and self._t.is_alive():
            self._error = self._error or RuntimeError("aborted")
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[1] is not None:
                    item[1]()
            self._q.put(None)
            self._t.join()
