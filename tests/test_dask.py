"""The dask route, on real LocalClusters (worker processes) on 127.0.0.1.

CLI-started workers with private /tmp and /dev/shm: test_dask_isolated.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import joblib
import pytest

from parallelmethods import WorkerCrashedError, parallelizable

from . import _models as M

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.dask, pytest.mark.timeout(180)]


def test_no_client_is_a_clear_error() -> None:
    """Without an active Client, backend='dask' says how to start one (runs before the fixture starts one)."""
    try:
        distributed.default_client()
    except ValueError:
        pass
    else:
        pytest.skip("a dask client is active in this process")
    with pytest.raises(ValueError, match=r"Client\(\)"):
        M.Model(1).score.map([1], backend="dask")


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, host="127.0.0.1"
    )
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def test_results_and_parallel_config(client: object) -> None:
    """backend='dask' and parallel_config(backend='dask') both run on the cluster."""
    m = M.Model(3)
    assert m.score.map(range(10), backend="dask") == [3 * i for i in range(10)]
    with joblib.parallel_config(backend="dask"):
        pids = set(m.pid.map(range(20)))
        assert list(m.score.imap(range(5))) == [0, 3, 6, 9, 12]
    assert os.getpid() not in pids


def test_plain_data_state_is_pickled_for_the_cluster(client: object) -> None:
    """The dask route never uses marshal (its workers may run another Python); values and sharing arrive intact."""
    from parallelmethods import _plan, _transport
    from parallelmethods._options import Options

    m = M.Tables(2048)
    plan = _plan.plan_for(m.facts, Options(backend="dask"))
    assert plan.route == "cluster" and _transport.serialize_subject(plan).marshalled == ()
    for equal, _types, left_is_right, repeated_shared, buffer_type in m.facts.map([0, 2047], backend="dask"):
        assert equal and left_is_right and repeated_shared and buffer_type == "bytearray"


def test_local_class_and_mutation(client: object) -> None:
    """Local classes travel (cloudpickle); a change between calls is seen."""

    class Local:
        def __init__(self) -> None:
            self.k = 2
            self.f = lambda x: x + 1

        @parallelizable
        def go(self, x: int) -> int:
            return self.f(self.k * x)

    obj = Local()
    assert obj.go.map([1, 2], backend="dask") == [3, 5]
    obj.k = 10
    assert obj.go.map([1, 2], backend="dask") == [11, 21]


def test_mixin_exclude_and_parallel_init(client: object, tmp_path: object) -> None:
    """exclude= and __parallel_init__ work on dask workers (sqlite + lock)."""
    path = os.path.join(str(tmp_path), "db.sqlite")
    M.make_db(path)
    assert M.Store(path).lookup.map(["k1", "k2", "x"], backend="dask") == ["v1", "v2", None]


def test_exception_with_note(client: object) -> None:
    """A method's exception comes back with its type and a note naming the item."""

    class Bad:
        @parallelizable
        def f(self, x: int) -> int:
            if x == 4:
                raise ValueError("four")
            return x

    with pytest.raises(ValueError, match="four") as info:
        Bad().f.map(range(6), backend="dask")
    assert any("on item 4" in n for n in info.value.__notes__)
    assert Bad().f.map(range(6), backend="dask", on_error="return")[4].args == ("four",)


class Killer:
    @parallelizable
    def f(self, x: int) -> int:
        if x == 3:
            os._exit(1)
        time.sleep(0.05)
        return x


def test_killed_worker(client: object) -> None:
    """A worker that dies mid-map gives WorkerCrashedError (after dask's own retries); the next map works."""
    client.run(lambda: None)  # type: ignore[attr-defined]
    with pytest.raises(WorkerCrashedError):
        Killer().f.map(range(8), backend="dask", batch_size=1)
    client.wait_for_workers(2, timeout=60)  # type: ignore[attr-defined]
    assert M.Model(1).score.map(range(4), backend="dask") == [0, 1, 2, 3]


def test_timeout_and_progress_on_dask(client: object, capsys: pytest.CaptureFixture[str]) -> None:
    """timeout raises TimeoutError (saying what dask does with the task) and progress counts items."""

    class Slow:
        @parallelizable
        def f(self, x: int) -> int:
            if x == 2:
                time.sleep(8)
            return x

    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        Slow().f.map(range(4), backend="dask", timeout=1)
    assert time.monotonic() - t0 < 6
    # A running dask task cannot be stopped: the message says so, and does
    # not claim that workers were stopped and replaced.
    assert "stopped and replaced" not in str(info.value)
    assert "cannot stop a running task" in str(info.value)
    M.Model(1).score.map(range(23), backend="dask", progress=True)
    assert "23/23" in capsys.readouterr().err


