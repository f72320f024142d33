"""The cluster route on Ray: ``self`` put in Ray's object store once per map call.

``backend="ray"`` (after ``ray.util.joblib.register_ray()``, as an option or
through ``joblib.parallel_config``) names joblib's ``RayBackend``. That
backend runs a ``ray.util.multiprocessing.Pool`` of new actor processes for
every ``Parallel`` call (measured here: 0.5 to 0.9 s per call before any
work, and new processes each time, so no worker could keep a rebuilt
``self`` between calls), and it rewires joblib's own ``PicklingPool`` to
Ray's pool for the whole process. :class:`RayTaskBackend` keeps what the user
configured (``ray_remote_args``, the connected cluster) and runs each chunk
as a plain Ray task instead (``ray.remote`` + ``ObjectRef.future()``, Ray's
documented API) on Ray's long-lived worker processes:

* ``self``'s bytes go to the object store once per map (``ray.put`` of a
  ``uint8`` array, :func:`put_bytes`, when the map's first task is
  submitted: the cluster route's blob, _dask.ClusterBlob); every task
  carries the small reference, and each worker reads the bytes without a copy from its node's
  store (:func:`fetch_blob`) and rebuilds ``self`` at most once per distinct
  state (_statecache), keeping it for later calls.
* Tasks run with ``max_retries=0`` unless ``ray_remote_args`` says otherwise:
  the recovery state machine (_recovery) owns re-runs, so an item's
  execution count is the one the docs state. A dead worker is Ray's
  ``WorkerCrashedError`` (``OutOfMemoryError`` when Ray's memory monitor
  killed it, ``NodeDiedError`` ...: :func:`is_pool_failure`), raised to
  joblib as :class:`RayWorkerDied`, the recovery state machine's
  ``WorkerDied``: the items in flight are re-run or become
  ``WorkerCrashedError``, as on every process backend.
* Never in the caller: :meth:`RayTaskBackend.effective_n_jobs` is at least 2,
  so joblib's ``n_jobs == 1`` shortcut (run in the calling process) never
  applies.
* Timeouts: the task that ran past the limit is cancelled with
  ``ray.cancel(force=True)``, which kills the worker process running it;
  Ray starts a new one when needed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ._compat import ParallelBackendBase
from ._dask import blobs_in
from ._mpwatch import WorkerDied

__all__ = ["RAY_POOL_FAILURES", "RayTaskBackend", "fetch_blob", "is_pool_failure", "is_ray_backend", "put_bytes"]

#: ``ray.exceptions`` that mean the task's worker (or node, or its input) is
#: gone, not that the method raised (that comes back as a value: run_chunk).
#: Checked on Ray 2.60 (the same names exist since Ray 2.0).
RAY_POOL_FAILURES = (
    "WorkerCrashedError",
    "OutOfMemoryError",
    "NodeDiedError",
    "LocalRayletDiedError",
    "ObjectLostError",
    "ObjectFetchTimedOutError",
    "OwnerDiedError",
    "ObjectReconstructionFailedError",
    "ObjectReconstructionFailedMaxAttemptsExceededError",
    "ObjectReconstructionFailedLineageEvictedError",
    "TaskCancelledError",
    "TaskUnschedulableError",
)


def is_pool_failure(err: BaseException) -> bool:
    """A Ray error that means "the worker died" (or its node, or its input), by class name and module.

    A ``RayTaskError`` is never one: the task ran and raised (Ray builds a
    class deriving from both it and the raised type, so its MRO may hold
    any of the names above).
    """
    mro = type(err).__mro__
    if any(k.__name__ == "RayTaskError" for k in mro):
        return False
    return any(klass.__name__ in RAY_POOL_FAILURES and (klass.__module__ or "").startswith("ray.") for klass in mro)


class RayWorkerDied(WorkerDied):
    """A Ray task lost to its worker (or node): what _recovery counts as a dead worker."""

    def __init__(self, error: BaseException) -> None:
        said = str(error).strip().splitlines()
        RuntimeError.__init__(self, f"a Ray worker died ({type(error).__name__}: {said[0] if said else ''})")
        self.exitcodes: tuple[int, ...] = ()  # Ray reports none
        self.pids: tuple[int, ...] = ()

    def __reduce__(self) -> Any:
        return (RuntimeError, (str(self),))


def is_ray_backend(backend: Any) -> bool:
    """Ray's joblib backend (``ray.util.joblib.ray_backend.RayBackend``, a subclass) or ours."""
    if isinstance(backend, RayTaskBackend):
        return True
    return any(k.__name__ == "RayBackend" and (k.__module__ or "").startswith("ray.") for k in type(backend).__mro__)


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        msg = "backend='ray' needs Ray: pip install 'parallelmethods[ray]', then ray.init() (or ray.init(address=...))"
        raise ImportError(msg) from None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()  # as Ray's own joblib backend does: RAY_ADDRESS names the cluster
        else:
            msg = (
                "backend='ray' runs on the connected Ray cluster, and this process is not connected to one. "
                "Connect first: `import ray; ray.init()` starts a local one, "
                "ray.init(address='ray://head:10001') (or RAY_ADDRESS) joins an existing one."
            )
            raise ValueError(msg)
    return ray


