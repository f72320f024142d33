"""Classes and helpers for tests/test_oracle_stateful.py (the plain-loop oracle).

Three kinds of classes, so that every way a class can travel is exercised:

* ``tests._oracle_helpers.Box`` / ``SlotBox`` / ``DataBox`` / ``MixBox``: the
  source in :data:`CLASSES_TEMPLATE` executed into this module's globals at
  import, so they pickle **by reference** (workers import this module). The
  state machine never changes their code or class attributes (long-lived
  workers may keep imported code, which the contract allows).
* the same source executed in the real ``__main__`` module (a notebook, see :class:`Notebook`):
  ``__module__ == "__main__"``, so they and their methods travel **by value**
  with cloudpickle; the state machine redefines them, their ``helper``, their
  class attributes and monkeypatches their methods.
* :func:`make_local_class`: a class defined in a function body
  (``<locals>`` qualname, by value), its code constant held in a closure.

Every method delegates to the module-level functions below (by reference,
never changed); what varies is passed in from the by-value parts: a code
constant written in the method body, ``type(self).factor`` and ``helper(x)``.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from dataclasses import dataclass, field  # noqa: F401 - used by the exec'd template
from typing import Any

from parallelmethods import ParallelMixin, parallelizable  # noqa: F401 - used by the exec'd template

#: Prefix of every temporary directory the state machine makes.
TMP_PREFIX = "pm_oracle_"
#: The module each probe directory holds (found through sys.path).
PROBE_MODULE = "pm_oracle_probe"
#: The relative file each cwd directory holds.
WHOAMI = "pm_oracle_whoami.txt"


def helper(v: int) -> int:
    """The by-reference classes' helper (never redefined)."""
    return v + 1


def init_box(self: Any, w: int, a: list[int], b: list[int], d: dict[int, int], arr: Any, big: Any) -> None:
    self.w = w
    self.a = a
    self.b = b
    self.seen = []
    self.count = 0
    self.d = d
    self.arr = arr
    self.big = big


def core_value(self: Any, x: int, code: int, factor: int, hx: int) -> tuple[Any, ...]:
    """What the pure method returns: everything a stale or confused copy would get wrong."""
    return (
        code,
        type(self).__name__,
        factor,
        hx,
        self.w * x,
        tuple(self.a),
        tuple(self.b),
        self.a is self.b,
        len(self.seen),
        self.count,
        tuple(sorted(self.d.items())),
        int(self.arr.sum()),
        tuple(int(v) for v in self.arr[:3]),
        None if self.big is None else (len(self.big), sum(self.big)),
    )


def where_value(x: int) -> tuple[Any, ...]:
    """The caller's cwd, a file read by relative path, and what sys.path finds."""
    import importlib.util

    try:
        with open(WHOAMI) as f:
            whoami: str | None = f.read()
    except FileNotFoundError:
        whoami = None
    spec = importlib.util.find_spec(PROBE_MODULE)
    origin = spec.origin if spec is not None else None
    ours = tuple(p for p in sys.path if TMP_PREFIX in p)
    return (x, os.getcwd(), whoami, origin, ours)


def record_impl(self: Any, x: int) -> tuple[int, int]:
    """Mutating: appends to self.seen, counts; returns (x, len(seen) before)."""
    before = len(self.seen)
    self.seen.append(x)
    self.count += 1
    return (x, before)


def scramble_impl(self: Any, x: int) -> int:
    """Mutating: changes many attributes (in place and rebinding); result is fixed."""
    self.b.append(x)
    self.w = self.w + 1
    self.d[x] = x
    self.arr = self.arr + 1
    self.count += 1
    if self.big is not None:
        self.big.append(x)
    return x * 2


def alias_impl(self: Any, x: int) -> int:
    """Mutating: makes self.b the same list as self.a, then grows it."""
    self.b = self.a
    self.a.append(x)
    return x + 1


def maybe_crash(x: int, crashers: frozenset[int], once_dir: str | None, runs_dir: str | None) -> None:
    """Kill this worker process on the items in ``crashers`` (always, or once per item)."""
    if x not in crashers:
        return
    if runs_dir is not None:
        with open(os.path.join(runs_dir, str(x)), "a") as f:
            f.write("r")
    if once_dir is None:
        os._exit(1)
    marker = os.path.join(once_dir, str(x))
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(1)


def maybe_sleep(x: int, sleepers: frozenset[int], secs: float) -> None:
    if x in sleepers:
        time.sleep(secs)


