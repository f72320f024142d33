"""How ``self`` reaches the workers for one call: the route's handle.

* ``reference`` / ``fork``: a token in ``_dispatch._REGISTRY`` (threads share
  the object; forked workers inherit the registry filled before the fork).
* ``file`` (loky): the payload in a file under /dev/shm, mapped by workers.
  The file of an object's last state is kept while the object lives (at
  most :data:`KEPT_FILES` objects, least recently used first out), so a
  later call on an unchanged object skips pickling and writing: its
  fingerprint (:func:`~parallelmethods._serialize.fingerprint`: content,
  top-level sharing, by-value code) tells that nothing changed, and warm
  workers already hold that state (they check their copy: _statecache).
* ``cluster`` (dask): the payload bytes scattered once per call.

Every payload carries a state-cache key made of the object's identity and
its fingerprint (:func:`state_key`): workers never serve one object's copy
to another object, nor an old state to a changed object.
"""

from __future__ import annotations

import atexit
import multiprocessing
import collections
import contextlib
import os
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from joblib.externals.loky.backend import resource_tracker

from . import _dispatch
from ._dispatch import FileHandle, LocalHandle
from ._serialize import Payload, dumps_state, fingerprint, root_reduce

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = ["Shipment", "shipped", "serialize_subject", "FILE_PREFIX", "KEPT_FILES"]

FILE_PREFIX = "parallelmethods-"
#: Objects whose last payload file is kept between calls.
KEPT_FILES = 4


@dataclass(frozen=True)
class Shipment:
    """The handle workers use to find ``self``, and (dask) the scattered bytes."""

    handle: Any
    blob: Any = None


def _shm_dir() -> str:
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    return tempfile.gettempdir()


def state_key(subject: Any, print_: str) -> str:
    """The workers' cache key for ``subject`` in the state with fingerprint ``print_``."""
    return f"{lineage_of(subject)}:{print_}"


def serialize_subject(plan: Plan, root_rv: Any = None, digest: str | None = None) -> Payload:
    owner_name = type(plan.subject).__qualname__ if plan.kind == "method" else plan.label
    # marshal only for local workers: its format belongs to this exact Python
    # version, and a dask worker may run another one.
    return dumps_state(
        plan.subject, exclude=plan.exclude, what="self", owner_name=owner_name, root_rv=root_rv, digest=digest, plain_as_marshal=plan.route == "file"
    )


def _write(payload: Payload, lineage: str = "") -> FileHandle:
    fd, path = tempfile.mkstemp(prefix=f"{FILE_PREFIX}{os.getpid()}-", suffix=".pkl", dir=_shm_dir())
    # Why the resource tracker: if this process is killed (SIGKILL, SIGTERM,
    # the OOM killer), atexit never runs; loky's tracker process, which
    # joblib uses for its own memmaps, then unlinks the file.
    resource_tracker.register(path, "file")
    with os.fdopen(fd, "wb") as f:
        f.write(payload.main)
        for buf in payload.buffers:
            f.write(buf)
    return FileHandle(path, payload.digest, len(payload.main), tuple(b.nbytes for b in payload.buffers), lineage)



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
        resource_tracker.unregister(path, "file")


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
            handle = _write(serialize_subject(plan, rv, state_key(subject, quick)), lineage_of(subject))
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
    if plan.route == "cluster":
        from ._dask import scatter_payload

        rv = root_reduce(plan.subject, plan.exclude)
        key = state_key(plan.subject, fingerprint(plan.subject, rv))
        with scatter_payload(serialize_subject(plan, rv, key), lineage_of(plan.subject)) as (handle, future):
            yield Shipment(handle, future)
        return
    with KEPT.handle_for(plan) as file_handle:
        yield Shipment(file_handle)
