"""Every private name of joblib/loky/cloudpickle we touch still exists and still means what we assume.

These fail loudly on an upgrade that moves one; parallelmethods/_compat.py says
why each is used and on which versions it was checked.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

import cloudpickle

from parallelmethods import _compat


def test_cloudpickle_decides_by_value_for_main_locals_and_registered_modules() -> None:
    """cloudpickle's private _should_pickle_by_reference exists and answers as we rely on."""
    assert callable(getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None))

    def local() -> None: ...

    assert _compat.cloudpickle_by_value(local)  # <locals>: by value
    assert not _compat.cloudpickle_by_value(importlib.import_module)  # importable: by reference
    main_cls = type("InMain", (), {"__module__": "__main__"})
    assert _compat.cloudpickle_by_value(main_cls)
    module = types.ModuleType("pm_registered_mod")
    exec("class Thing:\n    pass\n", module.__dict__)
    module.Thing.__module__ = "pm_registered_mod"
    sys.modules["pm_registered_mod"] = module
    try:
        assert not _compat.cloudpickle_by_value(module.Thing)
        cloudpickle.register_pickle_by_value(module)
        try:
            assert _compat.cloudpickle_by_value(module.Thing)
        finally:
            cloudpickle.unregister_pickle_by_value(module)
    finally:
        del sys.modules["pm_registered_mod"]


def test_loky_leak_limit_name_exists_and_is_raised_only_by_what_we_hold() -> None:
    """loky's private _MAX_MEMORY_LEAK_SIZE exists, is an int, and our adjustment is relative to its original value."""
    executor = importlib.import_module(_compat.LOKY_EXECUTOR_MODULE)
    original = executor._MAX_MEMORY_LEAK_SIZE
    assert isinstance(original, int) and original > 0
    try:
        _compat.raise_loky_leak_limit(1000)
        assert original + 1000 == executor._MAX_MEMORY_LEAK_SIZE
        _compat.raise_loky_leak_limit(10)  # not cumulative: base + what is held now
        assert original + 10 == executor._MAX_MEMORY_LEAK_SIZE
    finally:
        executor._MAX_MEMORY_LEAK_SIZE = original


# ---------------------------------------------------------------------------
# joblib backends (_plan's routing, _mpwatch).
# ---------------------------------------------------------------------------


def test_joblib_backend_classes_are_the_ones_joblib_registers() -> None:
    """The private joblib._parallel_backends classes are what the public names give."""
    import joblib

    registered = _compat.registered_backends()
    assert registered["threading"] is _compat.ThreadingBackend
    assert registered["sequential"] is _compat.SequentialBackend
    assert registered["multiprocessing"] is _compat.MultiprocessingBackend
    assert registered["loky"] is _compat.LokyBackend
    for cls in (
        _compat.ThreadingBackend,
        _compat.SequentialBackend,
        _compat.MultiprocessingBackend,
        _compat.LokyBackend,
    ):
        assert issubclass(cls, _compat.ParallelBackendBase)
    if hasattr(joblib, "ParallelBackendBase"):  # public from joblib 1.5
        assert joblib.ParallelBackendBase is _compat.ParallelBackendBase
    assert issubclass(_compat.FallbackToBackend, Exception)


def test_joblib_capability_flags_mean_what_routing_assumes() -> None:
    """uses_threads/supports_sharedmem: True for thread backends, absent or False for process backends."""

    def shares_memory(backend: object) -> bool:
        return bool(getattr(backend, "uses_threads", False) or getattr(backend, "supports_sharedmem", False))

    assert shares_memory(_compat.ThreadingBackend())
    assert shares_memory(_compat.SequentialBackend())
    assert not shares_memory(_compat.MultiprocessingBackend())
    assert not shares_memory(_compat.LokyBackend())
    assert _compat.ThreadingBackend().supports_timeout
    assert not _compat.SequentialBackend().supports_timeout


