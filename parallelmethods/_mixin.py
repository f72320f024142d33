"""``ParallelMixin``: class keywords ``parallel=`` and ``exclude=``."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, ClassVar

from ._descriptor import ParallelFunction
from ._options import UNSET, Options

__all__ = ["ParallelMixin"]


class ParallelMixin:
    """Give listed methods the parallel surface; keep some attributes home.

    ``parallel=`` names methods (instance, class or static) that get
    ``map``/``starmap``/``imap``/``partial``/``options``. ``exclude=`` names
    instance attributes that are not sent to worker processes; define
    ``__parallel_init__(self)`` to rebuild them there. Subclasses inherit both
    lists and may extend them.

    Example:
        >>> import threading
        >>> from parallelmethods import ParallelMixin
        >>> class Store(ParallelMixin, parallel=("lookup",), exclude=("_lock",)):
        ...     def __init__(self): self.data = {"a": 1}; self._lock = threading.Lock()
        ...     def __parallel_init__(self): self._lock = threading.Lock()
        ...     def lookup(self, key): return self.data.get(key)
        >>> Store().lookup.map(["a", "b"], backend="threading")
        [1, None]

    .. versionadded:: 0.1
    """

    __parallel_methods__: ClassVar[tuple[str, ...]] = ()
    __parallel_exclude__: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, *, parallel: Any = UNSET, exclude: Any = UNSET, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # UNSET means "inherit", not "()": dataclass(slots=True) and
        # attrs.define rebuild the class and call us again without keywords.
        names = tuple(cls.__parallel_methods__)
        if parallel is not UNSET:
            own = _as_names(parallel, "parallel", cls)
            _check_defined(cls, own)
            names = tuple(dict.fromkeys((*names, *own)))
        cls.__parallel_methods__ = names
        excluded = tuple(cls.__parallel_exclude__)
        if exclude is not UNSET:
            excluded = tuple(dict.fromkeys((*excluded, *_as_names(exclude, "exclude", cls))))
        cls.__parallel_exclude__ = excluded
        for name in names:
            attr = cls.__dict__.get(name)
            if attr is None or isinstance(attr, ParallelFunction):
                continue  # inherited (already wrapped in its class) or already decorated
            options = Options()
            if isinstance(attr, (classmethod, staticmethod)) and isinstance(attr.__func__, ParallelFunction):
                # @classmethod written above @parallelizable(...): classmethod(ParallelFunction)
                # loses the class on 3.13+. Normalize to the documented order, keeping the
                # decorator's options (issue 14).
                inner = attr.__func__
                attr, options = type(attr)(inner._target), inner._options
            pf: ParallelFunction[Any, Any] = ParallelFunction(attr, options)
            pf.__set_name__(cls, name)
            setattr(cls, name, pf)


def _as_names(value: Any, keyword: str, cls: type) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        names = tuple(value)
    except TypeError:
        msg = (
            f"{cls.__qualname__}: {keyword}= takes a tuple of attribute names, e.g. {keyword}=('name',), not {value!r}"
        )
        raise TypeError(msg) from None
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            msg = f"{cls.__qualname__}: {keyword}= takes attribute names (strings), got {name!r}"
            raise TypeError(msg)
    return names


def _check_defined(cls: type, names: tuple[str, ...]) -> None:
    for name in names:
        attr = inspect.getattr_static(cls, name, None)
        if attr is None:
            candidates = [n for k in cls.__mro__ for n in vars(k) if not n.startswith("__")]
            close = difflib.get_close_matches(name, candidates, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"ParallelMixin: parallel= names {name!r}, which {cls.__name__} does not define{hint}"
            raise TypeError(msg)
        if not (callable(attr) or isinstance(attr, (classmethod, staticmethod))):
            msg = f"ParallelMixin: parallel= names {name!r}, but {cls.__qualname__}.{name} is not a method ({type(attr).__name__})"
            raise TypeError(msg)
