"""``@parallelizable``: bare or with options (attrs' ``define`` idiom)."""

from __future__ import annotations

from typing import Any, Callable, Literal, ParamSpec, TypeVar, overload

from ._descriptor import ParallelFunction
from ._options import UNSET, Options, _Unset

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
    n_jobs: int | None | _Unset = UNSET,
    backend: str | None | _Unset = UNSET,
    batch_size: int | Literal["auto"] | _Unset = UNSET,
    progress: bool | _Unset = UNSET,
    timeout: float | None | _Unset = UNSET,
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

    Raises:
        TypeError: ``func`` is neither callable nor a descriptor, or an
            option has the wrong type. ValueError: an option's value is bad.

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
    layer = Options(**options)  # validates now, at decoration time
    if func is None:
        return lambda f: _wrap(f, layer)
    if options:
        msg = "parallelizable(func, ...) takes options only in the called form: @parallelizable(n_jobs=2)"
        raise TypeError(msg)
    return _wrap(func, layer)


def _wrap(func: Any, layer: Options) -> ParallelFunction[Any, Any]:
    if not (callable(func) or hasattr(func, "__get__")):
        msg = f"{func!r} is not callable or a descriptor; @parallelizable decorates functions and methods"
        raise TypeError(msg)
    if isinstance(func, ParallelFunction):
        return ParallelFunction(func._target, func._options.merge(layer))
    if isinstance(func, property):
        msg = "@parallelizable cannot decorate a property: decorate a method that takes the item as an argument"
        raise TypeError(msg)
    return ParallelFunction(func, layer)
