"""Contract clauses about options: precedence, batch_size, timeout, ordered, progress."""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import joblib
import pytest

from parallelmethods import parallelizable

from . import _contract_models as C
from . import _models as M

N = 2
MAIN_PID = os.getpid()


def _in_caller_process(results: list[tuple[int, int]]) -> bool:
    return {pid for pid, _ in results} == {MAIN_PID}


def _in_caller_thread(results: list[tuple[int, int]]) -> bool:
    return {(pid, tid) for pid, tid in results} == {(MAIN_PID, threading.get_ident())}


class ByDecorator:
    """Decorator options: loky, 2 workers."""

    @parallelizable(backend="loky", n_jobs=2)
    def where(self, x: int) -> tuple[int, int]:
        import time

        time.sleep(0.05)
        return os.getpid(), threading.get_ident()


# -- precedence: call > .options() > decorator > parallel_config > defaults, one level at a time --------


def test_default_backend_is_loky_processes() -> None:
    """No option anywhere: loky, so the method runs in other processes."""
    assert not _in_caller_process(C.Timed().where.map(range(4)))


def test_default_n_jobs_is_all_cores() -> None:
    """No n_jobs anywhere: -1 (all cores); on threading that means pool threads unless there is 1 core."""
    out = C.Timed().where.map(range(6), backend="threading")
    assert _in_caller_thread(out) == (joblib.cpu_count() == 1)


def test_parallel_config_beats_defaults() -> None:
    """parallel_config(backend='threading') replaces the loky default; parallel_config(n_jobs=1) the -1 default."""
    with joblib.parallel_config(backend="threading"):
        assert _in_caller_process(C.Timed().where.map(range(4)))
    with joblib.parallel_config(backend="threading", n_jobs=1):
        assert _in_caller_thread(C.Timed().where.map(range(4)))


def test_decorator_beats_parallel_config() -> None:
    """@parallelizable(backend='loky', n_jobs=2) wins over an enclosing parallel_config(threading, n_jobs=1)."""
    with joblib.parallel_config(backend="threading", n_jobs=1):
        out = ByDecorator().where.map(range(4))
    assert not _in_caller_process(out)
    with joblib.parallel_config(backend="threading", n_jobs=1):
        out = ByDecorator().where.map(range(4), backend="threading")  # only the backend from the call
    assert _in_caller_process(out) and not _in_caller_thread(out)  # n_jobs=2 from the decorator: pool threads


def test_options_beat_decorator() -> None:
    """.options(backend='threading', n_jobs=1) wins over the decorator's loky with 2 workers."""
    out = ByDecorator().where.options(backend="threading", n_jobs=1).map(range(4))
    assert _in_caller_thread(out)


def test_call_beats_options() -> None:
    """The call's backend and n_jobs win over .options()."""
    configured = ByDecorator().where.options(backend="threading", n_jobs=1)
    assert not _in_caller_process(configured.map(range(4), backend="loky", n_jobs=2))
    out = configured.map(range(4), n_jobs=2)
    assert _in_caller_process(out) and not _in_caller_thread(out)


def test_module_function_decorator_beats_parallel_config() -> None:
    """The same precedence for a module function: its decorator's loky beats parallel_config(threading)."""
    with joblib.parallel_config(backend="threading"):
        assert not _in_caller_process(C.where_fn.map(range(4)))
        assert _in_caller_process(C.where_fn.map(range(4), backend="threading"))


# -- batch_size: items per task -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_int_batch_size_is_items_per_task(backend: str) -> None:
    """batch_size=3: items 0-2 run in one task, 3-5 in the next..., for map, starmap and imap."""
    expected = [(i, i - i % 3) for i in range(10)]
    t = C.Timed()
    assert t.task.map(range(10), backend=backend, n_jobs=N, batch_size=3) == expected
    assert t.task.starmap([(i,) for i in range(10)], backend=backend, n_jobs=N, batch_size=3) == expected
    assert list(t.task.imap(range(10), backend=backend, n_jobs=N, batch_size=3)) == expected


def test_auto_batch_size_gives_about_four_tasks_per_worker() -> None:
    """batch_size='auto' on map: ceil(n / (4 * workers)) items per task (16 items, 2 workers: 2 per task)."""
    out = C.Timed().task.map(range(16), backend="loky", n_jobs=N)
    assert out == [(i, i - i % 2) for i in range(16)]


def test_timeout_sends_one_item_per_task() -> None:
    """With timeout= and batch_size='auto', every item is its own task (the timeout is per item)."""
    out = C.Timed().task.map(range(16), backend="loky", n_jobs=N, timeout=30)
    assert out == [(i, i) for i in range(16)]


def test_timeout_is_per_item_not_per_worker_total() -> None:
    """Six 0.5 s items on 2 workers with timeout=1.2: each item is within the limit (each worker's total is 1.5 s)."""
    assert C.Timed().half_second.map(range(6), backend="loky", n_jobs=N, timeout=1.2) == list(range(6))


