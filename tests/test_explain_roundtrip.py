"""explain() round-trips ``self`` as a worker would and reports what cannot be rebuilt.

shared/API.md, Errors: "Rebuilding self in a worker can fail ... explain()
reports it beforehand"; issue 10 point 6; issue 14 ("explain() reports
ok = False on the fork route, which never pickles").
"""

from __future__ import annotations

import multiprocessing
import pickle

import cloudpickle
import pytest

from parallelmethods import explain
from parallelmethods._explain import Explanation, Problem

from . import _rebuild_models as R


def _tqdm_bar_rebuilds() -> bool:
    """Whether this tqdm's bar survives a pickle round trip (pickle first, then cloudpickle, as the library does)."""
    bar = R.make_bar()
    try:
        try:
            blob = pickle.dumps(bar, protocol=5)
        except Exception:
            blob = cloudpickle.dumps(bar, protocol=5)
        pickle.loads(blob)
    except RecursionError:
        return False
    except Exception:
        return False
    finally:
        bar.close()
    return True


def _rebuild_problems(info: Explanation) -> list[Problem]:
    return [p for p in info.problems if p.stage == "rebuild"]


def test_tqdm_bar_on_self_is_reported() -> None:
    """A tqdm bar on self pickles but fails to unpickle: explain names self.bar, RecursionError and the fix."""
    if _tqdm_bar_rebuilds():
        pytest.skip("this tqdm version rebuilds a pickled bar: nothing to report")
    info = explain(R.WithBar().f, backend="loky", n_jobs=2)
    assert info.route == "file" and info.serializer is not None  # it does serialize
    assert info.ok is False and info.rebuilds is False
    [problem] = _rebuild_problems(info)
    assert problem.path == "self.bar"
    assert problem.type_name == "tqdm.std.tqdm"
    assert problem.cause.startswith("RecursionError")
    assert "while rebuilding self (WithBar) in a worker" in problem.message
    assert "nests too deep" in problem.fix and "exclude=" in problem.fix and "__parallel_init__" in problem.fix
    assert "backend='threading'" in problem.fix
    text = str(info)
    assert "cannot be rebuilt in a worker" in text and "self.bar (tqdm.std.tqdm)" in text


def test_setstate_that_raises_is_reported() -> None:
    """A __setstate__ that raises is reported on self, with its exception and a fix, without crashing explain."""
    info = explain(R.BadSetstate().f, backend="loky", n_jobs=2)
    assert info.ok is False and info.rebuilds is False
    [problem] = _rebuild_problems(info)
    assert problem.path == "self" and problem.type_name == "BadSetstate"
    assert problem.cause == "ValueError: state from another version"
    expected = "while rebuilding self (BadSetstate) in a worker: ValueError: state from another version"
    assert problem.message.endswith(expected)
    assert "__setstate__" in problem.fix and "backend='threading'" in problem.fix


def test_setstate_failure_matches_a_real_map() -> None:
    """What explain reports for a raising __setstate__ really happens: a loky map of that object fails."""
    assert explain(R.BadSetstate().f, backend="loky", n_jobs=2).ok is False
    with pytest.raises(Exception, match="state from another version"):
        R.BadSetstate().f.map(range(4), backend="loky", n_jobs=2)


def test_reduce_callable_that_raises_names_the_nested_path() -> None:
    """A __reduce__ whose callable raises, deep in a dict of lists, is reported at its exact path."""
    info = explain(R.HoldsExploding().f, backend="loky", n_jobs=2)
    assert info.ok is False
    [problem] = _rebuild_problems(info)
    assert problem.path == "self.table['k'][1]"
    assert problem.type_name == "tests._rebuild_models.Exploding"
    assert problem.cause == "RuntimeError: cannot be rebuilt here"
    assert "while rebuilding self (HoldsExploding) in a worker" in problem.message
    assert "'table'" in problem.fix and "exclude=" in problem.fix


def test_healthy_object_is_ok_without_running_parallel_init() -> None:
    """A healthy object (numpy buffer out of band, an excluded lock) rebuilds: ok, and __parallel_init__ is not run."""
    info = explain(R.Healthy().f, backend="loky", n_jobs=2)
    assert info.rebuilds is True
    assert info.problems == () and info.ok is True
    assert info.excluded == ("lock",)


def test_fork_route_is_ok_with_an_unpicklable_attribute() -> None:
    """On the fork route, which never pickles, a Lock on self leaves ok True and nothing is round-tripped."""
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the multiprocessing start method is not fork here")
    info = explain(R.WithLock().f, backend="multiprocessing", n_jobs=2)
    assert info.route == "fork"
    assert info.ok is True and info.rebuilds is None
    assert [p.path for p in info.problems] == ["self.lock"]  # still listed, for a switch of backend
    assert "harmless on this route" in str(info)
    assert explain(R.WithLock().f, backend="loky", n_jobs=2).ok is False  # where it is pickled, it matters


def test_reference_routes_do_not_round_trip() -> None:
    """On threading and sequential self is never unpickled: __setstate__ does not run and ok stays True."""
    R.SETSTATE_CALLS.clear()
    for backend in ("threading", "sequential"):
        info = explain(R.BadSetstate().f, backend=backend, n_jobs=2)
        assert info.route == "reference"
        assert info.ok is True and info.rebuilds is None and _rebuild_problems(info) == []
    assert R.SETSTATE_CALLS == []
    explain(R.BadSetstate().f, backend="loky", n_jobs=2)
    assert R.SETSTATE_CALLS == [1]  # the loky route does round-trip, exactly once
