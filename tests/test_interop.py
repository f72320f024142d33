"""Existing pickling code and frameworks keep working when a method is decorated (issue 11)."""

from __future__ import annotations

import json
import pickle
import subprocess
import textwrap
from typing import Any

import pytest

from . import _models as M
from ._scripts import run_script

# A user's script: a class in __main__, its decorated method handed to the
# stdlib and joblib pools that pickle it. Each route prints one JSON line.
MAIN_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, pickle
    from concurrent.futures import ProcessPoolExecutor

    import joblib
    from parallelmethods import parallelizable

    class Model:
        def __init__(self, w):
            self.w = w

        @parallelizable
        def score(self, x, y=0):
            return self.w * x + y

        @parallelizable
        @classmethod
        def build(cls, x):
            return [cls.__name__, x]

    def run(name, fn):
        try:
            result = fn()
        except BaseException as e:
            result = f"{type(e).__name__}: {e}"
        print(json.dumps({name: result}), flush=True)

    if __name__ == "__main__":
        m = Model(3)
        fork = multiprocessing.get_context("fork")
        xs = [0, 1, 2, 3]

        def pool_map():
            with fork.Pool(2) as pool:
                return pool.map(m.score, xs)

        def pool_map_partial():
            with fork.Pool(2) as pool:
                return pool.map(m.score.partial(y=10), xs)

        def executor_map():
            with ProcessPoolExecutor(2, mp_context=fork) as ex:
                return list(ex.map(m.score, xs))

        def joblib_multiprocessing():
            return joblib.Parallel(n_jobs=2, backend="multiprocessing")(joblib.delayed(m.score)(x) for x in xs)

        def joblib_loky():
            return joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(m.score)(x) for x in xs)

        def round_trip():
            again = pickle.loads(pickle.dumps(m.score))
            return [again(2), type(again).__name__]

        def round_trip_configured():
            again = pickle.loads(pickle.dumps(m.score.options(backend="threading").partial(y=1)))
            return [again.map([1, 2]), again._options.given(), again._kwargs]

        def round_trip_classmethod():
            return pickle.loads(pickle.dumps(Model.build))(5)

        def map_after_pickling():
            pickle.dumps(m.score)
            return m.score.map(xs, backend="loky", n_jobs=2)

        for name, fn in list(locals().items()):
            if callable(fn) and fn.__module__ == "__main__" and name not in ("run", "Model"):
                run(name, fn)
    """
)


@pytest.fixture(scope="module")
def main_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the __main__ script once; every route's result (or error text) by name."""
    proc: subprocess.CompletedProcess[str] = run_script(tmp_path_factory.mktemp("interop"), MAIN_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    results: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        results.update(json.loads(line))
    return results


def test_pool_map_takes_a_main_class_method(main_results: dict[str, Any]) -> None:
    """multiprocessing.Pool.map (fork) runs a decorated method of a __main__ class."""
    assert main_results["pool_map"] == [0, 3, 6, 9]


def test_pool_map_takes_a_partial_of_a_main_class_method(main_results: dict[str, Any]) -> None:
    """Pool.map keeps the fixed arguments of m.score.partial(...) across pickling."""
    assert main_results["pool_map_partial"] == [10, 13, 16, 19]


def test_process_pool_executor_takes_a_main_class_method(main_results: dict[str, Any]) -> None:
    """ProcessPoolExecutor.map (fork context) runs a decorated method of a __main__ class."""
    assert main_results["executor_map"] == [0, 3, 6, 9]


def test_joblib_multiprocessing_delayed_takes_a_main_class_method(main_results: dict[str, Any]) -> None:
    """joblib's multiprocessing backend runs delayed(m.score) for a __main__ class."""
    assert main_results["joblib_multiprocessing"] == [0, 3, 6, 9]


def test_joblib_loky_delayed_takes_a_main_class_method(main_results: dict[str, Any]) -> None:
    """joblib's loky backend (cloudpickle, by value) runs delayed(m.score) for a __main__ class."""
    assert main_results["joblib_loky"] == [0, 3, 6, 9]


def test_stdlib_pickle_round_trips_a_main_class_method(main_results: dict[str, Any]) -> None:
    """pickle.dumps/loads of m.score for a __main__ class gives a working bound method."""
    assert main_results["round_trip"] == [6, "BoundParallelMethod"]


def test_pickle_keeps_options_and_fixed_arguments(main_results: dict[str, Any]) -> None:
    """A configured copy (.options().partial()) keeps both through stdlib pickle."""
    assert main_results["round_trip_configured"] == [[4, 7], {"backend": "threading"}, {"y": 1}]


def test_stdlib_pickle_round_trips_a_main_classmethod(main_results: dict[str, Any]) -> None:
    """A decorated classmethod of a __main__ class pickles bound to its class."""
    assert main_results["round_trip_classmethod"] == ["Model", 5]


def test_map_still_works_after_pickling_the_method(main_results: dict[str, Any]) -> None:
    """Pickling m.score leaves nothing behind that breaks a later loky map."""
    assert main_results["map_after_pickling"] == [0, 3, 6, 9]


def test_bound_method_reduces_like_a_stdlib_bound_method() -> None:
    """A plain m.score reduces to (getattr, (m, 'score')), as a stdlib bound method does."""
    m = M.Model(2)
    assert m.score.__reduce__() == (getattr, (m, "score"))


def test_importable_module_function_still_pickles_by_reference() -> None:
    """A decorated function of an importable module is written by name, not copied."""
    data = pickle.dumps(M.square)
    assert pickle.loads(data) is M.square and len(data) < 200
