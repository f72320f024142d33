"""Core behaviour: every method kind, on every backend, with state shipped once."""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import textwrap

import joblib
import pytest

from parallelmethods import BoundParallelMethod, ParallelFunction, parallelizable

from . import _models as M
from ._scripts import run_script
from .conftest import FORK_ROUTE

N = 2  # workers


def test_instance_method_all_backends(backend: str) -> None:
    """map returns results in input order on every backend."""
    m = M.Model(3)
    assert m.score.map(range(10), backend=backend, n_jobs=N) == [3 * i for i in range(10)]


def test_several_iterables_zip_to_shortest(backend: str) -> None:
    """Several iterables are zipped and stop at the shortest, like builtin map."""
    m = M.Model(2)
    assert m.score.map([1, 2, 3], [10, 20], backend=backend, n_jobs=N) == [12, 24]


def test_starmap_and_partial(backend: str) -> None:
    """starmap unpacks tuples; partial fixes keywords and stays bound to m."""
    m = M.Model(2)
    assert m.score.starmap([(1, 10), (2, 20)], backend=backend, n_jobs=N) == [12, 24]
    assert m.score.partial(y=5).map(range(3), backend=backend, n_jobs=N) == [5, 7, 9]
    assert m.score.options(n_jobs=N).partial(y=1).map([1, 2], backend=backend) == [3, 5]


def test_imap_ordered_and_unordered(backend: str) -> None:
    """imap yields every item on every backend: in input order, and unordered as a permutation of the results.

    That unordered really means completion order is
    tests/test_contract_imap.py::test_unordered_imap_yields_in_completion_order.
    """
    m = M.Model(1)
    assert list(m.score.imap(range(20), backend=backend, n_jobs=N)) == list(range(20))
    assert sorted(m.score.imap(range(20), backend=backend, n_jobs=N, ordered=False)) == list(range(20))


def test_imap_streams_infinite_input() -> None:
    """imap over itertools.count() is lazy: islice takes the first items and stops."""
    m = M.Model(2)
    it = m.score.imap(itertools.count(), backend="loky", n_jobs=N)
    assert list(itertools.islice(it, 25)) == [2 * i for i in range(25)]
    it.close()  # type: ignore[attr-defined]


def test_empty_input_and_generators(backend: str) -> None:
    """[] gives []; generators are accepted."""
    m = M.Model(2)
    assert m.score.map([], backend=backend) == []
    assert m.score.map((i for i in range(4)), backend=backend, n_jobs=N) == [0, 2, 4, 6]


@pytest.mark.parametrize("backend_name", ["loky", "multiprocessing", "threading"])
def test_classmethod_staticmethod_module_function(backend_name: str) -> None:
    """classmethods bind to the class (also a subclass), staticmethods and functions work."""
    assert M.Model.build.map([1, 2], backend=backend_name, n_jobs=N) == [("Model", 1), ("Model", 2)]
    assert M.SubModel.build.map([1], backend=backend_name, n_jobs=N) == [("SubModel", 1)]
    assert M.Model(1).build.map([3], backend=backend_name, n_jobs=N) == [("Model", 3)]
    assert M.Model.helper.map([1, 2], backend=backend_name, n_jobs=N) == [101, 102]
    assert M.square.map(range(5), backend=backend_name, n_jobs=N) == [0, 1, 4, 9, 16]


def test_inherited_override_slots_dataclass_property_varargs(process_backend: str) -> None:
    """Inherited methods, subclass overrides, __slots__, dataclasses and properties all work in workers."""
    kw = {"backend": process_backend, "n_jobs": N}
    assert M.Inherits(2).score.map([1, 2], **kw) == [2, 4]
    assert M.SubModel(2).score.map([1, 2], **kw) == [-2, -4]
    assert M.Slotted(3).score.map([1, 2], **kw) == [3, 6]
    assert M.DataModel(4).score.map([1, 2], **kw) == [4, 8]
    assert M.SlotDataModel(5).score.map([1, 2], **kw) == [5, 10]
    assert M.Model(3).uses_property.map([1], **kw) == [7]
    assert M.Model(1).varargs.partial(9, k=1).map([1, 2], **kw) == [((9, 1), (("k", 1),)), ((9, 2), (("k", 1),))]


