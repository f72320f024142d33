"""The one function workers run: :func:`run_chunk`.

Data flow for ``m.score.map(xs, n_jobs=2)``::

  caller process                                              worker (loky / fork / thread / dask)
  ──────────────────────────────────────────────              ─────────────────────────────────────────
  BoundParallelMethod.map                 [_descriptor]
    └─ run_map                            [_runner]
        1 options merged + validated; backend, n_jobs
          and the route for self decided    [_options, _plan]
        2 self made reachable, once per call [_transport]
            threading, sequential, n_jobs=1 ─► LocalHandle(token): self stays in
                 this process, looked up in _REGISTRY (no copy, no pickle)
            multiprocessing + fork ─────────► LocalHandle(token): _REGISTRY is
                 filled *before* the pool forks, so workers inherit self
                 copy-on-write; never pickled
            loky (and any other local
            process backend) ───────────────► FileHandle: self pickled ONCE per
                 call into a file in /dev/shm: pickle stream + out-of-band
                 buffers (numpy arrays; big plain-data attributes as marshal
                 [_plain]); an unchanged object reuses its file
            dask ───────────────────────────► InlineHandle + the bytes,
                 scattered to the cluster once as a Future   [_dask]
        3 items cut into chunks; each chunk pickled once (args fall back to
          cloudpickle) and sent as one joblib task:
            delayed(run_chunk)(handle, spec, first_index, items, serialized, blob)
        4 joblib.Parallel(batch_size=1,
            return_as=generator_unordered | list)  ──────────────────────► 5 run_chunk:
                                                                          self = _REGISTRY[token]
                                                                            or _CACHE[digest]
                                                                            or mmap + unpickle
                                                                               (+ __parallel_init__)
                                                                          fn = raw function from spec
                                                                          for i, item in chunk:
                                                                            try fn(self, *fixed, item)
                                                                            except -> RemoteError(i, ...)
        6 ◄──────────────────────────── bytes of (first, results, mutated, had_error)
          results placed by index; a RemoteError is re-raised with its own type
          and a note naming the item; dead workers and timeouts become
          WorkerCrashedError / TimeoutError, or are re-run  [_runner]

Why a file and not the task arguments for loky: loky re-pickles every task's
arguments, so a 50 MB ``self`` inside the task would travel once per chunk.
A path + digest travels instead; each worker unpickles at most once per
distinct state (the LRU ``_CACHE``), and numpy buffers are mapped, not copied.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import mmap
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Any

from ._serialize import dumps_value, loads_value
from .errors import SerializationError

__all__ = ["run_chunk", "LocalHandle", "FileHandle", "InlineHandle", "RemoteError", "CACHE_SIZE"]

#: How many distinct ``self`` states a worker keeps unpickled (LRU).
CACHE_SIZE = 4

# token -> subject, for routes where workers share (threads) or inherit (fork)
# the caller's memory. Filled by the runner before the pool starts.
_REGISTRY: dict[str, Any] = {}
_CACHE: collections.OrderedDict[str, Any] = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class LocalHandle:
    """``self`` lives in this process (threads) or was inherited by fork.

    ``pid`` is the caller's: a worker with another pid holds a forked copy,
    on which ``exclude=`` and ``__parallel_init__`` apply as on a shipped one.
    """

    token: str
    pid: int
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileHandle:
    """``self`` pickled once into ``path``: stream then buffers, back to back."""

    path: str
    digest: str
    main_len: int
    buffer_lens: tuple[int, ...]
    lineage: str = ""


@dataclass(frozen=True)
class InlineHandle:
    """``self`` as bytes passed to the task: stream then buffers, back to back.

    On dask the bytes are scattered once and passed as a top-level Future
    argument (dask resolves it on the worker, fetching it once per worker).
    """

    digest: str
    main_len: int
    buffer_lens: tuple[int, ...]
    lineage: str = ""


@dataclass
class RemoteError:
    """An exception raised by the method on item ``index``, as it travels back.

    ``exc`` is the exception itself when it survives a pickle round trip,
    else None and the caller builds a ParallelMethodsError from the text.
    """

    index: int
    exc: BaseException | None
    type_name: str
    message: str
    traceback_text: str


def register_local(token: str, subject: Any) -> None:
    _REGISTRY[token] = subject


def unregister_local(token: str) -> None:
    _REGISTRY.pop(token, None)


def cache_info() -> dict[str, Any]:
    """What this process holds in its state cache (for tests and explain)."""
    with _CACHE_LOCK:
        return {"size": len(_CACHE), "max": CACHE_SIZE, "digests": list(_CACHE)}


def _load_file(handle: FileHandle) -> Any:
    with open(handle.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        # Why mmap: buffers handed to pickle.loads stay views on the mapped
        # file, so a 200 MB array is shared by every worker, not copied.
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
    view = memoryview(mm) if mm is not None else memoryview(b"")
    return _load_view(view, handle.main_len, handle.buffer_lens)


def _load_view(view: memoryview, main_len: int, buffer_lens: tuple[int, ...]) -> Any:
    buffers = []
    offset = main_len
    for n in buffer_lens:
        buffers.append(view[offset : offset + n])
        offset += n
    # Why the GC pause: unpickling a million tuples triggers full collections
    # that walk every object already cached in this worker (measured: 0.6 s
    # became 1.5 s with two states cached). Unpickling creates no garbage cycles.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return loads_value(view[:main_len], buffers=buffers)
    finally:
        if enabled:
            gc.enable()


def _after_load(subject: Any) -> Any:
    hook = getattr(type(subject), "__parallel_init__", None)
    if hook is not None and not isinstance(subject, type):
        hook(subject)
    return subject


_FORK_PREPARED: set[str] = set()


def _prepare_fork_copy(handle: LocalHandle, subject: Any) -> Any:
    """Once per forked worker: drop inherited excluded attributes, run __parallel_init__.

    Why: a forked copy shares the parent's sockets, sqlite handles and lock
    states; the contract says excluded attributes never reach a worker.
    """
    with _CACHE_LOCK:
        if handle.token in _FORK_PREPARED:
            return subject
        _FORK_PREPARED.add(handle.token)
    if not isinstance(subject, type):
        for name in handle.exclude:
            try:
                object.__delattr__(subject, name)
            except AttributeError:
                pass
        _after_load(subject)
    return subject


def _subject_of(handle: Any, blob: Any = None) -> Any:
    if isinstance(handle, LocalHandle):
        try:
            subject = _REGISTRY[handle.token]
            if handle.pid != os.getpid():
                return _prepare_fork_copy(handle, subject)
            return subject
        except KeyError:
            msg = (
                "parallelmethods internal error: this worker did not inherit the object "
                "(a fork-route handle reached a process that was not forked from the caller)"
            )
            raise RuntimeError(msg) from None
    digest = handle.digest
    with _CACHE_LOCK:
        if digest in _CACHE:
            _CACHE.move_to_end(digest)
            return _CACHE[digest]
    _forget_superseded(handle.lineage, digest)
    rss_before = _rss()
    if isinstance(handle, FileHandle):
        subject = _load_file(handle)
    else:
        subject = _load_view(memoryview(blob), handle.main_len, handle.buffer_lens)
    subject = _after_load(subject)
    with _CACHE_LOCK:
        _CACHE[digest] = subject
        _CACHE.move_to_end(digest)
        _HELD[digest] = max(0, _rss() - rss_before)
        if handle.lineage:
            _LINEAGE[handle.lineage] = digest
        while len(_CACHE) > CACHE_SIZE:
            old, _ = _CACHE.popitem(last=False)
            _HELD.pop(old, None)
        _allow_cached_memory(sum(_HELD.values()))
    return subject


# Bytes of RSS each cached state added when it was loaded.
_HELD: dict[str, int] = {}
# Caller object ("pid:id") -> digest of its state this worker holds.
_LINEAGE: dict[str, str] = {}


def _forget_superseded(lineage: str, digest: str) -> None:
    """Drop the state a changed object had before, ahead of loading its new one.

    Why: the cache is keyed by content, so after ``m.w = 7`` the old state
    of ``m`` would sit in the LRU until pushed out, holding its memory while
    the new one loads (measured: a 1M-entry dict state is ~300 MB per worker,
    and loads slowed from 0.6 s to over 1 s with stale states kept).
    """
    if not lineage:
        return
    with _CACHE_LOCK:
        old = _LINEAGE.get(lineage)
        if old is not None and old != digest:
            _CACHE.pop(old, None)
            _HELD.pop(old, None)
            del _LINEAGE[lineage]
_LOKY_LEAK_LIMIT: int | None = None


def _rss() -> int:
    try:
        import psutil
    except ImportError:  # loky checks memory only with psutil: nothing to adjust
        return 0
    return int(psutil.Process().memory_info().rss)


def _allow_cached_memory(held: int) -> None:
    """Tell loky's leak guard that our cache is not a leak.

    Why: a loky worker compares its RSS with its size after its first task
    and exits ("Memory leak detected") when it grew by more than
    ``_MAX_MEMORY_LEAK_SIZE`` (300 MB). A cached 1M-entry dict or a mapped
    200 MB array is deliberate growth, and the restart would throw the cache
    away (measured: warm calls fell back to full unpickling). We raise that
    limit, in this worker only, by what the cache holds.
    """
    global _LOKY_LEAK_LIMIT
    import sys

    executor = sys.modules.get("joblib.externals.loky.process_executor")
    if executor is None or not hasattr(executor, "_MAX_MEMORY_LEAK_SIZE"):
        return
    if _LOKY_LEAK_LIMIT is None:
        _LOKY_LEAK_LIMIT = int(getattr(executor, "_MAX_MEMORY_LEAK_SIZE"))  # noqa: B009
    setattr(executor, "_MAX_MEMORY_LEAK_SIZE", _LOKY_LEAK_LIMIT + held)  # noqa: B010


def unwrap_target(attr: Any) -> Any:
    """The plain function behind a ParallelFunction / classmethod / staticmethod."""
    from ._descriptor import ParallelFunction

    while True:
        if isinstance(attr, ParallelFunction):
            attr = attr._target
        elif isinstance(attr, (classmethod, staticmethod)):
            attr = attr.__func__
        else:
            return attr


def resolve_call(subject: Any, kind: str, name: str, mro_index: int) -> tuple[Any, tuple[Any, ...]]:
    """(function, leading args) for ``subject``; looked up in the class dict, not via getattr,
    so no bound view is built and a subclass override is the one that runs."""
    if kind == "function":
        return unwrap_target(subject), ()
    if kind == "method":
        cls = type(subject).__mro__[mro_index]
        return unwrap_target(cls.__dict__[name]), (subject,)
    cls = subject.__mro__[mro_index]
    fn = unwrap_target(cls.__dict__[name])
    return fn, ((subject,) if kind == "classmethod" else ())


def _state_digest(subject: Any) -> str:
    try:
        return hashlib.sha256(dumps_value(subject)).hexdigest()
    except Exception:  # noqa: BLE001 - unpicklable now: cannot tell, say unchanged
        return ""


def _capture(index: int, exc: BaseException, serialized: bool = True) -> RemoteError:
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    kept: BaseException | None = exc
    if not serialized:
        # Same process (threads): the exception object itself, traceback intact.
        return RemoteError(index, kept, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), "")
    try:
        # Round trip now: an exception whose __init__ pickle cannot call must
        # not explode later in the caller (joblib's MyExceptionWithFinickyInit).
        loads_value(dumps_value(exc))
    except Exception:  # noqa: BLE001
        kept = None
    exc.__traceback__ = None
    return RemoteError(index, kept, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb_text)


def run_chunk(handle: Any, spec: Any, first: int, items: Any, serialized: bool, blob: Any = None) -> Any:
    """Run one chunk of items; the only function any worker executes.

    ``spec`` = (kind, name, mro_index, fixed_args, fixed_kwargs, on_error,
    check_mutations); on process routes it and ``items`` arrive as bytes and
    the result leaves as bytes, so pickling errors are ours to name.
    Returns ``(first, results, mutated)`` where a failed item's result is a
    :class:`RemoteError`.
    """
    if serialized:
        spec = loads_value(spec)
        items = loads_value(items)
    kind, name, mro_index, fixed_args, fixed_kwargs, on_error, check_mutations, star = spec
    subject = _subject_of(handle, blob)
    fn, lead = resolve_call(subject, kind, name, mro_index)
    if fixed_args or lead:
        lead = (*lead, *fixed_args)
    before = _state_digest(subject) if check_mutations else ""
    results: list[Any] = []
    append = results.append
    had_error = False
    index = first
    for item in items:
        try:
            # Two call shapes: several iterables/starmap give tuples; one
            # iterable gives the argument itself (the hot path of map).
            if star:
                append(fn(*lead, *item, **fixed_kwargs))
            else:
                append(fn(*lead, item, **fixed_kwargs))
        except Exception as exc:  # noqa: BLE001 - every method error travels back
            append(_capture(index, exc, serialized))
            had_error = True
            if on_error == "raise":
                break
        index += 1
    mutated = bool(check_mutations) and _state_digest(subject) != before
    out = (first, results, mutated, had_error)
    if not serialized:
        return out
    try:
        return dumps_value(out)
    except Exception:  # noqa: BLE001 - find which result cannot travel
        return dumps_value((first, [_result_or_error(first + i, r) for i, r in enumerate(results)], mutated, True))


def _result_or_error(index: int, result: Any) -> Any:
    try:
        dumps_value(result)
    except Exception as exc:  # noqa: BLE001
        obj_type = f"{type(result).__module__}.{type(result).__qualname__}"
        err = SerializationError(
            f"the result of item {index} ({obj_type}) cannot be pickled to send it back, "
            f"even with cloudpickle: {exc}. Return plain data, or use backend='threading'.",
            path=f"result of item {index}",
            obj_type=obj_type,
        )
        return _capture(index, err)
    return result
