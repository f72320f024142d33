"""``explain(m.score)``: how ``self`` will travel, before you run anything."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._options import Options
from ._serialize import (
    Payload,
    _children,
    _picklable,
    _type_name,
    describe_path_fix,
    dumps_state,
    dumps_value,
    find_unpicklable,
    loads_value,
    tailor_fix,
)

__all__ = ["Explanation", "explain"]

_ROUTES = {
    "reference": "by reference: workers share this object (threads or your own process); nothing is copied",
    "fork": "fork inheritance: workers are forked after the object is registered and read it copy-on-write; never pickled",
    "file": "serialized once per map call into a payload file (/dev/shm when it has room, else joblib's temp folder); each worker unpickles it at most once per distinct state (numpy buffers are memory-mapped, not copied)",
    "cluster": "serialized once per map call and shipped to the cluster once (dask: scattered to every worker; Ray: put in the object store); each worker process unpickles it at most once per distinct state",
    "inline": "serialized once per map call and sent as bytes inside every task (no shared file or fork assumed); each worker unpickles it at most once per distinct state",
}


#: Routes on which ``self`` is pickled and rebuilt in workers.
_PICKLING_ROUTES = ("file", "cluster", "inline")

#: How deep (and how wide at each level) the search for the attribute that
#: cannot be rebuilt goes; beyond that the enclosing path is reported.
_REBUILD_SEARCH_DEPTH = 3
_REBUILD_SEARCH_WIDTH = 1000

_SCALARS = (int, float, complex, str, bytes, bool, type(None))
_CONTAINERS = (dict, list, tuple, set, frozenset)


@dataclass(frozen=True)
class Problem:
    """A path that cannot travel to workers, with its type, the fix and why.

    ``stage`` is ``"serialize"`` (the path cannot be pickled, even with
    cloudpickle) or ``"rebuild"`` (it pickles, but unpickling it, as a worker
    would, raises). ``cause`` is the exception, as ``"Type: message"``;
    ``message`` one sentence saying all of it.
    """

    path: str
    type_name: str
    fix: str
    stage: str = "serialize"
    cause: str = ""
    message: str = ""


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` found. Printing it reads well; the fields are data.

    Example:
        >>> from parallelmethods import parallelizable, explain
        >>> class M:
        ...     @parallelizable(backend="threading")
        ...     def f(self, x): return x
        >>> explain(M().f).route
        'reference'
    """

    method: str
    backend: str
    n_jobs: int
    route: str
    route_text: str
    serializer: str | None
    serializer_reason: str
    size_bytes: int | None
    largest_attributes: tuple[tuple[str, int], ...] = ()
    excluded: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = field(default=())
    #: Whether ``self`` was rebuilt (unpickled, without ``__parallel_init__``)
    #: in this process as a worker would: None where the route never pickles
    #: it (reference, fork) or it could not be serialized at all.
    rebuilds: bool | None = None

    @property
    def ok(self) -> bool:
        """True when ``self`` can travel on the chosen route.

        The reference and fork routes never pickle ``self``: problems listed
        there only matter if you switch to a backend that does.
        """
        return self.route not in _PICKLING_ROUTES or not self.problems

    def __str__(self) -> str:
        lines = [
            f"{self.method} on backend={self.backend!r} (n_jobs={self.n_jobs})",
            f"  route:      {self.route} - {self.route_text}",
        ]
        if self.serializer:
            lines.append(
                f"  serializer: {self.serializer}" + (f" ({self.serializer_reason})" if self.serializer_reason else "")
            )
        if self.size_bytes is not None:
            lines.append(f"  size:       {_human(self.size_bytes)}")
        if self.largest_attributes:
            lines.append("  largest attributes:")
            lines.extend(f"    self.{name:<20} {_human(size)}" for name, size in self.largest_attributes)
        if self.excluded:
            lines.append(f"  excluded:   {', '.join(self.excluded)} (rebuilt by __parallel_init__ in workers)")
        unpicklable = [p for p in self.problems if p.stage != "rebuild"]
        if unpicklable:
            harmless = ""
            if self.route not in _PICKLING_ROUTES:
                harmless = " (harmless on this route, which never pickles self)"
            lines.append(f"  cannot be serialized{harmless}:")
            for p in unpicklable:
                lines.append(f"    {p.path} ({p.type_name})")
                lines.append(f"      fix: {p.fix}")
        rebuild = [p for p in self.problems if p.stage == "rebuild"]
        if rebuild:
            lines.append("  cannot be rebuilt in a worker:")
            for p in rebuild:
                lines.append(f"    {p.message}")
                lines.append(f"      fix: {p.fix}")
        return "\n".join(lines)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def explain(method: Any, /, **options: Any) -> Explanation:
    """Explain how ``self`` of a parallel method will reach the workers.

    Args:
        method: a bound parallel method (``m.score``) or a parallelizable
            module function.
        **options: the options the map would get (``backend=``...).

    Example:
        >>> from parallelmethods import parallelizable, explain
        >>> class M:
        ...     @parallelizable
        ...     def f(self, x): return x
        >>> print(explain(M().f, backend="loky"))  # doctest: +ELLIPSIS
        M.f on backend='loky' (n_jobs=-1)
          route:      file - serialized once per map call...

    .. versionadded:: 0.1
    """
    return method.explain(**options)  # type: ignore[no-any-return]


