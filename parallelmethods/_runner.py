"""Parent side of a map: choose the route for ``self``, cut chunks, drive joblib.

See the data-flow diagram at the top of ``_dispatch.py``. This module owns
steps 1-4 and 6: options, route, chunks, ``joblib.Parallel`` (the
:class:`_Executor`) and results (the :class:`_Collector`). What happens when
the pool fails (dead workers, timeouts), and which items run again, is the
state machine in ``_recovery.py``.

imap's read-ahead, in items: imap reads its input one *window* at a time and
reads the next window only when every result of the current one has been
yielded. A window is ``READAHEAD_PER_WORKER`` (2) chunks per worker. With
auto batching a chunk starts at 1 item and doubles while a window takes
< 0.2 s, up to ``MAX_IMAP_CHUNK`` (256) items. So the items read from the
input but not yet yielded number at most::

    READAHEAD_PER_WORKER * effective_n_jobs * chunk
      <= 512 * n_jobs items             (batch_size="auto")
      <= 2 * n_jobs * batch_size        (batch_size=int)
      =  2 * n_jobs                     (timeout= set: one item per task)

and, with auto batching, chunks also stop growing (and shrink) once a window
holds more than ``READAHEAD_BYTES`` (32 MiB) by ``sys.getsizeof`` of the
window's first item (a shallow estimate, exact for bytes, str and numpy
arrays): 1 MB items keep about 32 items in the window. Why 256: joblib's
result loop polls every 10 ms, so each window costs >= 10 ms; 20 000 tiny
items through loky take 0.3 s with 256 (0.14 s with the old 4 096, 0.9 s
with 64).
"""

from __future__ import annotations

import atexit
import collections.abc
import contextlib
import itertools
import math
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, cast

from joblib import Parallel, delayed

from . import _results
from ._board import Board, Logged
from ._compat import add_note, set_parallel_timeout
from ._dispatch import RemoteError, run_chunk
from ._options import Options, check_timeout_per_item
from ._plan import Plan, plan_for
from ._recovery import PoolFailure, Recovery, internal_error, is_pool_failure
from ._serialize import dumps_value, serialization_error
from ._transport import Shipment, shipped
from .errors import ParallelMethodsError

if TYPE_CHECKING:
    from ._descriptor import BoundParallelMethod

__all__ = ["run_imap", "run_map"]

#: imap keeps at most this many chunks per worker in flight or buffered.
READAHEAD_PER_WORKER = 2
#: imap's auto batching grows chunks up to this many items, so its read-ahead
#: is at most READAHEAD_PER_WORKER * MAX_IMAP_CHUNK = 512 items per worker.
MAX_IMAP_CHUNK = 256
#: imap's auto batching stops growing chunks once a window holds this many
#: bytes (estimated from the window's first item).
READAHEAD_BYTES = 32 * 2**20


