"""A strict safetensors reader (mmap, one tensor at a time) and a streaming writer.

The reader treats every file as hostile: the header is parsed and checked completely (JSON object,
known dtypes, shapes matching byte sizes, offsets contiguous from 0 with no gap, overlap or
truncation, no duplicate names) before any tensor is touched.

The writer plans the whole header from names, dtypes and shapes, then takes tensor data strictly in
that planned order. It uses the layout rules of ``safetensors.torch.save_file`` (descending dtype
rank, then name; header padded with spaces to a multiple of 8), so for the same tensors its bytes
are identical to ``save_file``'s. One deliberate difference: ``__metadata__`` keys are written
sorted, where save_file's order comes from a hash map and varies between runs.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .dtypes import DTYPES, RANK, itemsize, torch_dtype
from .errors import QuantkitError
from .fileio import DirectWriter, open_direct, pread_full, pwrite_all

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
METADATA_KEY = "__metadata__"
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


class _Duplicate(Exception):
    pass


def parse_header(path: Path, raw: bytes, data_size: int) -> tuple[list[TensorInfo], dict[str, str] | None]:
    """Validate a header; return tensors sorted by offset and the metadata."""
    fix_corrupt = "the file is corrupt or was cut short; re-download or re-export it"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise QuantkitError("header is not UTF-8 text, so this is not a safetensors file",
                            file=path, fix="pass a .safetensors file") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise QuantkitError("header names this tensor twice", file=path, tensor=str(e.args[0]),
                            fix=fix_corrupt) from None
    except json.JSONDecodeError as e:
        raise QuantkitError(f"header is not valid JSON ({e.msg} at byte {e.pos})", file=path,
                            fix="pass a .safetensors file; this one is damaged or of another kind") from None
    if not isinstance(obj, dict):
        raise QuantkitError(f"header is a JSON {type(obj).__name__}, not an object", file=path,
                            fix="pass a .safetensors file")
    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise QuantkitError("__metadata__ must map strings to strings", file=path, fix=fix_corrupt)
    infos = []
    for name, entry in obj.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise QuantkitError("entry must have exactly dtype, shape and data_offsets", file=path,
                                tensor=name, fix=fix_corrupt)
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise QuantkitError(f"unknown dtype {dtype!r}", file=path, tensor=name,
                                fix=f"quantkit reads {', '.join(DTYPES)}; convert this tensor first")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise QuantkitError(f"shape {shape!r} is not a list of non-negative integers", file=path,
                                tensor=name, fix=fix_corrupt)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise QuantkitError(f"data_offsets {offs!r} are not [begin, end] with 0 <= begin <= end",
                                file=path, tensor=name, fix=fix_corrupt)
        info = TensorInfo(name, dtype, tuple(shape), offs[0], offs[1])
        if info.numel * itemsize(dtype) != info.nbytes:
            raise QuantkitError(
                f"{dtype} {list(shape)} needs {info.numel * itemsize(dtype)} bytes but its offsets span "
                f"{info.nbytes}", file=path, tensor=name, fix=fix_corrupt)
        infos.append(info)
    infos.sort(key=lambda t: (t.start, t.end))
    pos = 0
    for t in infos:
        if t.start < pos:
            raise QuantkitError(f"data [{t.start}, {t.end}) overlaps the previous tensor (ends at {pos})",
                                file=path, tensor=t.name, fix=fix_corrupt)
        if t.start > pos:
            raise QuantkitError(f"gap of {t.start - pos} bytes before this tensor's data", file=path,
                                tensor=t.name, fix=fix_corrupt)
        pos = t.end
    if pos > data_size:
        last = infos[-1]
        raise QuantkitError(f"data ends at byte {pos} but the file holds only {data_size} data bytes "
                            "(truncated)", file=path, tensor=last.name, fix=fix_corrupt)
    if pos < data_size:
        raise QuantkitError(f"{data_size - pos} unexplained bytes after the last tensor", file=path,
                            fix=fix_corrupt)
    return infos, metadata


class SafetensorsReader:
    """Open and validate a .safetensors file; hand out zero-copy tensor views from an mmap."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise QuantkitError("no such file", file=self.path, fix="check the path") from None
        except IsADirectoryError:
            raise QuantkitError("is a directory, not a file", file=self.path,
                                fix="pass the .safetensors file inside it") from None
        except PermissionError:
            raise QuantkitError("permission denied reading the file", file=self.path,
                                fix="make it readable (chmod +r)") from None
        try:
            self._open()
        except BaseException:
            self._f.close()
            raise

    def _open(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        self.file_size = size
        head = self._f.read(8)
        if len(head) < 8:
            raise QuantkitError(f"only {size} bytes, too short to be a safetensors file", file=self.path,
                                fix="pass a .safetensors file")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise QuantkitError(f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit, so this is "
                                "not a safetensors file", file=self.path, fix="pass a .safetensors file")
        if 8 + n > size:
            raise QuantkitError(f"header length {n} runs beyond the end of the {size}-byte file",
                                file=self.path, fix="the file is truncated or not a safetensors file")
        raw = self._f.read(n)
        self.header_bytes = n
        self.data_start = 8 + n
        self.tensors_in_order, self.metadata = parse_header(self.path, raw, size - 8 - n)
        self.tensors = {t.name: t for t in self.tensors_in_order}
        self._mm = None
        if size > self.data_start:
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a tensor view is still alive; the mapping goes with it
                pass
            self._mm = None
        self._f.close()

    def fileno(self) -> int:
        return self._f.fileno()

    def buffer(self, name: str) -> memoryview:
        t = self.tensors[name]
        if t.nbytes == 0:
            return memoryview(b"")
        a = self.data_start + t.start
        return memoryview(self._mm)[a:a + t.nbytes]

    def tensor(self, name: str) -> torch.Tensor:
        """A read-only view of the tensor in the mmap (a copy only if the data is misaligned)."""
        t = self.tensors[name]
        dt = torch_dtype(t.dtype)
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=dt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write
            flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=t.nbytes,
                                    offset=self.data_start + t.start)
        if (self.data_start + t.start) % itemsize(t.dtype):
            flat = flat.clone()
        return flat.view(dt).reshape(t.shape)

    def read(self, name: str) -> torch.Tensor:
        """An owned copy of the tensor, read with ``preadv`` straight into fresh memory (for data
        kept after the file is closed: page faults on one side only, where a clone of the mmap
        view faults on both)."""
        t = self.tensors[name]
        flat = torch.empty(t.nbytes, dtype=torch.uint8)
        if pread_full(self.fileno(), memoryview(flat.numpy()), self.data_start + t.start) < t.nbytes:
            raise QuantkitError("file ended inside a tensor's data (truncated?)", file=self.path, tensor=name,
                                fix="copy or download the file again")
        return flat.view(torch_dtype(t.dtype)).reshape(t.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading this tensor's pages now (read-ahead while we compute)."""
        if self._mm is None:
            return
        t = self.tensors[name]
        a = (self.data_start + t.start) // _PAGE * _PAGE
        b = self.data_start + t.end
        if b > a and hasattr(mmap, "MADV_WILLNEED"):
            self._mm.madvise(mmap.MADV_WILLNEED, a, b - a)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from our address space (they stay in the page cache), so RSS
        stays bounded however large the file is."""
        if self._mm is None:
            return
        t = self.tensors[name]
        a = (self.data_start + t.start) // _PAGE * _PAGE
        b = self.data_start + t.end
        if b > a and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def layout_order(tensors: Iterable[PlannedTensor]) -> list[PlannedTensor]:
    """save_file's order: descending dtype rank, then name."""
    return sorted(tensors, key=lambda t: (-RANK[t.dtype], t.name))


def build_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None) -> tuple[bytes, list[PlannedTensor]]:
    ordered = layout_order(tensors)
    header: dict = {}
    if metadata is not None:
        header[METADATA_KEY] = {k: metadata[k] for k in sorted(metadata)}
    pos = 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, ordered


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


