"""Binding matrix: parity with an undecorated class, and misplaced decorators (3.10-3.13+)."""

from __future__ import annotations

import pytest

from parallelmethods import parallelizable


class Original:
    def __init__(self, w: int) -> None:
        self.w = w

    def score(self, x: int, y: int = 0) -> int:
        return self.w * x + y

    @classmethod
    def build(cls, x: int) -> tuple[str, int]:
        return (cls.__name__, x)

    @staticmethod
    def helper(x: int) -> int:
        return x + 1


class Decorated:
    def __init__(self, w: int) -> None:
        self.w = w

    @parallelizable
    def score(self, x: int, y: int = 0) -> int:
        return self.w * x + y

    @parallelizable
    @classmethod
    def build(cls, x: int) -> tuple[str, int]:
        return (cls.__name__, x)

    @parallelizable
    @staticmethod
    def helper(x: int) -> int:
        return x + 1


class Misplaced:
    @classmethod  # type: ignore[misc]
    @parallelizable
    def build(cls, x: int) -> tuple[str, int]:
        return (cls.__name__, x)

    @staticmethod
    @parallelizable
    def helper(x: int) -> int:
        return x + 1


def test_parity_plain_calls() -> None:
    """Plain calls give the same results as the undecorated class."""
    o, d = Original(2), Decorated(2)
    assert d.score(3) == o.score(3) and Decorated.score(d, 3, 1) == Original.score(o, 3, 1)
    assert d.build(1)[1] == o.build(1)[1] and Decorated.build(1) == ("Decorated", 1)
    assert d.helper(1) == o.helper(1) == Decorated.helper(1)


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_parity_map(backend: str) -> None:
    """map equals a loop of plain calls, for every kind, bound via class or instance."""
    d = Decorated(2)
    assert d.score.map(range(4), backend=backend, n_jobs=2) == [d.score(i) for i in range(4)]
    assert Decorated.build.map([1], backend=backend, n_jobs=2) == [("Decorated", 1)]
    assert d.build.map([1], backend=backend, n_jobs=2) == [("Decorated", 1)]
    assert Decorated.helper.map([1], backend=backend, n_jobs=2) == [2]
    assert d.helper.map([1], backend=backend, n_jobs=2) == [2]


def test_misplaced_classmethod_never_loses_the_class() -> None:
    """@classmethod above @parallelizable: plain calls work; map raises TypeError naming the fix."""
    assert Misplaced.build(1) == ("Misplaced", 1)
    with pytest.raises(TypeError, match="above @classmethod"):
        Misplaced.build.map([1, 2], backend="threading")
    with pytest.raises(TypeError, match="above @classmethod"):
        Misplaced().build.map([1, 2], backend="threading")


def test_misplaced_staticmethod_names_the_fix() -> None:
    """@staticmethod above @parallelizable: plain calls work; map raises TypeError naming the fix."""
    assert Misplaced.helper(1) == 2
    with pytest.raises(TypeError, match="above @staticmethod"):
        Misplaced.helper.map([1], backend="threading")


def test_user_keywords_named_self_and_func_pass_through() -> None:
    """Keyword arguments called self/func reach the method (positional-only call surfaces)."""

    @parallelizable(backend="threading")
    def f(x: int, *, self: int = 0, func: int = 0) -> int:
        return x + self + func

    assert f.partial(self=1, func=2).map([1]) == [4]
    assert f.partial(self=1)(1, func=2) == 4


def test_not_callable_is_rejected() -> None:
    """Decorating something that is neither callable nor a descriptor is a TypeError."""
    with pytest.raises(TypeError, match="not callable or a descriptor"):
        parallelizable(42)  # type: ignore[call-overload]
