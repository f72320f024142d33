"""Contract clauses about errors that had no direct test (docs/conformance.md)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from parallelmethods import SerializationError

from . import _contract_models as C
from . import _faulty as F
from ._crashers import runs

N = 2


@pytest.mark.parametrize("backend", ["loky", "multiprocessing"])
@pytest.mark.parametrize("on_error", ["raise", "return"])
def test_retries_never_rerun_the_methods_own_exception_on_processes(
    tmp_path: object, backend: str, on_error: str
) -> None:
    """retries=3 on a process backend: item 2's own ValueError is a result, run exactly once (runs counted in files)."""
    d = str(tmp_path)
    if on_error == "raise":
        with pytest.raises(ValueError, match="own error"):
            C.OwnError(d).run.map(range(6), backend=backend, n_jobs=N, retries=3, batch_size=1)
    else:
        out = C.OwnError(d).run.map(range(6), backend=backend, n_jobs=N, retries=3, on_error=on_error, batch_size=1)
        assert isinstance(out[2], ValueError) and [v for i, v in enumerate(out) if i != 2] == [0, 1, 3, 4, 5]
        assert all(n == 1 for n in runs(d).values()) and len(runs(d)) == 6
    assert runs(d)[2] == 1


def test_argument_that_cannot_travel_is_named_and_never_runs(tmp_path: object) -> None:
    """Item 30 of 40 cannot be pickled: SerializationError naming 'argument 0 of item 30'; item 30 never ran.

    Arguments are serialized task by task, so earlier items may already have run
    (docs/errors.md says so); the map still fails fast and the next map works.
    """
    d = str(tmp_path)
    items: list[object] = [*range(30), threading.Lock(), *range(31, 40)]
    t0 = time.monotonic()
    with pytest.raises(SerializationError, match=r"argument 0 of item 30\b"):
        C.Recorder(d).run.map(items, backend="loky", n_jobs=N, batch_size=1)
    assert time.monotonic() - t0 < 10
    assert "lock" not in {name.split("-")[1] for name in os.listdir(d)}
    assert F.Faulty().method_raises.map(range(3), backend="loky", n_jobs=N) == [0, 1, 2]


def test_self_that_cannot_travel_fails_before_any_item_runs(tmp_path: object) -> None:
    """An unpicklable self: SerializationError and no item ran at all (self is serialized before any task)."""

    class Holder(C.Recorder):
        pass

    obj = Holder(str(tmp_path))
    obj.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(SerializationError, match=r"self\.lock"):
        obj.run.map(range(10), backend="loky", n_jobs=N)
    assert runs(str(tmp_path)) == {}
