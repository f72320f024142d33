"""Objects that fail at each stage of the round trip (loky's crash_cases, in spirit)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from parallelmethods import parallelizable


class FailsToUnpickle:
    def __reduce__(self) -> Any:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("cannot be rebuilt here")


class ResultUnpicklableHere:
    """Pickles fine in the worker, fails to rebuild in the caller."""

    def __reduce__(self) -> Any:
        return (_explode_in_caller, (os.getpid(),))


def _explode_in_caller(worker_pid: int) -> ResultUnpicklableHere:
    raise RuntimeError("result cannot be rebuilt in the caller")


class FinickyError(Exception):
    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


class Faulty:
    def __init__(self) -> None:
        self.ok = True

    @parallelizable
    def method_raises(self, x: int) -> int:
        if x == 7:
            raise KeyError(f"no {x}")
        return x

    @parallelizable
    def finicky(self, x: int) -> int:
        if x == 2:
            raise FinickyError("finicky", code=3)
        return x

    @parallelizable
    def result_unpicklable(self, x: int) -> Any:
        return threading.Lock() if x == 1 else x

    @parallelizable
    def result_fails_in_caller(self, x: int) -> Any:
        return ResultUnpicklableHere() if x == 1 else x

    @parallelizable
    def exits(self, x: int) -> int:
        if x == 3:
            os._exit(1)
        time.sleep(0.01)
        return x

    @parallelizable
    def killed(self, x: int) -> int:
        if x == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01)
        return x

    @parallelizable
    def sleeps(self, x: int) -> int:
        if x == 2:
            time.sleep(60)
        return x

    @parallelizable
    def flaky_exit(self, x: int) -> int:
        """Dies the first time it sees item 3 (a marker file, named by self.marker, remembers)."""
        marker = self.marker
        if x == 3 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return x


class UnpicklesBadly:
    def __init__(self) -> None:
        self.bomb = FailsToUnpickle()

    @parallelizable
    def f(self, x: int) -> int:
        return x


class HoldsLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    @parallelizable
    def f(self, x: int) -> int:
        return x
