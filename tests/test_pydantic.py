"""pydantic v2 models with decorated methods and with ParallelMixin (issue 11)."""

from __future__ import annotations

import pickle

import pytest

pydantic = pytest.importorskip("pydantic")

from parallelmethods import ParallelMixin, parallelizable  # noqa: E402


class Scored(pydantic.BaseModel):  # type: ignore[misc,name-defined]
    w: int

    @parallelizable
    def score(self, x: int) -> int:
        return self.w * x

    @parallelizable
    def _private(self, x: int) -> int:
        return self.w + x


class MixedIn(ParallelMixin, pydantic.BaseModel, parallel=("score", "_private")):  # type: ignore[misc,name-defined]
    w: int

    def score(self, x: int) -> int:
        return self.w * x

    def _private(self, x: int) -> int:
        return self.w + x


PYDANTIC_BACKENDS = [("loky", 2), ("threading", 2)]


@pytest.mark.parametrize(("backend", "n_jobs"), PYDANTIC_BACKENDS)
def test_pydantic_model_decorated_method_maps(backend: str, n_jobs: int) -> None:
    """A @parallelizable method of a BaseModel maps like the plain loop."""
    m = Scored(w=3)
    assert m.score.map(range(5), backend=backend, n_jobs=n_jobs) == [m.score(x) for x in range(5)]


@pytest.mark.parametrize(("backend", "n_jobs"), PYDANTIC_BACKENDS)
def test_pydantic_model_decorated_private_method_maps(backend: str, n_jobs: int) -> None:
    """A decorated _private method of a BaseModel stays a method and maps like the plain loop."""
    m = Scored(w=3)
    assert m._private.map(range(5), backend=backend, n_jobs=n_jobs) == [m._private(x) for x in range(5)]


def test_pydantic_does_not_take_decorated_methods_for_fields_or_private_attributes() -> None:
    """Decorated methods are neither fields nor private attributes of the model."""
    assert set(Scored.model_fields) == {"w"} and Scored.__private_attributes__ == {}
    assert Scored(w=1).model_dump() == {"w": 1}


@pytest.mark.parametrize(("backend", "n_jobs"), PYDANTIC_BACKENDS)
def test_pydantic_model_with_mixin_maps(backend: str, n_jobs: int) -> None:
    """ParallelMixin on a BaseModel gives its listed methods, _private included, the parallel surface."""
    m = MixedIn(w=2)
    xs = range(5)
    assert m.score.map(xs, backend=backend, n_jobs=n_jobs) == [m.score(x) for x in xs]  # type: ignore[attr-defined]
    assert m._private.map(xs, backend=backend, n_jobs=n_jobs) == [m._private(x) for x in xs]  # type: ignore[attr-defined]


def test_pydantic_decorated_private_method_pickles() -> None:
    """m._private of a BaseModel survives a stdlib pickle round trip."""
    assert pickle.loads(pickle.dumps(Scored(w=4)._private))(1) == 5