def explain_bound(bound: Any, layer: Options) -> Explanation:
    from ._plan import plan_for
    from ._transport import marshal_ok

    plan = plan_for(bound, layer)
    subject = plan.subject
    serializer: str | None = None
    reason = ""
    size: int | None = None
    problems: list[Problem] = []
    owner = type(subject).__qualname__ if plan.kind == "method" else plan.label
    payload: Payload | None = None
    failure: BaseException | None = None
    try:
        # As the map would: large plain-data attributes as marshal where marshal_ok says so.
        payload = dumps_state(
            subject, exclude=plan.exclude, what="self", owner_name=owner, plain_as_marshal=marshal_ok(plan)
        )
        serializer, reason, size = payload.via, payload.why, payload.nbytes
        if serializer == "pickle":
            reason = "every class and function in it can be imported by name in a worker"
        if payload.marshalled:
            reason += "; plain-data attributes written with marshal: " + ", ".join(payload.marshalled)
    except Exception as e:  # noqa: BLE001 - SerializationError, or anything a __reduce__ raises
        failure = e
        serializer = None
        reason = "neither pickle nor cloudpickle can serialize it"
    largest: list[tuple[str, int]] = []
    if plan.kind == "method":
        for suffix, child in _children(subject):
            name = suffix.lstrip(".")
            if name in plan.exclude:
                continue
            try:
                largest.append((name, len(dumps_value(child))))
            except Exception as e:  # noqa: BLE001 - reported as a problem below
                found = find_unpicklable(child, f"self{suffix}") if not _picklable(child) else None
                path, culprit = found if found is not None else (f"self{suffix}", child)
                problems.append(_unpicklable(path, culprit, e, owner))
        largest.sort(key=lambda kv: -kv[1])
    if failure is not None and not problems:
        # No attribute is to blame: the object itself (its __reduce__ or
        # __getstate__ raises), or a function/class that cannot travel.
        problems.append(_unpicklable("self", subject, failure, owner))
    # The size and serialization problems are reported on every route (they
    # matter as soon as you switch backend); a serializer, and the rebuild
    # check, only where self is serialized.
    serialized = plan.route in _PICKLING_ROUTES
    rebuilds: bool | None = None
    if serialized and payload is not None:
        with _quiet_teardown() as failed:
            broken = _rebuild_failure(payload)
            rebuilds = broken is None
            if broken is not None:
                problems.append(_rebuild_problem(plan, subject, owner, broken))
                _drop_frames(broken)
                broken = None
                failed.append(True)
    if plan.route in ("reference", "fork"):
        problems = [_on_a_route_that_never_pickles(p, plan) for p in problems]
    return Explanation(
        method=plan.label,
        backend=plan.backend_name,
        n_jobs=plan.n_jobs,
        route=plan.route,
        route_text=_ROUTES[plan.route],
        serializer=serializer if serialized else None,
        serializer_reason=reason if serialized else "",
        size_bytes=size,
        largest_attributes=tuple(largest[:5]),
        excluded=plan.exclude,
        problems=tuple(problems),
        rebuilds=rebuilds,
    )


def _on_a_route_that_never_pickles(problem: Problem, plan: Any) -> Problem:
    """The fix as it reads on threading, sequential or fork, where self is never pickled.

    Why: offering "use backend='threading'" to someone already on threading
    helps nobody; what they need to know is that nothing is wrong here, and
    what to do if they switch to a backend that copies ``self``.
    """
    how = "inherited by fork, never pickled" if plan.route == "fork" else "shared, never copied"
    fix = problem.fix
    for tail in (", or use backend='threading'", " or use backend='threading'"):
        cut = fix.find(tail)
        if cut != -1:
            fix = fix[:cut]
    fix = (
        f"nothing to do with backend={plan.backend_name!r} (self is {how}); "
        f"for a backend that copies self (loky, dask, Ray): {fix}"
    )
    return dataclasses.replace(problem, fix=fix)