def test_active_backend_returns_the_instance_parallel_config_made() -> None:
    """joblib.parallel.get_active_backend: (instance, n_jobs), honouring parallel_config and registered names."""
    import joblib

    backend, n_jobs = _compat.active_backend()
    assert type(backend) is _compat.LokyBackend and n_jobs is None
    with joblib.parallel_config(backend="threading", n_jobs=3):
        backend, n_jobs = _compat.active_backend()
    assert type(backend) is _compat.ThreadingBackend and n_jobs == 3

    class Mine(_compat.ThreadingBackend):  # type: ignore[misc]
        pass

    joblib.register_parallel_backend("pm-compat-mine", Mine)
    assert _compat.registered_backends()["pm-compat-mine"] is Mine
    assert "pm-compat-mine" in _compat.known_backend_names()
    assert "dask" in _compat.external_backend_names()
    with joblib.parallel_config(backend="pm-compat-mine"):
        backend, _ = _compat.active_backend()
    assert type(backend) is Mine


def test_backend_kwargs_keep_the_multiprocessing_context() -> None:
    """parallel_config(backend=..., context=ctx) reaches backend_kwargs (joblib 1.5+; 1.4 takes no kwargs)."""
    import multiprocessing

    import joblib

    if not hasattr(_compat.MultiprocessingBackend(), "backend_kwargs"):
        assert _compat.backend_kwargs(_compat.MultiprocessingBackend()) == {}
        return
    ctx = multiprocessing.get_context("spawn")
    with joblib.parallel_config(backend="multiprocessing", context=ctx):
        backend, _ = _compat.active_backend()
    assert _compat.backend_kwargs(backend)["context"] is ctx
    assert _compat.multiprocessing_start_method(backend) == "spawn"
    again = _compat.MultiprocessingBackend(**_compat.backend_init_kwargs(backend))
    assert _compat.backend_kwargs(again)["context"] is ctx


_START_METHOD_PROBE = """
import multiprocessing, sys
from joblib._parallel_backends import MultiprocessingBackend
from parallelmethods import _compat

MARK = []


def probe(_):
    return len(MARK)


if __name__ == "__main__":
    if sys.argv[1] != "default":
        multiprocessing.set_start_method(sys.argv[1])
    MARK.append(1)
    method = _compat.multiprocessing_start_method(MultiprocessingBackend())
    pool = _compat.memmapping_pool(1)
    try:
        inherited = pool.apply(probe, (0,)) == 1
    finally:
        pool.terminate()
    assert inherited == (method == "fork"), (method, inherited)
    print(method)
"""


def test_multiprocessing_start_method_is_what_joblibs_pool_uses(tmp_path: Any) -> None:
    """The start method we predict is the one joblib's MemmappingPool really uses (fork: the worker sees the parent's later state)."""
    import multiprocessing
    import subprocess

    script = tmp_path / "probe.py"
    script.write_text(_START_METHOD_PROBE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *sys.path]),
    }
    expected_default = multiprocessing.get_all_start_methods()[0]
    for arg, expected in (("default", expected_default), ("forkserver", "forkserver")):
        if expected not in multiprocessing.get_all_start_methods():
            continue
        out = subprocess.run(
            [sys.executable, str(script), arg], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected


def test_pool_processes_lists_live_workers_and_dead_ones_keep_their_exit_code() -> None:
    """multiprocessing.Pool._pool: the worker Process objects; a dead one is replaced, its object keeps the exit code."""
    import time

    pool = _compat.memmapping_pool(2)
    try:
        procs = _compat.pool_processes(pool)
        assert len(procs) == 2 and all(p.exitcode is None and p.pid for p in procs)
        # Die inside a task (a worker killed while idle may hold the queue's
        # lock, and Pool.terminate then blocks: a multiprocessing limitation).
        pool.apply_async(os._exit, (3,))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(p.exitcode is not None for p in procs):
            time.sleep(0.05)
        dead = [p for p in procs if p.exitcode is not None]
        assert [p.exitcode for p in dead] == [3]
        while time.monotonic() < deadline and (
            dead[0] in _compat.pool_processes(pool) or len(_compat.pool_processes(pool)) < 2
        ):
            time.sleep(0.05)
        assert dead[0] not in _compat.pool_processes(pool)  # why the watchdog keeps its own list
        assert len(_compat.pool_processes(pool)) == 2  # replaced, silently
    finally:
        pool.terminate()


def test_loky_pool_errors_are_what_a_dead_loky_worker_raises() -> None:
    """BrokenProcessPool/TerminatedWorkerError are still loky's classes and what joblib raises on a dead worker."""
    import joblib

    broken, terminated = _compat.loky_pool_errors()
    assert issubclass(terminated, broken)
    try:
        joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(os._exit)(1) for _ in range(2))
    except Exception as e:
        assert isinstance(e, broken), repr(e)
    else:  # pragma: no cover
        raise AssertionError("a dead loky worker raised nothing")


