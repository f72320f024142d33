"""The cluster route on dask.distributed: ``self`` scattered once per map call.

Three things joblib's ``DaskDistributedBackend`` does not do for us, and how
:class:`ClusterDaskBackend` (a subclass: joblib's documented extension
point, built per call from the user's backend with the same client and
``submit`` arguments) does them:

* **Never in the caller.** joblib's backend reports as many jobs as the
  cluster has worker threads (``sum(client.ncores().values())``), and
  ``joblib.Parallel.__call__`` runs every task *in the calling process*
  when that number is 1 (its ``n_jobs == 1`` shortcut): a one-worker
  cluster, or one whose other worker is being restarted, would run the
  method in the caller. :meth:`ClusterDaskBackend.effective_n_jobs` never
  reports fewer than 2 (the tasks then simply queue on the scheduler).
  0 (no worker after ``wait_for_workers_timeout``) is reported as joblib does.
* **Scatter once, survive its loss.** ``self`` is pickled once per map and
  its bytes scattered once with ``broadcast=True`` and ``hash=False`` (dask's
  own ``scatter``/``Client.map`` of the object would tokenize it: seconds
  for a 50 MB dict). The tasks carry a small :class:`ClusterBlob`; joblib's
  pre-scatter table (``data_futures``, what ``scatter=`` fills) swaps it for
  the scattered Future at submit time, and dask hands the worker the bytes.
  The broadcast happens when a run's first task is submitted (from the
  calling thread; later submits come from the client's event loop, which
  must not block). Scattered data has no lineage: when every worker holding
  it dies, dask logs that it "lost scattered data, which can't be recovered"
  and cancels what depends on it (a pool failure: see below). Then the blob
  is no longer swapped (joblib scatters the blob itself for the rest of that
  run, as it does for any large argument), and the next run of the recovery
  loop broadcasts it again, so the re-run items and the next map find it.
* **Dead workers are pool failures** (``KilledWorker``, or
  ``FutureCancelledError`` for tasks whose input died with a worker):
  the recovery state machine (_recovery) re-runs or fails exactly the items
  that were in flight. joblib's backend never tells ``Parallel`` about a
  ``KilledWorker`` (it sets it on its own future only, so the call would
  wait forever); :meth:`ClusterDaskBackend.submit` delivers it.
  Before that, dask itself re-runs a task whose worker died on other
  workers, up to ``distributed.scheduler.allowed-failures`` (3) more times:
  on dask an item that kills its worker runs up to 4 times per run of ours
  (set it to 0 on the scheduler for the counts of the other backends).

Timeouts: dask cannot stop a running task. ``timeout=`` raises in the caller
once the limit has passed; the map's other tasks are cancelled
(:meth:`ClusterDaskBackend.abort_everything`: queued ones never start); the
task that ran past the limit keeps its worker thread until the method
returns, and its result is discarded.

Each worker process rebuilds ``self`` at most once per distinct state (the
state cache of local workers, _statecache) and keeps it for later calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from ._compat import batch_calls, dask_backend_class, dask_copy_scattered, dask_take_pending
from ._dispatch import InlineHandle
from ._serialize import Payload

__all__ = ["ClusterBlob", "blobs_in", "cluster_backend", "scatter_payload"]


class ClusterBlob:
    """``self``'s bytes for one map call, and where a cluster holds them.

    Travels in every task's arguments; the engine's backend ships it once,
    when the call's first task is submitted: dask swaps it for the scattered
    Future (:class:`_PreScattered`), Ray reduces it to an object-store
    reference (:meth:`put_ray`, :func:`parallelmethods._ray.fetch_blob`).
    Anything else that pickles it (a backend we do not know) sends the bytes
    themselves, so a task never receives a stale reference.
    """

    __slots__ = ("__weakref__", "_lock", "client", "data", "future", "ref")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.future: Any = None  # dask: the scattered Future, on ``client``
        self.client: Any = None
        self.ref: Any = None  # Ray: the ObjectRef of the bytes in the object store
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        if self.ref is not None:
            from ._ray import fetch_blob

            return fetch_blob, (self.ref,)
        return bytes, (self.data,)

    def __sizeof__(self) -> int:  # dask's sizeof: joblib scatters arguments above 1 kB
        return len(self.data) + 64

    # -- dask ------------------------------------------------------------------
    def live_future(self, client: Any) -> Any:
        """The Future of the bytes on ``client``'s cluster while it still holds them, else None."""
        future = self.future
        if future is None or self.client is not client or future.status != "finished":
            return None
        return future

    def scatter(self, client: Any) -> None:
        """Scatter the bytes to every worker of ``client`` unless they are there already."""
        with self._lock:
            if self.live_future(client) is not None:
                return
            old = self.future
            # broadcast: every worker needs the bytes, and a copy on each
            # survives the death of any one of them.
            self.future = client.scatter(self.data, hash=False, broadcast=True)
            self.client = client
        if old is not None:
            with contextlib.suppress(Exception):
                old.release()

    # -- Ray -------------------------------------------------------------------
    def put_ray(self) -> None:
        """Put the bytes in Ray's object store, once."""
        with self._lock:
            if self.ref is None:
                from ._ray import put_bytes

                self.ref = put_bytes(self.data)

    def release(self) -> None:
        with self._lock:
            future, self.future, self.client = self.future, None, None
            self.ref = None  # Ray frees the object once no task holds it
        if future is not None:
            with contextlib.suppress(Exception):  # the client may be closed already
                future.release()


#: The blobs of the maps running now, by id: what _PreScattered looks up.
_LIVE: weakref.WeakValueDictionary[int, ClusterBlob] = weakref.WeakValueDictionary()


