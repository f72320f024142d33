"""Version shims (attrs' ``_compat.py`` in spirit)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

# Why: routing (_plan) tells "exactly joblib's own multiprocessing/loky
# backend" (ours to watch, or to give a file) from a user's subclass of it
# (Ray's RayBackend subclasses MultiprocessingBackend), and _mpwatch extends
# MultiprocessingBackend. Only ParallelBackendBase is public
# (``joblib.ParallelBackendBase`` from 1.5); the concrete classes live in the
# private ``joblib._parallel_backends`` under these names in every version
# checked. tests/test_compat.py checks each is still what joblib registers
# under "threading", "sequential", "multiprocessing" and "loky".
from joblib._parallel_backends import (
    FallbackToBackend,
    LokyBackend,
    MultiprocessingBackend,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

__all__ = [
    "LOKY_EXECUTOR_MODULE",
    "LOKY_WORKER_CMDLINE_MARK",
    "PY_3_11_PLUS",
    "REMOTE_BACKEND_MODULES",
    "FallbackToBackend",
    "LokyBackend",
    "MultiprocessingBackend",
    "ParallelBackendBase",
    "SequentialBackend",
    "ThreadingBackend",
    "active_backend",
    "add_note",
    "backend_init_kwargs",
    "backend_kwargs",
    "cloudpickle_by_value",
    "external_backend_names",
    "gil_enabled",
    "is_dask_backend",
    "is_remote_backend",
    "joblib_config_temp_folder",
    "known_backend_names",
    "loky_pool_errors",
    "memmapping_pool",
    "multiprocessing_start_method",
    "pool_processes",
    "raise_loky_leak_limit",
    "registered_backends",
    "track_file",
    "untrack_file",
]

PY_3_11_PLUS = sys.version_info >= (3, 11)


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``; on 3.10 set ``__notes__`` (kept by pickle, not displayed)."""
    if PY_3_11_PLUS:
        exc.add_note(note)  # type: ignore[attr-defined,unused-ignore]
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
    notes.append(note)
    try:
        exc.__notes__ = notes  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass


# ---------------------------------------------------------------------------
# cloudpickle internals. Every touch of a private name of joblib, loky,
# multiprocessing, cloudpickle or dask belongs in this module, with the
# versions it was checked on and a test in tests/test_compat.py.
# ---------------------------------------------------------------------------


def cloudpickle_by_value(obj: object) -> bool:
    """Whether cloudpickle would pickle this class or function by value.

    Why: the state cache must fingerprint *code* that travels by value
    (``__main__``, notebooks, ``<locals>``, modules registered with
    ``cloudpickle.register_pickle_by_value``), so that a redefined class or
    helper is shipped again. cloudpickle's own decision is the private
    ``_should_pickle_by_reference`` (cloudpickle 2.0 to 3.1 at least; checked
    on 2.2.1 and 3.1.3). If it disappears we fall back to the cases we can
    see ourselves (``__main__``, ``<locals>``, lambdas); the registry then
    goes unseen, and tests/test_compat.py fails loudly.
    """
    import cloudpickle

    decide = getattr(getattr(cloudpickle, "cloudpickle", None), "_should_pickle_by_reference", None)
    if decide is None:  # pragma: no cover - caught by tests/test_compat.py
        return False
    try:
        return not decide(obj)
    except Exception:  # noqa: BLE001 - odd objects (no __qualname__...): cloudpickle copies them
        return True


# ---------------------------------------------------------------------------
# loky internals.
# ---------------------------------------------------------------------------

_LOKY_LEAK_LIMIT: int | None = None
LOKY_EXECUTOR_MODULE = "joblib.externals.loky.process_executor"


