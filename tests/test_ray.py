"""backend="ray" on a real local Ray (127.0.0.1, no dashboard), started once for this module."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import joblib
import pytest

from parallelmethods import WorkerCrashedError, explain, parallelizable

from . import _models as M

if "ray" not in sys.modules:
    # Keep the local Ray on 127.0.0.1: with this off, Ray (2.x; read once, at
    # import, in ray._private.ray_constants) uses the loopback address as the
    # node's IP, and its GCS, raylet and workers listen there only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.timeout(240)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_not_connected_is_a_clear_error() -> None:
    """Without ray.init(), backend='ray' says how to connect (runs before the fixture starts Ray)."""
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS names a cluster: backend='ray' connects to it, as Ray's own backend does")
    from ray.util.joblib import register_ray

    register_ray()
    with pytest.raises(ValueError, match=r"ray\.init\(\)"):
        M.Model(1).score.map([1], backend="ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.util.joblib import register_ray

    # Workers import tests._models by name, as users' workers import their modules.
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    register_ray()
    try:
        assert (
            all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray.nodes())
            or os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0"
        )
        yield ray
    finally:
        ray.shutdown()


def test_results_parallel_config_and_never_in_the_caller(cluster: Any) -> None:
    """backend='ray' and parallel_config(backend='ray'): the loop's results, computed in Ray workers."""
    m = M.Model(3)
    assert m.score.map(range(10), backend="ray") == [3 * i for i in range(10)]
    with joblib.parallel_config(backend="ray"):
        pids = set(m.pid.map(range(20)))
        assert list(m.score.imap(range(5))) == [0, 3, 6, 9, 12]
        assert sorted(m.score.imap(range(5), ordered=False)) == [0, 3, 6, 9, 12]
    assert os.getpid() not in pids
    # n_jobs=1 too: joblib's n_jobs == 1 shortcut would run in this process.
    assert os.getpid() not in m.pid.map(range(6), backend="ray", n_jobs=1)


def test_explain_shows_the_cluster_route(cluster: Any) -> None:
    from parallelmethods._options import Options
    from parallelmethods._plan import plan_for

    info = explain(M.Model(2).score, backend="ray")
    assert info.route == "cluster"
    plan = plan_for(M.Model(2).score, Options(backend="ray"))
    assert (plan.route, plan.workers, plan.backend_name) == ("cluster", "remote", "ray")
    assert plan.effective_n_jobs >= 2


def test_self_is_put_once_per_map_never_per_task(cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ray.put per map however many tasks; every task carries a small reference."""
    from parallelmethods import _ray

    puts: list[int] = []
    real = _ray.put_bytes

    def counting(data: bytes) -> Any:
        puts.append(len(data))
        return real(data)

    monkeypatch.setattr(_ray, "put_bytes", counting)
    sizes: list[int] = []
    real_submit = _ray.RayTaskBackend.submit

    def measuring(self: Any, func: Any, callback: Any = None) -> Any:
        future = real_submit(self, func, callback)
        sizes.append(len(ray.cloudpickle.dumps(func)))
        return future

    monkeypatch.setattr(_ray.RayTaskBackend, "submit", measuring)
    m = M.Model(2)
    m.big = bytes(2_000_000)  # type: ignore[attr-defined]
    assert m.score.map(range(40), backend="ray", batch_size=1) == [2 * i for i in range(40)]
    assert len(puts) == 1 and puts[0] > 2_000_000
    assert len(sizes) == 40 and max(sizes) < 20_000


def test_local_class_and_changes_between_calls(cluster: Any) -> None:
    """Local classes travel by value; a change between calls is seen; a changed copy is not served."""

    class Local:
        def __init__(self) -> None:
            self.k = 2
            self.f = lambda x: x + 1
            self.seen: list[int] = []

        @parallelizable
        def go(self, x: int) -> int:
            return self.f(self.k * x)

        @parallelizable
        def grow(self, x: int) -> int:
            self.seen.append(x)
            return len(self.seen)

    obj = Local()
    assert obj.go.map([1, 2], backend="ray") == [3, 5]
    obj.k = 10
    assert obj.go.map([1, 2], backend="ray") == [11, 21]
    obj.grow.map(range(8), backend="ray", batch_size=4)
    # Every call's first task starts from the caller's state (empty list).
    assert obj.grow.map([0, 1], backend="ray", batch_size=2) == [1, 2]


def test_mixin_exclude_and_parallel_init(cluster: Any, tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "db.sqlite")
    M.make_db(path)
    assert M.Store(path).lookup.map(["k1", "k2", "x"], backend="ray") == ["v1", "v2", None]


def test_exception_with_note(cluster: Any) -> None:
    class Bad:
        @parallelizable
        def f(self, x: int) -> int:
            if x == 4:
                raise ValueError("four")
            return x

    with pytest.raises(ValueError, match="four") as info:
        Bad().f.map(range(6), backend="ray")
    assert any("on item 4" in n for n in info.value.__notes__)
    assert Bad().f.map(range(6), backend="ray", on_error="return")[4].args == ("four",)


class Crasher:
    def __init__(self, w: int) -> None:
        self.w = w

    @parallelizable
    def f(self, x: int) -> int:
        if x == 3:
            os._exit(1)
        time.sleep(0.02)
        return self.w * x


def test_worker_crash_is_named_and_the_next_map_works(cluster: Any) -> None:
    """A Ray worker that dies: WorkerCrashedError for its item (on_error='return') or the call; next map works."""
    m = Crasher(2)
    out = m.f.map(range(8), backend="ray", on_error="return", batch_size=1)
    assert [type(v).__name__ if isinstance(v, BaseException) else v for v in out] == [
        0,
        2,
        4,
        "WorkerCrashedError",
        8,
        10,
        12,
        14,
    ]
    assert "Crasher.f" in str(out[3]) and any("on item 3" in n for n in out[3].__notes__)  # type: ignore[union-attr]
    with pytest.raises(WorkerCrashedError, match=r"Crasher\.f"):
        m.f.map(range(6), backend="ray")
    m.w = 3
    assert m.f.map([1, 2, 4], backend="ray") == [3, 6, 12]


def test_timeout_kills_the_task_and_says_so(cluster: Any) -> None:
    class Slow:
        @parallelizable
        def f(self, x: int) -> int:
            if x == 2:
                time.sleep(60)
            return x

    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        Slow().f.map(range(4), backend="ray", timeout=1)
    assert time.monotonic() - t0 < 10
    assert "ray.cancel" in str(info.value)
    assert M.Model(1).score.map(range(4), backend="ray") == [0, 1, 2, 3]
