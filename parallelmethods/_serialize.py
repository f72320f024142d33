"""Turning ``self`` and arguments into bytes, once, and back.

``dumps_state(obj)`` -> :class:`Payload` (main pickle stream + out-of-band
buffers + the state-cache key, or a content digest when no key is given).
The rules, in order:

1. stdlib :mod:`pickle` (protocol 5), through a pickler that refuses anything
   a worker could not import by reference: classes and functions from
   ``__main__`` or defined in a function body (``<locals>``), lambdas. Why:
   ``pickle`` happily writes ``__main__.Model`` by name, and a loky worker,
   whose ``__main__`` is not your script, then fails to find it.
2. :mod:`cloudpickle` when (1) refuses or fails: it pickles those by value
   (the same choice cloudpickle's ``_should_pickle_by_reference`` makes).
3. Neither works: :class:`~parallelmethods.SerializationError`, naming the
   first attribute path that cannot be pickled, and the fix.

Attributes named in the class's ``exclude=`` list are dropped from the root
object's state by ``reducer_override`` (the user's class is never given a
``__getstate__``); ``__parallel_init__`` rebuilds them in the worker.

Large buffers (numpy arrays, ``PickleBuffer``) travel out of band (PEP 574):
they are not copied into the pickle stream, and the worker maps them
from the payload file (privately, copy-on-write) instead of copying them.

On the local file route and on Ray (``_transport.marshal_ok``), a large attribute that is plain data (nested
dicts, lists, tuples, sets of str/int/float/...; shared with nothing else)
is written with :mod:`marshal` inside the pickle, about 3x cheaper than
pickle's memo for such data: see :mod:`parallelmethods._plain` for when and why.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from ._compat import cloudpickle_by_value
from ._descriptor import ParallelFunction
from ._plain import marshal_plain_attributes
from .errors import SerializationError

__all__ = ["Payload", "describe_path_fix", "dumps_state", "dumps_value", "find_unpicklable", "loads_value"]

PROTOCOL = 5


class _NeedsCloudpickle(Exception):
    """Raised inside the stdlib pickler to switch to cloudpickle."""


def _by_reference_impossible(obj: Any) -> str | None:
    """Why ``obj`` (a class or function) cannot be pickled by name, or None."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "") or ""
    if module == "__main__":
        return f"{qualname} is defined in __main__, which workers cannot import"
    if "<locals>" in qualname:
        return f"{qualname} is defined inside a function"
    if qualname == "<lambda>" or qualname.endswith(".<lambda>"):
        return "a lambda has no importable name"
    if module is not None and cloudpickle_by_value(obj):
        # Registered with cloudpickle.register_pickle_by_value, or the name
        # no longer leads to this very object (redefined): by value.
        return f"{module}.{qualname} is pickled by value by cloudpickle"
    return None


class _RootPickler(pickle.Pickler):
    """stdlib pickler that writes the root from a reduce value taken once
    per map (see :func:`root_reduce`); used as is for digests."""

    def __init__(self, file: io.BytesIO, root: Any, root_rv: Any, buffer_callback: Any) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self._root = root
        self._root_rv = root_rv

    def reducer_override(self, obj: Any) -> Any:
        if obj is self._root and self._root_rv is not None:
            return fresh(self._root_rv)
        return NotImplemented


class _Pickler(_RootPickler):
    """The shipping pickler: also gives up on what only cloudpickle can carry."""

    def reducer_override(self, obj: Any) -> Any:
        # Called for every object except exact int/float/str/bytes/dict/list/
        # tuple/set instances, so plain data pays nothing for this (~2%, measured).
        if isinstance(obj, (type, types.FunctionType)):
            why = _by_reference_impossible(obj)
            if why is not None:
                raise _NeedsCloudpickle(why)
            return NotImplemented
        if isinstance(obj, ParallelFunction) and obj._travels_by_value():
            # Its __reduce__ names a __main__ function (for stdlib pickle
            # users); workers need the function itself.
            msg = f"{obj.__qualname__} is defined in {obj.__module__}, which workers cannot import"
            raise _NeedsCloudpickle(msg)
        return super().reducer_override(obj)


