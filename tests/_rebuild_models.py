"""Classes whose ``self`` pickles but cannot (or can) be rebuilt in a worker.

Module level, so process workers can import them by name.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np

from parallelmethods import ParallelMixin, parallelizable

#: How many times BadSetstate.__setstate__ ran in this process.
SETSTATE_CALLS: list[int] = []


def make_bar() -> Any:
    from tqdm import tqdm

    return tqdm(total=3, disable=False, file=io.StringIO())


class WithBar:
    def __init__(self) -> None:
        self.w = 2
        self.bar = make_bar()

    @parallelizable
    def f(self, x: int) -> int:
        return self.w * x


class BadSetstate:
    def __init__(self) -> None:
        self.w = 3

    def __setstate__(self, state: dict[str, Any]) -> None:
        SETSTATE_CALLS.append(1)
        raise ValueError("state from another version")

    @parallelizable
    def f(self, x: int) -> int:
        return self.w * x


def _explode() -> None:
    raise RuntimeError("cannot be rebuilt here")


class Exploding:
    def __reduce__(self) -> Any:
        return (_explode, ())


class HoldsExploding:
    def __init__(self) -> None:
        self.w = 1
        self.table = {"k": [1, Exploding()]}

    @parallelizable
    def f(self, x: int) -> int:
        return x


class Healthy(ParallelMixin, parallel=("f",), exclude=("lock",)):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.weights = np.arange(100_000, dtype=np.float64)  # out of band: > 64 KB
        self.names = {"a": [1, 2, 3]}

    def __parallel_init__(self) -> None:
        raise RuntimeError("__parallel_init__ must not run in explain()")

    def f(self, x: int) -> float:
        return float(self.weights[x])


class WithLock:
    def __init__(self) -> None:
        self.w = 4
        self.lock = threading.Lock()

    @parallelizable
    def f(self, x: int) -> int:
        return self.w * x