_WRITEBACK_MIN = 4 << 20


def _load_sync_file_range():
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        f = libc.sync_file_range
        f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return f
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int, pos: int, n: int) -> None:
    """Start (not wait for) writeback of a just-written range, so dirty pages do not pile up
    until the final fsync. Linux only; elsewhere the final fsync does all the work."""
    if _sync_file_range is not None:
        _sync_file_range(fd, pos, n, 2)  # SYNC_FILE_RANGE_WRITE


def _as_bytes(data: bytes | memoryview | torch.Tensor) -> memoryview:
    if isinstance(data, torch.Tensor):
        return tensor_bytes(data)
    return memoryview(data).cast("B")


class SafetensorsWriter:
    """Writes a planned header to an open file descriptor, then each tensor's bytes at its planned
    offset. Tensors may arrive in any order and in chunks (so the converter reads its input once, in
    file order); ``finish`` checks that every planned byte was written exactly once. Writes that
    overrun a tensor raise ``RuntimeError`` (a caller bug, not bad input). ``written``: bytes of the
    file claimed by writes so far, header included."""

    def __init__(self, fd: int, tensors: list[PlannedTensor], metadata: dict[str, str] | None) -> None:
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise RuntimeError("duplicate tensor names in write plan")
        self._fd = fd
        header, self.order = build_header(tensors, metadata)
        self.header_size = len(header)
        self.offsets: dict[str, int] = {}
        pos = self.header_size
        for t in self.order:
            self.offsets[t.name] = pos
            pos += t.nbytes
        self.total_size = pos
        self._planned = {t.name: t.nbytes for t in self.order}
        self._written = dict.fromkeys(self._planned, 0)
        self._reserve()
        dfd = open_direct(fd)
        self._io = DirectWriter(fd, dfd) if dfd is not None else None  # None: buffered writes
        self._pwrite_all(header, 0)
        self.written = self.header_size  # the header, then what each write or copy claims (for progress)

    def _reserve(self) -> None:
        """Allocate the whole file now, so a full disk fails before any work, not hours in."""
        try:
            os.posix_fallocate(self._fd, 0, self.total_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise

    def _pwrite_all(self, data: memoryview | bytes, pos: int) -> None:
        if self._io is not None:
            self._io.write(data, pos)
        else:
            pwrite_all(self._fd, data, pos)

    def _claim(self, name: str, nbytes: int) -> int:
        if name not in self._planned:
            raise RuntimeError(f"write of unplanned tensor {name!r}")
        done = self._written[name]
        if done + nbytes > self._planned[name]:
            raise RuntimeError(f"{name!r}: {done + nbytes} bytes written, {self._planned[name]} planned")
        self._written[name] = done + nbytes
        self.written += nbytes
        return self.offsets[name] + done

    def write(self, name: str, data: bytes | memoryview | torch.Tensor) -> None:
        """Append ``data`` to tensor ``name`` (whole, or the next chunk of it)."""
        mv = _as_bytes(data)
        pos = self._claim(name, len(mv))
        self._pwrite_all(mv, pos)
        if self._io is None and len(mv) >= _WRITEBACK_MIN:
            _start_writeback(self._fd, pos, len(mv))

    def copy_from_fd(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Append ``nbytes`` of another file to tensor ``name``: read into the direct writer's bounce
        buffers, or (buffered output) a kernel-side copy, falling back to pread/pwrite where the
        kernel cannot. Either way no copy of the tensor is held by the process."""
        pos = self._claim(name, nbytes)
        if self._io is not None:
            self._io.write_from_fd(src_fd, src_offset, nbytes, pos)
            return
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, self._fd, nbytes - done, src_offset + done, pos + done)
                if n == 0:
                    raise OSError(f"unexpected end of input while copying {name!r}")
                done += n
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        while done < nbytes:
            chunk = os.pread(src_fd, min(1 << 24, nbytes - done), src_offset + done)
            if not chunk:
                raise OSError(f"unexpected end of input while copying {name!r}")
            self._pwrite_all(chunk, pos + done)
            done += len(chunk)

    def finish(self) -> None:
        for t in self.order:
            if self._written[t.name] != t.nbytes:
                raise RuntimeError(f"file incomplete: {t.name!r} has {self._written[t.name]} of {t.nbytes} bytes")
        if self._io is not None:
            self._io.flush()
        self.close()
        os.ftruncate(self._fd, self.total_size)

    def close(self) -> None:
        """Release the direct-I/O descriptor and buffer (``finish`` does; call it on failure)."""
        if self._io is not None:
            self._io.close()
            self._io = None
