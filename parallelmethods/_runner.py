"""Parent side of a map: choose the route for ``self``, cut chunks, drive joblib.

See the data-flow diagram at the top of ``_dispatch.py``. This module owns
steps 1-4 and 6: options, route, chunks, ``joblib.Parallel``, results and the
mapping of pool failures (dead workers, timeouts) to our errors, including
re-running items that were lost with a dead pool (``on_error="return"``,
``retries=``).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator

from joblib import Parallel, delayed

from ._compat import add_note
from ._dispatch import RemoteError, run_chunk
from ._mpwatch import WorkerDied
from ._options import Options
from ._plan import Plan, plan_for
from ._serialize import dumps_value, loads_value, serialization_error
from ._transport import Shipment, shipped
from .errors import ParallelMethodsError, WorkerCrashedError

if TYPE_CHECKING:
    from ._descriptor import BoundParallelMethod

__all__ = ["run_map", "run_imap"]

#: imap keeps at most this many chunks per worker in flight or buffered.
READAHEAD_PER_WORKER = 2


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
    except Exception as e:  # noqa: BLE001
        raise serialization_error(plan.spec[3:5], e, what="the arguments fixed with .partial()") from e


def _items_payload(first: int, items: list[Any], serialized: bool, star: bool) -> Any:
    if not serialized:
        return items
    try:
        return dumps_value(items)
    except Exception as e:  # noqa: BLE001 - name the item and argument
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


class _PoolFailure(Exception):
    """The pool itself failed (dead worker, timeout); ``error`` is what to raise."""

    def __init__(self, error: BaseException, dispatched: set[int], completed: set[int]) -> None:
        super().__init__(str(error))
        self.error = error
        self.dispatched = dispatched
        self.completed = completed


def _exit_codes(err: BaseException) -> tuple[int, ...]:
    import re

    codes = getattr(err, "exitcodes", None)
    if codes:
        return tuple(codes)
    return tuple(int(c) for c in re.findall(r"\((-?\d+)\)", str(err)))


def _describe_items(items: list[int]) -> str:
    items = sorted(items)
    if not items:
        return "none"
    shown = ", ".join(map(str, items[:10]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > 10 else "")


def _map_pool_error(plan: Plan, err: BaseException, in_flight: list[int]) -> BaseException:
    from joblib.externals.loky.process_executor import BrokenProcessPool, TerminatedWorkerError

    if isinstance(err, (TerminatedWorkerError, BrokenProcessPool, WorkerDied)) or _is_dask_crash(err):
        codes = _exit_codes(err)
        how = ", ".join(_signal_name(c) for c in codes) if codes else "unknown exit status"
        msg = (
            f"a worker process died while running {plan.label} ({how}). Likely causes: "
            "os._exit() or sys.exit() in the method, a segfault in native code, or the OOM killer. "
            f"Items in flight: {_describe_items(in_flight)}. The pool was restarted; the next map works. "
            "Use on_error='return' or retries=N to keep the other results."
        )
        return WorkerCrashedError(msg, method=plan.label, exitcodes=codes, items=tuple(sorted(in_flight)))
    if isinstance(err, (TimeoutError, multiprocessing.TimeoutError)):
        msg = (
            f"{plan.label} took longer than timeout={plan.opts.timeout}s on an item "
            f"(in flight: {_describe_items(in_flight)}). "
            + ("Process workers were stopped and replaced." if plan.route != "reference" else "The thread cannot be stopped and finishes in the background.")
        )
        return TimeoutError(msg)
    return err


def _is_dask_crash(err: BaseException) -> bool:
    # dask retries a task whose worker died (distributed.scheduler.allowed-failures),
    # then raises KilledWorker; data lost with the worker cancels its dependents.
    return type(err).__name__ in ("KilledWorker", "FutureCancelledError")


def _signal_name(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


class _Executor:
    """Runs chunks through joblib; yields decoded chunk results as they complete."""

    def __init__(self, plan: Plan, shipment: Shipment) -> None:
        self.plan = plan
        self.handle = shipment.handle
        self.blob = shipment.blob
        self.serialized = plan.route != "reference"
        self.star = bool(plan.spec[-1])
        self.spec = _spec_payload(plan, self.serialized)

    def run(self, chunks: list[tuple[int, list[Any]]], timeout: float | None) -> Iterator[tuple[int, list[Any], bool, bool]]:
        plan = self.plan
        dispatched: set[int] = set()
        completed: set[int] = set()

        def tasks() -> Iterator[Any]:
            for first, items in chunks:
                payload = _items_payload(first, items, self.serialized, self.star)
                dispatched.add(first)
                yield delayed(run_chunk)(self.handle, self.spec, first, payload, self.serialized, self.blob)

        return_as = "generator_unordered" if plan.backend.supports_return_generator else "list"
        parallel = Parallel(n_jobs=plan.n_jobs, backend=plan.backend, batch_size=1, timeout=timeout, return_as=return_as)
        outputs: Any = None
        try:
            # "list" (multiprocessing) raises here; generators raise while iterated.
            outputs = parallel(tasks())
            for out in outputs:
                decoded = self._decode(out)
                completed.add(decoded[0])
                yield decoded
        except ParallelMethodsError:
            raise
        except (TimeoutError, multiprocessing.TimeoutError, WorkerDied) as e:
            raise _PoolFailure(e, dispatched, completed) from e
        except Exception as e:
            from joblib.externals.loky.process_executor import BrokenProcessPool, TerminatedWorkerError

            if isinstance(e, (TerminatedWorkerError, BrokenProcessPool)) or _is_dask_crash(e):
                raise _PoolFailure(e, dispatched, completed) from e
            raise
        finally:
            if hasattr(outputs, "close"):
                # We stop early on purpose (an error, an abandoned imap):
                # joblib's "generator was gc'ed before being consumed" warning
                # describes our own decision, not a user mistake.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r".*(tasks which were still being processed|successfully executed  but not used)")
                    outputs.close()

    def _decode(self, out: Any) -> tuple[int, list[Any], bool, bool]:
        if not self.serialized:
            return out  # type: ignore[no-any-return]
        try:
            return loads_value(out)  # type: ignore[no-any-return]
        except Exception as e:  # noqa: BLE001
            msg = (
                f"the results of {self.plan.label} could not be rebuilt in the caller "
                f"({type(e).__name__}: {e}); a returned object's class may fail to unpickle here. "
                "Return plain data, or use backend='threading'."
            )
            raise ParallelMethodsError(msg) from e


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


def _chunks(start: int, items: list[tuple[Any, ...]], size: int) -> list[tuple[int, list[tuple[Any, ...]]]]:
    return [(start + i, items[i : i + size]) for i in range(0, len(items), size)]


def _rebuild_error(plan: Plan, err: RemoteError) -> BaseException:
    if err.exc is not None:
        exc = err.exc
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
    add_note(exc, f"parallelmethods: raised by {plan.label} on item {err.index}")
    return exc


class _Collector:
    """Turns completed chunks into result lists; handles errors, progress, mutations."""

    def __init__(self, plan: Plan, total: int | None) -> None:
        self.plan = plan
        self.mutated = False
        from ._progress import make_bar

        self.bar = make_bar(plan, total)

    def accept(self, first: int, results: list[Any], mutated: bool, had_error: bool) -> list[Any]:
        if had_error:  # the worker says so: clean chunks skip this scan
            for offset, value in enumerate(results):
                if isinstance(value, RemoteError):
                    exc = _rebuild_error(self.plan, value)
                    if self.plan.opts.on_error == "raise":
                        raise exc
                    results[offset] = exc
        if mutated and not self.mutated and self.plan.route != "reference":
            self.mutated = True
            warnings.warn(
                f"{self.plan.label} changed self in a worker process; that change is lost "
                "(workers have copies). Return the new values instead, or use backend='threading'.",
                RuntimeWarning,
                stacklevel=5,
            )
        if self.bar is not None:
            self.bar.update(len(results))
        return results

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_items(plan: Plan, executor: _Executor, collector: _Collector, start: int, items: list[Any], chunk_size: int) -> Iterator[tuple[int, list[Any]]]:
    """Run ``items`` (indices ``start``...), yielding ``(first index, results)`` per chunk.

    Recovery from pool failures (dead worker, timeout), when the options ask
    for it: chunks never sent run again as they were; items that were in
    flight run again one by one, alone ("isolation"), so that a second
    failure is known to be that item's own and counts against ``retries``.
    """
    timeout = plan.opts.timeout
    attempts: dict[int, int] = {}
    recover = plan.opts.on_error == "return" or plan.opts.retries > 0
    todo = _chunks(start, items, chunk_size)
    suspects: list[tuple[int, Any]] = []
    while todo or suspects:
        if suspects:
            index, item = suspects.pop(0)
            run_chunks = [(index, [item])]
        else:
            run_chunks, todo = todo, []
        unfinished = dict(run_chunks)
        try:
            for first, results, mutated, had_error in executor.run(run_chunks, timeout):
                del unfinished[first]
                yield first, collector.accept(first, results, mutated, had_error)
        except _PoolFailure as failure:
            lost = [(f + i, x) for f, c in unfinished.items() if f in failure.dispatched for i, x in enumerate(c)]
            error = _map_pool_error(plan, failure.error, [i for i, _ in lost])
            if not recover:
                raise error from failure.error
            if len(run_chunks) == 1 and len(run_chunks[0][1]) == 1:
                index, item = run_chunks[0][0], run_chunks[0][1][0]
                attempts[index] = attempts.get(index, 0) + 1
                if attempts[index] <= plan.opts.retries:
                    suspects.insert(0, (index, item))
                elif plan.opts.on_error == "raise":
                    raise error from failure.error
                else:
                    error.__cause__ = failure.error
                    add_note(error, f"parallelmethods: raised by {plan.label} on item {index}")
                    if collector.bar is not None:
                        collector.bar.update(1)
                    yield index, [error]
            else:
                suspects.extend(lost)
            todo = [(f, c) for f, c in unfinished.items() if f not in failure.dispatched]


def run_map(bound: BoundParallelMethod[Any, Any], layer: Options, items_in: Any) -> list[Any]:
    """``map``/``starmap``: materialize the input, run, return results in order."""
    plan = plan_for(bound, layer, star=items_in.star)
    items = list(items_in.iterator)
    if not items:
        return []
    results: list[Any] = [None] * len(items)
    collector = _Collector(plan, len(items))
    try:
        with shipped(plan) as shipment:
            executor = _Executor(plan, shipment)
            for first, values in _run_items(plan, executor, collector, 0, items, _auto_chunk(plan, len(items))):
                results[first : first + len(values)] = values
    finally:
        collector.close()
    return results


def run_imap(bound: BoundParallelMethod[Any, Any], layer: Options, items_in: Any) -> Iterator[Any]:
    """``imap``: plan now (errors at the call), run lazily in bounded windows."""
    plan = plan_for(bound, layer, star=items_in.star)
    return _imap(plan, items_in.iterator)


def _imap(plan: Plan, items_iter: Iterator[Any]) -> Iterator[Any]:
    window_chunks = READAHEAD_PER_WORKER * max(1, plan.effective_n_jobs)
    chunk_size = plan.opts.batch_size if isinstance(plan.opts.batch_size, int) else 1
    collector = _Collector(plan, None)
    try:
        with shipped(plan) as shipment:
            executor = _Executor(plan, shipment)
            start = 0
            while True:
                window = list(itertools.islice(items_iter, window_chunks * chunk_size))
                if not window:
                    return
                t0 = time.perf_counter()
                if plan.opts.ordered:
                    buffered: dict[int, list[Any]] = {}
                    next_index = start
                    for first, values in _run_items(plan, executor, collector, start, window, chunk_size):
                        buffered[first] = values
                        while next_index in buffered:
                            ready = buffered.pop(next_index)
                            yield from ready
                            next_index += len(ready)
                else:
                    for _, values in _run_items(plan, executor, collector, start, window, chunk_size):
                        yield from values
                start += len(window)
                chunk_size = _grow_chunk(plan, chunk_size, time.perf_counter() - t0, window_chunks)
    finally:
        collector.close()


def _grow_chunk(plan: Plan, chunk_size: int, elapsed: float, window_chunks: int) -> int:
    """imap's auto batching: grow chunks while a window is cheap (< 0.2 s)."""
    if isinstance(plan.opts.batch_size, int) or plan.opts.timeout is not None:
        return chunk_size
    if elapsed < 0.2 and chunk_size < 4096:
        return chunk_size * 2
    if elapsed > 2.0 and chunk_size > 1:
        return chunk_size // 2
    return chunk_size


