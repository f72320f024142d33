"""Backends are routed by what they are, never replaced (API.md, issue 11).

Three backends are registered under new names, as a user would: a thread
backend (a ThreadingBackend subclass), a MultiprocessingBackend subclass and
a LokyBackend subclass; plus a stand-in for Ray's RayBackend (a
MultiprocessingBackend subclass from a ``ray.*`` module). Each one runs for
real: the plain loop's answer, the instance the user registered is the one
that runs, and ``explain()`` names the route.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from typing import Any

import joblib
import psutil
import pytest
from joblib._parallel_backends import LokyBackend, MultiprocessingBackend, SequentialBackend, ThreadingBackend

from parallelmethods import _compat, _plan, _transport, explain, parallelizable
from parallelmethods._mpwatch import WatchedMultiprocessingBackend

N = 2

#: (backend class name, method) -> calls, in the caller process.
CALLS: dict[tuple[str, str], int] = {}
_CALLS_LOCK = threading.Lock()


def _count(backend: Any, what: str) -> None:
    with _CALLS_LOCK:
        key = (type(backend).__name__, what)
        CALLS[key] = CALLS.get(key, 0) + 1


def _calls(cls: type, what: str) -> int:
    return CALLS.get((cls.__name__, what), 0)


class _Counting:
    """Counts configure() and task submissions (submit on joblib 1.5+, apply_async on 1.4)."""

    def configure(self, *args: Any, **kwargs: Any) -> Any:
        _count(self, "configure")
        return super().configure(*args, **kwargs)  # type: ignore[misc]

    def submit(self, func: Any, callback: Any = None) -> Any:
        _count(self, "submit")
        return super().submit(func, callback=callback)  # type: ignore[misc]

    def apply_async(self, func: Any, callback: Any = None) -> Any:
        _count(self, "submit")
        return super().apply_async(func, callback=callback)  # type: ignore[misc]


class UserThreads(_Counting, ThreadingBackend):  # type: ignore[misc]
    pass


class UserProcesses(_Counting, MultiprocessingBackend):  # type: ignore[misc]
    pass


class UserLoky(_Counting, LokyBackend):  # type: ignore[misc]
    pass


class FakeRay(_Counting, MultiprocessingBackend):  # type: ignore[misc]
    """Shaped like Ray's RayBackend: a MultiprocessingBackend subclass from ``ray.util.joblib``."""


FakeRay.__module__ = "ray.util.joblib.ray_backend"

THREADS, PROCS, LOKY, RAY = "pm-test-threads", "pm-test-processes", "pm-test-loky", "pm-test-ray"
joblib.register_parallel_backend(THREADS, UserThreads)
joblib.register_parallel_backend(PROCS, UserProcesses)
joblib.register_parallel_backend(LOKY, UserLoky)
joblib.register_parallel_backend(RAY, FakeRay)

REGISTERED = {THREADS: UserThreads, PROCS: UserProcesses, LOKY: UserLoky, RAY: FakeRay}
ROUTES = {THREADS: "reference", PROCS: "inline", LOKY: "file", RAY: "inline"}


class Scaler:
    def __init__(self, w: int) -> None:
        self.w = w
        self.seen: list[int] = []

    @parallelizable
    def score(self, x: int, y: int = 1) -> int:
        return self.w * x + y

    @parallelizable
    def record(self, x: int) -> Scaler:
        self.seen.append(x)
        return self

    @parallelizable
    def pids(self, x: int) -> tuple[int, int]:
        return os.getpid(), os.getppid()

    @parallelizable
    def exits_on(self, x: int) -> int:
        if x == 3:
            os._exit(1)
        time.sleep(0.05)
        return x