class _RemoteTraceback(Exception):
    """The worker's traceback, as text; set as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def _spec_payload(plan: Plan, serialized: bool) -> Any:
    if not serialized:
        return plan.spec
    try:
        return dumps_value(plan.spec)
    except Exception as e:
        raise serialization_error(plan.spec[3:5], e, what="the arguments fixed with .partial()") from e


def _items_payload(first: int, items: list[Any], serialized: bool, star: bool) -> Any:
    if not serialized:
        return items
    try:
        return dumps_value(items)
    except Exception as e:
        for offset, args in enumerate(items):
            for j, arg in enumerate(args if star else (args,)):
                try:
                    dumps_value(arg)
                except Exception as inner:  # noqa: BLE001
                    raise serialization_error(arg, inner, what=f"argument {j} of item {first + offset}") from e
        raise


# ----------------------------------------------------------------------------
# Running: one joblib call over a list of (first, items) chunks.
# ----------------------------------------------------------------------------


class _Executor:
    """Runs chunks through joblib; yields decoded chunk results as they complete."""

    def __init__(self, plan: Plan, shipment: Shipment) -> None:
        self.plan = plan
        self.handle = shipment.handle
        self.blob = shipment.blob
        self.serialized = plan.route != "reference"
        self.star = bool(plan.spec[-1])
        self.spec = _spec_payload(plan, self.serialized)

    def run(
        self, chunks: list[tuple[int, list[Any]]], timeout: float | None, board: Board | None = None
    ) -> Generator[tuple[int, list[Any], bool, bool], None, None]:
        plan = self.plan
        dispatched: set[int] = set()
        completed: set[int] = set()
        ref = board.ref if board is not None else None
        # Deaths before this run (an earlier run's crash, loky killing its
        # siblings) are not this run's: culprits are looked for from here on.
        deaths_from = board.watch.mark() if board is not None and board.watch is not None else 0

        def tasks() -> Iterator[Any]:
            for first, items in chunks:
                payload = _items_payload(first, items, self.serialized, self.star)
                dispatched.add(first)
                yield delayed(run_chunk)(self.handle, self.spec, first, payload, self.serialized, self.blob, ref)

        _join_drains()  # an earlier stopped run of this process ends first (it may share our backend)
        return_as = "generator_unordered" if plan.backend.supports_return_generator else "list"
        parallel = Parallel(
            n_jobs=plan.n_jobs, backend=plan.backend, batch_size=1, timeout=timeout, return_as=return_as
        )
        outputs: Any = None
        started_in = threading.get_ident()
        broken = False  # the pool failed: nothing is left to drain
        try:
            # "list" (multiprocessing) raises here; generators raise while iterated.
            outputs = parallel(tasks())
            for out in outputs:
                decoded = self._decode(out)
                completed.add(decoded[0])
                yield decoded
            outputs = None  # read to the end
        except ParallelMethodsError:
            raise
        except Exception as e:
            if is_pool_failure(e):
                broken = True
                # loky keeps the error that broke its executor (executor_flags)
                # until the next one starts; its traceback would keep these
                # frames, this call's plan and so `self` alive until then.
                e.__traceback__ = None
                raise PoolFailure(e, dispatched, completed, deaths_from) from e
            raise
        finally:

            def sweep() -> None:
                if dispatched - completed:
                    self.sweep_results()

            if not broken and _drain_outputs(parallel, outputs, started_in, board, sweep):
                pass  # the drain thread sweeps and closes the board when the run has ended
            else:
                _stop_outputs(outputs, started_in)
                if not (broken and board is not None and board.ref.log):
                    sweep()  # (after a crash, Recovery salvages the logs first, then sweeps)

    def sweep_results(self) -> None:
        """Remove the result files of chunks nobody read (an error, a crash, an abandoned imap)."""
        if self.serialized:
            _results.sweep(self.plan.spec[7].call, _results_folders(self.handle))

    def _decode(self, out: Any) -> tuple[int, list[Any], bool, bool]:
        if not self.serialized:
            return out  # type: ignore[no-any-return]
        # The multiprocessing backend decodes in the pool's result thread (_mpwatch).
        decoded = out if isinstance(out, _results.Decoded) else _results.decode(out)
        try:
            if decoded.error is not None:
                raise decoded.error
            first, results, mutated, had_error = decoded.value
            if isinstance(results, Logged):  # the results are in the chunk's log (_board)
                results = results.load()
                # A result that could not be pickled became its error in the log.
                had_error = had_error or any(type(v) is RemoteError for v in results)
        except ParallelMethodsError:
            raise
        except Exception as e:
            msg = (
                f"the results of {self.plan.label} could not be rebuilt in the caller "
                f"({type(e).__name__}: {e}); a returned object's class may fail to unpickle here. "
                "Return plain data, or use backend='threading'."
            )
            raise ParallelMethodsError(msg) from e
        return first, results, mutated, had_error


def _results_folders(handle: Any) -> list[str]:
    path = getattr(handle, "path", None)
    return [os.path.dirname(path)] if isinstance(path, str) else []


class _StopEarly(Exception):
    """Thrown into joblib's result generator when we stop reading it on purpose."""


def _stop_outputs(outputs: Any, started_in: int) -> None:
    """Stop joblib's result generator early (an error, an abandoned imap), without its warning.

    ``close()`` raises ``GeneratorExit`` in joblib's generator, which aborts the
    tasks and then warns "... tasks which were still being processed by the
    workers have been cancelled" (``Parallel._warn_exit_early``): that describes
    our own decision, not a user mistake. Throwing any other exception takes
    joblib's ``except BaseException`` branch instead: the same abort
    (``_abort()``, then ``_terminate_and_reset()``), and no warning. Nothing
    touches the process-wide warning filters, so warnings raised by concurrent
    maps in other threads are never lost (``warnings.catch_warnings`` is not
    thread-safe). From another thread than the one that started the run
    (a garbage-collected imap), joblib's own ``close()`` path is kept: it hands
    the abort to a helper thread rather than joining from a foreign thread.
    """
    if outputs is None or not hasattr(outputs, "close"):
        return  # a list: joblib already finished or raised
    if not hasattr(outputs, "throw") or threading.get_ident() != started_in:
        outputs.close()
        return
    try:
        outputs.throw(_StopEarly())
    except (_StopEarly, StopIteration):
        pass


