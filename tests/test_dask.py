"""The dask route, on a real LocalCluster (2 worker processes) on 127.0.0.1."""

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
    """timeout raises TimeoutError and progress counts items, as on local backends."""

    class Slow:
        @parallelizable
        def f(self, x: int) -> int:
            if x == 2:
                time.sleep(8)
            return x

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        Slow().f.map(range(4), backend="dask", timeout=1)
    assert time.monotonic() - t0 < 6
    M.Model(1).score.map(range(23), backend="dask", progress=True)
    assert "23/23" in capsys.readouterr().err
