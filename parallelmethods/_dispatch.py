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
                 [_plain]); an unchanged object (same fingerprint) reuses
                 its file and its key
            dask ───────────────────────────► InlineHandle + the bytes,
                 scattered to the cluster once as a Future   [_dask]
            Ray ────────────────────────────► InlineHandle + an object-store ref,
                 put once per call; chunks run as Ray tasks  [_ray]
            other remote or unknown process
            backends ───────────────────────► InlineHandle + the bytes in every
                 task (no file, no fork assumed)             [_inline]
        3 items cut into chunks; each chunk pickled once (args fall back to
          cloudpickle) and sent as one joblib task, with the CallContext
          (call id, caller's cwd and sys.path, class name) in spec:
            delayed(run_chunk)(handle, spec, first_index, items, serialized, blob)
        4 joblib.Parallel(batch_size=1,
            return_as=generator_unordered | list)  ──────────────────────► 5 run_chunk:
                                                                          follow the caller's cwd, sys.path
                                                                          self = _REGISTRY[token]
                                                                            or _statecache.acquire(key):
                                                                               a copy this call used,
                                                                               or a verified unchanged one,
                                                                               or mmap + unpickle
                                                                               (+ __parallel_init__)
                                                                            failure -> "while rebuilding self"
                                                                          fn = raw function from spec
                                                                          for i, item in chunk:
                                                                            try fn(self, *fixed, item)
                                                                            except BaseException (not Ctrl-C)
                                                                              -> RemoteError(i, ...)
        6 ◄──────────────────────────── bytes of (first, results, mutated, had_error)
          results placed by index; a RemoteError is re-raised with its own type
          and a note naming the item (a SystemExit or other non-Exception comes
          back as a value with on_error="return", or as the __cause__ of a
          ParallelMethodsError with "raise")  [_runner]
          dead workers and timeouts become WorkerCrashedError / TimeoutError,
          or are re-run: every item PENDING -> RUNNING -> DONE | FAILED  [_recovery]

Why a file and not the task arguments for loky: loky re-pickles every task's
arguments, so a 50 MB ``self`` inside the task would travel once per chunk.
A path + key travels instead; each worker rebuilds at most once per
distinct state (the state cache, _statecache, which also checks that no
method changed its copy before serving it to a new call), and numpy buffers
are mapped, not copied.
"""

from __future__ import annotations

import functools
import gc
import itertools
import mmap
import os
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass
from typing import Any

from . import _board, _orphan, _results, _statecache
from ._serialize import dumps_value, loads_value
from .errors import ParallelMethodsError, SerializationError

__all__ = [
    "CACHE_SIZE",
    "CallContext",
    "FileHandle",
    "InlineHandle",
    "LocalHandle",
    "RemoteError",
    "cache_info",
    "run_chunk",
]

CACHE_SIZE = _statecache.CACHE_SIZE
cache_info = _statecache.cache_info

# token -> subject, for routes where workers share (threads) or inherit (fork)
# the caller's memory. Filled by the runner before the pool starts.
_REGISTRY: dict[str, Any] = {}
_FORK_LOCK = threading.Lock()


@dataclass(frozen=True)
class CallContext:
    """What every task of one call carries besides the items.

    ``call`` names the call (the state cache serves a copy to a new call
    only after checking it); ``cwd`` and ``sys_path`` are the caller's at the
    moment of the call, which local process workers follow (``follow``);
    ``owner`` (the class name) is for naming a failure to rebuild ``self``.
    """

    call: str
    cwd: str
    sys_path: tuple[str, ...]
    follow: bool
    owner: str = ""


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
    """``self`` pickled once into ``path``: stream then buffers, back to back.

    ``key`` names this payload in the workers' state cache (_statecache).
    """

    path: str
    key: str
    main_len: int
    buffer_lens: tuple[int, ...]
    lineage: str = ""


@dataclass(frozen=True)
class InlineHandle:
    """``self`` as bytes passed to the task: stream then buffers, back to back.

    On dask the bytes are scattered once and passed as a top-level Future
    argument (dask resolves it on the worker, fetching it once per worker).
    """

    key: str
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


# ---------------------------------------------------------------------------
# Rebuilding self in a worker.
# ---------------------------------------------------------------------------


class _RebuildFailed(Exception):
    """Rebuilding ``self`` failed at ``stage``; ``error`` is what was raised."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(stage, error)
        self.stage = stage
        self.error = error


def _load_file(handle: FileHandle) -> Any:
    with open(handle.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        # Why mmap: buffers handed to pickle.loads stay views on the mapped
        # file, so a 200 MB array is shared by every worker, not copied.
        # Why ACCESS_COPY (a private, copy-on-write mapping): arrays are then
        # writable, as in the loop (ctypes from_buffer and Cython memoryviews
        # need that even to read); a page is copied only when a worker writes
        # to it, and what it writes stays in that worker's copy, which the
        # state cache then sees as changed (_statecache).
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None
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
        try:
            hook(subject)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            msg = "__parallel_init__"
            raise _RebuildFailed(msg, e) from e
    return subject


def _rebuild(handle: Any, blob: Any) -> Any:
    try:
        if isinstance(handle, FileHandle):
            subject = _load_file(handle)
        else:
            subject = _load_view(memoryview(blob), handle.main_len, handle.buffer_lens)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        msg = "unpickling"
        raise _RebuildFailed(msg, e) from e
    return _after_load(subject)


_FORK_PREPARED: set[str] = set()


def _prepare_fork_copy(handle: LocalHandle, subject: Any) -> Any:
    """Once per forked worker: drop inherited excluded attributes, run __parallel_init__.

    Why: a forked copy shares the parent's sockets, sqlite handles and lock
    states; the contract says excluded attributes never reach a worker.
    The fork route forks a fresh pool for every call, so this copy is the
    caller's state as of this call.
    """
    with _FORK_LOCK:
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


def _subject_of(handle: Any, blob: Any, ctx: CallContext) -> tuple[Any, str, bool]:
    """``(subject, cache key or "", cached)``; release with ``_statecache.release``."""
    if isinstance(handle, LocalHandle):
        try:
            subject = _REGISTRY[handle.token]
        except KeyError:
            msg = (
                "parallelmethods internal error: this worker did not inherit the object "
                "(a fork-route handle reached a process that was not forked from the caller)"
            )
            raise RuntimeError(msg) from None
        if handle.pid != os.getpid():
            return _prepare_fork_copy(handle, subject), "", False
        return subject, "", False
    subject, cached = _statecache.acquire(handle.key, ctx.call, handle.lineage, lambda: _rebuild(handle, blob))
    return subject, handle.key, cached


def _rebuild_error(ctx: CallContext, failure: BaseException) -> ParallelMethodsError:
    """The error for a ``self`` that could not be rebuilt: where, why, and the fix."""
    stage, error = (failure.stage, failure.error) if isinstance(failure, _RebuildFailed) else ("loading", failure)
    owner = ctx.owner or "self"
    if stage == "__parallel_init__":
        fix = f"fix {owner}.__parallel_init__ so that it works in a fresh process (it runs once per shipped copy)"
    elif isinstance(error, RecursionError):
        fix = (
            "an attribute nests deeper than the recursion limit when rebuilt (a tqdm bar, a long linked "
            "structure): add it to exclude= and rebuild it in __parallel_init__(), or use backend='threading'"
        )
    elif isinstance(error, (ImportError, AttributeError)):
        fix = (
            "the worker cannot import what self refers to: make the module importable (install it, or put "
            "its folder on sys.path before the map; local workers follow the caller's sys.path), or use "
            "backend='threading'"
        )
    else:
        fix = (
            f"make {owner}'s __setstate__/__reduce__ work in a fresh process, or add the attribute that fails "
            "to exclude= and rebuild it in __parallel_init__(), or use backend='threading'. "
            "explain(m.method) names the attribute"
        )
    msg = f"while rebuilding self ({owner}) in a worker: {type(error).__name__} during {stage}: {error}. Fix: {fix}."
    err = ParallelMethodsError(msg, type_name=f"{type(error).__module__}.{type(error).__qualname__}")
    err.__cause__ = error
    return err


def _follow_caller(ctx: CallContext) -> None:
    """Local process workers run in the caller's cwd and with its sys.path, as the loop does.

    Why: loky's workers live across calls and keep the directory and path
    they started with; a relative ``open()`` or an import made possible by a
    later ``sys.path.insert`` must behave as in the caller.
    """
    try:
        if os.getcwd() != ctx.cwd:
            os.chdir(ctx.cwd)
    except OSError:  # gone (or never there): the method sees the worker's own
        pass
    if tuple(sys.path) != ctx.sys_path:
        sys.path[:] = ctx.sys_path


# ---------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------


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


def _capture(index: int, exc: BaseException, serialized: bool = True) -> RemoteError:
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if not serialized:
        # Same process (threads): the exception object itself, traceback intact.
        return RemoteError(index, exc, type_name, str(exc), "")
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    kept: BaseException | None = exc
    try:
        # Round trip now: an exception whose __init__ pickle cannot call must
        # not explode later in the caller (joblib's MyExceptionWithFinickyInit).
        loads_value(dumps_value(exc))
    except Exception:  # noqa: BLE001
        kept = None
    exc.__traceback__ = None
    return RemoteError(index, kept, type_name, str(exc), tb_text)


def run_chunk(
    handle: Any, spec: Any, first: int, items: Any, serialized: bool, blob: Any = None, board: Any = None
) -> Any:
    """Run one chunk of items; the only function any worker executes.

    ``spec`` = (kind, name, mro_index, fixed_args, fixed_kwargs, on_error,
    check_mutations, context, star); on process routes it and ``items``
    arrive as bytes and the result leaves as bytes, so pickling errors are
    ours to name. Returns ``(first, results, mutated, had_error)`` where a
    failed item's result is a :class:`RemoteError`, and ``results`` may be
    :class:`~parallelmethods._board.Logged` (they are in the chunk's log) or
    :class:`~parallelmethods._results.Packed` (packed one by one as they ended).
    ``board`` (local process routes) is the run's board: its stop flag,
    and with recovery on, item marks and the results log (``_board``).
    """
    # A local process worker ends itself (and its caller's payload files)
    # within a second of its caller's death: loky's would idle 300 s.
    _orphan.watch_caller(handle)
    wboard = _board.attach(board) if board is not None else None
    if wboard is not None and wboard.ended_run():
        # The caller stopped reading this run (an error, an abandoned imap):
        # return at once, before rebuilding self; nobody reads this result.
        return _pack((first, [], False, False), serialized, handle)
    if serialized:
        spec = loads_value(spec)
        items = loads_value(items)
    _kind, _name, _mro_index, _fixed_args, _fixed_kwargs, on_error, _check_mutations, ctx, _star = spec
    if ctx.follow:
        _follow_caller(ctx)
    try:
        subject, key, cached = _subject_of(handle, blob, ctx)
    except KeyboardInterrupt:
        raise
    except BaseException as failure:  # noqa: BLE001 - every item of the chunk gets the named error
        err = _rebuild_error(ctx, failure)
        count = len(items) if on_error == "return" else 1
        failed = (first, [_capture(first + i, err, serialized) for i in range(count)], False, True)
        return _pack(failed, serialized, handle, ctx)
    log = wboard.open_log(first) if wboard is not None else None
    try:
        out: tuple[int, Any, bool, bool] = _run_items(subject, spec, first, items, serialized, wboard, log, handle)
        if log is not None and log.ok:
            # Every result is in the log already (written as each item ended,
            # so a crash later in the chunk loses none): send only the count.
            out = (out[0], _board.Logged(len(out[1]), log.path), out[2], out[3])
        return _pack(out, serialized, handle, ctx)
    finally:
        if log is not None:
            log.close()
        _statecache.release(key, cached)


#: The lean loop looks at the stop flag once per block of items that takes about
#: this long (timed block by block), and at least every MAX_BLOCK items.
STOP_CHECK_SECONDS = 0.01
MAX_BLOCK = 256
#: Items run one at a time (and timed) before the lean loop takes over.
PROBE_ITEMS = 8


def _run_items(
    subject: Any,
    spec: Any,
    first: int,
    items: Any,
    serialized: bool,
    wboard: _board.WorkerBoard | None = None,
    log: _board.ChunkLog | None = None,
    handle: Any = None,
) -> tuple[int, Any, bool, bool]:
    kind, name, mro_index, fixed_args, fixed_kwargs, on_error, check_mutations, ctx, star = spec
    call = _bind(*resolve_call(subject, kind, name, mro_index), fixed_args, fixed_kwargs)
    before = _statecache.state_fingerprint(subject) if check_mutations else ""
    results: list[Any] = []
    append = results.append
    had_error = False
    n_items = len(items)
    rest = iter(items)
    stopped = False
    # Two loops over the same iterator. The careful one runs items one at a
    # time: it looks at the stop flag before each, marks and logs each (with
    # recovery on, a crash is pinned on the item whose slot holds the dead
    # worker's pid and a crash later in the chunk loses no logged result:
    # _board), packs each as it ends when results are large (``stream``), and
    # times the first PROBE_ITEMS. The lean loop runs the rest in blocks of
    # about STOP_CHECK_SECONDS (at most MAX_BLOCK items, each block timed to
    # size the next) and looks at the stop flag between blocks.
    # Why two: the careful loop's per-item work doubles W1's cost.
    marks = wboard is not None and wboard.log
    # Why pack as items end: a chunk of large results packed item by item costs
    # the worker what one result costs (_results.STREAM_BYTES); the log packs
    # each result anyway. None: the first result decides; threads never pack.
    stream: bool | None = True if log is not None else (None if serialized else False)
    block = n_items  # items per look at the stop flag in the lean loop (no board: one block)
    if wboard is not None or stream is None:
        index = first
        timed_from = 0.0
        for item in rest:
            if wboard is not None and wboard.stopped():
                stopped = True  # the caller stopped reading: skip what has not started
                break
            if marks:
                wboard.started(index)  # type: ignore[union-attr]
            failed = False
            try:
                value = call(*item) if star else call(item)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - every method error travels back, SystemExit too
                value = _capture(index, exc, serialized)
                had_error = failed = True
            if stream is None:  # the first result: large ones are packed as they end
                packed, unpicklable = _pack_one(index, value, handle, ctx)
                stream = _results.packed_size(packed) >= _results.STREAM_BYTES
                append(packed if stream else value)
                had_error = had_error or (stream and unpicklable)
                timed_from = time.perf_counter()  # the probe times items 2..PROBE_ITEMS, not this packing
            elif stream:
                packed, unpicklable = _pack_one(index, value, handle, ctx)
                append(packed)
                had_error = had_error or unpicklable  # its SerializationError is in its place
            else:
                append(value)
            del value  # a packed result's objects go now, not at the next item
            if marks:
                wboard.ended(index)  # type: ignore[union-attr]
                if log is not None:
                    log.add(results[-1])
            if failed and on_error == "raise":
                stopped = True
                break
            index += 1
            if index == first + PROBE_ITEMS and not marks and not stream:
                if wboard is not None:
                    block = _block_size(time.perf_counter() - timed_from, PROBE_ITEMS - 1)
                break
    while not stopped and len(results) < n_items:
        if wboard is not None and wboard.stopped():
            break
        started_at = time.perf_counter()
        done = len(results)
        # Why the try outside the for: it costs nothing until an item raises;
        # then the item is captured and the next block goes on with the rest
        # of the same iterator (with on_error="raise" it stops there).
        try:
            if star:
                for item in itertools.islice(rest, block):
                    append(call(*item))
            else:
                for item in itertools.islice(rest, block):
                    append(call(item))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - every method error travels back, SystemExit too
            append(_capture(first + len(results), exc, serialized))
            had_error = True
            stopped = on_error == "raise"
        if wboard is not None:  # items that slow down get smaller blocks at once
            block = _block_size(time.perf_counter() - started_at, len(results) - done)
    mutated = bool(check_mutations) and _statecache.state_fingerprint(subject) != before
    if stream:
        return first, _results.Packed(results), mutated, had_error
    return first, results, mutated, had_error


def _block_size(elapsed: float, n: int) -> int:
    """Items the lean loop runs between two looks at the stop flag, from ``n`` items taking ``elapsed``."""
    if elapsed <= 0 or n <= 0:
        return MAX_BLOCK
    return max(1, min(MAX_BLOCK, int(STOP_CHECK_SECONDS * n / elapsed)))


def _bind(fn: Any, lead: tuple[Any, ...], fixed_args: tuple[Any, ...], fixed_kwargs: dict[str, Any]) -> Any:
    """One callable taking only the item's arguments.

    Why: ``fn(*lead, item, **fixed_kwargs)`` builds a tuple and a dict on every
    item: W1's item loop took 126 ms that way, 61 ms with a bound method (the
    common case: ``self`` and nothing fixed), as fast as ``obj.method(item)``.
    """
    if fixed_kwargs or fixed_args or len(lead) > 1:
        return functools.partial(fn, *lead, *fixed_args, **fixed_kwargs)
    if lead:
        return types.MethodType(fn, lead[0])
    return fn


def _pack_one(index: int, result: Any, handle: Any, ctx: Any) -> tuple[Any, bool]:
    """One result packed alone (large buffers in their own files, as _pack); True if it could not be.

    A result that cannot be pickled is packed as its named SerializationError
    (a RemoteError): the chunk then has an error (``had_error``).
    """
    try:
        return _results.pack(result, handle, ctx), False
    except Exception:  # noqa: BLE001 - name the result that cannot travel
        return _results.pack(_result_or_error(index, result), handle, ctx), True


def _pack(out: tuple[int, Any, bool, bool], serialized: bool, handle: Any = None, ctx: Any = None) -> Any:
    if not serialized:
        return out
    try:
        # Large buffers (numpy arrays) leave in files on local process routes (_results).
        return _results.pack(out, handle, ctx)
    except Exception:  # find which result cannot travel
        first, results, mutated, _ = out
        if isinstance(results, _results.Packed):
            raise  # packed bytes always pickle: this is not a result's fault
        safe = (first, [_result_or_error(first + i, r) for i, r in enumerate(results)], mutated, True)
        return _results.pack(safe, handle, ctx)


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
