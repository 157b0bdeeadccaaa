"""A strict safetensors reader (mmap, one tensor at a time) and a streaming writer.

The reader treats every file as hostile: the header is parsed and checked completely (JSON object,
known dtypes, shapes matching byte sizes, offsets contiguous from 0 with no gap, overlap or
truncation) before any tensor is touched. Its verdict is safetensors 0.8's own (``safe_open`` and
reading every tensor with torch; tests/test_header_fuzz.py compares the two): what serde_json
refuses and Python's json takes (deep nesting, NaN, lone surrogates, numbers past 64 bits) is
refused, what serde takes (a name given twice: the last entry; unknown entry fields) is read.
Only regular files (or symlinks to one) are opened.

The writer plans the whole header from names, dtypes and shapes, then takes tensor data strictly in
that planned order. It uses the layout rules of ``safetensors.torch.save_file`` (descending dtype
rank, then name; header padded with spaces to a multiple of 8), so for the same tensors its bytes
are identical to ``save_file``'s. One deliberate difference: ``__metadata__`` keys are written
sorted, where save_file's order comes from a hash map and varies between runs.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .dtypes import DTYPES, PACKED_X2, RANK, bitsize, itemsize, torch_dtype, torch_shape
from .errors import QuantkitError
from .fileio import DirectWriter, NotRegularFile, open_direct, open_regular, pread_full, pwrite_all

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE): one byte more is refused
MAX_JSON_DEPTH = 127  # nested arrays/objects serde_json parses in a header (128 is its recursion limit)
METADATA_KEY = "__metadata__"
_U64_MAX = (1 << 64) - 1
_PAGE = mmap.PAGESIZE
_FIELDS = ("dtype", "shape", "data_offsets")


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


class _Obj(dict):
    """A JSON object: the dict (a repeated key keeps its last value, as serde does) and every pair
    as written, so repeated keys and values they shadow are still checked."""

    __slots__ = ("pairs",)


def _object(pairs: list[tuple[str, object]]) -> _Obj:
    o = _Obj(pairs)
    o.pairs = pairs
    return o


class _Refused(Exception):
    """A header safetensors refuses: the message (and the tensor, where there is one)."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


def _parse_int(s: str) -> int | float:
    # serde_json reads "-0" and any integer beyond 64 bits as a float, so neither is a shape or an
    # offset; a float beyond f64 is an error (float() has no digit limit, int() has 4300)
    if s == "-0":
        return -0.0
    if len(s) > 20:
        return _parse_float(s)
    return int(s)


def _parse_float(s: str) -> float:
    f = float(s)
    if math.isinf(f):
        raise _Refused(f"number {_clip(s)} is out of range")
    return f


def _parse_constant(s: str) -> float:
    raise _Refused(f"{s} is not JSON")


def _clip(s: str, n: int = 24) -> str:
    return s if len(s) <= n else f"{s[:n]}... ({len(s)} characters)"


def _show(v: object) -> str:
    """A short JSON rendering of a header value for an error message."""
    if isinstance(v, str):
        return json.dumps(v[:60]) + ("..." if len(v) > 60 else "")
    if isinstance(v, dict | list) and (len(v) > 8 or any(isinstance(x, dict | list) for x in
                                                          (v.values() if isinstance(v, dict) else v))):
        return f"(a JSON {'object' if isinstance(v, dict) else 'array'} of {len(v)} item{'s' * (len(v) != 1)})"
    return _clip(json.dumps(v), 80)