#: How long a stopped run may take to end on its own (its workers finish the
#: item they are running) before joblib aborts it, killing loky's workers.
DRAIN_SECONDS = 0.25


def _drain_outputs(
    parallel: Any, outputs: Any, started_in: int, board: Board | None, sweep: Callable[[], None]
) -> bool:
    """Stop a run we no longer read without killing loky's warm workers; False if it cannot be.

    Why: stopping joblib's generator aborts the run, and on loky that kills
    every worker, so the next map pays a cold start (self rebuilt in fresh
    processes) after any error with ``on_error="raise"`` or an abandoned
    ``imap``. Instead the board's stop flag is raised: tasks not started
    return at once, running ones end after their current item (or block of
    quick items, ``_dispatch.STOP_CHECK_SECONDS``). A daemon
    thread reads the run to its end; if a worker is still busy after
    :data:`DRAIN_SECONDS`, joblib's own timeout aborts the run (as before).
    The caller does not wait: the error is raised, or ``close()`` returns, now.
    Only for runs with a board on a backend that returns a generator (loky
    and other local process backends), stopped in the thread that started them.
    """
    if board is None or outputs is None or not hasattr(outputs, "throw"):
        return False
    if threading.get_ident() != started_in:
        return False
    board.stop()
    board.hand_off()
    set_parallel_timeout(parallel, DRAIN_SECONDS)

    def drain() -> None:
        try:
            for _ in outputs:
                pass
        except BaseException:  # noqa: BLE001 - the timeout's abort, a broken pool: the run is over either way
            pass
        finally:
            sweep()
            board.close(final=True)
            with _DRAINS_LOCK:
                _DRAINS.pop(threading.current_thread(), None)

    thread = threading.Thread(target=drain, name="parallelmethods-drain", daemon=True)
    with _DRAINS_LOCK:
        _DRAINS[thread] = (board, sweep)
    thread.start()
    return True


#: Runs being drained, with what ends them (their board, their sweep).
_DRAINS: dict[threading.Thread, tuple[Board, Callable[[], None]]] = {}
_DRAINS_LOCK = threading.Lock()


def _join_drains(timeout: float = DRAIN_SECONDS + 1.0) -> None:
    """Wait (bounded) for stopped runs to end: they may share the backend instance a new run uses.

    Why: under ``parallel_config(backend=...)`` every map gets the same joblib
    backend instance, and a drain that ends (or aborts) resets it under a
    run that started meanwhile.
    """
    with _DRAINS_LOCK:
        for thread in [t for t in _DRAINS if not t.is_alive()]:
            del _DRAINS[thread]
        running = list(_DRAINS)
    deadline = time.monotonic() + timeout
    for thread in running:
        thread.join(max(0.0, deadline - time.monotonic()))


@atexit.register
def _end_drains() -> None:
    """At exit, a drain still running gets its bounded time, then its files go anyway."""
    _join_drains()
    with _DRAINS_LOCK:
        left = list(_DRAINS.values())
        _DRAINS.clear()
    for board, sweep in left:
        with contextlib.suppress(Exception):
            sweep()
        with contextlib.suppress(Exception):
            board.close(final=True)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_stacklevel() -> int:
    """``stacklevel`` that makes a warning point at the first frame outside this package.

    That is the user's line: the ``map``/``starmap`` call, or the ``next()``
    (``for`` loop) that reads an ``imap``, whatever the path through the
    package (method, classmethod, module function, ``.options()``...).
    """
    frame = sys._getframe(1)  # the function that calls warnings.warn
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------


def _auto_chunk(plan: Plan, n_items: int) -> int:
    opts = plan.opts
    if isinstance(opts.batch_size, int):
        return opts.batch_size
    if opts.timeout is not None:
        return 1  # the timeout is per item: one item per task
    if plan.route == "reference" and plan.effective_n_jobs == 1:
        return max(1, n_items)
    # As multiprocessing.Pool.map: about 4 chunks per worker.
    return max(1, math.ceil(n_items / (4 * max(1, plan.effective_n_jobs))))


