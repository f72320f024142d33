"""Contract clauses about ``imap`` (docs/conformance.md maps each clause to its test)."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import warnings

import psutil
import pytest

from parallelmethods import SerializationError, _dispatch

from . import _contract_models as C
from . import _faulty as F
from . import _models as M

N = 2


def _warm(backend: str) -> None:
    """Start the workers first, so that a worker's start-up time does not reorder completions."""
    M.Model(1).score.map(range(4), backend=backend, n_jobs=N)


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_unordered_imap_yields_in_completion_order(backend: str) -> None:
    """ordered=False yields as items complete: the slow item 0 comes last, not first; ordered=True keeps input order."""
    _warm(backend)
    items = list(C.SLEEPS)
    got = list(C.Timed().wait.imap(items, backend=backend, n_jobs=N, batch_size=1, ordered=False))
    assert got == C.COMPLETION_ORDER
    assert list(C.Timed().wait.imap(items, backend=backend, n_jobs=N, batch_size=1)) == items


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_ordered_imap_yields_every_result_before_a_failing_item(backend: str) -> None:
    """Item 1 fails before slow item 0 completes: ordered imap still yields item 0, then raises item 1's error."""
    it = C.Timed().fails_fast.imap(range(4), backend=backend, n_jobs=N, batch_size=1)
    assert next(it) == 0
    with pytest.raises(ValueError, match="item one") as info:
        next(it)
    assert "parallelmethods: raised by Timed.fails_fast on item 1" in info.value.__notes__


def test_unordered_imap_raises_when_the_error_arrives() -> None:
    """Unordered, the failing item's error is raised as it arrives: before the slow item 0."""
    it = C.Timed().fails_fast.imap(range(4), backend="threading", n_jobs=N, batch_size=1, ordered=False)
    with pytest.raises(ValueError, match="item one"):
        next(it)


def test_decorator_ordered_false_is_imaps_default() -> None:
    """@parallelizable(ordered=False) makes imap unordered; the call's ordered=True wins; map keeps input order."""
    items = list(C.SLEEPS)
    t = C.Timed()
    assert list(t.wait_unordered.imap(items, backend="threading", n_jobs=N, batch_size=1)) == C.COMPLETION_ORDER
    assert list(t.wait_unordered.imap(items, backend="threading", n_jobs=N, batch_size=1, ordered=True)) == items
    assert t.wait_unordered.map(items, backend="threading", n_jobs=N, batch_size=1) == items


def test_options_ordered_false_is_imaps_default() -> None:
    """.options(ordered=False) makes imap unordered; m.wait itself stays ordered."""
    items = list(C.SLEEPS)
    t = C.Timed()
    unordered = t.wait.options(ordered=False, backend="threading", n_jobs=N, batch_size=1)
    assert list(unordered.imap(items)) == C.COMPLETION_ORDER
    assert list(t.wait.imap(items, backend="threading", n_jobs=N, batch_size=1)) == items


def test_imap_raises_serialization_error_at_the_call() -> None:
    """A self that cannot be serialized fails at imap(...), before any next()."""
    with pytest.raises(SerializationError, match=r"self\.lock"):
        F.HoldsLock().f.imap([1, 2], backend="loky", n_jobs=N)


def test_imap_raises_for_partial_arguments_at_the_call() -> None:
    """Arguments fixed with .partial() that cannot be serialized fail at imap(...) too."""
    with pytest.raises(SerializationError):
        M.Model(1).varargs.partial(threading.Lock()).imap([1], backend="loky", n_jobs=N)


def test_imap_progress_without_tqdm_raises_at_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """progress=True without tqdm: ImportError naming the extra at imap(...), as at map(...)."""
    for name in ("tqdm", "tqdm.std", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"parallelmethods\[progress\]"):
        M.Model(1).score.imap([1, 2], backend="threading", n_jobs=N, progress=True)
    with pytest.raises(ImportError, match=r"parallelmethods\[progress\]"):
        M.Model(1).score.map([1, 2], backend="threading", n_jobs=N, progress=True)