def _cause(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _unpicklable(path: str, culprit: Any, exc: BaseException, owner: str) -> Problem:
    type_name = _type_name(culprit) if path != "self" else owner
    cause = _cause(exc)
    return Problem(
        path,
        type_name,
        tailor_fix(describe_path_fix(path, what="self", owner_name=owner), type_name),
        stage="serialize",
        cause=cause,
        message=f"{path} ({type_name}) cannot be serialized, even with cloudpickle: {cause}",
    )


@contextlib.contextmanager
def _quiet_teardown() -> Iterator[list[bool]]:
    """Collect the half-built objects a failed rebuild leaves, without noise.

    Why: their ``__del__`` may fail in turn (a half-rebuilt tqdm bar raises
    another RecursionError when closed) and Python prints "Exception
    ignored in ..." for each. Those raised on this thread while the window
    is open come from the round trip and are dropped; other threads' are
    passed on. Append to the yielded list to ask for a ``gc.collect()``
    (paid only when a rebuild failed).
    """
    previous = sys.unraisablehook
    me = threading.get_ident()

    def hook(unraisable: Any) -> None:
        if threading.get_ident() != me:
            previous(unraisable)

    sys.unraisablehook = hook
    failed: list[bool] = []
    try:
        yield failed
        if failed:
            gc.collect()
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def _drop_frames(exc: BaseException | None) -> None:
    """Release the unpickler frames (and half-built objects) an exception holds."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__context__


def _round_trip(load: Any) -> BaseException | None:
    """Run ``load()`` (an unpickling) and return what it raised, or None.

    Never raises, except KeyboardInterrupt: a RecursionError, a
    ``__setstate__``'s own exception, even a SystemExit from a reduce
    callable are all answers, not crashes of explain().
    """
    try:
        rebuilt = load()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - whatever rebuilding raises is the answer
        return e
    del rebuilt
    return None


def _failed_alone(value: Any) -> bool:
    """True when ``value``, pickled alone and loaded back, fails to rebuild."""
    exc = _value_rebuild_failure(value)
    _drop_frames(exc)
    return exc is not None


def _rebuild_failure(payload: Payload) -> BaseException | None:
    """Unpickle ``payload`` exactly as a worker does (main stream plus
    out-of-band buffers), without ``__parallel_init__``; what that raised,
    or None. The buffers are views of your own arrays: read-only here, so
    that nothing written while rebuilding reaches them (a worker's mapping
    is a private copy instead).

    Cost: one extra load of ``self`` in this process, dropped at once.
    """
    buffers = [memoryview(b).toreadonly() for b in payload.buffers]
    return _round_trip(lambda: loads_value(payload.main, buffers=buffers))


def _value_rebuild_failure(value: Any) -> BaseException | None:
    """Pickle ``value`` alone with the library's serializer and load it back."""
    try:
        blob = dumps_value(value)
    except Exception:  # noqa: BLE001 - cannot be pickled alone: not a rebuild problem
        return None
    return _round_trip(lambda: loads_value(blob))


def _find_unrebuildable(value: Any, path: str, exclude: tuple[str, ...], depth: int = 0) -> tuple[str, Any] | None:
    """The deepest path under ``value`` that fails to rebuild alone, or None.

    Tries each child (top-level attributes of ``self`` first), pickled alone
    and loaded back; descends into the first one that fails, up to
    ``_REBUILD_SEARCH_DEPTH`` levels and ``_REBUILD_SEARCH_WIDTH`` children per level.
    Below the top level it descends only through plain containers (dict,
    list, tuple, set): inside another object the culprit is that object
    (``self.bar``, a tqdm bar, rather than a function deep inside it).
    """
    if depth >= _REBUILD_SEARCH_DEPTH or (depth > 0 and not isinstance(value, _CONTAINERS)):
        return None
    try:
        children = list(itertools.islice(_children(value), _REBUILD_SEARCH_WIDTH))
    except Exception:  # noqa: BLE001 - an object whose state cannot be read: stop here
        return None
    for suffix, child in children:
        if depth == 0 and suffix.lstrip(".") in exclude:
            continue
        if isinstance(child, _SCALARS) or child is value:
            continue
        if _failed_alone(child):
            deeper = _find_unrebuildable(child, path + suffix, (), depth + 1)
            return deeper if deeper is not None else (path + suffix, child)
    return None


def _rebuild_problem(plan: Any, subject: Any, owner: str, exc: BaseException) -> Problem:
    what = f"self ({owner})" if plan.kind == "method" else plan.label
    found = _find_unrebuildable(subject, "self", plan.exclude) if plan.kind == "method" else None
    path, culprit = found if found is not None else ("self", subject)
    type_name = _type_name(culprit) if found is not None else owner
    cause = _cause(exc)
    if found is not None:
        fix = tailor_fix(describe_path_fix(path, what="self", owner_name=owner), type_name)
    elif plan.kind == "method":
        fix = (
            f"make {owner}'s __setstate__ (or __reduce__) able to rebuild it from its pickled state, "
            "or use backend='threading' to share the object without copying it"
        )
    else:
        fix = "make it importable by name in a worker, or use backend='threading'"
    if isinstance(exc, RecursionError):
        fix = (
            f"{path} nests too deep (or refers to itself without end) to be unpickled within the recursion limit; {fix}"
        )
    where = "unpickling " if path == "self" else f"{path} ({type_name}) "
    message = f"{where}fails while rebuilding {what} in a worker: {cause}"
    return Problem(path, type_name, fix, stage="rebuild", cause=cause, message=message)