class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, writing the root from the same once-taken reduce value."""

    def __init__(self, file: io.BytesIO, root: Any, root_rv: Any, buffer_callback: Any) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self._root = root
        self._root_rv = root_rv

    def reducer_override(self, obj: Any) -> Any:
        if obj is self._root and self._root_rv is not None:
            return fresh(self._root_rv)
        if isinstance(obj, ParallelFunction) and obj._travels_by_value():
            return obj._reduce_by_value()  # the function itself, by value (not its __main__ name)
        return super().reducer_override(obj)


def cloud_dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps`` that copies decorated ``__main__`` functions by value too.

    Why not plain ``cloudpickle.dumps``: a ``ParallelFunction`` of ``__main__``
    reduces to its name (so stdlib pickle users keep working), which a
    worker process cannot resolve.
    """
    out = io.BytesIO()
    _CloudPickler(out, None, None, None).dump(obj)
    return out.getvalue()


def root_reduce(obj: Any, exclude: tuple[str, ...] = ()) -> Any:
    """``obj.__reduce_ex__(5)`` taken once per map, minus excluded attributes.

    Why once: the digest pass and the shipping pass then serialize the same
    snapshot, and the object's ``__reduce_ex__``/``__getstate__`` runs once
    per map call. None for objects pickle writes by reference (classes,
    functions), which need no snapshot, and when ``__reduce_ex__`` raises:
    the pickler then calls it itself, fails, and the failure is reported.
    """
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return None
    if isinstance(obj, ParallelFunction):  # a decorated module function as the subject
        return obj._reduce_by_value() if obj._travels_by_value() else None
    try:
        rv = _reduce_without(obj, exclude) if exclude else obj.__reduce_ex__(PROTOCOL)
    except Exception:  # noqa: BLE001 - the pickler asks again and reports it as a SerializationError
        return None
    if isinstance(rv, tuple) and len(rv) > 3:
        # listitems/dictitems are one-shot iterators; every pass (fingerprint,
        # shipping, cloudpickle fallback) needs them, so keep them as lists.
        rv = (*rv[:3], *(None if it is None else list(it) for it in rv[3:5]), *rv[5:])
    return rv


def fresh(rv: Any) -> Any:
    """A reduce value pickle can consume: new iterators over the kept item lists."""
    if isinstance(rv, tuple) and len(rv) > 3:
        return (*rv[:3], *(None if it is None else iter(it) for it in rv[3:5]), *rv[5:])
    return rv


def _reduce_without(obj: Any, exclude: tuple[str, ...]) -> Any:
    """``obj.__reduce_ex__`` with the excluded attributes removed from the state.

    Handles the three state shapes ``object.__reduce_ex__`` produces: a
    ``__dict__`` copy, ``(dict, slots_dict)`` for ``__slots__`` classes, or None.
    """
    rv = obj.__reduce_ex__(PROTOCOL)
    if not isinstance(rv, tuple) or len(rv) < 3:
        return rv
    state = rv[2]
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if k not in exclude}
    elif isinstance(state, tuple) and len(state) == 2:
        d, slots = state
        d = {k: v for k, v in (d or {}).items() if k not in exclude} or None
        slots = {k: v for k, v in (slots or {}).items() if k not in exclude} or None
        state = (d, slots)
    return (*rv[:2], state, *rv[3:])


@dataclass(frozen=True)
class Payload:
    """One serialized object: pickle stream, out-of-band buffers, digest.

    ``via`` is ``"pickle"`` or ``"cloudpickle"``; ``why`` says why cloudpickle
    was needed (empty for pickle).
    """

    main: bytes
    buffers: tuple[memoryview, ...]
    digest: str
    via: str
    why: str = ""
    nbytes: int = field(default=0)
    marshalled: tuple[str, ...] = ()


def _digest(main: bytes, buffers: list[memoryview]) -> str:
    h = hashlib.sha256(main)
    for buf in buffers:
        h.update(len(buf).to_bytes(8, "little"))
        h.update(buf)
    return h.hexdigest()[:32]


def _dump_with(pickler_cls: Callable[..., pickle.Pickler], obj: Any, root_rv: Any) -> tuple[bytes, list[memoryview]]:
    buffers: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        # Small buffers cost more out of band than in the stream.
        if raw.nbytes < 1 << 16:
            return True
        buffers.append(raw)
        return False

    out = io.BytesIO()
    pickler_cls(out, obj, root_rv, keep).dump(obj)
    return out.getvalue(), buffers


