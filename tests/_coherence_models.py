"""Module-level classes for tests/test_coherence.py (workers import them by name)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from parallelmethods import ParallelMixin, parallelizable


class Counter:
    """Issue 10, case 1: a mutating method and a pure one on the same class."""

    def __init__(self, w: int) -> None:
        self.w = w
        self.seen: list[int] = []

    @parallelizable
    def record(self, x: int) -> int:
        self.seen.append(x)
        return x

    @parallelizable
    def score(self, x: int) -> int:
        return self.w * x + len(self.seen)

    @parallelizable
    def rebind(self, x: int) -> int:
        self.w = -1
        return x


class Pair:
    """Issue 10, case 3: the answer depends on sharing, not only on content."""

    def __init__(self, shared: bool) -> None:
        self.a = [1, 2]
        self.b = self.a if shared else [1, 2]

    @parallelizable
    def same(self, x: int) -> bool:
        return self.a is self.b

    @parallelizable
    def unshare(self, x: int) -> bool:
        self.b = list(self.b)
        return True


class Where:
    """Issue 10, case 7: the caller's cwd and sys.path."""

    @parallelizable
    def read(self, name: str) -> str:
        with open(name) as f:
            return f.read()

    @parallelizable
    def cwd(self, x: int) -> str:
        return os.getcwd()

    @parallelizable
    def has_path(self, entry: str) -> bool:
        return entry in sys.path

    @parallelizable
    def import_it(self, module: str) -> int:
        return int(__import__(module).VALUE)


class Guarded(ParallelMixin, parallel=("touch",), exclude=("lock",)):
    """check_mutations on an object with an excluded, unpicklable attribute."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __parallel_init__(self) -> None:
        self.lock = threading.Lock()

    def touch(self, x: int) -> int:
        self.n += 1
        return x


class SetstateFails:
    def __init__(self) -> None:
        self.v = 1

    def __setstate__(self, state: Any) -> None:
        raise ValueError("cannot restore this state here")

    @parallelizable
    def f(self, x: int) -> int:
        return x


class InitFails(ParallelMixin, parallel=("f",)):
    def __parallel_init__(self) -> None:
        raise OSError("database is not reachable")

    def f(self, x: int) -> int:
        return x


class DeepChain:
    """Rebuilding recurses deeper than the worker's limit (as a tqdm bar does)."""

    def __init__(self) -> None:
        self.v = 1

    def __reduce__(self) -> Any:
        return (_recurse_forever, ())

    @parallelizable
    def f(self, x: int) -> int:
        return x


def _recurse_forever() -> Any:
    return _recurse_forever()


class ImportsLater:
    """Refers to a class whose module only the caller can import (sys.path edit in a test)."""

    def __init__(self, thing: Any) -> None:
        self.thing = thing

    @parallelizable
    def f(self, x: int) -> int:
        return x


class Slow:
    def __init__(self, w: int) -> None:
        self.w = w

    @parallelizable
    def f(self, x: int) -> int:
        import time

        time.sleep(0.01)
        return x * self.w

    @parallelizable
    def nap(self, x: int) -> int:
        import time

        if x == 3:
            time.sleep(5)
        return x