METHODS = """
@parallelizable
def pure(self, x):
    return core_value(self, x, {code}, type(self).factor, helper(x))

@parallelizable
def alt(self, x):
    return ("alt", {code}, x, self.w)

@parallelizable
def where(self, x):
    return where_value(x)

@parallelizable
def record(self, x):
    return record_impl(self, x)

@parallelizable
def scramble(self, x):
    return scramble_impl(self, x)

@parallelizable
def alias_in_worker(self, x):
    return alias_impl(self, x)

@parallelizable
def crash(self, crashers, once_dir, runs_dir, x):
    maybe_crash(x, crashers, once_dir, runs_dir)
    return self.pure(x)

@parallelizable
def nap(self, sleepers, secs, x):
    maybe_sleep(x, sleepers, secs)
    return self.pure(x)
"""

_MIX_PARALLEL = ("pure", "alt", "where", "record", "scramble", "alias_in_worker", "crash", "nap")
_INIT = """
def __init__(self, w, a, b, d, arr, big=None):
    init_box(self, w, a, b, d, arr, big)
"""


def classes_source(code: int) -> str:
    """Source of the four classes; ``code`` is a constant written into the method bodies."""
    methods = textwrap.indent(METHODS.format(code=code), "    ")
    plain = methods.replace("    @parallelizable\n", "")
    init = textwrap.indent(_INIT, "    ")
    return f"""
class Box:
    factor = 1
{init}
{methods}

class SlotBox:
    __slots__ = ("w", "a", "b", "seen", "count", "d", "arr", "big")
    factor = 2
{init}
{methods}

@dataclass
class DataBox:
    w: int
    a: list
    b: list
    d: dict
    arr: object
    big: object = None
    seen: list = field(default_factory=list)
    count: int = 0
    factor = 3
{methods}

class MixBox(ParallelMixin, parallel={_MIX_PARALLEL!r}):
    factor = 4
{init}
{plain}
"""


#: Names of the classes :func:`classes_source` defines.
CLASS_NAMES = ("Box", "SlotBox", "DataBox", "MixBox")

NAMESPACE_PRELUDE = """
from dataclasses import dataclass, field
from parallelmethods import parallelizable, ParallelMixin
from tests._oracle_helpers import (
    core_value, where_value, record_impl, scramble_impl, alias_impl, maybe_crash, maybe_sleep, init_box,
)

def helper(v):
    return v + 1
"""


class Notebook:
    """Cells run in the real ``__main__`` module, as in a notebook or a script.

    What they define is findable by name in this process (stdlib pickle would
    write it by reference) but not in worker processes, so it must travel by
    value, and the oracle is its current code. :meth:`close` puts ``__main__``
    back as it was.
    """

    def __init__(self, code: int) -> None:
        self.ns: dict[str, Any] = sys.modules["__main__"].__dict__
        self._saved = dict(self.ns)
        self.run(NAMESPACE_PRELUDE)
        self.run(classes_source(code))

    def run(self, source: str) -> None:
        exec(compile(source, "<oracle-notebook>", "exec"), self.ns)

    def close(self) -> None:
        for k in list(self.ns):
            if k not in self._saved:
                del self.ns[k]
        self.ns.update(self._saved)


# By-reference copies of the same classes: tests._oracle_helpers.Box, ...
exec(compile(classes_source(0), __file__ + ":classes_source", "exec"), globals())


def make_local_class(code: int) -> type:
    """A class defined in a function body (travels by value); ``code`` lives in a closure."""

    class LocalBox:
        factor = 5

        def __init__(self, w, a, b, d, arr, big=None):  # type: ignore[no-untyped-def]
            init_box(self, w, a, b, d, arr, big)

        @parallelizable
        def pure(self, x):  # type: ignore[no-untyped-def]
            return core_value(self, x, code, type(self).factor, helper(x))

        @parallelizable
        def alt(self, x):  # type: ignore[no-untyped-def]
            return ("alt", code, x, self.w)

        @parallelizable
        def where(self, x):  # type: ignore[no-untyped-def]
            return where_value(x)

        @parallelizable
        def record(self, x):  # type: ignore[no-untyped-def]
            return record_impl(self, x)

        @parallelizable
        def scramble(self, x):  # type: ignore[no-untyped-def]
            return scramble_impl(self, x)

        @parallelizable
        def alias_in_worker(self, x):  # type: ignore[no-untyped-def]
            return alias_impl(self, x)

        @parallelizable
        def crash(self, crashers, once_dir, runs_dir, x):  # type: ignore[no-untyped-def]
            maybe_crash(x, crashers, once_dir, runs_dir)
            return self.pure(x)

        @parallelizable
        def nap(self, sleepers, secs, x):  # type: ignore[no-untyped-def]
            maybe_sleep(x, sleepers, secs)
            return self.pure(x)

    return LocalBox