def dumps_state(
    obj: Any,
    *,
    exclude: tuple[str, ...] = (),
    what: str = "self",
    owner_name: str = "",
    root_rv: Any = None,
    digest: str | None = None,
    plain_as_marshal: bool = False,
) -> Payload:
    """Serialize ``obj`` once: pickle, else cloudpickle, else SerializationError.

    ``root_rv`` is the root's reduce value when the caller already took it
    (:func:`root_reduce`); both passes below reuse it. ``digest``, when the
    caller has a state-cache key already (see :mod:`parallelmethods._statecache`),
    is used instead of hashing the stream. ``plain_as_marshal``
    (local workers and Ray only: marshal's format belongs to this Python version)
    writes large plain-data attributes with marshal, see
    :func:`~parallelmethods._plain.marshal_plain_attributes`.
    """
    if root_rv is None:
        root_rv = root_reduce(obj, exclude)
    marshalled: tuple[str, ...] = ()
    if plain_as_marshal:
        root_rv, marshalled = marshal_plain_attributes(obj, root_rv)
    why = ""
    try:
        main, buffers = _dump_with(_Pickler, obj, root_rv)
        return Payload(
            main,
            tuple(buffers),
            digest or _digest(main, buffers),
            "pickle",
            "",
            len(main) + sum(b.nbytes for b in buffers),
            marshalled,
        )
    except _NeedsCloudpickle as e:
        why = str(e)
    except RecursionError as e:  # as cloudpickle's Pickler.dump does
        why = f"pickle hit the recursion limit ({e})"
    except Exception as e:  # noqa: BLE001 - any pickling failure falls through to cloudpickle
        why = f"pickle failed: {type(e).__name__}: {e}"
    try:
        main, buffers = _dump_with(_CloudPickler, obj, root_rv)
    except Exception as e:
        raise serialization_error(obj, e, what=what, exclude=exclude, owner_name=owner_name) from e
    return Payload(
        main,
        tuple(buffers),
        digest or _digest(main, buffers),
        "cloudpickle",
        why,
        len(main) + sum(b.nbytes for b in buffers),
        marshalled,
    )


def _by_value_code(digest: str) -> None:  # pragma: no cover - never called
    """Stands for a class or function in a fingerprint (the bytes are only hashed)."""


class _FingerprintPickler(_RootPickler):
    """Memo-less pickler for fingerprints: code that travels by value is
    written as a digest of its cloudpickle bytes, so that a redefined class
    or helper, or a changed class attribute, changes the fingerprint."""

    def __init__(self, file: io.BytesIO, root: Any, root_rv: Any, buffer_callback: Any, code: dict[int, str]) -> None:
        super().__init__(file, root, root_rv, buffer_callback)
        self._code = code

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and _by_reference_impossible(obj) is not None:
            digest = self._code.get(id(obj))
            if digest is None:
                # cloudpickle writes the class with its methods and the
                # globals they use (helpers, constants), all by value.
                digest = hashlib.sha256(cloud_dumps(obj)).hexdigest()
                self._code[id(obj)] = digest
            return (_by_value_code, (digest,))
        if isinstance(obj, ParallelFunction) and obj._travels_by_value():
            return obj._reduce_by_value()  # its target then enters as by-value code
        return super().reducer_override(obj)


class _HashWriter:
    """A file for the pickler that hashes what it is given and keeps nothing.

    Why: the pickle of a large ``self`` (40 MB for a dict of a million
    entries) is only hashed; written into a BytesIO it would be held twice
    (buffer, then ``getvalue()``), and in a loky worker that transient
    memory counts against loky's leak guard.
    """

    __slots__ = ("hash",)

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return len(data)


def _fingerprint_bytes(value: Any, root: Any, root_rv: Any, code: dict[int, str], fast: bool) -> bytes:
    out = _HashWriter()
    buffers: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        buffers.append(buf.raw())
        return False

    pickler = _FingerprintPickler(out, root, root_rv, keep, code)  # type: ignore[arg-type]
    pickler.fast = fast  # type: ignore[attr-defined]
    pickler.dump(value)
    for buf in buffers:  # as _digest does
        out.hash.update(len(buf).to_bytes(8, "little"))
        out.hash.update(buf)
    return out.hash.hexdigest()[:32].encode()


def _state_parts(root_rv: Any) -> list[tuple[str, Any]] | None:
    """The (name, value) pairs of a reduce value's state, or None if it has another shape."""
    if not (isinstance(root_rv, tuple) and len(root_rv) >= 3):
        return None
    state = root_rv[2]
    if isinstance(state, dict):
        return list(state.items())
    if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
        return [*(state[0] or {}).items(), *(state[1] or {}).items()]
    return None


