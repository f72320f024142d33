"""Checked by mypy --strict in CI: the public API's static types."""

from __future__ import annotations

from collections.abc import Iterator

from typing_extensions import assert_type

from parallelmethods import BoundParallelMethod, parallelizable


class Model:
    def __init__(self, w: int) -> None:
        self.w = w

    @parallelizable
    def score(self, x: int, y: int = 0) -> float:
        return self.w * x + y

    @parallelizable(n_jobs=2, backend="threading")
    def label(self, x: int) -> str:
        return str(x)


@parallelizable
def square(i: int) -> int:
    return i * i


m = Model(2)
bound: BoundParallelMethod[[int, int], float] = m.score
assert_type(m.score(2), float)
assert_type(m.score(2, y=1), float)
assert_type(m.score.map([1, 2]), list[float])
assert_type(m.score.starmap([(1, 2)]), list[float])
assert_type(m.score.imap(range(3)), Iterator[float])
assert_type(m.score.options(n_jobs=2).map([1]), list[float])
assert_type(m.score.partial(y=5).map([1]), list[float])
assert_type(m.label.map([1]), list[str])
assert_type(square(3), int)
assert_type(square.map(range(3)), list[int])

m.score("x")  # type: ignore[arg-type]  # a wrong argument type is an error
square("x")  # type: ignore[arg-type]
