"""The worker-side state cache: rebuilt copies of ``self``, kept between calls.

The coherence rule
==================

Every call's first task on every worker starts from the caller's state of
``self`` at the moment of the call, and from today's code. A cached copy is
served only when it provably still is that state:

* **Key.** An entry is keyed by the payload's key, made in the caller from
  the object's identity (pid, ``id``) and its fingerprint (content, top-level
  sharing, code that travels by value: see
  :func:`parallelmethods._serialize.fingerprint`). Two caller objects never
  share an entry, so a copy made for one is never served to the other; a
  changed object, class, class attribute or by-value helper gets a new key.
* **Verification.** A method may change its worker's copy (``self.seen.append``).
  Each entry remembers the fingerprint it had right after it was rebuilt
  (after ``__parallel_init__``) and the call that last used it. For a plain
  instance (object's own pickling, nothing excluded, no
  ``__parallel_init__``) that is the caller's fingerprint, carried in the
  key, which the copy must reproduce; otherwise the worker takes it itself. Within one
  call the copy is reused as is (whether later tasks see a task's own change
  is unspecified). The first task of a *new* call fingerprints the copy
  again: unchanged, it is served; changed, it is dropped and rebuilt from
  the payload.
* **Concurrency.** An entry in use by one call is never handed to another
  call at the same time (dask workers run several tasks in threads): that
  call rebuilds a private copy for its chunk.

What it does not cover: modules imported by reference (an installed
package, a class in an importable module) stay loaded in long-lived workers,
as in any pool, and so do changes a method makes to them (their globals,
their class attributes). A change of sharing deeper than one level below the attributes alone is
not seen by the fingerprint (docs/state.md).

Bounds and costs: at most :data:`CACHE_SIZE` entries per worker process
(least recently used out first), and a changed object's previous state is
dropped before its new one is loaded. Verification costs one memo-less
pickle pass over the copy per call per worker (about 0.1 s for a 1M-entry
dict; nothing for calls that reuse a copy within the call).
"""

from __future__ import annotations

import collections
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._serialize import fingerprint, root_reduce

__all__ = ["CACHE_SIZE", "acquire", "cache_info", "release", "state_fingerprint"]

#: How many distinct ``self`` states a worker keeps rebuilt (LRU).
CACHE_SIZE = 4


@dataclass
class _Entry:
    subject: Any
    baseline: str  # fingerprint right after rebuilding
    call: str = ""  # the call that last used it ("" = never used)
    active: int = 0  # chunks running on it now
    held: int = 0  # bytes of RSS it added when loaded
    from_caller: bool = False  # baseline is the caller's print of this state (_transport.state_key)


_CACHE: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
# Caller object ("pid:id") -> key of its state this worker holds.
_LINEAGE: dict[str, str] = {}
# Reentrant: loading runs user code (__setstate__, __parallel_init__) that may
# itself map (nested) and come back here on this thread.
_LOCK = threading.RLock()


def state_fingerprint(subject: Any) -> str:
    """The fingerprint of a worker's copy, excluded attributes included.

    Why excluded ones too: ``__parallel_init__`` rebuilt them in this copy,
    and a method that closes or replaces one (``self.conn = None``) changes
    what the next call would see; such values (connections, locks) enter by
    identity, as nothing can pickle them.

    Why not ``__reduce_ex__``: checking a copy is not shipping it, and the
    user's ``__getstate__``/``__reduce__`` must run once per map, in the
    caller. The copy's own attributes (``__dict__``, ``__slots__``, and the
    items of a list or dict subclass) are what a method can change; only an
    object keeping its state elsewhere (a C extension type) is asked for
    its reduce value.
    """
    if isinstance(subject, (type, types.FunctionType)):
        return fingerprint(subject, None)
    cls = type(subject)
    names = [n for k in cls.__mro__ for n in _slot_names(k)]
    has_dict = hasattr(subject, "__dict__")
    if not has_dict and not names and not isinstance(subject, (list, dict)):
        return fingerprint(subject, root_reduce(subject))
    state = dict(vars(subject)) if has_dict else {}
    slots = {n: getattr(subject, n) for n in names if n not in ("__dict__", "__weakref__") and hasattr(subject, n)}
    items = list(subject) if isinstance(subject, list) else None
    pairs = list(subject.items()) if isinstance(subject, dict) else None
    return fingerprint(subject, (_copy_of, (cls,), (state, slots), items, pairs))


