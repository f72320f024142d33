"""Issue 10: a map gives the plain loop's answer on warm workers (regressions, one per case).

Each test is a *sequence* of calls: the bugs lived in what a warm worker kept
from an earlier call. Process backends only, where workers hold copies.
"""

from __future__ import annotations

import os
import sys
import textwrap
import warnings

import pytest

from parallelmethods import ParallelMethodsError

from . import _coherence_models as C
from ._scripts import run_script

N = 2
pytestmark = pytest.mark.timeout(120)


def test_worker_change_never_reaches_a_new_object(process_backend: str) -> None:
    """Case 1: what a method did to its worker's copy is not served to a brand-new equal object."""
    C.Counter(2).record.map(range(100), backend=process_backend, n_jobs=N)
    fresh = C.Counter(2)
    assert (
        fresh.score.map(range(5), backend=process_backend, n_jobs=N)
        == [fresh.score(x) for x in range(5)]
        == [0, 2, 4, 6, 8]
    )


def test_worker_change_never_reaches_the_next_call(process_backend: str) -> None:
    """Case 1b: the same object mapped again with a pure method starts from the caller's state."""
    c = C.Counter(3)
    for _ in range(3):  # warm workers, several rounds
        c.record.map(range(40), backend=process_backend, n_jobs=N)
        c.rebind.map(range(4), backend=process_backend, n_jobs=N)
        assert c.score.map(range(6), backend=process_backend, n_jobs=N) == [c.score(x) for x in range(6)]


def test_caller_mutation_between_calls_is_seen(process_backend: str) -> None:
    """A change made in the caller between two maps reaches the workers."""
    c = C.Counter(1)
    assert c.score.map(range(3), backend=process_backend, n_jobs=N) == [0, 1, 2]
    c.seen.append(99)
    c.w = 10
    assert c.score.map(range(3), backend=process_backend, n_jobs=N) == [1, 11, 21]


def test_sharing_is_part_of_the_state(process_backend: str) -> None:
    """Case 3: equal objects with and without aliasing answer `a is b` as the loop does, in any order."""
    shared, distinct = C.Pair(True), C.Pair(False)
    for _ in range(2):
        assert shared.same.map(range(3), backend=process_backend, n_jobs=N) == [True] * 3
        assert distinct.same.map(range(3), backend=process_backend, n_jobs=N) == [False] * 3
    distinct.b = distinct.a  # caller makes them shared: same bytes, new sharing
    assert distinct.same.map(range(3), backend=process_backend, n_jobs=N) == [True] * 3
    shared.unshare.map(range(4), backend=process_backend, n_jobs=N)  # a worker breaks the sharing of its copy
    assert shared.same.map(range(4), backend=process_backend, n_jobs=N) == [True] * 4


REDEFINE_SCRIPT = textwrap.dedent(
    """
    from parallelmethods import parallelizable

    def helper(v):
        return v * 2

    class Model:
        factor = 1
        def __init__(self):
            self.k = 1
        @parallelizable
        def f(self, x):
            return helper(x) * self.factor * self.k

    def check(obj, tag):
        got = obj.f.map(range(4), backend=BACKEND, n_jobs=2)
        want = [obj.f(x) for x in range(4)]
        assert got == want, (tag, got, want)

    m = Model()
    check(m, "first")
    def helper(v):                 # a notebook cell redefines the helper
        return v * 100
    check(m, "helper redefined")
    Model.factor = 1000            # ... changes a class attribute
    check(m, "class attribute")
    Model.f.__wrapped__ if hasattr(Model.f, "__wrapped__") else None
    class Model:                   # ... redefines the class itself
        factor = 7
        def __init__(self):
            self.k = 1
        @parallelizable
        def f(self, x):
            return -x * self.factor
    check(Model(), "class redefined")
    def patched(self, x):
        return 42
    Model.f = parallelizable(patched)   # ... monkeypatches the method
    check(Model(), "monkeypatched")
    print("ok")
    """
)


