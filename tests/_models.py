"""Classes used by the tests; importable by name in worker processes."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
from typing import Any

from parallelmethods import ParallelMixin, parallelizable

COUNTS_DIR_ENV = "PM_TEST_COUNTS_DIR"


class Model:
    def __init__(self, w: int) -> None:
        self.w = w

    @parallelizable
    def score(self, x: int, y: int = 0) -> int:
        """Score one item."""
        return self.w * x + y

    @parallelizable
    @classmethod
    def build(cls, x: int) -> tuple[str, int]:
        return (cls.__name__, x)

    @parallelizable
    @staticmethod
    def helper(x: int) -> int:
        return x + 100

    @property
    def doubled(self) -> int:
        return self.w * 2

    @parallelizable
    def uses_property(self, x: int) -> int:
        return self.doubled + x

    @parallelizable
    def varargs(self, *args: int, **kwargs: int) -> tuple[Any, ...]:
        return (args, tuple(sorted(kwargs.items())))

    @parallelizable
    def pid(self, x: int) -> int:
        return os.getpid()

    @parallelizable
    def mutate(self, x: int) -> int:
        self.w += 1
        return x

    @parallelizable
    def read_w(self, x: int) -> int:
        return self.w


class SubModel(Model):
    """Inherits score; overrides build via a new decorated method."""

    @parallelizable
    def score(self, x: int, y: int = 0) -> int:
        return -(self.w * x + y)


class Inherits(Model):
    pass


class Slotted:
    __slots__ = ("w",)

    def __init__(self, w: int) -> None:
        self.w = w

    @parallelizable
    def score(self, x: int) -> int:
        return self.w * x


@dataclasses.dataclass
class DataModel:
    w: int

    @parallelizable
    def score(self, x: int) -> int:
        return self.w * x


@dataclasses.dataclass(slots=True)
class SlotDataModel:
    w: int

    @parallelizable
    def score(self, x: int) -> int:
        return self.w * x


class Counted:
    """Appends to files each time it is pickled (caller) or unpickled (worker)."""

    def __init__(self, payload: Any, counts_dir: str) -> None:
        self.payload = payload
        self.counts_dir = counts_dir

    def __getstate__(self) -> dict[str, Any]:
        with open(os.path.join(self.counts_dir, "pickled"), "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        with open(os.path.join(self.counts_dir, "unpickled"), "a") as f:
            f.write(f"{os.getpid()}\n")

    @parallelizable
    def get(self, x: int) -> int:
        return len(self.payload) + x


class Store(ParallelMixin, parallel=("lookup", "kinds"), exclude=("conn", "_lock")):
    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(path)
        self._lock = threading.Lock()
        self.inits = 0

    def __parallel_init__(self) -> None:
        self.conn = sqlite3.connect(self.path)
        self._lock = threading.Lock()
        self.inits += 1

    def lookup(self, key: str) -> Any:
        with self._lock:
            row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @classmethod
    def kinds(cls, x: int) -> str:
        return f"{cls.__name__}:{x}"

    @parallelizable
    def inits_seen(self, x: int) -> int:
        return self.inits


class SubStore(Store, parallel=("shout",), exclude=("extra",)):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.extra = threading.Lock()

    def lookup(self, key: str) -> Any:
        value = super().lookup(key)
        return None if value is None else str(value).upper()

    def shout(self, x: str) -> str:
        return x.upper()


@dataclasses.dataclass(slots=True)
class SlotStore(ParallelMixin, parallel=("get",), exclude=("lock",)):
    data: dict[str, int]
    lock: Any = None

    def get(self, key: str) -> int | None:
        return self.data.get(key)


def make_db(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kv (key TEXT, value TEXT)")
    conn.executemany("INSERT INTO kv VALUES (?, ?)", [(f"k{i}", f"v{i}") for i in range(20)])
    conn.commit()
    conn.close()


@parallelizable
def square(i: int) -> int:
    """Square a number."""
    return i * i


def plain_table(n: int) -> dict[str, Any]:
    """Plain data of every kind marshal and pickle both write: the same each call."""
    return {
        f"k{i}": (
            i,
            float(i),
            str(i) * 2,
            [i, -i],
            {"n": i, (i, "t"): frozenset({i})},
            None,
            i % 2 == 0,
            b"b",
            2**70 + i,
            complex(i, 1),
            (),
        )
        for i in range(n)
    }


class Tables:
    """Large plain-data attributes, some shared: what travels as marshal and what must not."""

    def __init__(self, n: int) -> None:
        self.table = plain_table(n)  # only self holds it: marshalled on the file route
        shared = list(range(n))
        self.left = shared  # two attributes, one list: sharing must survive
        self.right = shared
        inner = [0, 0]
        self.repeated = [inner] * n  # one list referenced n times inside a value
        self.buffers = [bytearray(b"ab") for _ in range(n)]  # bytearray: marshal would make bytes

    @parallelizable
    def facts(self, i: int) -> tuple[Any, ...]:
        key = f"k{i}"
        return (
            self.table[key] == plain_table(i + 1)[key],
            [type(v).__name__ for v in self.table[key]],
            self.left is self.right,
            self.repeated[0] is self.repeated[-1],
            type(self.buffers[i]).__name__,
        )