def test_plain_calls_and_introspection() -> None:
    """The decorated object keeps name, doc, wrapped and signature; plain calls are unchanged."""
    m = M.Model(3)
    assert m.score(2) == 6
    assert M.Model.score(m, 2, y=1) == 7
    assert M.Model.build(4) == ("Model", 4)
    assert M.Model.helper(1) == 101
    assert isinstance(M.Model.__dict__["score"], ParallelFunction)
    assert isinstance(m.score, BoundParallelMethod)
    assert m.score.__name__ == "score"
    assert m.score.__qualname__ == "Model.score"
    assert m.score.__doc__ == "Score one item."
    assert str(inspect.signature(m.score)) == "(x: 'int', y: 'int' = 0) -> 'int'"
    assert str(inspect.signature(M.square)) == "(i: 'int') -> 'int'"
    assert M.square.__wrapped__.__name__ == "square"
    assert "score" not in vars(m)  # nothing cached on the instance
    p = m.score.partial(y=5)
    assert p(1) == 8 and p(1, y=0) == 3  # call-time keywords override, as functools.partial
    assert str(inspect.signature(p)) == str(inspect.signature(functools.partial(m.score.__wrapped__, y=5)))


def test_options_copy_leaves_original() -> None:
    """.options() returns a configured copy still bound to m; m.score is unchanged."""
    m = M.Model(2)
    fast = m.score.options(backend="threading", n_jobs=2)
    assert fast._options.backend == "threading"
    assert m.score._options.given() == {}
    assert fast.map([1]) == [2] and fast.__self__ is m


def test_unbound_map_needs_instance() -> None:
    """Model.score.map without an instance raises TypeError saying to use an instance."""
    with pytest.raises(TypeError, match="needs an instance"):
        M.Model.score.map([1, 2])


def test_parallel_config_is_honoured() -> None:
    """An enclosing joblib.parallel_config picks the backend and n_jobs; call options win."""
    m = M.Model(1)
    main = os.getpid()
    with joblib.parallel_config(backend="threading", n_jobs=2):
        assert set(m.pid.map(range(4))) == {main}
        assert m.pid.explain().backend == "threading"
        assert main not in set(m.pid.map(range(4), backend="loky"))
    with joblib.parallel_config(n_jobs=1):
        assert set(m.pid.map(range(4), backend="loky")) == {main}


def test_mutation_between_calls_is_seen(process_backend: str) -> None:
    """Changing self between two maps is seen by the next map (the worker cache is by content)."""
    m = M.Model(1)
    assert m.read_w.map(range(4), backend=process_backend, n_jobs=N) == [1] * 4
    m.w = 7
    assert m.read_w.map(range(4), backend=process_backend, n_jobs=N) == [7] * 4


def test_two_instances_alternated(process_backend: str) -> None:
    """Alternating two instances gives each its own state."""
    a, b = M.Model(1), M.Model(2)
    for _ in range(3):
        assert a.score.map([1, 2], backend=process_backend, n_jobs=N) == [1, 2]
        assert b.score.map([1, 2], backend=process_backend, n_jobs=N) == [2, 4]