class Crasher:
    def __init__(self, w: int) -> None:
        self.w = w

    @parallelizable
    def f(self, x: int) -> int:
        if x == 3:
            os._exit(1)
        time.sleep(0.02)
        return self.w * x

    @parallelizable
    def pid(self, x: int) -> int:
        return os.getpid()


def _shape(out: list[object]) -> list[object]:
    return [type(v).__name__ if isinstance(v, BaseException) else v for v in out]


def test_worker_death_mid_map_is_a_crash_for_its_items_only(client: object) -> None:
    """on_error='return': the item that killed its worker is a WorkerCrashedError, every other item
    its value (dask's "lost scattered data" included), and the next maps work, changed object too."""
    m = Crasher(2)
    out = m.f.map(range(10), backend="dask", on_error="return", batch_size=1)
    assert _shape(out) == [0, 2, 4, "WorkerCrashedError", 8, 10, 12, 14, 16, 18]
    assert "Crasher.f" in str(out[3]) and any("on item 3" in n for n in out[3].__notes__)  # type: ignore[union-attr]
    assert sorted(m.pid.map(range(6), backend="dask")) != [os.getpid()] * 6
    m.w = 5
    assert m.f.map([1, 2, 4], backend="dask") == [5, 10, 20]
    client.wait_for_workers(2, timeout=60)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def one_worker() -> Iterator[object]:
    """A second cluster with a single worker (one thread): joblib's n_jobs == 1 shortcut territory."""
    cluster = distributed.LocalCluster(
        n_workers=1, processes=True, threads_per_worker=1, dashboard_address=None, host="127.0.0.1"
    )
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def test_one_worker_cluster_never_runs_in_the_caller(one_worker: object) -> None:
    """A 1-worker cluster (or n_jobs=1) still runs every task on the cluster, never in this process."""
    from parallelmethods import explain
    from parallelmethods._options import Options
    from parallelmethods._plan import plan_for

    m = Crasher(1)
    with one_worker.as_current():  # type: ignore[attr-defined]
        plan = plan_for(m.pid, Options(backend="dask"))
        assert (plan.route, plan.workers) == ("cluster", "remote") and plan.effective_n_jobs >= 2
        assert explain(m.pid, backend="dask").route == "cluster"
        for n_jobs in (None, 1):
            pids = set(m.pid.map(range(8), backend="dask", n_jobs=n_jobs))
            assert os.getpid() not in pids and len(pids) == 1
        with joblib.parallel_config(backend="dask", n_jobs=1):
            assert os.getpid() not in m.pid.map(range(3))


def test_one_worker_crash_never_kills_the_caller(one_worker: object) -> None:
    """os._exit on the only worker: the scattered self dies with it; a WorkerCrashedError for that
    item, the other items re-run on the restarted worker with self sent again; the next map works."""
    m = Crasher(3)
    with one_worker.as_current():  # type: ignore[attr-defined]
        out = m.f.map(range(6), backend="dask", on_error="return")
        assert _shape(out) == [0, 3, 6, "WorkerCrashedError", 12, 15]
        with pytest.raises(WorkerCrashedError, match=r"Crasher\.f"):
            m.f.map(range(6), backend="dask", batch_size=1)
        one_worker.wait_for_workers(1, timeout=60)  # type: ignore[attr-defined]
        assert m.f.map([1, 2], backend="dask") == [3, 6]
        assert os.getpid() not in m.pid.map(range(4), backend="dask")


def test_retries_rerun_items_lost_with_a_worker(one_worker: object, tmp_path: object) -> None:
    """retries=1: an item whose worker died once runs again and gets its value."""

    class Once:
        def __init__(self, flag: str) -> None:
            self.flag = flag

        @parallelizable
        def f(self, x: int) -> int:
            if x == 2 and not os.path.exists(self.flag):
                with open(self.flag, "w"):
                    pass
                os._exit(1)
            return x * 10

    with one_worker.as_current():  # type: ignore[attr-defined]
        assert Once(os.path.join(str(tmp_path), "died")).f.map(range(5), backend="dask", retries=1) == [
            0,
            10,
            20,
            30,
            40,
        ]


def test_the_backend_keeps_the_users_client_and_submit_arguments(client: object) -> None:
    """Ours replaces joblib's dask backend for the call only: same client, same submit keywords."""
    from parallelmethods._options import Options
    from parallelmethods._plan import plan_for

    with joblib.parallel_config(backend="dask", priority=5):
        plan = plan_for(Crasher(1).pid, Options())
    assert plan.backend.client is client
    assert plan.backend.submit_kwargs == {"priority": 5}
    assert plan.backend_name == "dask"
