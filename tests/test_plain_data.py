"""Large plain-data attributes travel as marshal on the file route (loky):
exactly the same objects come back, and anything shared, referenced from
elsewhere or not plain is pickled as before."""

from __future__ import annotations

import collections
import math
import pickle
import threading
from typing import Any

import pytest

from parallelmethods import ParallelMixin, parallelizable
from parallelmethods._plain import MARSHAL_MIN_OBJECTS
from parallelmethods._serialize import dumps_state

from . import _models as M

N = 2
BIG = 2 * MARSHAL_MIN_OBJECTS


class Holder:
    pass


def ship(obj: Any, exclude: tuple[str, ...] = ()) -> tuple[tuple[str, ...], Any, int]:
    """(marshalled attribute names, the object as a worker loads it, payload bytes)."""
    payload = dumps_state(obj, exclude=exclude, plain_as_marshal=True)
    return payload.marshalled, pickle.loads(payload.main, buffers=payload.buffers), payload.nbytes


def test_plain_attribute_round_trips_exactly() -> None:
    """Every atom and container type, dict order, -0.0, nan and big ints come back as they were."""
    obj = Holder()
    obj.table = M.plain_table(BIG)  # type: ignore[attr-defined]
    obj.table["special"] = (-0.0, math.nan, math.inf, "\udcff", b"\x00", {1, 2}, frozenset(), [], {})  # type: ignore[attr-defined]
    obj.small = [1, 2]  # type: ignore[attr-defined]
    names, back, _ = ship(obj)
    assert names == ("table",)
    assert list(back.table) == list(obj.table)  # type: ignore[attr-defined]
    assert repr(back.table) == repr(obj.table)  # type: ignore[attr-defined]
    special = back.table["special"]
    assert math.copysign(1, special[0]) == -1 and math.isnan(special[1])
    assert type(special[5]) is set and type(special[6]) is frozenset and back.small == [1, 2]