def _slot_names(klass: type) -> tuple[str, ...]:
    slots = klass.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _copy_of(cls: type) -> None:  # pragma: no cover - never called
    """Stands for the class of a checked copy in its fingerprint (hashed, never loaded)."""


def cache_info() -> dict[str, Any]:
    """What this process holds in its state cache (for tests and explain)."""
    with _LOCK:
        return {"size": len(_CACHE), "max": CACHE_SIZE, "digests": list(_CACHE)}


def acquire(key: str, call: str, lineage: str, load: Callable[[], Any]) -> tuple[Any, bool]:
    """``(subject, cached)`` for one chunk of ``call``; pair with :func:`release`.

    ``load`` rebuilds the subject from the payload (and runs
    ``__parallel_init__``). ``cached`` is False for a private copy that
    :func:`release` must not look up.
    """
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None:
            if entry.call == call or not entry.call:
                # Same call (reuse as is), or rebuilt and never used yet.
                return _use(key, entry, call), True
            if entry.active:
                # Another call is running on this copy right now (threads
                # of a dask worker): it may be changing it. Private copy.
                return load(), False
            if _current(entry) == entry.baseline:
                return _use(key, entry, call), True  # a new call, copy verified unchanged
            _drop(key)  # a method changed it: rebuild from the payload
            if entry.from_caller:
                # Perhaps only the caller's print did not fit this copy after
                # all: the next rebuild takes its own, so this happens once.
                _OWN_PRINT.add(key)
        _forget_superseded(lineage, key)
        rss_before = _rss()
        subject = load()
        if key.endswith("=") and key not in _OWN_PRINT:
            # The caller fingerprinted this very state the way we would (see
            # _transport.state_key): no pass over the copy now.
            entry = _Entry(subject, key[key.rindex(":") + 1 : -1], from_caller=True)
        else:
            entry = _Entry(subject, state_fingerprint(subject))
        entry.held = max(0, _rss() - rss_before)
        _CACHE[key] = entry
        if lineage:
            _LINEAGE[lineage] = key
        while len(_CACHE) > CACHE_SIZE:
            oldest = next(iter(_CACHE))
            if _CACHE[oldest].active:
                break  # in use by a running chunk: evicted later
            _drop(oldest)
        _allow_cached_memory(sum(e.held for e in _CACHE.values()))
        return _use(key, entry, call), True


# Keys whose caller print did not match a rebuilt copy: they take their own.
_OWN_PRINT: set[str] = set()


def _current(entry: _Entry) -> str:
    """The copy's fingerprint now, computed the way its baseline was."""
    if entry.from_caller:
        return fingerprint(entry.subject, root_reduce(entry.subject))
    return state_fingerprint(entry.subject)


def release(key: str, cached: bool) -> None:
    if not cached:
        return
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry.active:
            entry.active -= 1


def _use(key: str, entry: _Entry, call: str) -> Any:
    entry.call = call
    entry.active += 1
    _CACHE.move_to_end(key)
    return entry.subject


def _drop(key: str) -> None:
    _CACHE.pop(key, None)
    for lineage, held_key in list(_LINEAGE.items()):
        if held_key == key:
            del _LINEAGE[lineage]


def _forget_superseded(lineage: str, key: str) -> None:
    """Drop the state a changed object had before, ahead of loading its new one.

    Why: after ``m.w = 7`` the old state of ``m`` would sit in the LRU until
    pushed out, holding its memory while the new one loads (measured: a
    1M-entry dict state is ~300 MB per worker, and loads slowed from 0.6 s
    to over 1 s with stale states kept).
    """
    if not lineage:
        return
    old = _LINEAGE.get(lineage)
    if old is not None and old != key and not (old in _CACHE and _CACHE[old].active):
        _drop(old)


def _rss() -> int:
    try:
        import psutil
    except ImportError:  # loky checks memory only with psutil: nothing to adjust
        return 0
    return int(psutil.Process().memory_info().rss)


def _allow_cached_memory(held: int) -> None:
    """Tell loky's leak guard that our cache is not a leak (see _compat)."""
    from ._compat import raise_loky_leak_limit

    raise_loky_leak_limit(held)