def _check_tree(v: object, depth: int = 1) -> None:
    """Nesting depth and strings: what serde_json refuses and Python's json accepts."""
    if isinstance(v, (_Obj, list)):
        if depth > MAX_JSON_DEPTH:
            raise _Refused(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        for k, x in (v.pairs if isinstance(v, _Obj) else enumerate(v)):
            if isinstance(k, str):
                _check_str(k)
            _check_tree(x, depth + 1)
    elif isinstance(v, str):
        _check_str(v)


def _check_str(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Refused(f"string {_clip(ascii(s), 40)} holds a lone surrogate (\\u{ord(s[e.start]):04x}), "
                           "which is not Unicode text") from None


def _u64_list(v: object, n: int | None = None) -> list[int] | None:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        return None
    if not all(type(x) is int and 0 <= x <= _U64_MAX for x in v):
        return None
    return v


def _dtype(v: object) -> str | None:
    if isinstance(v, str):
        return v if v in DTYPES else None
    if isinstance(v, _Obj) and len(v.pairs) == 1 and v.pairs[0][1] is None:  # serde's {"F32": null}
        return v.pairs[0][0] if v.pairs[0][0] in DTYPES else None
    return None


def _entry(name: str, v: object) -> TensorInfo:
    if isinstance(v, _Obj):
        seen = [k for k, _ in v.pairs if k in _FIELDS]
        if len(seen) != len(set(seen)):
            raise _Refused("entry names one of dtype, shape, data_offsets twice", name)
        if len(set(seen)) != 3:
            missing = ", ".join(f for f in _FIELDS if f not in v)
            raise _Refused(f"entry lacks {missing}", name)
        dtype, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
    elif isinstance(v, list) and len(v) == 3:  # serde also reads a struct from a sequence of its fields
        dtype, shape, offs = v
    else:
        raise _Refused(f"entry {_show(v)} is not an object with dtype, shape and data_offsets", name)
    dt = _dtype(dtype)
    if dt is None:
        raise _Refused(f"unknown dtype {_show(dtype)} (safetensors knows {', '.join(DTYPES)})",
                       name)
    if _u64_list(shape) is None:
        raise _Refused(f"shape {_show(shape)} is not a list of unsigned 64-bit integers", name)
    if _u64_list(offs, 2) is None:
        raise _Refused(f"data_offsets {_show(offs)} are not [begin, end] of unsigned "
                       "64-bit integers", name)
    return TensorInfo(name, dt, tuple(shape), offs[0], offs[1])


def _json(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("header is not UTF-8 text, so this is not a safetensors file") from None
    try:
        obj = json.loads(text, object_pairs_hook=_object, parse_int=_parse_int, parse_float=_parse_float,
                         parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise _Refused(f"header is not valid JSON ({e.msg} at byte {e.pos})") from None
    except RecursionError:
        raise _Refused(f"header JSON is nested more than {MAX_JSON_DEPTH} levels deep") from None
    _check_tree(obj)
    return obj


def parse_header(path: Path, raw: bytes, data_size: int) -> tuple[list[TensorInfo], dict[str, str] | None]:
    """Validate a header as safetensors 0.8 does (and as its torch loader then needs); return the
    tensors sorted by offset and the metadata. A name given twice keeps its last entry, as in
    safetensors; every entry must be valid all the same."""
    fix_corrupt = "the file is corrupt or was cut short; re-download or re-export it"
    try:
        obj = _json(raw)
        if not isinstance(obj, _Obj):
            raise _Refused(f"header is a JSON {type(obj).__name__}, not an object")
        metadata: dict[str, str] | None = None
        tensors: dict[str, TensorInfo] = {}
        seen_metadata = False
        for name, v in obj.pairs:
            if name != METADATA_KEY:
                tensors[name] = _entry(name, v)
                continue
            if seen_metadata:
                raise _Refused(f"header has {METADATA_KEY} twice")
            seen_metadata = True
            if v is not None and (not isinstance(v, _Obj) or not all(isinstance(x, str) for x in v.values())):
                raise _Refused(f"{METADATA_KEY} must map strings to strings")
            metadata = None if v is None else dict(v)
    except _Refused as e:
        raise QuantkitError(str(e), file=path, tensor=e.tensor,
                            fix="pass a .safetensors file; this one is damaged or of another kind") from None
    infos = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    pos = 0
    for t in infos:
        if t.end < t.start:
            raise QuantkitError(f"data_offsets [{t.start}, {t.end}] are not [begin, end] with begin <= end",
                                file=path, tensor=t.name, fix=fix_corrupt)
        if t.start < pos:
            raise QuantkitError(f"data [{t.start}, {t.end}) overlaps the previous tensor (ends at {pos})",
                                file=path, tensor=t.name, fix=fix_corrupt)
        if t.start > pos:
            raise QuantkitError(f"gap of {t.start - pos} bytes before this tensor's data", file=path,
                                tensor=t.name, fix=fix_corrupt)
        pos = t.end
        _check_size(path, t, fix_corrupt)
    if pos > data_size:
        raise QuantkitError(f"data ends at byte {pos} but the file holds only {data_size} data bytes "
                            "(truncated)", file=path, tensor=infos[-1].name, fix=fix_corrupt)
    if pos < data_size:
        raise QuantkitError(f"{data_size - pos} unexplained bytes after the last tensor", file=path,
                            fix=fix_corrupt)
    for t in infos:
        _check_torch(path, t)
    return infos, metadata


def _check_size(path: Path, t: TensorInfo, fix: str) -> None:
    n = 1
    for d in t.shape:  # in safetensors' order: a zero after an overflowing product does not save it
        n *= d
        if n > _U64_MAX:
            break
    bits = n * bitsize(t.dtype)
    if bits > _U64_MAX:
        raise QuantkitError(f"{t.dtype} {list(t.shape)} is more bits than a 64-bit size holds", file=path,
                            tensor=t.name, fix=fix)
    if bits % 8:
        raise QuantkitError(f"{t.dtype} {list(t.shape)} is {bits} bits, not a whole number of bytes",
                            file=path, tensor=t.name, fix=fix)
    if bits // 8 != t.nbytes:
        raise QuantkitError(f"{t.dtype} {list(t.shape)} needs {bits // 8} bytes but its offsets span "
                            f"{t.nbytes}", file=path, tensor=t.name, fix=fix)


def _check_torch(path: Path, t: TensorInfo) -> None:
    """What safetensors' torch loader refuses in a header it parsed: a dtype torch lacks, an F4 tensor
    whose last dimension is odd, a shape torch's signed 64-bit sizes or strides cannot hold."""
    fix = "re-export the tensor in a dtype and shape torch can hold"
    if DTYPES[t.dtype][0] is None:
        raise QuantkitError(f"torch {torch.__version__} has no dtype for {t.dtype} (safetensors' torch "
                            "loader refuses it too)", file=path, tensor=t.name, fix=fix)
    if t.dtype in PACKED_X2 and (not t.shape or t.shape[-1] % 2):
        raise QuantkitError(f"{t.dtype} {list(t.shape)}: torch packs two elements per byte, so the last "
                            "dimension must be even", file=path, tensor=t.name, fix=fix)
    if t.nbytes == 0 and t.shape:
        try:
            _empty(t)
        except (RuntimeError, TypeError, ValueError, OverflowError):
            raise QuantkitError(f"torch cannot hold shape {list(t.shape)} (its sizes and strides are signed "
                                "64-bit)", file=path, tensor=t.name, fix=fix) from None


def _empty(t: TensorInfo) -> torch.Tensor:
    """A zero-size tensor of ``t``'s shape, made as safetensors' torch loader makes it."""
    return torch.empty(0, dtype=torch.uint8).view(torch_dtype(t.dtype)).reshape(torch_shape(t.dtype, t.shape))


class SafetensorsReader:
    """Open and validate a .safetensors file; hand out zero-copy tensor views from an mmap."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._f = os.fdopen(open_regular(self.path), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise QuantkitError("no such file", file=self.path, fix="check the path") from None
        except NotRegularFile as e:
            if e.kind == "a directory":
                raise QuantkitError("is a directory, not a file", file=self.path,
                                    fix="pass the .safetensors file inside it") from None
            raise QuantkitError(f"is {e.kind}, not a regular file", file=self.path,
                                fix="pass the .safetensors file itself") from None
        except PermissionError:
            raise QuantkitError("permission denied reading the file", file=self.path,
                                fix="make it readable (chmod +r)") from None
        except OSError as e:
            raise QuantkitError(f"cannot open the file ({e.strerror or e})", file=self.path,
                                fix="check the path and the disk") from None
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
            return _empty(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write
            flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=t.nbytes,
                                    offset=self.data_start + t.start)
        if (self.data_start + t.start) % itemsize(t.dtype):
            flat = flat.clone()
        return flat.view(dt).reshape(torch_shape(t.dtype, t.shape))

    def read(self, name: str) -> torch.Tensor:
        """An owned copy of the tensor, read with ``preadv`` straight into fresh memory (for data
        kept after the file is closed: page faults on one side only, where a clone of the mmap
        view faults on both)."""
        t = self.tensors[name]
        if t.nbytes == 0:
            return _empty(t)
        flat = torch.empty(t.nbytes, dtype=torch.uint8)
        if pread_full(self.fileno(), memoryview(flat.numpy()), self.data_start + t.start) < t.nbytes:
            raise QuantkitError("file ended inside a tensor's data (truncated?)", file=self.path, tensor=name,
                                fix="copy or download the file again")
        return flat.view(torch_dtype(t.dtype)).reshape(torch_shape(t.dtype, t.shape))

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
        n = bitsize(self.dtype)
        for d in self.shape:
            n *= d
        return n // 8


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
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: the reader refuses such files, a caller may not
        bad = next((k for k, v in header.items() if _unencodable(k) or k == METADATA_KEY and any(
            _unencodable(x) for kv in v.items() for x in kv)), None)
        raise QuantkitError(f"a name or metadata string is not Unicode text ({e.reason})",
                            tensor=None if bad is None else ascii(bad),
                            fix="use names and metadata that are valid Unicode") from None
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise QuantkitError(f"the output header would be {len(raw)} bytes, over safetensors' "
                            f"{MAX_HEADER_BYTES}-byte limit", fix="shorten or drop the input's metadata")
    return len(raw).to_bytes(8, "little") + raw, ordered


def _unencodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