def _rebuild_error(plan: Plan, err: RemoteError) -> BaseException:
    """The exception to put in the item's place (``on_error="return"``) or to raise.

    A ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``GeneratorExit``...; ``KeyboardInterrupt`` is never caught in workers)
    must not end the caller: it is returned as a value with ``"return"``, and
    with ``"raise"`` it becomes the ``__cause__`` of a ParallelMethodsError.
    """
    note = f"parallelmethods: raised by {plan.label} on item {err.index}"
    if err.exc is not None:
        exc = err.exc
        if isinstance(exc, SystemExit) and exc.code is None and exc.args:
            # tblib's pickling support, which dask.distributed installs for every
            # exception class, rebuilds a SystemExit without running its __init__,
            # so ``code`` comes back None; it is derived from args as __init__ does.
            exc.code = exc.args[0] if len(exc.args) == 1 else exc.args  # type: ignore[assignment]
        if exc.__cause__ is None and err.traceback_text and exc.__traceback__ is None:
            exc.__cause__ = _RemoteTraceback(err.traceback_text)
    else:
        msg = (
            f"{plan.label} raised {err.type_name} on item {err.index}: {err.message}\n"
            "(the exception itself could not be sent back to the caller: it does not survive "
            "pickling; its traceback is in .traceback_text)"
        )
        exc = ParallelMethodsError(msg, type_name=err.type_name, traceback_text=err.traceback_text)
        exc.__cause__ = _RemoteTraceback(err.traceback_text)
    add_note(exc, note)
    if plan.opts.on_error == "raise" and not isinstance(exc, Exception):
        msg = (
            f"{plan.label} raised {type(exc).__name__}({err.message!r}) on item {err.index}; "
            f"parallelmethods does not let a worker's {type(exc).__name__} end your process. "
            "The original is the __cause__; use on_error='return' to get it in the item's place."
        )
        wrapper = ParallelMethodsError(msg, type_name=err.type_name, traceback_text=err.traceback_text)
        wrapper.__cause__ = exc
        add_note(wrapper, note)
        return wrapper
    return exc