_TRACKED_FILE_PROBE = """
import os, sys, tempfile
from parallelmethods import _compat

fd, path = tempfile.mkstemp(prefix="pm-compat-tracked-")
os.close(fd)
_compat.track_file(path)
other = path + ".untracked"
open(other, "w").close()
_compat.track_file(other)
_compat.untrack_file(other)
print(path, other, flush=True)
os._exit(0)  # no atexit, no cleanup: the tracker must remove the tracked file
"""


def test_tracked_files_are_removed_when_the_process_dies(tmp_path: Any) -> None:
    """loky's resource_tracker.register(path, "file") unlinks it after an abrupt exit; unregister opts out."""
    import subprocess
    import time

    out = subprocess.run(
        [sys.executable, "-c", _TRACKED_FILE_PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    path, other = out.stdout.split()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(path):
            time.sleep(0.1)
        assert not os.path.exists(path)
        assert os.path.exists(other)
    finally:
        for p in (path, other):
            if os.path.exists(p):
                os.unlink(p)


def test_dask_and_ray_backends_are_recognised_by_module() -> None:
    """joblib._dask.DaskDistributedBackend keeps its name and module; Ray's module prefix marks a backend remote."""
    dask_backends = __import__("pytest").importorskip("joblib._dask")
    backend = object.__new__(dask_backends.DaskDistributedBackend)
    assert _compat.is_dask_backend(backend) and _compat.is_remote_backend(backend)
    ray_like = type("RayBackend", (_compat.MultiprocessingBackend,), {"__module__": "ray.util.joblib.ray_backend"})
    assert _compat.is_remote_backend(ray_like()) and not _compat.is_dask_backend(ray_like())
    assert not _compat.is_remote_backend(_compat.LokyBackend())
    rayon = type("Rayon", (_compat.LokyBackend,), {"__module__": "rayon.backend"})  # a prefix, not a package
    assert not _compat.is_remote_backend(rayon())


def test_joblib_config_temp_folder_reads_parallel_config() -> None:
    """parallel_config().__enter__ returns the active config dict with temp_folder."""
    import joblib

    assert _compat.joblib_config_temp_folder() is None
    with joblib.parallel_config(temp_folder="/tmp/pm-compat-folder"):
        assert _compat.joblib_config_temp_folder() == "/tmp/pm-compat-folder"
    assert _compat.joblib_config_temp_folder() is None


def test_gil_enabled_answers() -> None:
    """sys._is_gil_enabled (3.13+) or True before it."""
    assert _compat.gil_enabled() is (bool(sys._is_gil_enabled()) if hasattr(sys, "_is_gil_enabled") else True)


def test_loky_workers_command_line_carries_the_mark() -> None:
    """Live loky workers started by joblib run ``-m joblib.externals.loky.backend.popen_loky_posix``."""
    import joblib
    import pytest

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    pids = set(joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(os.getpid)() for _ in range(4)))
    assert pids and os.getpid() not in pids
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace").replace("\0", " ")
        assert _compat.LOKY_WORKER_CMDLINE_MARK in cmdline, cmdline


def test_cloudpickle_dispatch_table_copies_a_main_parallel_function_by_value() -> None:
    """cloudpickle.Pickler.dispatch_table is consulted first, so plain cloudpickle copies a __main__ decorated function."""
    import pickle as _pickle

    from parallelmethods import parallelizable
    from parallelmethods._descriptor import ParallelFunction

    assert ParallelFunction in cloudpickle.Pickler.dispatch_table

    def body(i: int) -> int:
        return i + 1

    body.__module__ = "__main__"
    body.__qualname__ = "pm_not_in_main"
    func = parallelizable(body)
    rebuilt = _pickle.loads(cloudpickle.dumps(func))  # by name it could not be found
    assert isinstance(rebuilt, ParallelFunction) and rebuilt(1) == 2


def test_joblib_dask_backend_names_we_rely_on() -> None:
    """joblib._dask.DaskDistributedBackend still exists and still uses the private tables _dask reads."""
    import inspect

    import pytest

    pytest.importorskip("distributed")
    cls = _compat.dask_backend_class()
    source = inspect.getsource(cls)
    for name in _compat.DASK_BACKEND_TABLES:
        assert f"self.{name}" in source, name
    for name in ("submit", "abort_everything", "retrieve_result_callback", "effective_n_jobs", "data_futures"):
        assert name in source, name
    from joblib.parallel import BatchedCalls

    assert "self.items" in inspect.getsource(BatchedCalls)


class _NotOurPool:
    """Stands for Ray's Pool, which Ray's joblib backend makes the base of joblib's PicklingPool."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("tasks would run on someone else's pool")


def test_multiprocessing_survives_rays_pool_patch() -> None:
    """After Ray's joblib backend re-parents joblib's PicklingPool, our multiprocessing maps still fork our own workers."""
    import multiprocessing.pool

    from joblib.pool import PicklingPool

    from parallelmethods import parallelizable

    class Doubler:
        @parallelizable
        def f(self, x: int) -> int:
            return 2 * x

    PicklingPool.__bases__ = (_NotOurPool,)  # what RayBackend.configure does, with Ray's Pool
    try:
        assert Doubler().f.map(range(6), backend="multiprocessing", n_jobs=2) == [0, 2, 4, 6, 8, 10]
        assert PicklingPool.__bases__ == (multiprocessing.pool.Pool,)
    finally:
        PicklingPool.__bases__ = (multiprocessing.pool.Pool,)


def test_a_running_parallel_reads_its_new_timeout() -> None:
    """Parallel's result loop reads ``self.timeout`` at each poll: a timeout set on a running generator ends it."""
    import multiprocessing
    import time

    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=2, backend="loky", return_as="generator_unordered")
    outputs = parallel(delayed(time.sleep)(s) for s in (0.0, 30.0))
    next(outputs)  # running: the 30 s task is in a worker
    _compat.set_parallel_timeout(parallel, 0.3)
    t0 = time.monotonic()
    try:
        for _ in outputs:
            pass
    except (TimeoutError, multiprocessing.TimeoutError):
        pass
    else:  # pragma: no cover - what this test guards against
        raise AssertionError("the new timeout was not read: the run waited for the 30 s task")
    assert time.monotonic() - t0 < 10


