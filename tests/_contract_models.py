"""Classes for the contract tests (tests/test_contract_*.py); importable by name in workers."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any

from parallelmethods import ParallelMixin, parallelizable

#: imap items whose completion order differs from input order on 2 workers:
#: item 0 is slow, so 1, 2, 3 (each after the previous, on the other worker) finish first.
SLEEPS = {0: 1.5, 1: 0.0, 2: 0.2, 3: 0.4}
COMPLETION_ORDER = [1, 2, 3, 0]


def task_first() -> int:
    """The first item index of the task (chunk) running this call, read from the worker's dispatcher frame.

    Items sent in one task share it; it is how the tests observe batch_size in
    the worker, whatever the backend.
    """
    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "run_chunk" and "first" in frame.f_locals:
            return int(frame.f_locals["first"])
        frame = frame.f_back
    raise AssertionError("not called by parallelmethods' run_chunk")


class Timed:
    """``wait(x)`` sleeps ``SLEEPS[x]`` and returns ``x``; ``where(x)`` says where it ran."""

    @parallelizable
    def wait(self, x: int) -> int:
        time.sleep(SLEEPS.get(x, 0.0))
        return x

    @parallelizable(ordered=False)
    def wait_unordered(self, x: int) -> int:
        time.sleep(SLEEPS.get(x, 0.0))
        return x

    @parallelizable
    def fails_fast(self, x: int) -> int:
        """Item 0 is slow and fine; item 1 fails at once: its error arrives first."""
        if x == 0:
            time.sleep(1.0)
        if x == 1:
            raise ValueError("item one")
        return x

    @parallelizable
    def where(self, x: int) -> tuple[int, int]:
        time.sleep(0.05)
        return os.getpid(), threading.get_ident()

    @parallelizable
    def task(self, x: int) -> tuple[int, int]:
        return x, task_first()

    @parallelizable
    def spin(self, x: int) -> int:
        """Burns CPU for up to 20 s (so a task still running shows in CPU time)."""
        if x == 0:
            return 0
        end = time.monotonic() + 20
        while time.monotonic() < end:
            pass
        return x

    @parallelizable
    def half_second(self, x: int) -> int:
        time.sleep(0.5)
        return x


@parallelizable(backend="loky", n_jobs=2)
def where_fn(x: int) -> tuple[int, int]:
    time.sleep(0.05)
    return os.getpid(), threading.get_ident()


class Mutates:
    def __init__(self) -> None:
        self.seen = 0

    @parallelizable
    def bump(self, x: int) -> int:
        self.seen += 1
        return x


class OwnError:
    """``run(x)`` records each run in ``self.dir``; item 2 raises ValueError (its own exception, not a loss)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory

    @parallelizable
    def run(self, x: int) -> int:
        with open(os.path.join(self.dir, f"run-{x}-{uuid.uuid4().hex}"), "w"):
            pass
        if x == 2:
            raise ValueError("own error")
        return x


class Recorder:
    """``run(x)`` records its run in ``self.dir``; an argument that is a lock cannot travel."""

    def __init__(self, directory: str) -> None:
        self.dir = directory

    @parallelizable
    def run(self, x: Any) -> int:
        with open(os.path.join(self.dir, f"run-{x if isinstance(x, int) else 'lock'}-{uuid.uuid4().hex}"), "w"):
            pass
        return 0


class WithStatic(ParallelMixin, parallel=("twice",)):
    @staticmethod
    def twice(x: int) -> int:
        return 2 * x


class InitCounted(ParallelMixin, parallel=("inits_seen",), exclude=("lock",)):
    """Counts ``__parallel_init__`` runs on the object itself and in a class-level list (same process only)."""

    calls: list[int] = []

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inits = 0

    def __parallel_init__(self) -> None:
        self.lock = threading.Lock()
        self.inits += 1
        InitCounted.calls.append(os.getpid())

    def inits_seen(self, x: int) -> int:
        return self.inits


class Plain:
    """The undecorated twin of :class:`Decorated`, for metadata parity."""

    def score(self, x: int, y: int = 0) -> int:
        """Score one item."""
        return x + y

    @classmethod
    def build(cls, x: int) -> str:
        """Build from x."""
        return f"{cls.__name__}{x}"

    @staticmethod
    def helper(x: int) -> int:
        """Help with x."""
        return x + 1


class Decorated:
    """:class:`Plain` with every method decorated (outermost)."""

    @parallelizable
    def score(self, x: int, y: int = 0) -> int:
        """Score one item."""
        return x + y

    @parallelizable
    @classmethod
    def build(cls, x: int) -> str:
        """Build from x."""
        return f"{cls.__name__}{x}"

    @parallelizable
    @staticmethod
    def helper(x: int) -> int:
        """Help with x."""
        return x + 1