def fingerprint(obj: Any, root_rv: Any) -> str:
    """What a worker's copy of ``obj`` must match: content, sharing (two levels), by-value code.

    Computed in the caller (is the kept payload still this object's state?)
    and in workers (has a method changed the cached copy?). Three parts:

    * content: a memo-less ("fast mode") pickle, hashed. Why memo-less:
      pickle's memo dominates the cost of large containers; without it a
      1M-entry dict pickles ~9x faster (0.09 s vs 0.84 s, measured). The
      bytes are only hashed, never sent.
    * code: classes and functions that travel by value (``__main__``,
      notebooks, ``<locals>``, cloudpickle's by-value registry) enter as a
      digest of their cloudpickle bytes, which hold their methods, class
      attributes and the globals the methods use.
    * sharing: which attributes, and which of their direct children, are
      the same object (``self.b is self.a``, ``self.b is self.a[0]``; see
      :func:`_sharing`). Memo-less bytes cannot see sharing at all.

    Never raises. A part that fast mode refuses (a cycle) is hashed with the
    memo; a part nothing can pickle (a worker-made lock or connection)
    enters by type and identity. Not seen: a change in sharing deeper than
    that alone (``self.cfg['a'][0] = self.cfg['b'][0]`` when both were equal
    already), which leaves every byte the same, and state that a nested
    object's ``__getstate__`` leaves out (docs/state.md).
    """
    code: dict[int, str] = {}
    h = hashlib.sha256()
    parts = _state_parts(root_rv)
    try:
        h.update(_fingerprint_bytes(obj, obj, root_rv, code, fast=True))
    except Exception:  # noqa: BLE001 - a cycle or an unpicklable part: hash part by part
        h = hashlib.sha256(b"parts")
        pieces: list[tuple[str, Any]] = [
            ("<type>", (root_rv[0], root_rv[1]) if isinstance(root_rv, tuple) else type(obj))
        ]
        pieces += parts if parts is not None else [("<obj>", obj)]
        for name, value in pieces:
            h.update(repr(name).encode())
            if value is obj:
                h.update(b"<self>")
                continue
            for fast in (True, False):
                try:
                    h.update(_fingerprint_bytes(value, obj, root_rv, code, fast))
                    break
                except Exception:  # noqa: BLE001
                    continue
            else:
                h.update(f"<unpicklable {type(value).__module__}.{type(value).__qualname__} at {id(value)}>".encode())
    if parts is not None:
        h.update(_sharing(parts))
    return h.hexdigest()[:32]


_ATOMS = (int, float, complex, str, bytes, bool, type(None))
#: Containers larger than this are not looked into for sharing (cost).
SHARING_SCAN_LIMIT = 256


def _sharing(parts: list[tuple[str, Any]]) -> bytes:
    """Which of the attributes, and of their direct children, are the same object.

    Two levels: ``self.b is self.a`` and ``self.b is self.a[0]`` (or
    ``self.cfg['x'] is self.cfg['y']``, ``self.b is self.inner.x``) are
    seen; deeper sharing is not. Children are looked at in containers and
    objects of at most :data:`SHARING_SCAN_LIMIT` entries; immutable atoms
    (numbers, strings) are skipped.
    """
    first: dict[int, str] = {}
    out: list[str] = []

    def see(path: str, value: Any) -> None:
        seen = first.setdefault(id(value), path)
        if seen != path:
            out.append(f"<{path} is {seen}>")

    for i, (_, value) in enumerate(parts):
        see(str(i), value)
    for i, (_, value) in enumerate(parts):
        for j, child in enumerate(_small_children(value)):
            if not isinstance(child, _ATOMS):
                see(f"{i}.{j}", child)
    return "".join(out).encode()


def _small_children(value: Any) -> Any:
    if isinstance(value, (_ATOMS, type, types.FunctionType)):
        return ()
    if isinstance(value, (list, tuple)):
        return value if len(value) <= SHARING_SCAN_LIMIT else ()
    if isinstance(value, dict):
        return value.values() if len(value) <= SHARING_SCAN_LIMIT else ()
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict) and len(attrs) <= SHARING_SCAN_LIMIT:
        return attrs.values()
    return ()


def dumps_value(value: Any) -> bytes:
    """Pickle a value (arguments, results), falling back to cloudpickle. May raise."""
    try:
        out = io.BytesIO()
        _Pickler(out, None, None, None).dump(value)
        return out.getvalue()
    except Exception:  # noqa: BLE001 - cloudpickle decides
        return cloud_dumps(value)


def loads_value(blob: bytes | memoryview, buffers: Any = None) -> Any:
    return pickle.loads(blob, buffers=buffers)


# --------------------------------------------------------------------------
# Finding *what* cannot be pickled, for the error message.
# --------------------------------------------------------------------------


def _picklable(value: Any) -> bool:
    try:
        cloud_dumps(value)
    except Exception:  # noqa: BLE001
        return False
    return True