def test_notebook_redefinitions_are_seen(tmp_path: object, process_backend: str) -> None:
    """Case 2: redefined helper, class attribute, class and method in __main__ run as today's code."""
    proc = run_script(tmp_path, f"BACKEND = {process_backend!r}\n" + REDEFINE_SCRIPT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_workers_follow_the_callers_cwd(tmp_path: object, process_backend: str) -> None:
    """Case 7: after os.chdir a relative open() in the method reads the caller's file, as the loop does."""
    w = C.Where()
    assert w.cwd.map(range(2), backend=process_backend, n_jobs=N) == [os.getcwd()] * 2  # warm the workers
    old = os.getcwd()
    try:
        for name in ("one", "two"):
            d = os.path.join(str(tmp_path), name)
            os.mkdir(d)
            with open(os.path.join(d, "data.txt"), "w") as f:
                f.write(name)
            os.chdir(d)
            assert (
                w.read.map(["data.txt"] * 4, backend=process_backend, n_jobs=N)
                == [w.read("data.txt")] * 4
                == [name] * 4
            )
            assert w.cwd.map(range(2), backend=process_backend, n_jobs=N) == [d] * 2
    finally:
        os.chdir(old)


def test_workers_follow_the_callers_sys_path(tmp_path: object, process_backend: str) -> None:
    """Case 7: a folder put on sys.path after the workers started is importable in them too."""
    w = C.Where()
    w.cwd.map(range(2), backend=process_backend, n_jobs=N)  # warm the workers
    folder = os.path.join(str(tmp_path), "late")
    os.mkdir(folder)
    with open(os.path.join(folder, "pm_late_module.py"), "w") as f:
        f.write("VALUE = 17\n")
    sys.path.insert(0, folder)
    try:
        assert w.has_path.map([folder] * 2, backend=process_backend, n_jobs=N) == [True, True]
        assert w.import_it.map(["pm_late_module"] * 3, backend=process_backend, n_jobs=N) == [17] * 3
    finally:
        sys.path.remove(folder)
        sys.modules.pop("pm_late_module", None)
    assert w.has_path.map([folder] * 2, backend=process_backend, n_jobs=N) == [False, False]


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (C.SetstateFails, r"while rebuilding self \(SetstateFails\) in a worker: ValueError .*cannot restore"),
        (
            C.InitFails,
            r"while rebuilding self \(InitFails\) in a worker: OSError during __parallel_init__.*not reachable.*Fix: fix InitFails.__parallel_init__",
        ),
        (C.DeepChain, r"while rebuilding self \(DeepChain\) in a worker: RecursionError.*exclude="),
    ],
    ids=["__setstate__", "__parallel_init__", "RecursionError"],
)
def test_rebuild_failures_are_named(obj: type, match: str) -> None:
    """Case 6: an error while rebuilding self names the stage, the class and the fix; on_error='return' keeps every slot."""
    with pytest.raises(ParallelMethodsError, match=match):
        obj().f.map(range(6), backend="loky", n_jobs=N)
    out = obj().f.map(range(6), backend="loky", n_jobs=N, on_error="return")
    assert len(out) == 6 and all(isinstance(e, ParallelMethodsError) for e in out)
    assert obj is C.InitFails or "while rebuilding self" in str(out[3])
    assert C.Counter(1).score.map(range(3), backend="loky", n_jobs=N) == [0, 1, 2]  # the next map works


def test_rebuild_failure_with_a_module_the_worker_cannot_import(tmp_path: object) -> None:
    """Case 6: a class whose module the worker cannot import is named as a rebuild failure with the fix."""
    folder = os.path.join(str(tmp_path), "private")
    os.mkdir(folder)
    with open(os.path.join(folder, "pm_private_mod.py"), "w") as f:
        f.write("class Thing:\n    pass\n")
    sys.path.insert(0, folder)
    try:
        import pm_private_mod  # type: ignore[import-not-found]

        obj = C.ImportsLater(pm_private_mod.Thing())
    finally:
        sys.path.remove(folder)
    try:
        with pytest.raises(
            ParallelMethodsError,
            match=r"while rebuilding self \(ImportsLater\).*(ModuleNotFoundError|ImportError).*sys\.path",
        ):
            obj.f.map(range(4), backend="loky", n_jobs=N)
    finally:
        sys.modules.pop("pm_private_mod", None)


def test_check_mutations_with_excluded_unpicklable_attribute(process_backend: str) -> None:
    """check_mutations warns for an object with exclude= (it used to stay silent), and names what happens to the change."""
    g = C.Guarded()
    with pytest.warns(RuntimeWarning, match=r"Guarded.touch changed self in a worker process.*not sent back"):
        g.touch.map(range(4), backend=process_backend, n_jobs=N, check_mutations=True)
    assert g.n == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.Counter(1).score.map(range(4), backend=process_backend, n_jobs=N, check_mutations=True)  # pure: no warning


def test_another_threads_timeout_does_not_break_this_map() -> None:
    """A timeout in one thread stops loky's shared executor; a map running meanwhile in another thread re-runs and completes."""
    import threading

    out: dict[str, object] = {}

    def good() -> None:
        try:
            out["good"] = C.Slow(3).f.map(range(200), backend="loky", n_jobs=N)
        except BaseException as e:
            out["good"] = e

    def timing_out() -> None:
        try:
            C.Slow(1).nap.map(range(8), backend="loky", n_jobs=N, timeout=0.5)
        except BaseException as e:
            out["timeout"] = e

    threads = [threading.Thread(target=good), threading.Thread(target=timing_out)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert isinstance(out["timeout"], TimeoutError)
    assert out["good"] == [3 * x for x in range(200)]