def raise_loky_leak_limit(held: int) -> None:
    """Tell loky's leak guard, in this worker only, that ``held`` bytes are our cache.

    Why: a loky worker compares its RSS with its size after its first task
    and exits ("Memory leak detected") when it grew by more than the private
    ``process_executor._MAX_MEMORY_LEAK_SIZE`` (300 MB; joblib 1.3 to 1.6,
    loky 3.4 to 3.5). A cached 1M-entry dict or a mapped 200 MB array is
    deliberate growth, and the restart would throw the cache away (measured:
    warm calls fell back to full unpickling). Only in processes where loky's
    executor is loaded; if the name is gone the guard is left as is, and
    tests/test_compat.py fails loudly.
    """
    global _LOKY_LEAK_LIMIT
    executor = sys.modules.get(LOKY_EXECUTOR_MODULE)
    if executor is None or not hasattr(executor, "_MAX_MEMORY_LEAK_SIZE"):
        return
    if _LOKY_LEAK_LIMIT is None:
        _LOKY_LEAK_LIMIT = int(getattr(executor, "_MAX_MEMORY_LEAK_SIZE"))  # noqa: B009
    setattr(executor, "_MAX_MEMORY_LEAK_SIZE", _LOKY_LEAK_LIMIT + held)  # noqa: B010


# ---------------------------------------------------------------------------
# joblib backends. Checked on joblib 1.4.2, 1.5.0, 1.5.1, 1.5.3 and 1.6.0;
# the backend classes are imported at the top of this module (why: there).
# ---------------------------------------------------------------------------

#: Module prefixes of joblib backends whose workers run on other machines.
#: Why: nothing in joblib's backend API says where the workers are. dask's
#: backend is ``joblib._dask.DaskDistributedBackend`` (private module; 1.4 to
#: 1.6); Ray's is ``ray.util.joblib.ray_backend.RayBackend`` (Ray 1.x, 2.x),
#: a MultiprocessingBackend subclass that runs a Ray pool. A class from one
#: of these modules anywhere in a backend's MRO marks it remote.
REMOTE_BACKEND_MODULES = ("joblib._dask", "distributed", "dask", "ray")


def active_backend() -> tuple[Any, int | None]:
    """``(backend instance, n_jobs)`` that ``joblib.Parallel()`` would use here.

    Why: no public joblib API returns the backend *instance* an enclosing
    ``parallel_config(backend=...)`` (or ``parallel_backend``) made, with its
    parameters; ``joblib.parallel.get_active_backend`` does (not exported
    from ``joblib``, not documented; same signature and return value in
    1.4.2 to 1.6.0). n_jobs is None when no config set one (1.5+; 1.4 gives
    None too).
    """
    from joblib.parallel import get_active_backend

    backend, n_jobs = get_active_backend()
    return backend, n_jobs


def registered_backends() -> dict[str, Any]:
    """joblib's registry: name -> backend class or factory (``register_parallel_backend``).

    Why: to name a backend instance and to suggest names; joblib has no
    public accessor. ``joblib.parallel.BACKENDS`` is a plain dict in 1.4.2 to
    1.6.0 (written by ``register_parallel_backend``).
    """
    from joblib.parallel import BACKENDS

    return dict(BACKENDS)


def external_backend_names() -> tuple[str, ...]:
    """Names joblib registers on first use ("dask"): ``joblib.parallel.EXTERNAL_BACKENDS`` (1.4.2 to 1.6.0)."""
    from joblib.parallel import EXTERNAL_BACKENDS

    return tuple(EXTERNAL_BACKENDS)


def known_backend_names() -> list[str]:
    """Every backend name ``parallel_config(backend=...)`` accepts now."""
    return sorted({*registered_backends(), *external_backend_names()})


def backend_kwargs(backend: Any) -> dict[str, Any]:
    """The keyword arguments a backend was created with (``parallel_config(backend=..., **kw)``).

    Why: to recreate joblib's MultiprocessingBackend as our watched subclass
    with the same parameters (``context=``...). joblib 1.5+ keeps them in
    ``backend.backend_kwargs``; joblib 1.4's backends accept none (its
    ``ParallelBackendBase.__init__`` passes them to ``object``), so {}.
    """
    return dict(getattr(backend, "backend_kwargs", None) or {})


def backend_init_kwargs(backend: Any) -> dict[str, Any]:
    """What to pass to a backend class to get another instance configured like ``backend``."""
    kwargs = backend_kwargs(backend)
    kwargs["nesting_level"] = getattr(backend, "nesting_level", None)
    inner = getattr(backend, "inner_max_num_threads", None)
    if inner is not None:
        kwargs["inner_max_num_threads"] = inner
    return kwargs