def test_threading_passes_self_by_reference() -> None:
    """Threading and sequential backends share self: mutations are visible to the caller."""
    for backend in ("threading", "sequential"):
        m = M.Model(0)
        m.mutate.map(range(5), backend=backend, n_jobs=N)
        assert m.w == 5


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def test_loky_pickles_once_unpickles_once_per_worker(counts_dir: str) -> None:
    """loky: self pickled once per map in the caller and unpickled at most once per worker."""
    obj = M.Counted(list(range(1000)), counts_dir)
    assert obj.get.map(range(200), backend="loky", n_jobs=N) == [1000 + i for i in range(200)]
    pickled = _lines(os.path.join(counts_dir, "pickled"))
    unpickled = _lines(os.path.join(counts_dir, "unpickled"))
    assert pickled == [str(os.getpid())]
    assert len(unpickled) <= N and len(set(unpickled)) == len(unpickled)
    # Unchanged object, second call: one reduce in the caller (the digest pass that
    # tells it is unchanged); still at most one unpickling per worker overall.
    obj.get.map(range(200), backend="loky", n_jobs=N)
    assert len(_lines(os.path.join(counts_dir, "pickled"))) == 2
    again = _lines(os.path.join(counts_dir, "unpickled"))
    assert len(again) <= N and len(set(again)) == len(again)


@pytest.mark.parametrize("backend_name", ["multiprocessing", "threading", "sequential"])
def test_no_pickling_on_fork_and_threads(counts_dir: str, backend_name: str) -> None:
    """Fork (multiprocessing) and thread routes never pickle self."""
    if backend_name == "multiprocessing" and not FORK_ROUTE:
        pytest.skip("the default start method does not fork here: multiprocessing takes the file route")
    obj = M.Counted([1, 2, 3], counts_dir)
    assert obj.get.map(range(50), backend=backend_name, n_jobs=N) == [3 + i for i in range(50)]
    assert _lines(os.path.join(counts_dir, "pickled")) == []
    assert _lines(os.path.join(counts_dir, "unpickled")) == []


def test_local_class_and_lambda_attribute(process_backend: str) -> None:
    """Classes defined in a function, and lambdas held in attributes, travel (cloudpickle)."""

    class Local:
        def __init__(self) -> None:
            self.fn = lambda x: x * 10

        @parallelizable
        def apply(self, x: int) -> int:
            return self.fn(x) + 1

    assert Local().apply.map(range(4), backend=process_backend, n_jobs=N) == [1, 11, 21, 31]
    # Lambdas as arguments travel too.
    assert M.Model(1).varargs.map([lambda: 1], backend=process_backend, n_jobs=N)[0][0][0]() == 1


MAIN_SCRIPT = textwrap.dedent(
    """
    import os
    from parallelmethods import parallelizable, ParallelMixin

    class Scaler:
        def __init__(self, k):
            self.k = k
            self.f = lambda x: x + 1
        @parallelizable
        def scale(self, x):
            return self.f(self.k * x)

    class Mixed(ParallelMixin, parallel=("twice",)):
        def twice(self, x):
            return 2 * x

    @parallelizable
    def cube(x):
        return x ** 3

    if __name__ == "__main__":
        for backend in ("loky", "multiprocessing"):
            assert Scaler(3).scale.map(range(5), backend=backend, n_jobs=2) == [1, 4, 7, 10, 13], backend
            assert Mixed().twice.map([1, 2], backend=backend, n_jobs=2) == [2, 4]
            assert cube.map([1, 2, 3], backend=backend, n_jobs=2) == [1, 8, 27]
            assert list(Scaler(1).scale.imap(range(3), backend=backend, n_jobs=2)) == [1, 2, 3]
        print("MAIN OK")
    """
)