def _children(value: Any) -> Iterator[tuple[str, Any]]:
    """(path suffix, child) pairs, the way pickle would reach them."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"[{k!r}]", v
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield f"[{i}]", v
        return
    if isinstance(value, (set, frozenset)):
        for v in value:
            yield "{...}", v
        return
    state: Any = None
    getstate = getattr(value, "__getstate__", None)
    try:
        state = getstate() if getstate is not None else _default_state(value)
    except Exception:  # noqa: BLE001
        state = getattr(value, "__dict__", None)
    if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
        merged: dict[str, Any] = {}
        for part in state:
            merged.update(part or {})
        state = merged
    if isinstance(state, dict):
        for k, v in state.items():
            yield (f".{k}" if isinstance(k, str) and k.isidentifier() else f"[{k!r}]"), v


def _default_state(value: Any) -> Any:
    """The state pickle takes from an object without ``__getstate__`` (Python
    3.10, where ``object`` has none): the one ``__reduce_ex__`` returns, which
    includes ``__slots__`` values as ``(dict, slots)``."""
    rv = value.__reduce_ex__(PROTOCOL)
    return rv[2] if isinstance(rv, tuple) and len(rv) > 2 else None


def find_unpicklable(
    value: Any, path: str, exclude: tuple[str, ...] = (), _depth: int = 0, _seen: set[int] | None = None
) -> tuple[str, Any] | None:
    """Depth-first: the deepest path under ``value`` that cannot be pickled.

    Returns ``(path, obj)`` or None when every child pickles (then ``value``
    itself is the culprit, e.g. a ``__reduce__`` that raises).
    """
    seen = _seen if _seen is not None else set()
    if id(value) in seen or _depth > 50:
        return None
    seen.add(id(value))
    for suffix, child in _children(value):
        if _depth == 0 and suffix.lstrip(".") in exclude:
            continue
        if isinstance(child, (int, float, str, bytes, bool, type(None))):
            continue
        if not _picklable(child):
            deeper = find_unpicklable(child, path + suffix, (), _depth + 1, seen)
            return deeper if deeper is not None else (path + suffix, child)
    return None


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def describe_path_fix(path: str, *, what: str, owner_name: str) -> str:
    if what == "self" and path.startswith("self.") and "." not in path[5:] and "[" not in path[5:]:
        attr = path[5:]
        return (
            f"add {attr!r} to exclude= (class {owner_name or 'YourClass'}(ParallelMixin, "
            f"parallel=(...), exclude=({attr!r},))) and rebuild it in __parallel_init__(), "
            "or use backend='threading' to share the object without copying it"
        )
    if what == "self" and path == "self":
        return (
            "give the class a __getstate__ (or __reduce__) that leaves out what cannot be pickled, "
            "or use backend='threading' to share the object without copying it"
        )
    if what == "self":
        top = path[5:].split(".")[0].split("[")[0]
        return (
            f"exclude the attribute that holds it ({top!r}) with ParallelMixin's exclude= and "
            "rebuild it in __parallel_init__(), or use backend='threading'"
        )
    return "pass something picklable (a path, a key, plain data) or use backend='threading'"


def tailor_fix(fix: str, obj_type: str) -> str:
    """The fix, adjusted to what the culprit is."""
    if obj_type.startswith("sqlite3."):
        # sqlite refuses a connection used from another thread unless told otherwise.
        fix = fix.replace(
            "backend='threading'", "backend='threading' with sqlite3.connect(..., check_same_thread=False)"
        )
    return fix


def serialization_error(
    obj: Any, cause: BaseException, *, what: str, exclude: tuple[str, ...] = (), owner_name: str = ""
) -> SerializationError:
    """Build the SerializationError for ``obj`` named ``what`` ("self", "argument 0 of item 3")."""
    found = find_unpicklable(obj, "self" if what == "self" else what, exclude)
    path, culprit = found if found is not None else (what, obj)
    obj_type = _type_name(culprit)
    subject = f"{owner_name or _type_name(obj)}" if what == "self" else what
    fix = tailor_fix(describe_path_fix(path, what=what, owner_name=owner_name), obj_type)
    if path == what and what != "self":  # an argument, named already: do not say it twice
        described = f"it ({obj_type}) is"
    else:
        described = f"{path} ({obj_type}) is"
    msg = (
        f"cannot send {subject} to worker processes: {described} not picklable, "
        f"even with cloudpickle ({type(cause).__name__}: {cause}). Fix: {fix}."
    )
    return SerializationError(msg, path=path, obj_type=obj_type, cause=cause)
