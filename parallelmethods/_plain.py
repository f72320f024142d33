"""Large plain-data attributes travel as :mod:`marshal` inside the pickle.

Why: pickle memoizes every string and tuple it writes, so that an object
reached twice is written once and comes back shared. For a big tree of
plain data (a 1M-entry dict of tuples and strings) that memo is most of the
cost: 1.0 s to pickle, 0.1 s to marshal. marshal records an object for
sharing only when it has more than one reference, and rebuilds the same
values and types.

When: only where nobody could tell the difference (:func:`marshal_plain_attributes`):

* the root's default state (``copyreg.__newobj__`` + a dict), attribute by attribute;
* an attribute that is an exact dict/list/tuple/set/frozenset, holding only
  exact builtin containers and atoms (str, bytes, int, float, complex, bool,
  None), at least :data:`MARSHAL_MIN_OBJECTS` objects in all;
* no container in it referenced from anywhere but its one parent, and the
  attribute itself referenced only by ``self`` (:func:`_plain_size` reads
  reference counts): so no sharing with the rest of the state, no cycles;
* local workers (the file route) and Ray, which refuses workers of another
  Python version (``_transport.marshal_ok``): marshal's format belongs to one
  Python version, and a dask worker may run another;
* CPython with the GIL only (:data:`MARSHAL_SUPPORTED`): the reference-count
  check was measured and reasoned about there. On PyPy reference counts do
  not exist, and on a free-threaded build (3.13t) other threads can take a
  reference while we scan, and counts are biased per thread.

Anything else is pickled as before. The result is an ordinary reduce value:
``marshal.loads(buffer)``, with the buffer out of band when large.
"""

from __future__ import annotations

import copyreg
import itertools
import marshal
import pickle
import sys
from collections.abc import Iterator
from typing import Any

from . import _compat

__all__ = ["MARSHAL_MIN_OBJECTS", "MARSHAL_SUPPORTED", "marshal_plain_attributes"]

#: Where the marshal path is used at all (see the module docstring).
MARSHAL_SUPPORTED = sys.implementation.name == "cpython" and _compat.gil_enabled()

_NEWOBJ = getattr(copyreg, "__newobj__")  # noqa: B009 - untyped in typeshed; the default object reduce
_PLAIN_ATOMS = frozenset({str, bytes, int, float, complex, bool, type(None)})
_PLAIN_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})
_PLAIN_TYPES = _PLAIN_ATOMS | _PLAIN_CONTAINERS
#: Below this many objects, an attribute is pickled as usual (not worth it).
MARSHAL_MIN_OBJECTS = 1024
_MAX_DEPTH = 64


def _calibrate_unshared() -> int:
    """What ``sys.getrefcount`` reports, through ``map``, for an object held by
    one container and by one of our work lists: the count of an unshared
    object in :func:`_plain_size`. Measured, not assumed, because
    interpreters differ in how they count the temporary reference."""
    parent: list[Any] = [[]]
    group = list(parent)
    return max(map(sys.getrefcount, group))


_UNSHARED = _calibrate_unshared()


def _plain_size(group: list[Any], limit: int) -> int | None:
    """Objects in a tree of plain data, or None if it is not one.

    A tree of plain data: exact builtin containers and atoms only (no
    subclasses, no bytearray or other buffers, which marshal would turn into
    bytes), where no container is referenced from anywhere but its one
    parent (so no sharing and no cycle that marshal and pickle could treat
    differently). ``group`` holds the root; ``limit`` is the highest
    reference count its elements may show. Works one level at a time with
    C-level ``map`` calls (about 50 ns per object); a level of atoms only is
    type-checked without being listed.
    """
    pending: list[tuple[list[Any], set[type]]] = [(group, set(map(type, group)))]
    seen = 0
    for _depth in range(_MAX_DEPTH):
        if not pending:
            return seen
        deeper: list[tuple[list[Any], set[type]]] = []
        for level, kinds in pending:
            seen += len(level)
            if not kinds <= _PLAIN_TYPES:
                return None
            if not kinds & _PLAIN_CONTAINERS:
                continue  # atoms only: immutable, and marshal keeps their sharing
            holders = limit
            if kinds - _PLAIN_CONTAINERS:
                # A list of this level's containers adds a reference to each.
                level = [o for o in level if type(o) in _PLAIN_CONTAINERS]
                holders += 1
            if max(map(sys.getrefcount, level)) > holders:
                counts = list(map(sys.getrefcount, level))
                # Shared. Except the empty tuple and frozenset: immutable singletons.
                if any(n > holders and (len(o) or type(o) not in (tuple, frozenset)) for o, n in zip(level, counts)):
                    return None
            dicts = [o for o in level if type(o) is dict] if dict in kinds else []
            others = [o for o in level if type(o) is not dict] if dicts else level
            sources = [(dicts, False), (dicts, True)] if dicts else []
            if others:
                sources.append((others, False))
            for parents, values in sources:
                child_kinds = set(map(type, _children_of(parents, values)))
                if not child_kinds <= _PLAIN_TYPES:
                    return None
                if child_kinds & _PLAIN_CONTAINERS:
                    deeper.append((list(_children_of(parents, values)), child_kinds))
                else:
                    seen += sum(map(len, parents))
            del level, dicts, others, sources
        pending = deeper
        limit = _UNSHARED
    return None  # deeper than _MAX_DEPTH: leave it to pickle


def _children_of(parents: list[Any], values: bool) -> Iterator[Any]:
    """Elements (dict keys) of every container in ``parents``, or dict values."""
    if values:
        return itertools.chain.from_iterable(map(dict.values, parents))
    return itertools.chain.from_iterable(parents)


class _Marshalled:
    """A plain-data value, marshalled; pickles as ``marshal.loads(buffer)``.

    The buffer goes out of band when large, so the worker parses it straight
    from the mapped payload file.
    """

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self) -> Any:
        return marshal.loads, (pickle.PickleBuffer(self.blob),)


def marshal_plain_attributes(obj: Any, root_rv: Any) -> tuple[Any, tuple[str, ...]]:
    """``root_rv`` with its large plain-data attributes marshalled, and their names.

    Only the default object state (``copyreg.__newobj__``, a dict state) is
    touched; an attribute qualifies when :func:`_plain_size` accepts it,
    holds at least :data:`MARSHAL_MIN_OBJECTS` objects, and nothing else in
    the process refers to it (another attribute, a global, a caller's local
    variable): those are pickled as usual, so sharing survives as before.
    """
    if not MARSHAL_SUPPORTED:
        return root_rv, ()
    if not (isinstance(root_rv, tuple) and len(root_rv) >= 3 and root_rv[0] is _NEWOBJ and type(root_rv[2]) is dict):
        return root_rv, ()
    state: dict[str, Any] = root_rv[2]
    own = getattr(obj, "__dict__", None)
    new_state: dict[str, Any] | None = None
    names: list[str] = []
    for name in list(state):
        if type(state[name]) not in _PLAIN_CONTAINERS:
            continue
        # The state dict holds it, and __dict__ too when the state is a copy.
        limit = _UNSHARED + (1 if own is not None and own is not state and own.get(name) is state[name] else 0)
        size = _plain_size([state[name]], limit)
        if size is None or size < MARSHAL_MIN_OBJECTS:
            continue
        try:
            blob = marshal.dumps(state[name], 4)
        except ValueError:  # too deeply nested for marshal
            continue
        if new_state is None:
            new_state = dict(state)
        new_state[name] = _Marshalled(blob)
        names.append(name)
    if new_state is None:
        return root_rv, ()
    return (*root_rv[:2], new_state, *root_rv[3:]), tuple(names)