def test_main_module_classes_in_subprocess(tmp_path: object) -> None:
    """Classes and functions defined in a __main__ script work on loky and multiprocessing."""
    proc = run_script(tmp_path, MAIN_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert "MAIN OK" in proc.stdout


def test_worker_cache_is_bounded() -> None:
    """A long-lived loky worker keeps at most CACHE_SIZE states."""
    from parallelmethods import _dispatch

    objs = [M.Model(i) for i in range(_dispatch.CACHE_SIZE + 3)]
    for o in objs:
        o.score.map(range(4), backend="loky", n_jobs=1 + 1)

    class Probe:
        @parallelizable
        def cache(self, x: int) -> int:
            from parallelmethods import _dispatch as d

            return int(d.cache_info()["size"])

    sizes = Probe().cache.map(range(8), backend="loky", n_jobs=N)
    assert max(sizes) <= _dispatch.CACHE_SIZE


def test_numpy_array_is_mapped_not_copied() -> None:
    """A large numpy array in self reaches loky workers as a private, writable memory map."""
    np = pytest.importorskip("numpy")

    class Holder:
        def __init__(self) -> None:
            self.a = np.arange(1_000_000, dtype=np.float64)

        @parallelizable
        def probe(self, i: int) -> tuple[float, bool]:
            return float(self.a[i]), bool(self.a.flags.writeable)

    out = Holder().probe.map([0, 10, 999_999], backend="loky", n_jobs=N)
    assert [v for v, _ in out] == [0.0, 10.0, 999_999.0]
    assert all(w for _, w in out)


class ArrayHolder:
    def __init__(self) -> None:
        import numpy as np

        self.a = np.arange(200_000, dtype=np.float64)

    @parallelizable
    def scribble(self, i: int) -> float:
        self.a[i] = -1.0  # a worker's write: private to its copy, never sent back
        return float(self.a[i])

    @parallelizable
    def read(self, i: int) -> float:
        return float(self.a[i])


def test_worker_writes_into_a_mapped_array_stay_private() -> None:
    """Writing into self's mapped array in a worker works as in the loop; the next call sees the caller's values."""
    pytest.importorskip("numpy")
    h = ArrayHolder()
    assert h.scribble.map([1, 2, 3], backend="loky", n_jobs=N) == [-1.0, -1.0, -1.0]
    assert h.a[1] == 1.0  # not sent back
    assert h.read.map([1, 2, 3], backend="loky", n_jobs=N) == [h.read(i) for i in (1, 2, 3)] == [1.0, 2.0, 3.0]


class CacheProbe:
    @parallelizable
    def states(self, x: int) -> int:
        import time

        from parallelmethods import _dispatch as d

        time.sleep(0.05)
        return len(d.cache_info()["digests"])


def test_changed_object_replaces_its_old_state_in_workers() -> None:
    """A mutated object's superseded states are dropped from worker caches, not piled up."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True, kill_workers=True)  # start from empty caches
    m = M.Model(0)
    for w in range(5):
        m.w = w
        assert m.read_w.map(range(8), backend="loky", n_jobs=N) == [w] * 8
    # Each worker now holds m's current state and the probe's own: 2, not 4 (LRU full of m's old states).
    held = CacheProbe().states.map(range(4), backend="loky", n_jobs=N, batch_size=1)
    assert max(held) <= 2


def test_unchanged_object_is_not_pickled_again(counts_dir: str) -> None:
    """A second map over an unchanged object reuses what workers hold: no new unpickling in workers."""
    obj = M.Counted(list(range(100)), counts_dir)
    for _ in range(3):
        obj.get.map(range(40), backend="loky", n_jobs=N)
    unpickled = _lines(os.path.join(counts_dir, "unpickled"))
    # At most once per worker for this state, however many maps ran
    # (a worker that got no chunk in the first map may load it in a later one).
    assert 1 <= len(unpickled) <= N and len(set(unpickled)) == len(unpickled)
    obj.payload.append(1)  # a change is seen
    assert obj.get.map([0], backend="loky", n_jobs=N) == [101]


def test_decorated_objects_pickle_by_reference() -> None:
    """Decorated functions and bound methods pickle (by reference) and still work after a round trip."""
    import pickle

    assert pickle.loads(pickle.dumps(M.square)) is M.square
    m = M.Model(4)
    bound = pickle.loads(pickle.dumps(m.score.partial(y=1)))
    assert bound(2) == 9 and bound.map([1, 2], backend="threading") == [5, 9]
    # And joblib's own delayed() accepts them, as users may mix both.
    assert joblib.Parallel(n_jobs=2)(joblib.delayed(m.score)(i) for i in range(3)) == [0, 4, 8]