def multiprocessing_start_method(backend: Any) -> str:
    """The start method of the pool a joblib MultiprocessingBackend will create.

    Why: joblib's ``MemmappingPool`` passes a ``context=`` backend argument
    (``parallel_config(backend="multiprocessing", context=ctx)``, joblib
    1.5+) on to ``multiprocessing.Pool``; without one the pool uses the
    default context, whose start method is the one set by
    ``multiprocessing.set_start_method`` or else the platform default: the
    first of ``get_all_start_methods()`` (fork on Linux up to Python 3.13,
    forkserver from 3.14; spawn on macOS and Windows). Asking
    ``get_start_method()`` without ``allow_none`` would fix the default
    context as a side effect, so it is not asked.
    """
    import multiprocessing

    context = backend_kwargs(backend).get("context")
    if context is not None:
        return str(context.get_start_method())
    method = multiprocessing.get_start_method(allow_none=True)
    return method if method is not None else multiprocessing.get_all_start_methods()[0]


def is_dask_backend(backend: Any) -> bool:
    """joblib's ``DaskDistributedBackend`` (or a subclass), found without importing dask."""
    return any(k.__name__ == "DaskDistributedBackend" and k.__module__ == "joblib._dask" for k in type(backend).__mro__)


def is_remote_backend(backend: Any) -> bool:
    """A backend from a cluster engine (dask, Ray): its workers may be on other machines."""
    for klass in type(backend).__mro__:
        module = getattr(klass, "__module__", "") or ""
        if any(module == m or module.startswith(m + ".") for m in REMOTE_BACKEND_MODULES):
            return True
    return False


def joblib_config_temp_folder() -> str | None:
    """The ``temp_folder`` of the enclosing ``joblib.parallel_config`` (this thread), or None.

    Why: payload files go where joblib would put its memmaps, and joblib has
    no public getter. Entering ``parallel_config()`` with no arguments
    changes nothing and returns the active config dict
    (``parallel_config.__enter__``, joblib 1.3 to 1.6; unset keys hold a
    private ``_Sentinel``). Anything unexpected reads as "not set", and
    tests/test_compat.py fails loudly.
    """
    import os

    import joblib

    try:
        with joblib.parallel_config() as config:
            value = config.get("temp_folder") if isinstance(config, dict) else None
    except Exception:  # noqa: BLE001 - a changed joblib: behave as if unset
        return None
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None


# ---------------------------------------------------------------------------
# joblib's multiprocessing pool. Checked on joblib 1.4.2 to 1.6.0 and
# CPython 3.10 to 3.14.
# ---------------------------------------------------------------------------


def memmapping_pool(n_jobs: int, **kwargs: Any) -> Any:
    """joblib's ``MemmappingPool``, as ``MultiprocessingBackend.configure`` makes it.

    Why: our watched backend (_mpwatch) builds the pool joblib would, minus
    joblib's ``gc.collect()``. ``joblib.pool.MemmappingPool(processes,
    **kwargs)`` has the same signature in 1.4.2 to 1.6.0 but is not part of
    joblib's documented API.
    """
    from joblib.pool import MemmappingPool

    return MemmappingPool(n_jobs, **kwargs)


def pool_processes(pool: Any) -> list[Any]:
    """The worker ``Process`` objects of a ``multiprocessing.Pool``.

    Why: ``multiprocessing.Pool`` replaces a dead worker silently and the
    task it held never completes; the watchdog reads the workers' exit codes.
    The list is the private ``Pool._pool`` (CPython 3.8 to 3.14). If it is
    gone, [] (the watchdog sees nothing) and tests/test_compat.py fails.
    """
    return list(getattr(pool, "_pool", None) or ())


def outqueue_write_lock(pool: Any) -> Any:
    """The lock every worker of a ``multiprocessing.Pool`` holds while it sends a result; None if unknown.

    Why: a worker killed while it holds this lock (SIGKILL, or the pool's own
    SIGTERM in ``terminate()``) leaves it held for ever, and ``Pool.terminate()``
    then hangs: its task-handler thread's last ``outqueue.put(None)`` waits on
    it, and ``terminate()`` joins that thread (CPython's pool, every version to
    3.14). ``_mpwatch`` releases it once every worker is dead. It is the
    private ``Pool._outqueue._wlock`` (a ``multiprocessing.Lock``, which any
    process may release; joblib's ``CustomizablePicklingQueue`` 1.4.2 to 1.6.0
    and CPython's ``SimpleQueue`` on POSIX); tests/test_compat.py fails if it
    is gone.
    """
    lock = getattr(getattr(pool, "_outqueue", None), "_wlock", None)
    return lock if hasattr(lock, "acquire") and hasattr(lock, "release") else None