def test_outqueue_write_lock_is_the_lock_workers_send_results_under() -> None:
    """Pool._outqueue._wlock: a multiprocessing Lock the workers take to send a result; any process may release it."""
    pool = _compat.memmapping_pool(2)
    try:
        lock = _compat.outqueue_write_lock(pool)
        assert lock is not None
        assert lock is pool._outqueue._wlock
        assert pool.apply_async(abs, (-3,)).get(timeout=30) == 3  # free after a result was sent
        assert lock.acquire(timeout=10)
        lock.release()
    finally:
        pool.terminate()


def _take_and_die(lock: Any) -> None:
    lock.acquire()
    os._exit(7)


def test_result_lock_held_by_a_dead_worker_is_released() -> None:
    """_mpwatch._unstick releases the result lock once every worker is dead and it stays taken (Pool.terminate's hang)."""
    import multiprocessing
    import threading
    import time

    from parallelmethods import _mpwatch

    ctx = multiprocessing.get_context()
    lock = ctx.Lock()
    holder = ctx.Process(target=_take_and_die, args=(lock,))
    holder.start()
    holder.join(30)
    assert holder.exitcode == 7
    assert not lock.acquire(False)  # held for ever by a dead process

    class Pool:  # the two attributes _unstick reads, on real processes and a real lock
        _pool = [holder]
        _outqueue = types.SimpleNamespace(_wlock=lock)

    ended = threading.Event()
    t0 = time.monotonic()
    thread = threading.Thread(target=_mpwatch._unstick, args=(Pool(), ended))
    thread.start()
    assert lock.acquire(timeout=10)  # released for us
    assert time.monotonic() - t0 >= _mpwatch.STUCK_SECONDS  # not before it stayed taken that long
    lock.release()
    thread.join(10)
    assert not thread.is_alive()