class _Raised:
    """A method's exception that ordered ``imap`` raises when it reaches the item (``on_error="raise"``)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Collector:
    """Turns completed chunks into result lists; handles errors, progress, mutations.

    ``unit_size`` (ordered ``imap`` only) gives the number of items of the unit
    starting at an index: then a method's exception with ``on_error="raise"``
    is not raised on arrival but put in its item's place as :class:`_Raised`
    (and the unit's later items, which the worker did not run, too), so that
    ``imap`` first yields every result before the failing item, then raises.
    """

    def __init__(self, plan: Plan, total: int | None, unit_size: Callable[[int], int] | None = None) -> None:
        self.plan = plan
        self.mutated = False
        self.unit_size = unit_size
        from ._progress import make_bar

        self.bar = make_bar(plan, total)

    def accept(self, first: int, results: list[Any], mutated: bool, had_error: bool) -> list[Any]:
        n_results = len(results)
        if had_error:  # the worker says so: clean chunks skip this scan
            for offset, value in enumerate(results):
                if isinstance(value, RemoteError):
                    exc = _rebuild_error(self.plan, value)
                    if self.plan.opts.on_error == "raise":
                        if self.unit_size is None:
                            raise exc
                        # The worker stopped at this item: pad the unit with the marker.
                        results = results[:offset] + [_Raised(exc)] * (self.unit_size(first) - offset)
                        break
                    results[offset] = exc
        if mutated and not self.mutated and self.plan.route != "reference":
            self.mutated = True
            warnings.warn(
                f"{self.plan.label} changed self in a worker process; the change is not sent back to "
                "your object (the worker changed its copy, which later calls do not see). Return the "
                "new values instead, or use backend='threading' to change the object itself.",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
        if self.bar is not None:
            self.bar.update(n_results)
        return results

    def count(self, n: int) -> None:
        """``n`` items resolved without a chunk result (failed for good)."""
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_map(bound: BoundParallelMethod[Any, Any], layer: Options, items_in: Any) -> list[Any]:
    """``map``/``starmap``: materialize the input, run, return results in order."""
    plan = plan_for(bound, layer, star=items_in.star)
    check_timeout_per_item(plan.opts.timeout, plan.opts.batch_size)
    items = list(items_in.iterator)
    if not items:
        return []
    results: list[Any] = [_UNFILLED] * len(items)
    collector = _Collector(plan, len(items))
    filled = 0
    try:
        with shipped(plan) as shipment:
            executor = _Executor(plan, shipment)
            for first, values in Recovery(plan, executor, collector, 0, items, _auto_chunk(plan, len(items))).run():
                results[first : first + len(values)] = values
                filled += len(values)
    finally:
        collector.close()
    # Recovery.run checked each unit's length and that its units add up to
    # every item; this counts the values placed. Why a count, not a scan of
    # the slots: scanning 200 000 slots costs W1 ~10 ms.
    if filled != len(items):
        missing = [i for i, r in enumerate(results) if r is _UNFILLED][:10]
        what = f"results for items {missing} are missing"
        raise internal_error(what)
    return results


#: A result slot no item has filled yet; never returned (run_map checks).
_UNFILLED: Any = object()


def run_imap(bound: BoundParallelMethod[Any, Any], layer: Options, items_in: Any) -> Iterator[Any]:
    """``imap``: plan, check and ship ``self`` now (errors at the call), run lazily in bounded windows.

    Everything that can fail before the first item runs happens here, at the
    call, as for ``map``: bad options, a missing tqdm for ``progress=True``,
    a ``self`` (or ``.partial()`` arguments) that cannot be serialized. The
    shipment of ``self`` then lives until the iterator is exhausted, closed or
    garbage-collected (:class:`_ImapIterator`), also when it is never read.
    """
    plan = plan_for(bound, layer, star=items_in.star)
    check_timeout_per_item(plan.opts.timeout, plan.opts.batch_size)
    if plan.opts.progress:
        from ._progress import bar_class

        bar_class()  # ImportError naming the extra, now rather than at the first next()
    stack = contextlib.ExitStack()
    try:
        shipment = stack.enter_context(shipped(plan))
        executor = _Executor(plan, shipment)
    except BaseException:
        stack.close()
        raise
    return _ImapIterator(_imap(plan, executor, items_in.iterator, stack), stack)


def _finish_imap(gen: Generator[Any, None, None], stack: contextlib.ExitStack) -> None:
    try:
        gen.close()  # stops the work (the generator's finally), when it had started
    finally:
        stack.close()  # releases self's shipment, also when the generator never started


class _ImapIterator(collections.abc.Iterator):  # type: ignore[type-arg]
    """The iterator ``imap`` returns: reads results lazily; ``close()`` (or dropping it) stops the work."""

    def __init__(self, gen: Generator[Any, None, None], stack: contextlib.ExitStack) -> None:
        self._gen = gen
        self._finalizer = weakref.finalize(self, _finish_imap, gen, stack)

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        """Stop reading: running tasks are stopped, ``self``'s shipment is released."""
        self._finalizer()


def _imap(
    plan: Plan, executor: _Executor, items_iter: Iterator[Any], stack: contextlib.ExitStack
) -> Generator[Any, None, None]:
    window_chunks = READAHEAD_PER_WORKER * max(1, plan.effective_n_jobs)
    chunk_size = plan.opts.batch_size if isinstance(plan.opts.batch_size, int) else 1
    ordered = plan.opts.ordered
    recovery: Recovery | None = None
    collector = _Collector(plan, None, (lambda first: len(recovery.units[first].items)) if ordered else None)  # type: ignore[union-attr]
    try:
        start = 0
        while True:
            window = list(itertools.islice(items_iter, window_chunks * chunk_size))
            if not window:
                return
            t0 = time.perf_counter()
            recovery = Recovery(plan, executor, collector, start, window, chunk_size)
            results = cast(Generator[tuple[int, list[Any]], None, None], recovery.run())
            try:
                if ordered:
                    buffered: dict[int, list[Any]] = {}
                    next_index = start
                    for first, values in results:
                        buffered[first] = values
                        while next_index in buffered:
                            ready = buffered.pop(next_index)
                            for value in ready:
                                if type(value) is _Raised:
                                    raise value.exc  # every result before this item was yielded
                                yield value
                            next_index += len(ready)
                else:
                    for _, values in results:
                        yield from values
            finally:
                results.close()  # stops the window's tasks now when we leave early
            start += len(window)
            window_bytes = len(window) * _sizeof(window[0])
            chunk_size = _grow_chunk(plan, chunk_size, time.perf_counter() - t0, window_bytes)
    finally:
        collector.close()
        stack.close()


def _sizeof(item: Any) -> int:
    try:
        return sys.getsizeof(item)
    except Exception:  # noqa: BLE001 - an odd __sizeof__: no estimate
        return 0


def _grow_chunk(plan: Plan, chunk_size: int, elapsed: float, window_bytes: int) -> int:
    """imap's auto batching: grow chunks while a window is cheap (< 0.2 s) and small (bytes)."""
    if isinstance(plan.opts.batch_size, int) or plan.opts.timeout is not None:
        return chunk_size
    if (elapsed > 2.0 or window_bytes > READAHEAD_BYTES) and chunk_size > 1:
        return chunk_size // 2
    if elapsed < 0.2 and window_bytes * 2 <= READAHEAD_BYTES and chunk_size < MAX_IMAP_CHUNK:
        return min(chunk_size * 2, MAX_IMAP_CHUNK)
    return chunk_size