# ---------------------------------------------------------------------------
# loky (vendored in joblib.externals.loky: joblib 1.4.2 has loky 3.4.1,
# 1.5.x loky 3.5.3 to 3.5.6, 1.6.0 loky 3.5.x).
# ---------------------------------------------------------------------------


#: What the command line of a loky worker process contains (Linux
#: ``/proc/<pid>/cmdline``). Why: a worker that saw its caller die stops the
#: caller's idle loky workers (_orphan) and must tell them from any other
#: process. loky starts workers as ``python -m
#: joblib.externals.loky.backend.popen_loky_posix ...`` (``Popen.__module__``;
#: joblib 1.4.2 to 1.6.0, POSIX).
LOKY_WORKER_CMDLINE_MARK = "joblib.externals.loky.backend.popen_loky_posix"


def loky_pool_errors() -> tuple[type[BaseException], ...]:
    """loky's errors for a dead worker / broken executor: ``(BrokenProcessPool, TerminatedWorkerError)``.

    Why: they mean "the pool failed", not "the method raised". joblib
    vendors loky under ``joblib.externals``; the classes are in its
    ``process_executor`` in every version checked.
    """
    from joblib.externals.loky.process_executor import BrokenProcessPool, TerminatedWorkerError

    return (BrokenProcessPool, TerminatedWorkerError)


def track_file(path: str) -> None:
    """Have loky's resource tracker unlink ``path`` if this process dies without cleaning up.

    Why: atexit does not run on SIGKILL / the OOM killer; the tracker process
    joblib uses for its own memmaps does. ``resource_tracker.register(name,
    "file")`` in ``joblib.externals.loky.backend.resource_tracker`` (1.4.2 to 1.6.0).
    """
    from joblib.externals.loky.backend import resource_tracker

    resource_tracker.register(path, "file")


def untrack_file(path: str) -> None:
    """Undo :func:`track_file` once we removed ``path`` ourselves (exactly once per file)."""
    from joblib.externals.loky.backend import resource_tracker

    resource_tracker.unregister(path, "file")


# ---------------------------------------------------------------------------
# CPython.
# ---------------------------------------------------------------------------


def gil_enabled() -> bool:
    """Whether this interpreter runs with the GIL.

    Why: the marshal path (_plain) was measured on GIL builds of CPython
    only. ``sys._is_gil_enabled()`` (3.13+, documented as a CPython detail);
    before 3.13 every CPython build has the GIL.
    """
    probe = getattr(sys, "_is_gil_enabled", None)
    return True if probe is None else bool(probe())


