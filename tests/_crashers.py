"""Methods that crash their worker on chosen items and count their runs on disk.

Module-level classes, so process workers import them by reference. Every
run of item ``x`` creates a file ``run-<x>-<unique>`` in ``self.dir``; the
tests count them with :func:`runs`.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

from parallelmethods import parallelizable


def runs(directory: str, what: str = "run") -> dict[int, int]:
    """How many times each item ran (``what="end"``: ran to its end), from the files in ``directory``."""
    counts: dict[int, int] = {}
    for name in os.listdir(directory):
        if name.startswith(f"{what}-"):
            item = int(name.split("-")[1])
            counts[item] = counts.get(item, 0) + 1
    return counts


class Crasher:
    """``run(x)`` returns ``10 * x``; on items in ``crash_on`` it ends its worker with ``os._exit(1)``.

    ``once=True``: only the first run of such an item crashes (a marker file
    remembers). ``delay`` seconds of sleep before crashing let the other items
    complete first.
    """

    def __init__(
        self, directory: str, crash_on: tuple[int, ...] = (3,), once: bool = False, delay: float = 0.0
    ) -> None:
        self.dir = directory
        self.crash_on = crash_on
        self.once = once
        self.delay = delay

    @parallelizable
    def run(self, x: int) -> int:
        with open(os.path.join(self.dir, f"run-{x}-{uuid.uuid4().hex}"), "w"):
            pass
        if x in self.crash_on:
            marker = os.path.join(self.dir, f"crashed-{x}")
            if not (self.once and os.path.exists(marker)):
                with open(marker, "w"):
                    pass
                time.sleep(self.delay)
                os._exit(1)
        with open(os.path.join(self.dir, f"end-{x}-{uuid.uuid4().hex}"), "w"):
            pass
        return 10 * x


class Sleeper:
    """``run(x)`` returns ``x``; item ``slow`` sleeps ``seconds`` the first time it runs."""

    def __init__(self, directory: str, slow: int = 2, seconds: float = 30.0) -> None:
        self.dir = directory
        self.slow = slow
        self.seconds = seconds

    @parallelizable
    def run(self, x: int) -> int:
        with open(os.path.join(self.dir, f"run-{x}-{uuid.uuid4().hex}"), "w"):
            pass
        marker = os.path.join(self.dir, f"slept-{x}")
        if x == self.slow and not os.path.exists(marker):
            with open(marker, "w"):
                pass
            time.sleep(self.seconds)
        return x


class Exiter:
    """``run(x)`` returns ``x``; item 2 calls ``sys.exit(3)``."""

    @parallelizable
    def run(self, x: int) -> int:
        if x == 2:
            sys.exit(3)
        return x


class Warm:
    """``pid(x)`` says which worker ran it; ``fail(x)`` raises on ``bad`` and sleeps ``nap`` seconds on ``slow``."""

    def __init__(self, bad: int = 3, slow: int = -1, nap: float = 0.0) -> None:
        self.bad = bad
        self.slow = slow
        self.nap = nap
        self.ballast = list(range(200_000))  # a self worth keeping warm

    @parallelizable
    def pid(self, x: int) -> int:
        time.sleep(0.01)
        return os.getpid()

    @parallelizable
    def quick(self, x: int) -> int:
        """About a microsecond of work (chunks of them run in the worker's lean loop); raises on ``bad``."""
        if x == self.bad:
            raise ValueError(f"bad {x}")
        return sum(range(20)) + x

    @parallelizable
    def fail(self, x: int) -> int:
        if x == self.bad:
            raise ValueError(f"bad {x}")
        time.sleep(self.nap if x == self.slow else 0.02)
        return os.getpid()
