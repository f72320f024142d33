"""Results come back the way ``self`` goes out: large buffers out of band, in files.

Without this, a chunk's results ``(first, results, mutated, had_error)`` were
pickled in band by the worker (a 16 MB array copied into the pickle stream,
then once more by ``getvalue()``), pickled again by loky or multiprocessing
as bytes, pushed through a pipe, and copied once more by ``pickle.loads`` in
the caller: four copies and a pipe for every large array.

Now (local process routes only: loky/file and multiprocessing/fork; never
threads, dask, Ray or an unknown backend's inline route):

* worker, :func:`pack`: pickle protocol 5 with a buffer callback. Buffers of
  at least :data:`MIN_FILE_BYTES` (numpy arrays, ``PickleBuffer``) are written
  each to its own file in the payload folder of ``self`` (``/dev/shm`` when it
  has room, else the system temp folder; a folder the user chose is the only
  one used), and an :class:`OutOfBand` handle travels instead: the small
  pickle stream plus the file names. No large buffer: the in-band bytes, as
  before. Any failure to write (no room, no resource tracker): in-band bytes.
* caller, :func:`load`: each file is mapped copy-on-write (``MAP_PRIVATE``,
  ``mmap.ACCESS_COPY``) and unlinked at once; the results are rebuilt on the
  mapped views, without a copy. Arrays are writable, as the loop's are, and
  private: writes never reach the file or anyone else (a written page is
  copied, once, on first write).

Why one file per buffer and not per chunk: an array keeps its own mapping
alive; sharing one file per chunk would keep every array of the chunk in
memory as long as any one of them lives.

Files are never left behind:

* every file is registered with loky's resource tracker by the worker
  *before* it exists (so the tracker knows every file there is), and
  unregistered by whoever unlinks it (the caller, right after mapping);
  a worker writes files only when it shares its caller's tracker
  (loky workers and forked pool workers do), so if the caller dies the
  tracker unlinks them once the workers are gone;
* names hold the caller's pid, so a surviving worker's watchdog
  (:mod:`parallelmethods._orphan`) removes them within a second of the
  caller's death;
* names hold the call id, so the caller removes (:func:`sweep`) the files of
  chunks it never read: an error that stopped the map, an abandoned
  ``imap``, a worker that died between writing and returning.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import pickle
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from . import _orphan
from ._compat import track_file, untrack_file
from ._serialize import _CloudPickler, _Pickler, dumps_value, loads_value

__all__ = ["MIN_FILE_BYTES", "STREAM_BYTES", "OutOfBand", "Packed", "load", "pack", "sweep"]

#: Buffers at least this large come back in their own file; smaller ones stay in the stream.
#: Why 1 MiB: a file costs ~0.1 ms (create, register, map, unlink, unregister),
#: about what copying 1 MiB through pickle and a pipe costs (measured).
MIN_FILE_BYTES = 1 << 20
_PREFIX = "parallelmethods-"
_SUFFIX = ".res"
#: A chunk whose first result packs to at least this many bytes is packed item
#: by item as each item ends (:class:`Packed`). Why: kept as objects until the
#: chunk ends, 8 results of ~1 MB of plain data cost the worker full garbage
#: collections over all of them and one pickle memo over all of them; packed
#: one at a time they cost what one does (W6b: worker CPU 4.8 s vs 2.9 s).
#: Why a threshold: packing each of 200 000 tiny results alone costs W1 more
#: than the pickle of their list.
STREAM_BYTES = 64 * 1024


@dataclass(frozen=True)
class OutOfBand:
    """A chunk's results: pickle stream in band, large buffers in files (one each)."""

    main: bytes
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    #: The pickle stream itself is the last file (``main`` is empty): see :func:`pack`.
    main_in_file: bool = False


# ---------------------------------------------------------------------------
# Worker side.
# ---------------------------------------------------------------------------


def _local_caller(handle: Any) -> tuple[int, str | None] | None:
    """(caller pid, self's payload folder or None) on the local process routes, else None."""
    from ._dispatch import FileHandle, LocalHandle

    if isinstance(handle, FileHandle):
        caller, folder = _orphan._caller_of(handle)
        return (caller, folder) if caller is not None else None
    if isinstance(handle, LocalHandle) and handle.pid != os.getpid():  # a forked copy
        return handle.pid, None
    return None


