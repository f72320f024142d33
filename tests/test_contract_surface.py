"""Contract clauses about the call surface: partial objects, metadata, the mixin, where warnings point."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from typing import Any

import pytest

from . import _contract_models as C
from . import _models as M

N = 2

# -- .partial(...) objects have the whole surface -------------------------------------------------------


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_partial_object_has_map_starmap_imap_options_partial(backend: str) -> None:
    """m.score.partial(y=5) maps, starmaps, imaps, takes .options() and .partial() again, and stays bound to m."""
    m = M.Model(3)
    p = m.score.partial(y=5)
    loop = [m.score(x, y=5) for x in range(4)]
    assert p.map(range(4), backend=backend, n_jobs=N) == loop
    assert p.starmap([(x,) for x in range(4)], backend=backend, n_jobs=N) == loop
    assert list(p.imap(range(4), backend=backend, n_jobs=N)) == loop
    assert p.options(backend=backend, n_jobs=N).map(range(4)) == loop
    assert p.__self__ is m and p.options(n_jobs=N).__self__ is m
    chained = m.varargs.partial(1).partial(2, k=3)
    assert chained.map([9], backend=backend, n_jobs=N) == [((1, 2, 9), (("k", 3),))]


def test_partial_object_call_is_functools_partial() -> None:
    """A plain call of a .partial() object: args prepended, call-time keywords override fixed ones."""
    m = M.Model(3)
    p = m.score.partial(y=5)
    ref = functools.partial(m.score.__wrapped__, y=5)
    assert p(2) == ref(2) == 11
    assert p(2, y=0) == ref(2, y=0) == 6
    assert m.varargs.partial(1, k=2)(3, k=4) == ((1, 3), (("k", 4),))


def test_partial_on_module_function_and_classmethod() -> None:
    """Module functions and classmethods have .partial() with the same surface."""
    assert M.square.partial().map([2, 3], backend="threading", n_jobs=N) == [4, 9]
    assert list(M.Model.build.partial().imap([1], backend="loky", n_jobs=N)) == [("Model", 1)]


# -- metadata parity with the undecorated original ----------------------------------------------------


def _same_metadata(decorated: Any, plain: Any) -> None:
    assert decorated.__name__ == plain.__name__
    assert decorated.__qualname__ == plain.__qualname__.replace("Plain", "Decorated")
    assert decorated.__doc__ == plain.__doc__
    assert inspect.signature(decorated) == inspect.signature(plain)
    assert inspect.getdoc(decorated) == inspect.getdoc(plain)


def test_metadata_parity_instance_method_via_instance() -> None:
    """d.score: name, qualname, doc and signature (x, y=0) as p.score; __wrapped__ is the bound original."""
    d, p = C.Decorated(), C.Plain()
    _same_metadata(d.score, p.score)
    assert str(inspect.signature(d.score)) == "(x: 'int', y: 'int' = 0) -> 'int'"
    assert d.score.__wrapped__.__self__ is d
    assert d.score.__wrapped__.__func__ is inspect.unwrap(C.Decorated.__dict__["score"])


def test_metadata_parity_instance_method_via_class() -> None:
    """Decorated.score (class-level access): as Plain.score, signature with self; __wrapped__ the original function."""
    _same_metadata(C.Decorated.score, C.Plain.score)
    assert list(inspect.signature(C.Decorated.score).parameters) == ["self", "x", "y"]
    wrapped = C.Decorated.score.__wrapped__
    assert inspect.isfunction(wrapped) and wrapped.__qualname__ == "Decorated.score"


@pytest.mark.parametrize("via", ["class", "instance"])
def test_metadata_parity_classmethod(via: str) -> None:
    """Decorated.build / d.build: as Plain.build (signature (x), no cls); __wrapped__ bound to the class."""
    owner_d = C.Decorated if via == "class" else C.Decorated()
    owner_p = C.Plain if via == "class" else C.Plain()
    _same_metadata(owner_d.build, owner_p.build)
    assert str(inspect.signature(owner_d.build)) == "(x: 'int') -> 'str'"
    assert owner_d.build.__wrapped__.__self__ is C.Decorated


@pytest.mark.parametrize("via", ["class", "instance"])
def test_metadata_parity_staticmethod(via: str) -> None:
    """Decorated.helper / d.helper: as Plain.helper; __wrapped__ is the plain function."""
    owner_d = C.Decorated if via == "class" else C.Decorated()
    owner_p = C.Plain if via == "class" else C.Plain()
    _same_metadata(owner_d.helper, owner_p.helper)
    assert inspect.isfunction(owner_d.helper.__wrapped__)
    assert owner_d.helper.__wrapped__(1) == owner_p.helper(1) == 2


# -- ParallelMixin --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_mixin_parallel_names_a_staticmethod(backend: str) -> None:
    """parallel=('twice',) naming a staticmethod: map works via the class and an instance; plain calls unchanged."""
    assert C.WithStatic.twice(4) == 8
    assert C.WithStatic.twice.map([1, 2], backend=backend, n_jobs=N) == [2, 4]
    assert C.WithStatic().twice.map([3], backend=backend, n_jobs=N) == [6]
    assert str(inspect.signature(C.WithStatic.twice)) == "(x: 'int') -> 'int'"


@pytest.mark.parametrize("backend", ["sequential", "threading"])
def test_parallel_init_never_runs_by_reference(backend: str) -> None:
    """Under sequential and threading self is shared: __parallel_init__ runs neither on it nor anywhere."""
    C.InitCounted.calls.clear()
    obj = C.InitCounted()
    assert obj.inits_seen.map(range(4), backend=backend, n_jobs=N) == [0, 0, 0, 0]
    assert obj.inits == 0 and C.InitCounted.calls == []


def test_parallel_init_runs_on_shipped_copies() -> None:
    """The counterpart: on loky each shipped copy ran __parallel_init__ once (inits == 1), the caller's object never."""
    obj = C.InitCounted()
    assert obj.inits_seen.map(range(4), backend="loky", n_jobs=N) == [1, 1, 1, 1]
    assert obj.inits == 0