@pytest.mark.parametrize("name", list(REGISTERED))
def test_registered_backend_gives_the_plain_loop_answer(name: str) -> None:
    """A map on each registered backend equals the plain loop."""
    m = Scaler(3)
    xs = list(range(23))
    assert m.score.map(xs, backend=name, n_jobs=N) == [m.score(x) for x in xs]
    assert m.score.partial(y=5).map(xs, backend=name, n_jobs=N) == [m.score(x, y=5) for x in xs]
    assert sorted(m.score.imap(xs, backend=name, n_jobs=N, ordered=False)) == sorted(m.score(x) for x in xs)


@pytest.mark.parametrize("name", list(REGISTERED))
def test_the_registered_backend_runs_never_a_replacement(name: str) -> None:
    """The user's class is the one configured and given the tasks; the plan keeps the instance joblib made."""
    cls = REGISTERED[name]
    configured, submitted = _calls(cls, "configure"), _calls(cls, "submit")
    assert Scaler(2).score.map(range(8), backend=name, n_jobs=N) == [2 * x + 1 for x in range(8)]
    assert _calls(cls, "configure") > configured
    assert _calls(cls, "submit") > submitted
    with joblib.parallel_config(backend=name):
        backend, _ = _compat.active_backend()
        plan = _plan.plan_for(Scaler(1).score, _plan.Options())
    assert type(plan.backend) is cls
    assert plan.backend is backend


@pytest.mark.parametrize("name", list(REGISTERED))
def test_explain_names_the_route(name: str) -> None:
    """explain() reports the registered name and the route its workers call for."""
    info = explain(Scaler(1).score, backend=name, n_jobs=N)
    assert info.backend == name
    assert info.route == ROUTES[name]
    assert info.ok


def test_thread_backend_passes_self_by_reference() -> None:
    """A registered thread backend shares self: the mutation is visible and the result is self."""
    m = Scaler(1)
    out = m.record.map(range(6), backend=THREADS, n_jobs=N)
    assert all(r is m for r in out)
    assert sorted(m.seen) == list(range(6))


@pytest.mark.parametrize("name", [PROCS, LOKY])
def test_process_backends_run_in_child_processes_of_the_caller(name: str) -> None:
    """The subclasses keep their local workers: children of this process, not this process."""
    out = Scaler(1).pids.map(range(6), backend=name, n_jobs=N)
    assert all(pid != os.getpid() for pid, _ in out)
    # Under forkserver (Python 3.14's default) the fork server is the parent.
    parents = {os.getpid(), *(p.pid for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline()))}
    assert all(ppid in parents for _, ppid in out)


