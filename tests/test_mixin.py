"""ParallelMixin: parallel=, exclude=, __parallel_init__, inheritance, class re-creation."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from parallelmethods import ParallelMixin, SerializationError

from . import _models as M


@pytest.fixture
def db(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "db.sqlite")
    M.make_db(path)
    return path


def test_store_with_sqlite_and_lock(db: str, process_backend: str) -> None:
    """A real sqlite connection and lock are excluded, then rebuilt in each worker copy."""
    store = M.Store(db)
    keys = [f"k{i}" for i in range(20)] + ["missing"]
    assert store.lookup.map(keys, backend=process_backend, n_jobs=2) == [f"v{i}" for i in range(20)] + [None]
    # __parallel_init__ ran on the shipped copies, never on the caller's object.
    assert store.inits == 0
    assert set(store.inits_seen.map(range(4), backend=process_backend, n_jobs=2)) == {1}


def test_parallel_init_never_runs_under_threads(db: str) -> None:
    """Under threading the object is shared; __parallel_init__ does not run."""
    store = M.Store(db)
    store.conn.close()
    store.conn = __import__("sqlite3").connect(db, check_same_thread=False)
    assert store.inits_seen.map(range(3), backend="threading", n_jobs=2) == [0, 0, 0]


def test_classmethod_in_parallel_list(db: str) -> None:
    """parallel= may name classmethods."""
    assert M.Store.kinds.map([1, 2], backend="loky", n_jobs=2) == ["Store:1", "Store:2"]
    assert M.SubStore.kinds.map([1], backend="loky", n_jobs=2) == ["SubStore:1"]


def test_subclass_inherits_and_extends(db: str) -> None:
    """Subclasses inherit both lists, extend them, and their overrides run in workers."""
    sub = M.SubStore(db)
    assert M.SubStore.__parallel_methods__ == ("lookup", "kinds", "shout")
    assert M.SubStore.__parallel_exclude__ == ("conn", "_lock", "extra")
    assert sub.lookup.map(["k1", "nope"], backend="loky", n_jobs=2) == ["V1", None]
    assert sub.shout.map(["a"], backend="loky", n_jobs=2) == ["A"]


def test_dataclass_slots_recreation_keeps_lists() -> None:
    """dataclass(slots=True) rebuilds the class; the lists survive and exclude works on slots."""
    store = M.SlotStore({"a": 1}, threading.Lock())
    assert M.SlotStore.__parallel_methods__ == ("get",)
    assert M.SlotStore.__parallel_exclude__ == ("lock",)
    assert store.get.map(["a", "b"], backend="loky", n_jobs=2) == [1, None]


def test_attrs_define_keeps_lists() -> None:
    """attrs.define (slots by default) keeps the lists."""
    attrs = pytest.importorskip("attrs")

    @attrs.define
    class A(ParallelMixin, parallel=("get",), exclude=("lock",)):
        data: dict[str, int]
        lock: object = None

        def get(self, k: str) -> int | None:
            return self.data.get(k)

    assert A.__parallel_methods__ == ("get",) and A.__parallel_exclude__ == ("lock",)
    assert A({"x": 3}, threading.Lock()).get.map(["x"], backend="threading") == [3]


def test_unknown_name_suggests_closest() -> None:
    """A parallel= name the class does not define is a TypeError at class creation, with a suggestion."""
    with pytest.raises(TypeError, match=r"'lokup'.*did you mean 'lookup'"):

        class Bad(ParallelMixin, parallel=("lokup",)):
            def lookup(self, k: str) -> str:
                return k


def test_missing_exclude_names_are_skipped() -> None:
    """exclude= names that an instance lacks are skipped."""

    @dataclasses.dataclass
    class D(ParallelMixin, parallel=("f",), exclude=("not_there",)):
        x: int

        def f(self, y: int) -> int:
            return self.x + y

    assert D(1).f.map([1, 2], backend="loky", n_jobs=2) == [2, 3]


def test_unexcluded_lock_names_path_and_fix() -> None:
    """Without exclude=, a lock in self gives SerializationError naming self.<attr> and the fix."""

    class Holder(ParallelMixin, parallel=("f",)):
        def __init__(self) -> None:
            self.inner = {"k": threading.Lock()}

        def f(self, x: int) -> int:
            return x

    with pytest.raises(SerializationError, match=r"self\.inner\['k'\] \(_thread\.lock\).*exclude="):
        Holder().f.map([1], backend="loky", n_jobs=2)
