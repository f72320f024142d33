"""``@parallelizable``: bare or with options (attrs' ``define`` idiom)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, ParamSpec, TypeVar, overload

from ._descriptor import ParallelFunction
from ._options import UNSET, Options, _Unset, check_option_names

__all__ = ["parallelizable"]

P = ParamSpec("P")
R = TypeVar("R")


@overload
def parallelizable(func: Callable[P, R], /) -> ParallelFunction[P, R]: ...
@overload
def parallelizable(func: classmethod[Any, P, R], /) -> ParallelFunction[..., R]: ...  # type: ignore[overload-overlap,unused-ignore]
@overload
def parallelizable(func: staticmethod[P, R], /) -> ParallelFunction[P, R]: ...
@overload
def parallelizable(
    func: None = None,
    /,
    *,
    n_jobs: int | _Unset | None = UNSET,
    backend: str | _Unset | None = UNSET,
    batch_size: int | Literal["auto"] | _Unset = UNSET,
    progress: bool | _Unset = UNSET,
    timeout: float | _Unset | None = UNSET,
    on_error: Literal["raise", "return"] | _Unset = UNSET,
    ordered: bool | _Unset = UNSET,
    retries: int | _Unset = UNSET,
    check_mutations: bool | _Unset = UNSET,
) -> Callable[[Callable[P, R]], ParallelFunction[P, R]]: ...
def parallelizable(func: Any = None, /, **options: Any) -> Any:
    """Give a method (or function) ``map``, ``starmap``, ``imap``, ``partial`` and ``options``.

    Use it bare or with default options; put it outermost, above
    ``@classmethod``/``@staticmethod``.

    Args:
        func: the function, method, classmethod or staticmethod.
        **options: defaults for every map (``n_jobs``, ``backend``,
            ``batch_size``, ``progress``, ``timeout``, ``on_error``,
            ``ordered``, ``retries``, ``check_mutations``).

    Returns:
        A :class:`ParallelFunction` descriptor.

    What it accepts: functions (including builtins and function-like
    wrappers that keep ``__name__``/``__qualname__``, such as
    :func:`functools.lru_cache`'s), and ``classmethod``/``staticmethod`` of
    those. Anything else is refused at decoration with a ``TypeError`` that
    says what to decorate instead: a ``property`` or
    ``functools.cached_property`` (not a function of the item), a
    ``functools.partial`` (decorate the function, then use ``.partial()``)
    and a callable instance (decorate its class's ``__call__``, or a function
    that calls it). Why not support the last two: they have no name a worker
    could import them by and no ``__qualname__`` for messages, so every later
    step would have to guess.

    Raises:
        TypeError: ``func`` is not a function, classmethod or staticmethod,
            or an option is misspelt or has the wrong type.
        ValueError: an option's value is bad.

    Example:
        >>> from parallelmethods import parallelizable
        >>> class Model:
        ...     def __init__(self, w): self.w = w
        ...     @parallelizable(backend="threading")
        ...     def score(self, x, y=0): return self.w * x + y
        >>> Model(2).score.map(range(4))
        [0, 2, 4, 6]

    .. versionadded:: 0.1
    """
    check_option_names(options, where="parallelizable")
    layer = Options(**options)  # validates now, at decoration time
    if func is None:
        return lambda f: _wrap(f, layer)
    if options:
        msg = "parallelizable(func, ...) takes options only in the called form: @parallelizable(n_jobs=2)"
        raise TypeError(msg)
    return _wrap(func, layer)


def _wrap(func: Any, layer: Options) -> ParallelFunction[Any, Any]:
    if isinstance(func, ParallelFunction):
        return ParallelFunction(func._target, func._options.merge(layer))
    problem = _refusal(func)
    if problem is not None:
        raise TypeError(problem)
    return ParallelFunction(func, layer)


def _is_function_like(obj: Any) -> bool:
    # Functions, builtins, and wrappers that keep the function's identity
    # (lru_cache, wrapt, Cython): callable with a name and a qualified name.
    return (
        callable(obj)
        and isinstance(getattr(obj, "__name__", None), str)
        and isinstance(getattr(obj, "__qualname__", None), str)
    )


def _refusal(func: Any) -> str | None:
    """Why ``func`` cannot be decorated, phrased as what to do instead; None if it can."""
    inner = func.__func__ if isinstance(func, (classmethod, staticmethod)) else func
    outer = f"@{type(func).__name__} over " if inner is not func else ""
    if isinstance(inner, ParallelFunction):
        return None  # classmethod(ParallelFunction): handled (and explained) at binding
    if _is_function_like(inner) and not isinstance(inner, type):
        return None
    what = f"{outer}{type(inner).__module__}.{type(inner).__qualname__} object".replace("builtins.", "")
    if isinstance(inner, (property, functools.cached_property)):
        name = getattr(getattr(inner, "fget", None) or getattr(inner, "func", None), "__name__", "...")
        return (
            f"@parallelizable got a {what} ({name}), which is not a function: decorate a method "
            f"that takes the item as an argument instead, e.g. `@parallelizable def {name}_of(self, item): ...`"
        )
    if isinstance(inner, functools.partial):
        target = getattr(inner.func, "__name__", repr(inner.func))
        return (
            f"@parallelizable got a {what} of {target}: decorate the function itself and fix the "
            f"arguments on the result, e.g. parallelizable({target}).partial(...).map(items)"
        )
    if isinstance(inner, type):
        return (
            f"@parallelizable got the class {inner.__qualname__}: decorate one of its methods, "
            "or a function that builds and uses an instance"
        )
    if callable(inner):
        cls = type(inner).__qualname__
        return (
            f"@parallelizable got a {what}, a callable object rather than a function: decorate "
            f"{cls}.__call__ in the class body instead (then use obj.__call__.map(...)), or decorate a "
            "function that calls the object"
        )
    return (
        f"{func!r} is not callable or a descriptor; @parallelizable decorates functions, methods, "
        "classmethods and staticmethods"
    )
