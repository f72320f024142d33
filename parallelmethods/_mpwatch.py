"""joblib's multiprocessing backend, plus a watchdog for dead workers.

Why: ``multiprocessing.Pool`` silently replaces a worker that died
(``os._exit``, SIGKILL, OOM) and the task it held never completes, so
``joblib.Parallel(backend="multiprocessing")`` waits forever. This subclass
(joblib's documented extension point, a ``ParallelBackendBase``) watches the
pool's processes; when one ends, every pending task's callback is called with
:class:`WorkerDied`, which joblib reports as the task's error, aborting the
call and terminating the pool.

It is used for joblib's own ``MultiprocessingBackend`` only (_plan swaps
that exact class for this one): a user's own subclass is never replaced,
so it is not watched either (Ray's ``RayBackend`` is routed to the cluster
by _plan and never reaches this module).

joblib 1.4 schedules tasks with ``backend.apply_async``; 1.5 renamed it
``submit`` (and calls only that). Both are overridden here, so the watchdog
sees every task on 1.4.2 to 1.6.0.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from typing import Any

from ._compat import (
    FallbackToBackend,
    MultiprocessingBackend,
    SequentialBackend,
    backend_kwargs,
    memmapping_pool,
    outqueue_write_lock,
    pool_processes,
    undo_ray_pool_patch,
)
from ._results import OutOfBand, decode

__all__ = ["WatchedMultiprocessingBackend", "WorkerDied"]

POLL_SECONDS = 0.05


class WorkerDied(RuntimeError):
    """A pool worker process ended while tasks were pending."""

    def __init__(self, exitcodes: tuple[int, ...], pids: tuple[int, ...] = ()) -> None:
        super().__init__(f"a multiprocessing pool worker died (exit codes {exitcodes})")
        self.exitcodes = exitcodes
        self.pids = pids  # the dead workers, seen before the pool kills the others (_board)

    def __reduce__(self) -> Any:
        return (WorkerDied, (self.exitcodes, self.pids))


class _Died:
    def __init__(self, exitcodes: tuple[int, ...], pids: tuple[int, ...]) -> None:
        self.exitcodes = exitcodes
        self.pids = pids


class WatchedMultiprocessingBackend(MultiprocessingBackend):  # type: ignore[misc]
    """``MultiprocessingBackend`` that fails fast instead of hanging on a dead worker."""

    def configure(
        self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **pool_kwargs: Any
    ) -> int:
        # MultiprocessingBackend.configure (joblib 1.6), minus its gc.collect()
        # before forking: with a large self (1M tuples) that costs ~60 ms per
        # map and frees nothing we need, as the fork shares pages copy-on-write.
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        undo_ray_pool_patch()  # our workers must be our own forked processes (see _compat)
        self._pool = memmapping_pool(n_jobs, **{**backend_kwargs(self), **pool_kwargs})
        self.parallel = parallel
        self._pending: dict[int, Any] = {}
        self._keys = itertools.count()
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        # Snapshot now: Pool.__init__ has started every worker, and one that
        # dies before our first poll is reaped and replaced by the pool's own
        # maintenance thread; we would never see it.
        workers = pool_processes(self._pool)
        self._watchdog = threading.Thread(
            target=self._watch, args=(self._pool, self._stop, workers), name="parallelmethods-mp-watchdog", daemon=True
        )
        self._watchdog.start()
        return n_jobs  # type: ignore[no-any-return]

    def submit(self, func: Any, callback: Any = None) -> Any:
        # A counter, not id(func): joblib drops the batch object once it is
        # sent, so a later batch can reuse its id while the first still runs.
        key = next(self._keys)

        def done(out: Any) -> None:
            with self._pending_lock:
                cb = self._pending.pop(key, None)
            if cb is not None:
                cb(out)

        with self._pending_lock:
            self._pending[key] = callback
        parent = super()
        # joblib 1.5+: PoolManagerMixin.submit; joblib 1.4: its apply_async.
        schedule = getattr(parent, "submit", None) or getattr(parent, "apply_async")  # noqa: B009
        return schedule(func, callback=done)

    def apply_async(self, func: Any, callback: Any = None) -> Any:
        # joblib 1.4's Parallel calls this name (1.5+ calls submit only).
        return self.submit(func, callback=callback)

    def retrieve_result_callback(self, result: Any) -> Any:
        if isinstance(result, _Died):
            raise WorkerDied(result.exitcodes, result.pids)
        out = super().retrieve_result_callback(result)
        # Rebuild each chunk's results here, in the pool's result thread, as
        # they arrive: joblib gives the main thread a multiprocessing run's
        # results only when the whole run ends, so decoding there would add
        # to the run's time instead of overlapping the workers' (W6b).
        if isinstance(out, list):
            out = [decode(o) if isinstance(o, (bytes, OutOfBand)) else o for o in out]
        return out

    def _watch(self, pool: Any, stop: threading.Event, seen: list[Any]) -> None:
        while not stop.wait(POLL_SECONDS):
            # The pool's own maintenance thread removes dead workers from its
            # list, so we keep every one we have seen and read its exit code.
            for proc in pool_processes(pool):
                if proc not in seen:
                    seen.append(proc)
            ended = [p for p in seen if p.exitcode is not None]
            dead = tuple(p.exitcode for p in ended)
            if dead and not stop.is_set():
                with self._pending_lock:
                    callbacks = list(self._pending.values())
                    self._pending.clear()
                for cb in callbacks:
                    if cb is not None:
                        cb(_Died(dead, tuple(p.pid for p in ended)))
                return

    def terminate(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()  # before the pool's own SIGTERMs, which are not crashes
        pool = getattr(self, "_pool", None)
        ended = threading.Event()
        if pool is not None:
            threading.Thread(
                target=_unstick, args=(pool, ended), name="parallelmethods-mp-unstick", daemon=True
            ).start()
        try:
            super().terminate()
        finally:
            ended.set()


#: How long the result lock may stay taken once every worker is dead before it is released.
STUCK_SECONDS = 1.0


def _unstick(pool: Any, ended: threading.Event) -> None:
    """Release the pool's result lock if a dead worker holds it, so that ``terminate()`` ends.

    Why: a worker killed while sending a result (the pool's own SIGTERM, a
    SIGKILL) holds ``outqueue``'s write lock for ever, and ``Pool.terminate()``
    waits on it (see ``_compat.outqueue_write_lock``). Only once every worker
    is dead and the lock has stayed taken for :data:`STUCK_SECONDS` is it
    released, once: then no living process can hold it.
    """
    lock = outqueue_write_lock(pool)
    if lock is None:
        return
    taken_since: float | None = None
    while not ended.wait(POLL_SECONDS):
        # A worker the pool already removed from its list was dead and joined.
        if any(p.exitcode is None for p in pool_processes(pool)):
            taken_since = None
            continue
        if lock.acquire(False):
            lock.release()
            taken_since = None
            continue
        now = time.monotonic()
        if taken_since is None:
            taken_since = now
        elif now - taken_since >= STUCK_SECONDS:
            with contextlib.suppress(ValueError):
                lock.release()  # held by a dead worker: nobody else will
            return
