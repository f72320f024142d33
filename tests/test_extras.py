"""Progress bar, explain(), check_mutations."""

from __future__ import annotations

import re
import threading
import warnings

import pytest

from parallelmethods import ParallelMixin, explain, parallelizable

from . import _models as M
from ._scripts import run_script
from .conftest import FORK_ROUTE


@pytest.mark.parametrize("backend_name", ["loky", "multiprocessing", "threading", "sequential"])
@pytest.mark.parametrize("how", ["map", "starmap", "imap", "imap_unordered"])
def test_progress_bar_counts_items(capsys: pytest.CaptureFixture[str], backend_name: str, how: str) -> None:
    """progress=True draws a tqdm bar on stderr whose count reaches the number of items."""
    m = M.Model(1)
    kw = {"backend": backend_name, "n_jobs": 2, "progress": True}
    if how == "map":
        m.score.map(range(37), **kw)
    elif how == "starmap":
        m.score.starmap([(i, 0) for i in range(37)], **kw)
    else:
        list(m.score.imap(range(37), ordered=(how == "imap"), **kw))
    err = capsys.readouterr().err
    assert re.search(r"\b37/37\b|\b37 ?item", err), err
    assert "Model.score" in err


def test_no_bar_without_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """Without progress=True nothing is drawn."""
    M.Model(1).score.map(range(10), backend="loky", n_jobs=2)
    assert capsys.readouterr().err == ""


def test_progress_bar_closes_on_error(capsys: pytest.CaptureFixture[str]) -> None:
    """The bar is closed when the map raises."""

    class Bad:
        @parallelizable
        def f(self, x: int) -> int:
            raise ValueError("no")

    with pytest.raises(ValueError):
        Bad().f.map(range(5), backend="threading", progress=True)
    err = capsys.readouterr().err
    assert "Bad.f" in err
    assert err.endswith("\n"), "a closed bar (leave=True) ends its line; an open one does not"


class WithLock:
    def __init__(self) -> None:
        self.data = list(range(1000))
        self.guard = {"lock": threading.Lock()}

    @parallelizable
    def f(self, x: int) -> int:
        return x


class Excluding(ParallelMixin, parallel=("f",), exclude=("lock",)):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.payload = "x" * 10_000

    def f(self, x: int) -> int:
        return x


def test_explain_names_lock_path_and_fix() -> None:
    """explain names an unpicklable path with its type and fix, and the largest attributes."""
    info = explain(WithLock().f, backend="loky")
    assert info.route == "file"
    assert [p.path for p in info.problems] == ["self.guard['lock']"]
    assert "lock" in info.problems[0].type_name and "exclude=" in info.problems[0].fix
    assert info.largest_attributes[0][0] == "data"
    text = str(info)
    assert "self.guard['lock']" in text and "fix:" in text


def test_explain_excluded_and_routes() -> None:
    """explain lists excluded attributes and the route for each backend."""
    info = Excluding().f.explain(backend="loky")
    assert info.excluded == ("lock",) and info.problems == ()
    assert info.serializer == "pickle" and info.size_bytes and info.size_bytes > 10_000
    assert Excluding().f.explain(backend="threading").route == "reference"
    assert Excluding().f.explain(backend="multiprocessing", n_jobs=2).route == ("fork" if FORK_ROUTE else "file")


def test_explain_main_class_serializer(tmp_path: object) -> None:
    """For a class defined in __main__, explain says cloudpickle and why."""
    out = run_script(
        tmp_path,
        (
            "from parallelmethods import parallelizable, explain\n"
            "class C:\n"
            "    @parallelizable\n"
            "    def f(self, x): return x\n"
            "info = explain(C().f, backend='loky')\n"
            "print(info.serializer, '|', info.serializer_reason)\n"
        ),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("cloudpickle |") and "__main__" in out.stdout


@pytest.mark.parametrize("backend_name", ["loky", "multiprocessing"])
def test_check_mutations_warns_on_process_backends(backend_name: str) -> None:
    """check_mutations=True warns once when a worker changed self (the change is not sent back)."""
    m = M.Model(0)
    with pytest.warns(RuntimeWarning, match="changed self") as record:
        m.mutate.map(range(10), backend=backend_name, n_jobs=2, check_mutations=True)
    assert len([r for r in record if "changed self" in str(r.message)]) == 1
    assert m.w == 0


def test_check_mutations_silent_for_pure_and_threads() -> None:
    """No warning for a pure method, nor on threading (where the change is kept)."""
    m = M.Model(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.score.map(range(10), backend="loky", n_jobs=2, check_mutations=True)
        m.mutate.map(range(10), backend="threading", n_jobs=2, check_mutations=True)
    assert m.w == 10
