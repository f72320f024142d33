"""``explain(m.score)``: how ``self`` will travel, before you run anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._options import Options
from ._serialize import _children, _picklable, _type_name, describe_path_fix, dumps_state, dumps_value, find_unpicklable
from .errors import SerializationError

__all__ = ["Explanation", "explain"]

_ROUTES = {
    "reference": "by reference: workers share this object (threads or your own process); nothing is copied",
    "fork": "fork inheritance: workers are forked after the object is registered and read it copy-on-write; never pickled",
    "file": "serialized once per map call into a shared-memory file; each worker unpickles it at most once per distinct state (numpy buffers are memory-mapped, not copied)",
    "cluster": "serialized once per map call and scattered to the cluster once; each dask worker unpickles it at most once per distinct state",
}


@dataclass(frozen=True)
class Problem:
    """A path that cannot be serialized, with its type and the fix."""

    path: str
    type_name: str
    fix: str


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

    @property
    def ok(self) -> bool:
        """True when ``self`` can travel on the chosen route."""
        return not self.problems or self.route == "reference"

    def __str__(self) -> str:
        lines = [
            f"{self.method} on backend={self.backend!r} (n_jobs={self.n_jobs})",
            f"  route:      {self.route} - {self.route_text}",
        ]
        if self.serializer:
            lines.append(f"  serializer: {self.serializer}" + (f" ({self.serializer_reason})" if self.serializer_reason else ""))
        if self.size_bytes is not None:
            lines.append(f"  size:       {_human(self.size_bytes)}")
        if self.largest_attributes:
            lines.append("  largest attributes:")
            lines.extend(f"    self.{name:<20} {_human(size)}" for name, size in self.largest_attributes)
        if self.excluded:
            lines.append(f"  excluded:   {', '.join(self.excluded)} (rebuilt by __parallel_init__ in workers)")
        if self.problems:
            lines.append("  cannot be serialized:")
            for p in self.problems:
                lines.append(f"    {p.path} ({p.type_name})")
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

    plan = plan_for(bound, layer)
    subject = plan.subject
    serializer: str | None = None
    reason = ""
    size: int | None = None
    problems: list[Problem] = []
    owner = type(subject).__qualname__ if plan.kind == "method" else plan.label
    try:
        # As the map would: large plain-data attributes as marshal on the file route.
        payload = dumps_state(subject, exclude=plan.exclude, what="self", owner_name=owner, plain_as_marshal=plan.route == "file")
        serializer, reason, size = payload.via, payload.why, payload.nbytes
        if serializer == "pickle":
            reason = "every class and function in it can be imported by name in a worker"
        if payload.marshalled:
            reason += "; plain-data attributes written with marshal: " + ", ".join(payload.marshalled)
    except SerializationError:
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
            except Exception:  # noqa: BLE001 - reported as a problem below
                found = find_unpicklable(child, f"self{suffix}") if not _picklable(child) else None
                path, culprit = found if found is not None else (f"self{suffix}", child)
                problems.append(Problem(path, _type_name(culprit), describe_path_fix(path, what="self", owner_name=owner)))
        largest.sort(key=lambda kv: -kv[1])
    # The size and problems are reported on every route (they matter as soon
    # as you switch backend); a serializer only where self is serialized.
    serialized = plan.route not in ("reference", "fork")
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
    )