@pytest.mark.parametrize("name", [PROCS, RAY])
def test_bytes_route_writes_no_file_and_never_takes_the_fork_route(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MultiprocessingBackend subclass (Ray's shape) gets self as bytes in the task, not a path.

    Before capability routing such a backend was replaced by our local fork
    pool, or (Ray) got a fork-route handle its workers could not resolve.
    """

    def no_files(plan: Any) -> Any:
        raise AssertionError(f"route {plan.route!r} wrote a payload file")

    monkeypatch.setattr(_transport.KEPT, "handle_for", no_files)
    m = Scaler(4)
    assert m.score.map(range(10), backend=name, n_jobs=N) == [4 * x + 1 for x in range(10)]
    # A changed self is seen by the next map (a new state key travels).
    m.w = 5
    assert m.score.map(range(10), backend=name, n_jobs=N) == [5 * x + 1 for x in range(10)]


def test_unwatched_process_subclass_dead_worker_is_guarded_by_timeout() -> None:
    """A user's MultiprocessingBackend subclass is not watched (never replaced): ``timeout=`` guards it.

    multiprocessing.Pool never completes a task whose worker died; joblib's
    own MultiprocessingBackend is swapped for our watched subclass, a user's
    subclass is used as given. Documented limitation: on it a dead worker
    is noticed through ``timeout=``, which raises TimeoutError and stops the pool.
    """
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        Scaler(1).exits_on.map(range(6), backend=PROCS, n_jobs=N, timeout=2, batch_size=1)
    assert time.monotonic() - t0 < 15
    assert Scaler(2).score.map(range(4), backend=PROCS, n_jobs=N) == [1, 3, 5, 7]


# ---------------------------------------------------------------------------
# The routing table itself (no processes).
# ---------------------------------------------------------------------------


class SharedMemBackend(_Counting, SequentialBackend):  # type: ignore[misc]
    pass


class CustomProcessBackend(
    joblib.ParallelBackendBase if hasattr(joblib, "ParallelBackendBase") else LokyBackend.__mro__[-2]
):  # type: ignore[misc]
    """A process backend we cannot see into: no uses_threads, not joblib's pool."""

    supports_retrieve_callback = True

    def effective_n_jobs(self, n_jobs: int) -> int:
        return 2

    def apply_async(self, func: Any, callback: Any = None) -> Any:  # pragma: no cover - never run
        raise NotImplementedError

    def submit(self, func: Any, callback: Any = None) -> Any:  # pragma: no cover - never run
        raise NotImplementedError


def _route(backend: Any, effective: int = 2) -> tuple[str, str]:
    return _plan.route_for(_plan._own_backend(backend), effective)


def test_routing_table() -> None:
    """Each kind of backend gets the route of the table in _plan's docstring."""
    fork = _compat.multiprocessing_start_method(MultiprocessingBackend()) == "fork"
    assert _route(ThreadingBackend()) == ("reference", "threads")
    assert _route(UserThreads()) == ("reference", "threads")
    assert _route(SequentialBackend()) == ("reference", "caller")
    assert _route(SharedMemBackend()) == ("reference", "caller")
    assert _route(LokyBackend(), effective=1) == ("reference", "caller")
    assert _route(MultiprocessingBackend()) == ("fork" if fork else "file", "local processes")
    assert _route(LokyBackend()) == ("file", "local processes")
    assert _route(UserLoky()) == ("file", "local processes")
    assert _route(UserProcesses()) == ("inline", "local processes")
    assert _route(FakeRay()) == ("inline", "remote")
    assert _route(CustomProcessBackend()) == ("inline", "remote")


def test_dask_backend_routes_to_the_cluster() -> None:
    distributed_backend = pytest.importorskip("joblib._dask").DaskDistributedBackend
    backend = object.__new__(distributed_backend)  # no client needed to classify it
    assert _plan.route_for(backend, 2) == ("cluster", "remote")


def test_only_joblibs_own_multiprocessing_backend_is_swapped() -> None:
    """joblib's exact MultiprocessingBackend becomes the watched one with its parameters; subclasses stay."""
    own = MultiprocessingBackend(nesting_level=0)
    swapped = _plan._own_backend(own)
    assert type(swapped) is WatchedMultiprocessingBackend
    assert swapped.nesting_level == 0
    for backend in (UserProcesses(), FakeRay(), UserLoky(), UserThreads(), LokyBackend()):
        assert _plan._own_backend(backend) is backend


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_with_a_non_fork_context_takes_the_file_route(method: str) -> None:
    """Python 3.14's default (forkserver) or spawn: our pool does not fork from the caller, so self travels by file."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"{method} not available")
    if not hasattr(MultiprocessingBackend(), "backend_kwargs"):
        pytest.skip("joblib 1.4 backends take no context= parameter")
    with joblib.parallel_config(backend="multiprocessing", context=multiprocessing.get_context(method)):
        info = explain(Scaler(1).score, n_jobs=N)
    assert info.route == "file"


def test_multiprocessing_forkserver_map_runs() -> None:
    """A real map under forkserver (what Python 3.14 uses by default) gives the loop's answer."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("forkserver not available")
    if not hasattr(MultiprocessingBackend(), "backend_kwargs"):
        pytest.skip("joblib 1.4 backends take no context= parameter")
    m = Scaler(3)
    with joblib.parallel_config(backend="multiprocessing", context=multiprocessing.get_context("forkserver")):
        out = m.score.map(range(10), n_jobs=N)
    assert out == [3 * x + 1 for x in range(10)]