def test_shared_and_referenced_values_keep_pickle_semantics() -> None:
    """Shared between attributes, held elsewhere, shared inside, cyclic, not plain, small: pickled as usual."""
    obj = Holder()
    shared = list(range(BIG))
    obj.a = shared  # type: ignore[attr-defined]
    obj.b = shared  # type: ignore[attr-defined]
    del shared
    held_elsewhere = {i: str(i) for i in range(BIG)}
    obj.c = held_elsewhere  # type: ignore[attr-defined]
    inner = [1]
    obj.d = [inner] * BIG  # type: ignore[attr-defined]
    cyclic: list[Any] = list(range(BIG))
    cyclic.append(cyclic)
    obj.e = cyclic  # type: ignore[attr-defined]
    del cyclic
    obj.f = [bytearray(b"y") for _ in range(BIG)]  # type: ignore[attr-defined]
    obj.g = [collections.OrderedDict(a=i) for i in range(BIG)]  # type: ignore[attr-defined]
    obj.h = list(range(MARSHAL_MIN_OBJECTS // 2))  # type: ignore[attr-defined]
    names, back, _ = ship(obj)
    assert names == ()
    assert back.a is back.b
    assert back.c == held_elsewhere
    assert back.d[0] is back.d[-1]
    assert back.e[-1] is back.e
    assert type(back.f[0]) is bytearray and type(back.g[0]) is collections.OrderedDict
    assert back.h == obj.h  # type: ignore[attr-defined]


def test_shared_strings_inside_a_value_stay_shared() -> None:
    """A value repeating one large string is not written once per reference."""
    obj = Holder()
    obj.words = ["x" * 100_000] * BIG  # type: ignore[attr-defined]
    names, back, nbytes = ship(obj)
    assert names == ("words",)
    assert nbytes < 1_000_000
    assert back.words[0] is back.words[-1] and back.words[0] == "x" * 100_000


class WithLock(ParallelMixin, parallel=("get",), exclude=("lock",)):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.table = {i: (i, str(i)) for i in range(BIG)}

    def get(self, i: int) -> Any:
        return self.table[i]


def test_excluded_attributes_and_marshal_together() -> None:
    """With exclude= the state is a copy: the plain attribute is still marshalled, the lock dropped."""
    names, back, _ = ship(WithLock(), exclude=("lock",))
    assert names == ("table",)
    assert "lock" not in vars(back) and back.table == WithLock().table


def test_workers_see_the_same_objects_on_every_backend(backend: str) -> None:
    """End to end: values, types and sharing as the caller has them, whatever the route."""
    n = BIG
    m = M.Tables(n)
    assert dumps_state(m, plain_as_marshal=True).marshalled == ("table",)
    picks = [0, 1, n // 2, n - 1]
    got = m.facts.map(picks, backend=backend, n_jobs=N)
    expected_types = [type(v).__name__ for v in M.plain_table(1)["k0"]]
    for equal, types, left_is_right, repeated_shared, buffer_type in got:
        assert equal and types == expected_types
        assert left_is_right and repeated_shared and buffer_type == "bytearray"


def test_changed_plain_attribute_is_shipped_again() -> None:
    """A mutation inside a marshalled attribute is seen by the next map."""
    m = M.Tables(BIG)
    assert m.facts.map([3], backend="loky", n_jobs=N)[0][0] is True
    m.table["k3"] = ("changed",)
    assert m.facts.map([3], backend="loky", n_jobs=N)[0][0] is False


def test_local_class_with_plain_data_goes_through_cloudpickle() -> None:
    """A class defined in a function needs cloudpickle; its plain attribute still travels as marshal."""

    class Local:
        def __init__(self) -> None:
            self.table = {f"k{i}": [i, float(i)] for i in range(BIG)}

        @parallelizable
        def get(self, key: str) -> Any:
            return self.table[key]

    obj = Local()
    payload = dumps_state(obj, plain_as_marshal=True)
    assert (payload.via, payload.marshalled) == ("cloudpickle", ("table",))
    assert obj.get.map(["k0", f"k{BIG - 1}"], backend="loky", n_jobs=N) == [[0, 0.0], [BIG - 1, float(BIG - 1)]]


@pytest.mark.parametrize("n", [0, 1, MARSHAL_MIN_OBJECTS])
def test_threshold_and_empty_values(n: int) -> None:
    """Empty and small values are pickled as usual; the threshold counts every object inside."""
    obj = Holder()
    obj.rows = [(i,) for i in range(n)]  # type: ignore[attr-defined]
    names, back, _ = ship(obj)
    assert back.rows == obj.rows  # type: ignore[attr-defined]
    assert names == (("rows",) if 2 * n + 1 >= MARSHAL_MIN_OBJECTS else ())


def test_explain_names_marshalled_attributes() -> None:
    """explain() on loky says which attributes travel as marshal; threads serialize nothing."""
    m = M.Tables(BIG)
    assert "marshal: table" in m.facts.explain(backend="loky").serializer_reason
    assert "marshal" not in m.facts.explain(backend="threading").serializer_reason


def test_too_deep_stays_with_pickle() -> None:
    """Nesting deeper than the scan follows is pickled as usual."""
    obj = Holder()
    deep: list[Any] = list(range(BIG))
    for _ in range(80):
        deep = [deep]
    obj.deep = deep  # type: ignore[attr-defined]
    del deep
    names, back, _ = ship(obj)
    assert names == ()
    inner = back.deep
    for _ in range(80):
        inner = inner[0]
    assert inner == list(range(BIG))


def test_shared_empty_list_stays_with_pickle() -> None:
    """An empty list is mutable: one shared with another attribute keeps its identity."""
    obj = Holder()
    empty: list[Any] = []
    obj.rows = [empty] + [(i,) for i in range(BIG)]  # type: ignore[attr-defined]
    obj.other = empty  # type: ignore[attr-defined]
    del empty
    names, back, _ = ship(obj)
    assert names == ()
    assert back.rows[0] is back.other
    obj.other = None  # type: ignore[attr-defined]
    names, back, _ = ship(obj)
    assert names == ("rows",) and back.rows[0] == [] and back.rows[1:] == obj.rows[1:]  # type: ignore[attr-defined]