def _run_batch(func: Any) -> Any:
    """The Ray task: one joblib batch (a chunk of items through run_chunk)."""
    return func()


_REMOTE: Any = None


def _remote() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(_run_batch)
    return _REMOTE


class RayTaskBackend(ParallelBackendBase):  # type: ignore[misc]
    """Runs joblib batches as Ray tasks on the connected cluster (see the module docstring)."""

    supports_retrieve_callback = True
    uses_threads = False
    supports_sharedmem = False
    default_n_jobs = -1

    def __init__(
        self,
        ray_remote_args: dict[str, Any] | None = None,
        force_cancel: bool = False,
        nesting_level: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level if nesting_level is not None else 0, **kwargs)
        self.ray_remote_args = dict(ray_remote_args or {})
        self.force_cancel = force_cancel
        self._running: dict[Any, Any] = {}  # concurrent.futures.Future -> ObjectRef

    @classmethod
    def from_backend(cls, backend: Any, force_cancel: bool = False) -> RayTaskBackend:
        """Ours for one call, with the ``ray_remote_args`` of ``backend`` (Ray's RayBackend)."""
        if isinstance(backend, RayTaskBackend):
            return cls(backend.ray_remote_args, force_cancel=force_cancel or backend.force_cancel)
        args = getattr(backend, "ray_remote_args", None) or (getattr(backend, "backend_kwargs", None) or {}).get(
            "ray_remote_args"
        )
        return cls(args, force_cancel=force_cancel)

    def __reduce__(self) -> tuple[Any, ...]:
        return RayTaskBackend, (self.ray_remote_args,)

    def effective_n_jobs(self, n_jobs: Any) -> int:
        ray = _require_ray()
        if n_jobs == 0:
            msg = "n_jobs == 0 in Parallel has no meaning"
            raise ValueError(msg)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if n_jobs is None or n_jobs < 0:
            n = max(cpus + 1 + (n_jobs if n_jobs is not None else -1), 1)
        else:
            n = int(n_jobs)
        # joblib runs n_jobs == 1 in the caller: never on a cluster.
        return max(n, 2)

    def configure(
        self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **backend_args: Any
    ) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def _options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"max_retries": 0}
        opts.update(self.ray_remote_args)
        return opts

    def submit(self, func: Any, callback: Any = None) -> Any:
        for blob in blobs_in(func):
            blob.put_ray()  # once per map: every task carries the reference
        ref = _remote().options(**self._options()).remote(func)
        future = ref.future()
        self._running[future] = ref
        future.add_done_callback(lambda f: self._running.pop(f, None))
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Any) -> Any:
        try:
            return future.result()
        except Exception as error:
            if is_pool_failure(error):
                # The recovery state machine's name for a dead worker.
                raise RayWorkerDied(error) from error
            raise

    def abort_everything(self, ensure_ready: bool = True) -> None:
        import ray

        for ref in list(self._running.values()):
            with contextlib.suppress(Exception):  # finished meanwhile
                # force=True (timeouts) kills the worker process running the
                # task; otherwise a queued task is dropped and a running one
                # gets KeyboardInterrupt (its worker lives on).
                ray.cancel(ref, force=self.force_cancel)
        self._running.clear()

    def terminate(self) -> None:
        self._running.clear()


def put_bytes(data: bytes) -> Any:
    """``data`` in Ray's object store (once per map: ClusterBlob.put_ray), as a ``uint8`` array.

    Why an array and not bytes: workers get it back without a copy (a view
    of their node's shared object store), and ``self``'s out-of-band buffers
    (numpy arrays) stay views of it.
    """
    import numpy as np
    import ray

    return ray.put(np.frombuffer(data, dtype=np.uint8))


def fetch_blob(ref: Any) -> Any:
    """In a Ray worker, while the task's arguments are unpickled: the bytes behind ``ref``."""
    import ray

    return ray.get(ref)
