"""How ``self`` reaches the workers for one call: the route's handle.

* ``reference`` / ``fork``: a token in ``_dispatch._REGISTRY`` (threads share
  the object; forked workers inherit the registry filled before the fork).
* ``file`` (loky): the payload in a file where joblib keeps its memmaps
  (/dev/shm when it has room; :func:`temp_folders`), mapped by workers.
  The file of an object's last state is kept while the object lives (at
  most :data:`KEPT_FILES` objects, least recently used first out), so a
  later call on an unchanged object skips pickling and writing: its
  fingerprint (:func:`~parallelmethods._serialize.fingerprint`: content,
  sharing of attributes and their children, by-value code) tells that nothing changed, and warm
  workers already hold that state (they check their copy: _statecache).
* ``cluster`` (dask, Ray): the payload shipped to the cluster once per call.

Every payload carries a state-cache key made of the object's identity and
its fingerprint (:func:`state_key`): workers never serve one object's copy
to another object, nor an old state to a changed object.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _dispatch
from ._compat import joblib_config_temp_folder, track_file, untrack_file
from ._dispatch import FileHandle, LocalHandle
from ._serialize import Payload, dumps_state, fingerprint, root_reduce
from .errors import ParallelMethodsError

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = ["FILE_PREFIX", "KEPT_FILES", "Shipment", "serialize_subject", "shipped"]

FILE_PREFIX = "parallelmethods-"
#: Objects whose last payload file is kept between calls.
KEPT_FILES = 4


@dataclass(frozen=True)
class Shipment:
    """The handle workers use to find ``self``, and (dask) the scattered bytes."""

    handle: Any
    blob: Any = None


def state_key(plan: Plan, print_: str) -> str:
    """The workers' cache key for ``plan.subject`` in the state with fingerprint ``print_``.

    A trailing ``=`` says that a worker may take ``print_`` as its copy's
    fingerprint right after rebuilding (see _statecache): true when the
    worker, fingerprinting its copy the same way, must find the same bytes
    (:func:`_caller_print_applies`). It saves a pass over ``self`` in every
    worker on the first call (0.1 s for a dict of a million entries).
    """
    return f"{lineage_of(plan.subject)}:{print_}" + ("=" if _caller_print_applies(plan) else "")


def _caller_print_applies(plan: Plan) -> bool:
    """Whether a rebuilt copy of ``plan.subject`` pickles to what the caller fingerprinted.

    Only for an instance whose class keeps object's own pickling (no
    ``__reduce__``, ``__reduce_ex__``, ``__getstate__`` or ``__setstate__``
    of its own: the worker can then take the same reduce value without
    running user code), with nothing excluded and no ``__parallel_init__``
    (both make the copy differ from the original on purpose).
    """
    if plan.kind != "method" or plan.exclude:
        return False
    cls = type(plan.subject)
    if getattr(cls, "__parallel_init__", None) is not None or getattr(cls, "__setstate__", None) is not None:
        return False
    base: Any = object
    return all(
        getattr(cls, name, None) is getattr(base, name, None)
        for name in ("__reduce_ex__", "__reduce__", "__getstate__")
    )


def marshal_ok(plan: Plan) -> bool:
    """Whether large plain-data attributes may travel as marshal on this route.

    marshal's format belongs to one Python version: fine for local workers
    (the file route) and for Ray, which refuses a cluster whose Python
    version differs from the driver's; not for dask, whose workers may run
    another one.
    """
    if plan.route == "file":
        return True
    if plan.route == "cluster":
        from ._ray import is_ray_backend

        return is_ray_backend(plan.backend)
    return False


def serialize_subject(plan: Plan, root_rv: Any = None, digest: str | None = None) -> Payload:
    owner_name = type(plan.subject).__qualname__ if plan.kind == "method" else plan.label
    return dumps_state(
        plan.subject,
        exclude=plan.exclude,
        what="self",
        owner_name=owner_name,
        root_rv=root_rv,
        digest=digest,
        plain_as_marshal=marshal_ok(plan),
    )


def _write(payload: Payload, lineage: str = "", what: str = "self") -> FileHandle:
    """Write ``payload`` to a new file in the first folder with room (see :func:`temp_folders`).

    Free space is checked (``os.statvfs``) before writing, and the space is
    reserved (``posix_fallocate``) before the bytes go in, so a payload that
    does not fit fails fast. A file whose write fails for any reason is
    removed and unregistered before the next folder is tried, so nothing is
    left behind and later maps are unaffected. When no folder has room, the
    unchanged-object files kept for other objects (:data:`KEPT_FILES`) are
    dropped and the folders tried once more; then :class:`ParallelMethodsError`
    names the payload's size, the folders tried and the fix.
    """
    size = len(payload.main) + sum(b.nbytes for b in payload.buffers)
    for attempt in (1, 2):
        folders, configured = temp_folders()
        tried: list[str] = []
        last_error: OSError | None = None
        for folder in folders:
            free = _free_bytes(folder)
            if free is not None and free < size + _headroom(folder):
                tried.append(f"{folder} ({_size(free)} free)")
                continue
            try:
                path = _write_in(folder, payload, size)
            except OSError as exc:
                last_error = exc
                if exc.errno not in _NO_ROOM and (configured or not _falls_back_after(exc)):
                    raise
                tried.append(f"{folder} ({_size(free) + ' free, ' if free is not None else ''}{exc.strerror or exc})")
                continue
            return FileHandle(
                path, payload.digest, len(payload.main), tuple(b.nbytes for b in payload.buffers), lineage
            )
        if attempt == 1 and KEPT.drop_unused():
            continue  # files kept for other objects made room
        break
    how = (
        "the folder you chose (joblib.parallel_config(temp_folder=...) or JOBLIB_TEMP_FOLDER)"
        if configured
        else "the folders joblib would use (/dev/shm, then the system temp folder)"
    )
    msg = (
        f"no room for the {_size(size)} payload of {what} in {how}: tried {', '.join(tried) or 'no folder'}. "
        "Fix: point JOBLIB_TEMP_FOLDER (or joblib.parallel_config(temp_folder=...)) at a folder with room, "
        "or give /dev/shm more space (in Docker: docker run --shm-size=2g ...; 64 MB is Docker's default); "
        "a thread backend (backend='threading') needs no copy at all."
    )
    raise ParallelMethodsError(msg) from last_error


# ---------------------------------------------------------------------------
# Where payload files go: joblib's rule (joblib._memmapping_reducer._get_temp_dir,
# joblib 1.3 to 1.6): parallel_config(temp_folder=...), else JOBLIB_TEMP_FOLDER,
# else /dev/shm, else the system temp folder (TMPDIR/TEMP/TMP, then /tmp).
# joblib takes /dev/shm only when it has more than 2 GB free; we check the
# payload's actual size instead, so small payloads stay in RAM on small
# /dev/shm (Docker's 64 MB) and large ones go to disk.
# ---------------------------------------------------------------------------

SYSTEM_SHARED_MEM = "/dev/shm"
#: errno values that mean "this folder is full": try the next one.
_NO_ROOM = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e is not None)


def _falls_back_after(exc: OSError) -> bool:
    """Errors on an automatically chosen folder after which joblib also falls back (rights, read-only)."""
    return exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR)


def temp_folders() -> tuple[list[str], bool]:
    """The folders to try in order, and whether the user chose the folder.

    A chosen folder (``parallel_config(temp_folder=...)``, then the
    ``JOBLIB_TEMP_FOLDER`` environment variable, as in joblib) is the only
    one tried: we never write elsewhere than where the user asked. Otherwise
    ``/dev/shm`` (when it exists and is writable), then the system temp folder.
    """
    chosen = joblib_config_temp_folder() or os.environ.get("JOBLIB_TEMP_FOLDER") or None
    if chosen:
        folder = os.path.abspath(os.path.expanduser(chosen))
        os.makedirs(folder, exist_ok=True)  # joblib creates its pool folder there too
        return [folder], True
    folders = []
    if os.path.isdir(SYSTEM_SHARED_MEM) and os.access(SYSTEM_SHARED_MEM, os.W_OK):
        folders.append(SYSTEM_SHARED_MEM)
    system = os.path.abspath(tempfile.gettempdir())
    if system not in folders:
        folders.append(system)
    return folders, False


def _free_bytes(folder: str) -> int | None:
    """Bytes an unprivileged writer may still use in ``folder`` (None: unknown)."""
    statvfs = getattr(os, "statvfs", None)
    if statvfs is None:  # Windows: the write itself tells
        return None
    try:
        st = statvfs(folder)
    except OSError:
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def _headroom(folder: str) -> int:
    """Space left free beside a payload: 1 MiB, or 2% of the file system if more.

    A full /dev/shm breaks others that live there (semaphores, other
    programs' shared memory), so a payload may not take the last bytes.
    """
    try:
        st = os.statvfs(folder)
        total = int(st.f_blocks) * int(st.f_frsize)
    except (AttributeError, OSError):
        total = 0
    return max(1 << 20, total // 50)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - unreachable


_SWEPT: set[str] = set()
#: Files of a dead process younger than this are left alone (a moment's grace).
SWEEP_AGE_SECONDS = 60


def _sweep_orphans(folder: str) -> None:
    """Once per folder and process: remove payload files whose process is gone.

    Why: a caller killed together with its workers and loky's resource
    tracker (``kill -9`` of the whole process group, an OOM kill of the
    container's main group) leaves no one to remove its files, and /dev/shm
    is memory. Only files named ``parallelmethods-<pid>-...`` whose pid no
    longer runs here, and older than :data:`SWEEP_AGE_SECONDS`, are removed.
    (Processes in another pid namespace that share this /dev/shm, as with
    ``docker --ipc=host``, are not visible here: they should use their own
    ``JOBLIB_TEMP_FOLDER``.)
    """
    if folder in _SWEPT:
        return
    _SWEPT.add(folder)
    now = time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.startswith(FILE_PREFIX):
            continue
        pid_text = name[len(FILE_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime > SWEEP_AGE_SECONDS:
                os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _write_in(folder: str, payload: Payload, size: int) -> str:
    _sweep_orphans(folder)
    fd, path = tempfile.mkstemp(prefix=f"{FILE_PREFIX}{os.getpid()}-", suffix=".pkl", dir=folder)
    # Why the resource tracker: if this process is killed (SIGKILL, SIGTERM,
    # the OOM killer), atexit never runs; loky's tracker process, which
    # joblib uses for its own memmaps, then unlinks the file (once the
    # workers are gone too: see _orphan).
    try:
        track_file(path)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            fallocate = getattr(os, "posix_fallocate", None)
            if fallocate is not None and size:
                try:
                    fallocate(f.fileno(), 0, size)  # ENOSPC now, not after writing 60 MB
                except OSError as exc:
                    if exc.errno in _NO_ROOM:
                        raise
                    # EOPNOTSUPP, EINVAL...: the file system cannot reserve; the writes will tell
            f.write(payload.main)
            for buf in payload.buffers:
                f.write(buf)
    except BaseException:
        # Any failure (ENOSPC, EIO, KeyboardInterrupt, MemoryError): no partial file stays.
        _unlink(path)
        raise
    return path


def _what(plan: Plan) -> str:
    return f"self ({type(plan.subject).__qualname__}, for {plan.label})" if plan.kind == "method" else plan.label


def lineage_of(subject: Any) -> str:
    """Which caller object a state belongs to, so workers can drop its old states."""
    return f"{os.getpid()}:{id(subject)}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return  # someone else removed (and unregistered) it
    # Exactly once per file, by whoever removed it: the tracker treats an
    # unknown name as an error.
    with contextlib.suppress(Exception):  # at interpreter exit the tracker may be gone
        untrack_file(path)


@dataclass
class _Kept:
    ref: Any  # weakref to the object
    quick: str  # fingerprint at the time it was shipped
    exclude: tuple[str, ...]
    handle: FileHandle
    in_use: int = 0


class _KeptFiles:
    """The last payload file of up to KEPT_FILES live objects (LRU)."""

    def __init__(self) -> None:
        # Reentrant: the weakref callback (_drop) runs whenever the GC collects
        # an object, which can happen at any allocation, including inside our
        # own critical sections on this thread.
        self._lock = threading.RLock()
        self._entries: collections.OrderedDict[int, _Kept] = collections.OrderedDict()

    @contextlib.contextmanager
    def handle_for(self, plan: Plan) -> Iterator[FileHandle]:
        subject = plan.subject
        rv = root_reduce(subject, plan.exclude)  # once per call, shared by both passes
        quick = fingerprint(subject, rv)
        key = id(subject)
        entry = None
        with self._lock:
            found = self._entries.get(key)
            if found is not None and found.ref() is subject and found.quick == quick and found.exclude == plan.exclude:
                entry = found
                entry.in_use += 1
                self._entries.move_to_end(key)
        if entry is None:
            handle = _write(serialize_subject(plan, rv, state_key(plan, quick)), lineage_of(subject), _what(plan))
            entry = self._keep(subject, quick, plan.exclude, handle)
        try:
            yield entry.handle if entry is not None else handle
        finally:
            if entry is None:
                _unlink(handle.path)
            else:
                with self._lock:
                    entry.in_use -= 1
                    # Replaced while in use (two threads shipped the same object
                    # at once): the last user of the old file removes it.
                    orphaned = entry.in_use == 0 and self._entries.get(key) is not entry
                if orphaned:
                    _unlink(entry.handle.path)
                self._evict()

    def _keep(self, subject: Any, quick: str, exclude: tuple[str, ...], handle: FileHandle) -> _Kept | None:
        if multiprocessing.parent_process() is not None:
            # Worker processes (a map nested in a map) are killed without
            # running atexit: they keep nothing that would outlive them.
            return None
        key, path = id(subject), handle.path

        def on_collect(_ref: Any) -> None:  # the object is gone: so is its file
            self._drop(key, path)

        try:
            ref = weakref.ref(subject, on_collect)
        except TypeError:  # not weak-referenceable (__slots__ without __weakref__): no shortcut
            return None
        entry = _Kept(ref, quick, exclude, handle, in_use=1)
        with self._lock:
            old = self._entries.pop(id(subject), None)
            self._entries[id(subject)] = entry
        if old is not None and old.in_use == 0:
            _unlink(old.handle.path)
        return entry

    def _drop(self, key: int, path: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.handle.path == path:
                del self._entries[key]
        _unlink(path)

    def _evict(self) -> None:
        doomed: list[str] = []
        with self._lock:
            for key in list(self._entries):
                if len(self._entries) <= KEPT_FILES:
                    break
                if self._entries[key].in_use == 0:
                    doomed.append(self._entries.pop(key).handle.path)
        for path in doomed:
            _unlink(path)

    def drop_unused(self) -> bool:
        """Remove the kept files no call is using (to make room); whether any went."""
        doomed: list[str] = []
        with self._lock:
            for key in list(self._entries):
                if self._entries[key].in_use == 0:
                    doomed.append(self._entries.pop(key).handle.path)
        for path in doomed:
            _unlink(path)
        return bool(doomed)

    def clear(self) -> None:
        """Remove every kept file (at exit; also handy in tests)."""
        with self._lock:
            paths = [e.handle.path for e in self._entries.values()]
            self._entries.clear()
        for path in paths:
            _unlink(path)


KEPT = _KeptFiles()
atexit.register(KEPT.clear)


@contextlib.contextmanager
def shipped(plan: Plan) -> Iterator[Shipment]:
    """Make ``self`` reachable from workers for one call; clean up afterwards."""
    if plan.route in ("reference", "fork"):
        token = uuid.uuid4().hex
        _dispatch.register_local(token, plan.subject)
        try:
            yield Shipment(LocalHandle(token, os.getpid(), plan.exclude if plan.route == "fork" else ()))
        finally:
            _dispatch.unregister_local(token)
        return
    if plan.route == "inline":
        # Remote or unknown process workers: the bytes travel in every task.
        from ._inline import inline_payload

        with inline_payload(plan) as (handle, blob):
            yield Shipment(handle, blob)
        return
    if plan.route == "cluster":
        from ._dask import scatter_payload

        rv = root_reduce(plan.subject, plan.exclude)
        key = state_key(plan, fingerprint(plan.subject, rv))
        with scatter_payload(serialize_subject(plan, rv, key), lineage_of(plan.subject)) as (handle, future):
            yield Shipment(handle, future)
        return
    with KEPT.handle_for(plan) as file_handle:
        yield Shipment(file_handle)