def test_unread_imap_releases_self_when_dropped() -> None:
    """imap ships self at the call; an iterator dropped without a next() releases it (no registry entry kept)."""
    before = set(_dispatch._REGISTRY)
    it = M.Model(1).score.imap(range(3), backend="threading", n_jobs=N)
    assert len(set(_dispatch._REGISTRY) - before) == 1
    del it
    gc.collect()
    assert set(_dispatch._REGISTRY) == before


def test_imap_ships_self_as_it_is_at_the_call() -> None:
    """The state the workers see is the caller's at the imap call (the loop's moment), not at the first next()."""
    m = M.Model(1)
    it = m.read_w.imap(range(3), backend="loky", n_jobs=N)
    m.w = 99
    assert list(it) == [1, 1, 1]


def _children_cpu(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def test_abandoned_imap_leaves_no_loky_task_running() -> None:
    """Closing a loky imap whose other tasks spin stops them: no CPU burnt afterwards, and the next map is prompt.

    loky keeps idle reusable workers by design; the clause is that none is stuck on our work.
    """
    _warm("loky")
    it = C.Timed().spin.imap(range(8), backend="loky", n_jobs=N, batch_size=1)
    assert next(it) == 0
    time.sleep(0.5)  # the spinning tasks are running now
    it.close()  # type: ignore[attr-defined]
    time.sleep(0.5)
    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    cpu0 = _children_cpu(pids)
    time.sleep(1.0)
    assert _children_cpu(pids) - cpu0 < 0.3, "a worker kept running an abandoned task"
    t0 = time.monotonic()
    assert M.Model(2).score.map(range(6), backend="loky", n_jobs=N) == [0, 2, 4, 6, 8, 10]
    assert time.monotonic() - t0 < 5


def test_abandoned_imap_leaves_no_multiprocessing_pool() -> None:
    """Closing a multiprocessing imap ends its pool: the worker processes it used are gone within a few seconds.

    (joblib's multiprocessing backend returns a window's results only when the
    whole window is done, so the window is complete at the first next().)
    """
    it = C.Timed().where.imap(range(40), backend="multiprocessing", n_jobs=N, batch_size=1)
    pid, _ = next(it)
    assert pid != os.getpid()
    it.close()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while (
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, "a pool process was left"
    assert M.Model(2).score.map(range(6), backend="multiprocessing", n_jobs=N) == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_abandoned_imap_emits_no_joblib_warning(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping early is our decision: joblib's "tasks ... have been cancelled" warning is not shown, and it is
    not hidden by swapping the process-wide filters (warnings.catch_warnings is not thread-safe)."""
    from_package: list[str] = []
    real = warnings.catch_warnings

    def spy(*args: object, **kwargs: object) -> object:
        filename = sys._getframe(1).f_code.co_filename
        if os.sep + "parallelmethods" + os.sep in filename:
            from_package.append(filename)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    with real(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "catch_warnings", spy)
        it = C.Timed().half_second.imap(range(20), backend=backend, n_jobs=N, batch_size=1)
        assert next(it) == 0
        it.close()  # type: ignore[attr-defined]
        with pytest.raises(KeyError):
            F.Faulty().method_raises.map(range(10), backend=backend, n_jobs=N, batch_size=1)
        monkeypatch.undo()
    assert [str(w.message) for w in caught] == []
    assert from_package == []


def test_imap_mutation_warning_points_at_the_next_call() -> None:
    """check_mutations' warning for imap names the user's line that reads the iterator (where the work runs)."""
    it = C.Mutates().bump.imap(range(4), backend="loky", n_jobs=N, check_mutations=True)
    with pytest.warns(RuntimeWarning, match="changed self") as record:
        line = sys._getframe().f_lineno + 1
        values = list(it)
    assert values == [0, 1, 2, 3]
    assert record[0].filename == __file__ and record[0].lineno == line
    assert os.path.basename(record[0].filename) == "test_contract_imap.py"