@contextlib.contextmanager
def scatter_payload(payload: Payload, lineage: str = "") -> Iterator[tuple[InlineHandle, ClusterBlob]]:
    """``self``'s payload for the cluster route: ``(handle, blob)``; released afterwards.

    Ships nothing by itself: the engine's backend (dask's or Ray's, both
    ours) ships the blob when the call's first task is submitted, so this
    works for every cluster engine (_transport calls it for the route).
    """
    blob = ClusterBlob(b"".join([payload.main, *(bytes(b) for b in payload.buffers)]))
    _LIVE[id(blob)] = blob
    try:
        yield InlineHandle(payload.digest, len(payload.main), tuple(b.nbytes for b in payload.buffers), lineage), blob
    finally:
        _LIVE.pop(id(blob), None)
        blob.release()


def blobs_in(func: Any) -> list[ClusterBlob]:
    """The blobs among the arguments of a joblib batch.

    Why ``func.items``: a joblib ``BatchedCalls`` holds its ``(function,
    args, kwargs)`` triples there (joblib 1.3 to 1.6; joblib's own dask
    backend reads it the same way in ``_to_func_args``). Our tasks pass the
    blob as a top-level positional argument of run_chunk.
    """
    found: list[ClusterBlob] = []
    for call in batch_calls(func):
        try:
            _, args, _ = call
        except (TypeError, ValueError):
            continue
        found.extend(a for a in args if type(a) is ClusterBlob)
    return found


def _in_loop_of(client: Any) -> bool:
    """Whether this thread runs ``client``'s event loop (where a blocking scatter would deadlock)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return running is getattr(client.loop, "asyncio_loop", running)


class _PreScattered:
    """joblib's ``data_futures`` table (``id(arg) -> Future``, what ``scatter=`` fills) plus our live blobs."""

    def __init__(self, user: dict[int, Any], client: Any) -> None:
        self.user = user
        self.client = client

    def get(self, key: int, default: Any = None) -> Any:
        blob = _LIVE.get(key)
        if blob is not None:
            # None when the cluster lost it (or it was never scattered): joblib
            # then scatters the blob itself for this run, as any large argument;
            # the next run's first submit broadcasts it again.
            return blob.live_future(self.client)
        return self.user.get(key, default)


class _Failed:
    """A dask-level task error (not the method's: those come back as values), on its way to joblib."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_CLASS: type | None = None


def _cluster_class() -> type:
    """joblib's DaskDistributedBackend, subclassed on first use (importing parallelmethods never imports dask)."""
    global _CLASS
    if _CLASS is None:
        base: Any = dask_backend_class()  # what parallel_config(backend="dask") builds

        class ClusterDaskBackend(base):  # type: ignore[misc,valid-type]
            """joblib's dask backend that never runs a task in the caller and re-sends lost blobs (module docstring)."""

            @property
            def data_futures(self) -> Any:
                return _PreScattered(self.__dict__.get("_pm_user_scattered", {}), self.client)

            @data_futures.setter
            def data_futures(self, value: dict[int, Any]) -> None:
                self.__dict__["_pm_user_scattered"] = value

            def effective_n_jobs(self, n_jobs: Any) -> int:
                n = int(super().effective_n_jobs(n_jobs))
                # joblib runs n_jobs == 1 in the caller: never on a cluster.
                return n if n == 0 else max(n, 2)

            def submit(self, func: Any, callback: Any = None) -> Any:
                # The first submit of a run comes from the calling thread:
                # broadcast the blob (again, if the cluster lost it). Later
                # ones come from the client's event loop, which must not block.
                if not _in_loop_of(self.client):
                    for blob in blobs_in(func):
                        blob.scatter(self.client)
                future = super().submit(func, callback)
                if callback is not None:
                    # joblib's _collect hands a dask-level error (KilledWorker:
                    # the task's workers kept dying) to the future but never to
                    # joblib's callback, so Parallel would wait forever
                    # (joblib 1.4 to 1.6). Deliver it as the task's outcome.
                    def on_error(done: Any) -> None:
                        if not done.cancelled() and done.exception() is not None:
                            callback(_Failed(done.exception()))

                    future.add_done_callback(on_error)
                return future

            def abort_everything(self, ensure_ready: bool = True) -> None:
                # joblib's only forgets the call's futures locally; its
                # _results table keeps them (and so their tasks) alive while
                # this backend lives, which is the whole map under recovery.
                # Cancel them: queued tasks are dropped; a running one cannot
                # be stopped and finishes on its worker, result discarded.
                pending = dask_take_pending(self, clear=False)  # before joblib's abort
                super().abort_everything(ensure_ready)
                dask_take_pending(self)  # then empty the tables
                if pending and not _in_loop_of(self.client):
                    with contextlib.suppress(Exception):  # a closed client: nothing left to cancel
                        self.client.cancel(pending)

            def retrieve_result_callback(self, out: Any) -> Any:
                if isinstance(out, _Failed):
                    raise out.error
                return super().retrieve_result_callback(out)

        ClusterDaskBackend.__module__ = __name__
        _CLASS = ClusterDaskBackend
    return _CLASS


def cluster_backend(backend: Any) -> Any:
    """Our dask backend for one call: the same client, ``submit`` arguments and ``scatter=`` data as ``backend``."""
    cls = _cluster_class()
    if isinstance(backend, cls):
        return backend
    new = cls(
        client=backend.client,
        wait_for_workers_timeout=getattr(backend, "wait_for_workers_timeout", 10),
        **dict(getattr(backend, "submit_kwargs", None) or {}),
    )
    new.data_futures = dict(getattr(backend, "data_futures", None) or {})
    dask_copy_scattered(backend, new)
    new.nesting_level = getattr(backend, "nesting_level", None)
    return new