# -- warnings point at the user's line ----------------------------------------------------------------


def _warning_line(call: Any) -> tuple[str, int]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if "changed self" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    return ours[0].filename, ours[0].lineno


def _next_line() -> int:
    """The caller's next line number."""
    return sys._getframe(1).f_lineno + 1


@pytest.mark.parametrize("how", ["map", "starmap", "options_map", "partial_map"])
def test_mutation_warning_points_at_the_callers_line(how: str) -> None:
    """check_mutations' RuntimeWarning names this file and the line of the map call, whatever the path.

    (imap: tests/test_contract_imap.py::test_imap_mutation_warning_points_at_the_next_call.)
    """
    m = C.Mutates()
    kw: dict[str, Any] = {"backend": "loky", "n_jobs": N, "check_mutations": True}
    line: list[int] = []

    def call() -> None:
        if how == "map":
            line.append(_next_line())
            m.bump.map(range(4), **kw)
        elif how == "starmap":
            line.append(_next_line())
            m.bump.starmap([(i,) for i in range(4)], **kw)
        elif how == "options_map":
            line.append(_next_line())
            m.bump.options(**kw).map(range(4))
        else:
            line.append(_next_line())
            m.bump.partial().map(range(4), **kw)

    filename, lineno = _warning_line(call)
    assert os.path.abspath(filename) == os.path.abspath(__file__)
    assert lineno == line[0]


# -- names and inputs -----------------------------------------------------------------------------------


def test_public_names_and_error_hierarchy() -> None:
    """The five public names import from the package; the errors subclass as documented."""
    import parallelmethods
    from parallelmethods import (
        ParallelMethodsError,
        ParallelMixin,
        SerializationError,
        WorkerCrashedError,
        parallelizable,
    )

    assert {
        "parallelizable",
        "ParallelMixin",
        "ParallelMethodsError",
        "SerializationError",
        "WorkerCrashedError",
    } <= set(parallelmethods.__all__)
    assert callable(parallelizable) and isinstance(ParallelMixin, type)
    assert issubclass(SerializationError, ParallelMethodsError) and issubclass(SerializationError, TypeError)
    assert issubclass(WorkerCrashedError, ParallelMethodsError) and issubclass(WorkerCrashedError, RuntimeError)


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_starmap_accepts_generators_and_empty_input(backend: str) -> None:
    """starmap takes a generator of tuples (consumed once) and [] gives []; imap of [] yields nothing."""
    m = M.Model(2)
    assert m.score.starmap(((i, 1) for i in range(5)), backend=backend, n_jobs=N) == [2 * i + 1 for i in range(5)]
    assert m.score.starmap([], backend=backend, n_jobs=N) == []
    assert list(m.score.imap([], backend=backend, n_jobs=N)) == []