@pytest.mark.parametrize(
    "make",
    [
        lambda: M.Model(1).score.map([1], backend="loky", timeout=1, batch_size=4),
        lambda: M.Model(1).score.options(batch_size=4).map([1], backend="loky", timeout=1),
        lambda: M.Model(1).score.options(timeout=1).imap([1], backend="loky", batch_size=4),
        lambda: parallelizable(timeout=1, batch_size=4),
    ],
    ids=["call", "options+call", "options+imap", "decorator"],
)
def test_timeout_with_batches_of_several_items_is_refused(make: Any) -> None:
    """timeout= with batch_size > 1 would time several items together: ValueError where the two meet, before work."""
    with pytest.raises(ValueError, match="timeout is per item"):
        make()


def test_timeout_with_batch_size_one_is_accepted() -> None:
    """batch_size=1 with timeout= is the same thing as the automatic choice: accepted."""
    assert M.Model(2).score.map(range(4), backend="loky", n_jobs=N, timeout=30, batch_size=1) == [0, 2, 4, 6]


# -- ordered ------------------------------------------------------------------------------------------


def test_starmap_ordered_is_a_type_error_pointing_to_imap() -> None:
    """starmap(..., ordered=False) is a TypeError that names imap; so is map's."""
    with pytest.raises(TypeError, match=r"starmap\(\) does not take ordered=.*\.imap\(\.\.\., ordered=False\)"):
        M.Model(1).score.starmap([(1, 2)], ordered=False)
    with pytest.raises(TypeError, match=r"map\(\) does not take ordered=.*\.imap\(\.\.\., ordered=False\)"):
        M.Model(1).score.map([1], ordered=False)


# -- progress: the bar counts items and is closed ------------------------------------------------------


class _Bars:
    """A tqdm class that remembers its bars."""

    def __init__(self) -> None:
        from tqdm.std import tqdm

        made: list[Any] = []

        class Recording(tqdm):  # type: ignore[misc,type-arg]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["file"] = io.StringIO()
                super().__init__(*args, **kwargs)
                made.append(self)

        self.cls = Recording
        self.made = made


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> _Bars:
    pytest.importorskip("tqdm")
    from parallelmethods import _progress

    rec = _Bars()
    monkeypatch.setattr(_progress, "bar_class", lambda: rec.cls)
    return rec


@pytest.mark.parametrize("backend", ["loky", "threading"])
@pytest.mark.parametrize("how", ["map", "starmap", "imap", "imap_unordered"])
def test_progress_bar_final_count_is_the_number_of_items(bars: _Bars, backend: str, how: str) -> None:
    """One bar per call; its final count is the number of items (37, not the number of tasks); it is closed."""
    m = M.Model(1)
    kw: dict[str, Any] = {"backend": backend, "n_jobs": N, "progress": True}
    if how == "map":
        m.score.map(range(37), **kw)
    elif how == "starmap":
        m.score.starmap([(i, 0) for i in range(37)], **kw)
    else:
        list(m.score.imap(range(37), ordered=(how == "imap"), **kw))
    assert len(bars.made) == 1
    bar = bars.made[0]
    assert bar.n == 37
    assert bar.total == (37 if how in ("map", "starmap") else None)
    assert bar.desc.startswith("Model.score")
    assert bar.disable, "the bar was not closed"


def test_progress_bar_is_closed_when_the_map_raises(bars: _Bars) -> None:
    """A map that raises closes its bar."""
    from . import _faulty as F

    with pytest.raises(KeyError):
        F.Faulty().method_raises.map(range(10), backend="threading", n_jobs=N, progress=True)
    assert len(bars.made) == 1 and bars.made[0].disable


def test_progress_bar_uses_no_catch_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Choosing the bar class (tqdm.auto not imported yet) does not swap the process-wide warning filters."""
    pytest.importorskip("tqdm")
    import sys
    import warnings

    from parallelmethods import _progress

    monkeypatch.delitem(sys.modules, "tqdm.auto", raising=False)
    calls: list[str] = []
    real = warnings.catch_warnings

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(sys._getframe(1).f_code.co_filename)
        return real(*args, **kwargs)

    monkeypatch.setattr(warnings, "catch_warnings", spy)
    cls = _progress.bar_class()
    assert cls.__module__ == "tqdm.std"  # not in a notebook: the text bar
    ours = [f for f in calls if os.sep + "parallelmethods" + os.sep in f]
    assert ours == []


def test_timeout_where_the_work_would_run_in_the_caller_is_refused() -> None:
    """n_jobs=1 runs in the caller's own process, where a timeout cannot be enforced: ValueError, never ignored."""
    with pytest.raises(ValueError, match="cannot be enforced"):
        M.Model(1).score.map([1, 2], backend="loky", n_jobs=1, timeout=1)
    with pytest.raises(ValueError, match="cannot be enforced"):
        M.Model(1).score.imap([1, 2], backend="threading", n_jobs=1, timeout=1)