def _tracker_shared() -> bool:
    """Whether this worker talks to an inherited resource tracker (its caller's)."""
    tracker = sys.modules.get("joblib.externals.loky.backend.resource_tracker")
    rt = getattr(tracker, "_resource_tracker", None)
    return rt is not None and getattr(rt, "_fd", None) is not None


def _dump(value: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``value`` (pickle, else cloudpickle) with buffers >= MIN_FILE_BYTES out of band."""
    buffers: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < MIN_FILE_BYTES:
            return True
        buffers.append(raw)
        return False

    out = io.BytesIO()
    try:
        _Pickler(out, None, None, keep).dump(value)
    except Exception:  # noqa: BLE001 - cloudpickle decides, as in dumps_value
        buffers.clear()
        out = io.BytesIO()
        _CloudPickler(out, None, None, keep).dump(value)
    return out.getvalue(), buffers


def _folders(caller_folder: str | None) -> list[str]:
    """Where result files may go: self's folder first; a folder the user chose is the only one."""
    from ._transport import temp_folders

    automatic, configured = temp_folders()
    if caller_folder is None:
        return automatic
    if configured or caller_folder not in automatic:
        return [caller_folder]
    return [caller_folder, *(f for f in automatic if f != caller_folder)]


def _write(folder: str, prefix: str, raw: memoryview) -> str:
    path = os.path.join(folder, f"{prefix}{uuid.uuid4().hex[:16]}{_SUFFIX}")
    track_file(path)  # before the file exists: the tracker knows every file there is
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except BaseException:
        untrack_file(path)
        raise
    try:
        done = 0
        while done < raw.nbytes:  # raw: 1-D, format "B" (PickleBuffer.raw)
            done += os.write(fd, raw[done:])
    except BaseException:
        os.close(fd)
        _remove(path)
        raise
    os.close(fd)
    return path


def pack(value: Any, handle: Any, ctx: Any) -> Any:
    """A chunk's results as they leave the worker: :class:`OutOfBand`, or in-band bytes.

    Raises only what pickling ``value`` raises (the caller then names the result at fault).
    """
    local = _local_caller(handle) if os.name == "posix" else None
    if local is None:  # threads never get here; dask, Ray, inline: in band, as before
        return dumps_value(value)
    main, buffers = _dump(value)
    if not buffers and len(main) < MIN_FILE_BYTES:
        return main  # a complete in-band stream: nothing large
    try:
        return _to_files(main, buffers, local, ctx)
    except Exception:  # noqa: BLE001 - no room, no tracker, any OSError: in band, as before
        return dumps_value(value)


def _to_files(main: bytes, buffers: list[memoryview], local: tuple[int, str | None], ctx: Any) -> Any:
    if not _tracker_shared():
        raise OSError(errno.ENOTSUP, "no resource tracker shared with the caller")
    from ._transport import _free_bytes, _headroom

    caller, caller_folder = local
    prefix = f"{_PREFIX}{caller}-r{_call_tag(getattr(ctx, 'call', ''))}-"
    need = sum(b.nbytes for b in buffers) + (len(main) if len(main) >= MIN_FILE_BYTES else 0)
    for folder in _folders(caller_folder):
        free = _free_bytes(folder)
        if free is not None and free < need + _headroom(folder):
            continue
        # Why a large pickle stream goes in a file too (plain data: lists,
        # dicts, W6b): through the pipe, loky's result thread reads it 64 KiB
        # at a time and needs the GIL for each read, while the caller's main
        # thread holds it rebuilding the previous chunk: a 10 MB chunk then
        # waits on ~160 GIL hand-offs. A file is read with one mapping.
        stream_in_file = len(main) >= MIN_FILE_BYTES
        files = [*buffers, memoryview(main)] if stream_in_file else buffers
        written: list[str] = []
        try:
            for raw in files:
                written.append(_write(folder, prefix, raw))
        except OSError:
            for path in written:
                _remove(path)
            continue
        _watch_folder(caller, folder)
        sizes = tuple(b.nbytes for b in files)
        return OutOfBand(b"" if stream_in_file else main, tuple(written), sizes, stream_in_file)
    raise OSError(errno.ENOSPC, "no folder with room for the results")


def _call_tag(call: str) -> str:
    return "".join(c for c in call if c.isalnum())[:12] or "x"


def _watch_folder(caller: int, folder: str) -> None:
    """Have this worker's watchdog also clear ``folder`` when the caller dies."""
    if _orphan._caller == caller and folder not in _orphan._folders:
        _orphan._folders.add(folder)


# ---------------------------------------------------------------------------
# Caller side.
# ---------------------------------------------------------------------------


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False  # someone else removed (and unregistered) it
    with contextlib.suppress(Exception):  # at interpreter exit the tracker may be gone
        untrack_file(path)
    return True


def _map(path: str, size: int) -> memoryview:
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != size:
            msg = f"result file {path} holds {os.fstat(fd).st_size} bytes, expected {size}"
            raise OSError(errno.EIO, msg)
        # Copy-on-write: the results are writable and private, like the loop's.
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    return memoryview(mm)


def load(out: Any) -> Any:
    """The chunk's ``(first, results, mutated, had_error)`` from what :func:`pack` returned."""
    if not isinstance(out, OutOfBand):
        # No GC pause here (unlike _dispatch._load_view for self): with the
        # collector on, young tuples of plain data are untracked as they are
        # made; paused, a whole chunk survives into the old generation at once
        # and triggers full collections over every result so far (W6b: 1.46 s
        # paused vs 1.28 s not, naive joblib 1.13 s).
        return loads_value(out)
    views: list[memoryview] = []
    try:
        for path, size in zip(out.paths, out.sizes):
            views.append(_map(path, size))
            _remove(path)  # mapped: the name can go now, so nothing outlives us
    finally:
        for path in out.paths[len(views) :]:
            _remove(path)
    if out.main_in_file:
        stream = views.pop()
        try:
            return loads_value(stream, buffers=views)
        finally:
            with contextlib.suppress(BufferError):
                stream.release()  # unmapped now: nothing rebuilt refers to the stream
    return loads_value(out.main, buffers=views)


def packed_size(packed: Any) -> int:
    """Bytes that one :func:`pack` output stands for (its stream and its files)."""
    if isinstance(packed, OutOfBand):
        return len(packed.main) + sum(packed.sizes)
    return len(packed)


class Packed:
    """A chunk's results already packed one by one in the worker (each a :func:`pack` output).

    The caller rebuilds them one at a time (:func:`decode`). See :data:`STREAM_BYTES`.
    """

    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Packed, (self.items,))

    def load(self) -> list[Any]:
        return [load(item) for item in self.items]