def register_cloudpickle_reducer(cls: type, reducer: object) -> None:
    """Make every cloudpickle pickler (joblib's loky transport, dask) reduce ``cls`` with ``reducer``.

    Why: a decorated function of ``__main__`` reduces to its *name* for
    stdlib pickle (as the undecorated function does, so ``Pool.map(square,
    xs)`` keeps working), but a process that cloudpickle feeds (a loky or dask
    worker) cannot resolve ``__main__.square``. cloudpickle consults
    ``Pickler.dispatch_table`` before ``__reduce_ex__``; it is a ChainMap whose
    first map is cloudpickle's own private ``_dispatch_table`` (checked on
    cloudpickle 2.2.1 and 3.1.3), so this entry applies to all its picklers,
    as copyreg does for pickle. tests/test_compat.py checks that it is used.
    """
    import importlib

    # joblib 1.5 and older carry their own copy, joblib.externals.cloudpickle,
    # which loky's transport uses; joblib 1.6 uses the installed cloudpickle.
    for name in ("cloudpickle", "joblib.externals.cloudpickle"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        table = getattr(getattr(module, "Pickler", None), "dispatch_table", None)
        if table is not None:  # else caught by tests/test_compat.py
            table[cls] = reducer


def set_parallel_timeout(parallel: Any, seconds: float) -> None:
    """Give a running ``joblib.Parallel`` a new ``timeout``, read by its result loop from now on.

    Why: a stopped run is drained in the background (_runner._drain_outputs)
    and must not wait forever on an item that never ends. ``timeout`` is a
    constructor argument; that ``Parallel._retrieve`` reads ``self.timeout``
    again at each poll (``get_status(timeout=self.timeout)``) is joblib's
    internal behaviour (1.5.0 to 1.6.0). tests/test_compat.py sets it on a
    running generator and expects the TimeoutError.
    """
    parallel.timeout = seconds


def is_executor_shutdown(err: BaseException) -> bool:
    """Whether ``err`` says the loky executor was shut down under a running call.

    Why: loky's reusable executor is shared by every call in the process. When
    another call's timeout or abort shuts it down, loky fails this call's
    pending futures with ``ShutdownExecutorError`` and joblib's LokyBackend
    re-raises that as a bare ``RuntimeError("The executor underlying Parallel
    has been shutdown...")`` (joblib 1.5 and 1.6), the loky error as its
    ``__context__``. Such items did nothing wrong: they are run again.
    """
    from joblib.externals.loky.process_executor import ShutdownExecutorError

    return isinstance(err, ShutdownExecutorError) or isinstance(err.__context__, ShutdownExecutorError)


# ---------------------------------------------------------------------------
# joblib's dask backend (used by _dask). joblib documents "dask" as a backend
# name, but its class lives in the private module joblib._dask; we subclass
# it (joblib's backend API is its documented extension point) and read three
# of its private tables. Checked on joblib 1.5.0 to 1.6.0 with distributed
# 2024 to 2026; tests/test_compat.py reads joblib's source for each name.
# ---------------------------------------------------------------------------

#: Private attributes of DaskDistributedBackend that _dask reads or clears:
#: ``_results`` and ``_callbacks`` (the call's futures: cancelled on abort so
#: their tasks stop), ``_scatter`` (the user's ``scatter=`` objects, kept alive).
DASK_BACKEND_TABLES = ("_results", "_callbacks", "_scatter")


def dask_backend_class() -> type:
    """joblib's ``DaskDistributedBackend`` (imports dask: call only when dask is wanted)."""
    from joblib._dask import DaskDistributedBackend

    return DaskDistributedBackend  # type: ignore[no-any-return]


def batch_calls(func: Any) -> Any:
    """The ``(function, args, kwargs)`` triples of a joblib ``BatchedCalls``.

    Why: to find our blob among a batch's arguments when dask's backend
    submits it; joblib's own dask backend reads ``BatchedCalls.items`` the
    same way (joblib 1.3 to 1.6).
    """
    return getattr(func, "items", ()) or ()


def undo_ray_pool_patch() -> bool:
    """Give joblib's ``PicklingPool`` back its ``multiprocessing.pool.Pool`` base; True if it had lost it.

    Why: Ray's joblib backend (``ray.util.joblib.ray_backend.RayBackend.configure``,
    Ray 2.x) re-parents joblib's private ``joblib.pool.PicklingPool`` onto
    Ray's own Pool, for the whole process and for good. After one
    ``Parallel(backend="ray")`` call, joblib's multiprocessing backend then
    runs its tasks on Ray actors: processes that were not forked from us, so
    the fork route would find nothing inherited (measured: "this worker did
    not inherit the object"). Ray sets the base again each time its own
    backend configures, so both keep working when used one after the other.
    """
    import multiprocessing.pool

    from joblib.pool import PicklingPool

    if PicklingPool.__bases__ == (multiprocessing.pool.Pool,):
        return False
    PicklingPool.__bases__ = (multiprocessing.pool.Pool,)
    return True


def dask_take_pending(backend: Any, *, clear: bool = True) -> list[Any]:
    """The futures pending in joblib's dask backend's ``_results`` table; empties it and ``_callbacks`` if ``clear``.

    Why: joblib's ``abort_everything`` forgets a call's futures only locally;
    those tables keep them (and so their tasks) alive while the backend lives.
    """
    pending = list(getattr(backend, DASK_BACKEND_TABLES[0], None) or {})
    for table in DASK_BACKEND_TABLES[:2] if clear else ():
        with contextlib.suppress(Exception):
            getattr(backend, table).clear()
    return pending


def dask_copy_scattered(source: Any, target: Any) -> None:
    """Carry the user's ``scatter=`` objects (``_scatter``) over, so their ids stay alive."""
    setattr(target, DASK_BACKEND_TABLES[2], list(getattr(source, DASK_BACKEND_TABLES[2], [])))
