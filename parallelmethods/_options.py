"""The options of a map, as one frozen, validated value.

Layers are merged in the contract's precedence, lowest first::

    defaults < enclosing joblib.parallel_config < @parallelizable(...) < .options(...) < call

Each layer is an :class:`Options` whose unset fields hold :data:`UNSET`;
``merge`` lets the later layer win field by field (the role of attrs'
``evolve``). Validation runs in ``__post_init__``, so a bad value fails where
it is given, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

__all__ = [
    "OPTION_NAMES",
    "UNSET",
    "Options",
    "Resolved",
    "check_option_names",
    "check_timeout_per_item",
    "resolve",
    "split_options",
]


class _Unset(enum.Enum):
    """'Not given' marker: ``None`` is a real value for ``backend``/``timeout``.

    An enum member pickles as a singleton, so ``is UNSET`` holds in workers too.
    """

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset.UNSET

_PROCESS_FREE_BACKENDS = ("threading", "sequential")


def _known_backends() -> list[str]:
    from ._compat import known_backend_names

    return known_backend_names()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Per-map options; every field may be :data:`UNSET` (= inherit).

    Example:
        >>> Options(n_jobs=2).merge(Options(backend="threading")).n_jobs
        2
        >>> Options(n_jobs=0)
        Traceback (most recent call last):
        ...
        ValueError: n_jobs=0 is not valid: use a positive number of workers, -1 for all cores, or None
    """

    n_jobs: int | _Unset | None = UNSET
    backend: str | _Unset | None = UNSET
    batch_size: int | Literal["auto"] | _Unset = UNSET
    progress: bool | _Unset = UNSET
    timeout: float | _Unset | None = UNSET
    on_error: Literal["raise", "return"] | _Unset = UNSET
    ordered: bool | _Unset = UNSET
    retries: int | _Unset = UNSET
    check_mutations: bool | _Unset = UNSET

    def __post_init__(self) -> None:
        _validate(self)

    def merge(self, later: Options) -> Options:
        """Return a copy where every field set in ``later`` wins."""
        changes = {
            f.name: getattr(later, f.name) for f in dataclasses.fields(later) if getattr(later, f.name) is not UNSET
        }
        return dataclasses.replace(self, **changes) if changes else self

    def given(self) -> dict[str, Any]:
        """The fields that are set, as a dict (for reprs and docs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not UNSET}


OPTION_NAMES: Final = frozenset(f.name for f in dataclasses.fields(Options))


def _did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def check_option_names(kwargs: dict[str, Any], *, where: str) -> None:
    """Reject keywords that are not options, with a "did you mean" when one is close.

    Used where only options are accepted (the decorator, ``.options()``).
    """
    for name in kwargs:
        if name not in OPTION_NAMES:
            close = _did_you_mean(name, OPTION_NAMES)
            hint = f"did you mean {close!r}? " if close else ""
            msg = (
                f"{where}() got an unexpected keyword argument {name!r}: {hint}"
                f"the options are {', '.join(sorted(OPTION_NAMES))}"
            )
            raise TypeError(msg)


def split_options(
    kwargs: dict[str, Any],
    *,
    where: str,
    allow_ordered: bool,
    parameter: Callable[[str], Literal["named", "any"] | None] = lambda name: None,
) -> Options:
    """Build :class:`Options` from call keywords, rejecting anything else.

    ``where`` names the call for the message (``"Model.score.map"``).
    ``parameter(name)`` says whether the method itself takes that keyword:
    ``"named"`` (one of its parameters: ``.partial(name=...)`` is the fix),
    ``"any"`` (only through ``**kwargs``: the closest option, if any, is
    suggested first, then ``.partial``) or None (the closest option only:
    ``njobs`` -> ``n_jobs``).
    """
    for name in kwargs:
        if name in OPTION_NAMES:
            continue
        kind = parameter(name)
        close = None if kind == "named" else _did_you_mean(name, OPTION_NAMES)
        hint = f"did you mean {close!r}? " if close else ""
        if kind is None:
            msg = (
                f"{where}() got an unexpected keyword argument {name!r}: {hint}"
                f"it is neither an option ({', '.join(sorted(OPTION_NAMES))}) nor a parameter of the method"
            )
            raise TypeError(msg)
        fixed = ", ".join(f"{k}={v!r:.40}" for k, v in kwargs.items() if k not in OPTION_NAMES)
        msg = (
            f"{where}() got an unexpected keyword argument {name!r}: {hint}only options "
            f"({', '.join(sorted(OPTION_NAMES))}) are accepted here. To pass {name}= to every call "
            f"of the method, fix it first: .partial({fixed}).{where.rsplit('.', 1)[-1]}(...)"
        )
        raise TypeError(msg)
    if not allow_ordered and "ordered" in kwargs:
        msg = (
            f"{where}() does not take ordered=: map and starmap always return results "
            "in input order. Use .imap(..., ordered=False) to get them as they complete."
        )
        raise TypeError(msg)
    return Options(**kwargs)


def _validate(opts: Options) -> None:
    n_jobs = opts.n_jobs
    if n_jobs is not UNSET and n_jobs is not None:
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral):
            msg = f"n_jobs must be an int or None, not {type(n_jobs).__name__} ({n_jobs!r})"
            raise TypeError(msg)
        if n_jobs == 0:
            msg = "n_jobs=0 is not valid: use a positive number of workers, -1 for all cores, or None"
            raise ValueError(msg)

    backend = opts.backend
    if backend is not UNSET and backend is not None:
        if not isinstance(backend, str):
            msg = (
                f"backend must be a backend name (str) or None, not {type(backend).__name__}; "
                "to use a backend instance, wrap the call in joblib.parallel_config(backend=...)"
            )
            raise TypeError(msg)
        known = _known_backends()
        if backend not in known:
            close = _did_you_mean(backend, known)
            hint = f"did you mean {close!r}? " if close else ""
            if backend == "ray":  # joblib knows Ray only once Ray registers itself
                hint = (
                    "Ray registers it with joblib: `from ray.util.joblib import register_ray; register_ray()` "
                    "(pip install 'parallelmethods[ray]'), then connect with ray.init(). "
                )
            msg = (
                f"backend={backend!r} is not a known joblib backend; {hint}expected one of "
                f"{', '.join(map(repr, known))}, or a name registered with "
                "joblib.register_parallel_backend"
            )
            raise ValueError(msg)

    batch_size = opts.batch_size
    if batch_size is not UNSET and batch_size != "auto":
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            msg = f"batch_size must be 'auto' or an int >= 1, not {batch_size!r}"
            raise TypeError(msg)
        if batch_size < 1:
            msg = f"batch_size={batch_size} is not valid: use 'auto' or an int >= 1 (items per task)"
            raise ValueError(msg)

    for name in ("progress", "ordered", "check_mutations"):
        value = getattr(opts, name)
        if value is not UNSET and not isinstance(value, bool):
            msg = f"{name} must be True or False, not {value!r}"
            raise TypeError(msg)

    timeout = opts.timeout
    if timeout is not UNSET and timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
            msg = f"timeout must be a number of seconds or None, not {timeout!r}"
            raise TypeError(msg)
        if not timeout > 0:
            msg = f"timeout={timeout} is not valid: use a number of seconds > 0, or None for no limit"
            raise ValueError(msg)
        if opts.backend == "sequential":
            msg = (
                "timeout cannot be enforced with backend='sequential': the work runs in your "
                "own process and cannot be stopped. Use a process backend (loky, "
                "multiprocessing) or backend='threading', or drop timeout="
            )
            raise ValueError(msg)

    check_timeout_per_item(opts.timeout, opts.batch_size)

    on_error = opts.on_error
    if on_error is not UNSET and on_error not in ("raise", "return"):
        msg = (
            f"on_error={on_error!r} is not valid: use 'raise' (stop at the first error) "
            "or 'return' (put each exception in its item's place)"
        )
        raise ValueError(msg)

    retries = opts.retries
    if retries is not UNSET:
        if isinstance(retries, bool) or not isinstance(retries, numbers.Integral):
            msg = f"retries must be an int >= 0, not {retries!r}"
            raise TypeError(msg)
        if retries < 0:
            msg = f"retries={retries} is not valid: use 0 (no re-runs) or a positive count"
            raise ValueError(msg)


def check_timeout_per_item(timeout: Any, batch_size: Any) -> None:
    """``timeout=`` is per item, so it needs one item per task: refuse ``batch_size`` > 1 with it.

    joblib's ``timeout`` limits a whole task; with ``batch_size=k`` a task holds
    k items, and the limit would silently become one on k items together.
    Checked where both are given in one layer (``__post_init__``) and, once
    the layers are merged, before any work starts (the runner).
    """
    if timeout is UNSET or timeout is None or batch_size is UNSET or batch_size == "auto":
        return
    if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and int(batch_size) > 1:
        msg = (
            f"timeout={timeout} cannot be combined with batch_size={batch_size}: the timeout is per item, "
            "so items are sent one per task, and a task of several items could not be timed per item. "
            "Drop batch_size (with timeout= set, 'auto' sends one item per task) or use batch_size=1"
        )
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Options with every field decided (defaults filled in); what the runner reads."""

    n_jobs: int | None
    backend: str | None
    batch_size: int | Literal["auto"]
    progress: bool
    timeout: float | None
    on_error: Literal["raise", "return"]
    ordered: bool
    retries: int
    check_mutations: bool


def resolve(layer: Options) -> Resolved:
    """Fill every unset field of ``layer`` with its default."""
    full = DEFAULTS.merge(layer)
    return Resolved(**{f.name: getattr(full, f.name) for f in dataclasses.fields(Options)})


DEFAULTS: Final = Options(
    n_jobs=None,
    backend=None,
    batch_size="auto",
    progress=False,
    timeout=None,
    on_error="raise",
    ordered=True,
    retries=0,
    check_mutations=False,
)