@dataclass(frozen=True)
class Decoded:
    """A chunk's results already rebuilt in the caller (by the pool's result thread), or why not."""

    value: Any = None
    error: BaseException | None = None


def decode(out: Any) -> Decoded:
    """Rebuild what :func:`pack` returned, as a :class:`Decoded`.

    Why a separate step: the multiprocessing backend calls it in the pool's
    result thread as each chunk arrives, while the workers go on computing;
    joblib hands the main thread the results only when the whole run ends.
    Results the worker packed one by one (:class:`Packed`) are rebuilt here
    too. A chunk whose results are in its log (``_board.Logged``) stays so: the
    log is read when the main thread takes the chunk, so that a run that
    fails later still finds it (the board's salvage).
    """
    try:
        value = load(out)
        if type(value) is tuple and len(value) == 4 and type(value[1]) is Packed:
            value = (value[0], value[1].load(), *value[2:])
        return Decoded(value)
    except Exception as e:  # noqa: BLE001 - raised where the main thread reads it
        return Decoded(error=e)


def sweep(call: str, folders: list[str]) -> int:
    """Remove this process's result files of call ``call`` nobody read; how many went."""
    from ._transport import temp_folders

    prefix = f"{_PREFIX}{os.getpid()}-r{_call_tag(call)}-"
    seen: set[str] = set()
    removed = 0
    for folder in [*folders, *temp_folders()[0]]:
        if folder in seen:
            continue
        seen.add(folder)
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(prefix) and name.endswith(_SUFFIX):
                    removed += _remove(os.path.join(folder, name))
    return removed
