"""``ParallelFunction`` (the class attribute) and ``BoundParallelMethod`` (``m.score``).

Binding follows CPython's ``cached_property``/``singledispatchmethod`` and
wrapt: the class attribute is a non-data descriptor; ``__get__(None, owner)``
returns the descriptor itself (so ``Model.score(m, 2)`` calls the function),
and ``__get__(obj, owner)`` returns a fresh, cheap bound view. Nothing is
cached on the instance or in a WeakKeyDictionary (CPython gh-127750), and
nothing is written into ``obj.__dict__``, since that would be pickled with
``self``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from types import GenericAlias, MethodType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Concatenate,
    Generic,
    Literal,
    NamedTuple,
    ParamSpec,
    TypeVar,
    overload,
)

from ._compat import register_cloudpickle_reducer
from ._options import Options, check_option_names, split_options

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._explain import Explanation

__all__ = ["BoundParallelMethod", "ParallelFunction"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")
S = TypeVar("S")


def _classify(target: Any) -> str:
    # Classified once, at decoration time, as wrapt's FunctionWrapper does.
    if isinstance(target, classmethod):
        return "classmethod"
    if isinstance(target, staticmethod):
        return "staticmethod"
    return "function"


def _defined_in_class_body(qualname: str) -> bool:
    parts = qualname.split(".")
    return len(parts) > 1 and parts[-2] != "<locals>"


def _lookup_qualname(module: str, qualname: str) -> Any:
    """Walk ``module.qualname`` without triggering descriptors (like cloudpickle's
    ``_lookup_module_and_qualname``); None when it cannot be walked."""
    if "<locals>" in qualname:
        return None
    try:
        obj: Any = importlib.import_module(module)
    except Exception:  # noqa: BLE001
        return None
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part, None)
        if obj is None:
            return None
    return obj


def _resolve_function(module: str, qualname: str) -> Any:
    obj = _lookup_qualname(module, qualname)
    if obj is None:
        msg = f"cannot find {module}.{qualname} to rebuild a parallelizable function"
        raise AttributeError(msg)
    return obj


class ParallelFunction(Generic[P, R]):
    """What ``@parallelizable`` puts in the class (or module): a descriptor.

    Do not build it yourself; use :func:`parallelizable`. On a module
    function it is callable and has ``map``/``starmap``/``imap``/``partial``/
    ``options`` directly; on a method, access it through an instance.

    Example:
        >>> from parallelmethods import parallelizable
        >>> @parallelizable(backend="threading")
        ... def square(i):
        ...     return i * i
        >>> square.map(range(4))
        [0, 1, 4, 9]

    .. versionadded:: 0.1
    """

    __class_getitem__ = classmethod(GenericAlias)  # type: ignore[var-annotated]
    # Set by functools.update_wrapper in __init__:
    __name__: str
    __qualname__: str
    __module__: str
    __wrapped__: Callable[P, R]

    def __init__(self, target: Any, options: Options) -> None:
        self._target = target
        self._kind = _classify(target)
        self._options = options
        func = target.__func__ if self._kind != "function" else target
        self._func = func
        self._name: str | None = None
        functools.update_wrapper(self, func)  # __name__, __qualname__, __doc__, __wrapped__, __module__

    # -- binding ---------------------------------------------------------
    def __set_name__(self, owner: type, name: str) -> None:
        # Only the name is kept: class re-creation (dataclass(slots=True),
        # attrs) calls this again with a new owner, so owners are looked up
        # at bind time, never captured here.
        self._name = name
        _declare_classvar_for_pydantic(owner, name)

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(
        self: ParallelFunction[Concatenate[S, P2], R2], instance: S, owner: type | None = None
    ) -> BoundParallelMethod[P2, R2]: ...
    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if owner is None:
            owner = type(instance)
        if self._kind == "classmethod":
            # Why the class and not the instance: m.build.map and Model.build.map
            # both bind to the class, exactly as classmethod does.
            return BoundParallelMethod(self, owner, "classmethod", self._options, (), {})
        if self._kind == "staticmethod":
            return BoundParallelMethod(self, owner, "staticmethod", self._options, (), {})
        if instance is None:
            return self
        if isinstance(instance, type) and self._stacked_under(instance, classmethod):
            # Python <= 3.12: classmethod(ParallelFunction) chains into our
            # __get__ with the class as "instance". Plain calls still work; the
            # parallel methods raise, naming the fix.
            return BoundParallelMethod(self, instance, "misplaced-classmethod", self._options, (), {})
        return BoundParallelMethod(self, instance, "method", self._options, (), {})

    def _stacked_under(self, cls: type, wrapper: type) -> bool:
        name = self._name or self.__name__
        for klass in getattr(cls, "__mro__", ()):
            attr = klass.__dict__.get(name)
            if isinstance(attr, wrapper) and getattr(attr, "__func__", None) is self:
                return True
        return False

    def __call__(self, /, *args: P.args, **kwargs: P.kwargs) -> R:
        # Positional-only self: f(1, self=2) reaches a parameter named "self".
        return self._func(*args, **kwargs)  # type: ignore[no-any-return]

    # -- module functions have the parallel surface directly -------------
    def _as_bound(self, what: str) -> BoundParallelMethod[P, R]:
        qualname = self.__qualname__
        if self._kind == "function" and (self._name is not None or _defined_in_class_body(qualname)):
            owner = _lookup_qualname(self.__module__, qualname.rsplit(".", 1)[0])
            attr = inspect.getattr_static(owner, qualname.rsplit(".", 1)[1], None) if owner is not None else None
            if isinstance(attr, (classmethod, staticmethod)) and attr.__func__ is self:
                deco = type(attr).__name__
                msg = (
                    f"{qualname}.{what}() cannot find its class: @parallelizable is under "
                    f"@{deco}. Put @parallelizable above @{deco} (outermost)."
                )
                raise TypeError(msg)
            msg = (
                f"{qualname}.{what}() needs an instance: call it as instance.{self._name or self.__name__}"
                f".{what}(...), e.g. {qualname.rsplit('.', 1)[0]}(...).{self._name or self.__name__}.{what}(...). "
                f"(If this is a classmethod or staticmethod, put @parallelizable above it.)"
            )
            raise TypeError(msg)
        return BoundParallelMethod(self, self, "function", self._options, (), {})

    def map(self, /, *iterables: Iterable[Any], **options: Any) -> list[R]:
        """See :meth:`BoundParallelMethod.map`."""
        return self._as_bound("map").map(*iterables, **options)

    def starmap(self, iterable: Iterable[Iterable[Any]], /, **options: Any) -> list[R]:
        """See :meth:`BoundParallelMethod.starmap`."""
        return self._as_bound("starmap").starmap(iterable, **options)

    def imap(self, /, *iterables: Iterable[Any], **options: Any) -> Iterator[R]:
        """See :meth:`BoundParallelMethod.imap`."""
        return self._as_bound("imap").imap(*iterables, **options)

    def partial(self, /, *args: Any, **kwargs: Any) -> BoundParallelMethod[..., R]:
        """See :meth:`BoundParallelMethod.partial`."""
        return self._as_bound("partial").partial(*args, **kwargs)

    def options(self, /, **options: Any) -> BoundParallelMethod[P, R]:
        """See :meth:`BoundParallelMethod.options`."""
        return self._as_bound("options").options(**options)

    def explain(self, /, **options: Any) -> Explanation:
        """See :func:`parallelmethods.explain`."""
        return self._as_bound("explain").explain(**options)

    def __reduce__(self) -> Any:
        # Pickle by reference (module + qualname), as wrapt's pickling proxy:
        # stdlib pickle refuses a decorated function ("not the same object"),
        # and cloudpickle would otherwise copy it by value. Where no worker can
        # import it (__main__, <locals>), carry the function itself by value:
        # then the raw function makes our pickler switch to cloudpickle, as
        # the undecorated function would (a class pickled by value holds us,
        # so a by-name lookup could not work while that class is being rebuilt).
        #
        # A module-level function of __main__ is written by name, as stdlib
        # pickle writes the undecorated one, so that Pool.map(square, xs) and
        # pickle.dumps(square) work where they did before (fork children have
        # __main__). Our own shipping picklers never take that branch: they
        # ask _travels_by_value() first and copy such functions by value.
        module, qualname = self.__module__, self.__qualname__
        if "<locals>" not in qualname and _lookup_qualname(module, qualname) is self:
            if module == "__main__":
                return qualname
            return (_resolve_function, (module, qualname))
        return self._reduce_by_value()

    def _reduce_by_value(self) -> Any:
        return (_rebuild_function, (self._target, self._options, self._name))

    def _travels_by_value(self) -> bool:
        """Whether a worker process could not find this object by name (``__main__``, ``<locals>``)."""
        module, qualname = self.__module__, self.__qualname__
        return module == "__main__" or "<locals>" in qualname or _lookup_qualname(module, qualname) is not self

    def __repr__(self) -> str:
        return f"<parallelizable {self._kind} {self.__qualname__}>"


def _rebuild_function(target: Any, options: Options, name: str | None) -> ParallelFunction[Any, Any]:
    """Unpickle a by-value :class:`ParallelFunction`, keeping the name it was bound under."""
    pf: ParallelFunction[Any, Any] = ParallelFunction(target, options)
    pf._name = name  # a class rebuilt by value gets setattr, not __set_name__
    return pf


def _declare_classvar_for_pydantic(owner: type, name: str) -> None:
    """Annotate ``name`` as a ``ClassVar`` on a pydantic model, pydantic's own remedy.

    Why: pydantic v2 takes an unannotated class attribute that is not a
    function, property, classmethod or staticmethod for a field (and raises),
    and a ``_name`` one for a private attribute (silently). A ``ClassVar``
    annotation tells it "neither". Only pydantic models are touched; models
    built by pydantic releases that check before ``__set_name__`` runs still
    need ``model_config = ConfigDict(ignored_types=(ParallelFunction,))``.
    """
    pydantic = sys.modules.get("pydantic")
    base = getattr(pydantic, "BaseModel", None)
    if base is None or not isinstance(owner, type) or not issubclass(owner, base):
        return
    # The class's own dict, to add to it (pydantic reads it when it builds the model).
    annotations = owner.__dict__.get("__annotations__")  # noqa: RUF063
    if annotations is None:
        annotations = {}
        type.__setattr__(owner, "__annotations__", annotations)
    annotations.setdefault(name, ClassVar[ParallelFunction[..., Any]])


def _rebind(
    subject: Any, name: str, options: Options, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> BoundParallelMethod[Any, Any]:
    """Unpickle ``subject.name`` with its options and fixed arguments."""
    bound = getattr(subject, name)
    if not isinstance(bound, BoundParallelMethod):
        msg = f"{subject!r}.{name} is no longer a @parallelizable method ({type(bound).__name__}); cannot unpickle it"
        raise TypeError(msg)
    return BoundParallelMethod(bound._func, bound._subject, bound._kind, options, args, kwargs)


class _Doc:
    """``__doc__`` that is the class docstring on the class (``inspect.getdoc``,
    the API page) and the method's docstring on a bound object, as
    :func:`functools.update_wrapper` would give."""

    def __init__(self, class_doc: str | None) -> None:
        self.class_doc = class_doc

    def __get__(self, instance: Any, owner: type | None = None) -> str | None:
        if instance is None:
            return self.class_doc
        doc: str | None = instance._func._func.__doc__
        return doc


def _cloudpickle_reduce(func: ParallelFunction[Any, Any]) -> Any:
    # cloudpickle feeds other processes: a __main__ function travels by value there.
    if func._travels_by_value():
        return func._reduce_by_value()
    return func.__reduce__()


register_cloudpickle_reducer(ParallelFunction, _cloudpickle_reduce)


class BoundParallelMethod(Generic[P, R]):
    """``m.score``: the method bound to ``m``, with the parallel surface.

    Built on every attribute access (cheap); ``.options()`` and
    ``.partial()`` return new ones still bound to the same object.

    Example:
        >>> from parallelmethods import parallelizable
        >>> class Model:
        ...     def __init__(self, w): self.w = w
        ...     @parallelizable(backend="threading")
        ...     def score(self, x, y=0): return self.w * x + y
        >>> m = Model(3)
        >>> m.score(2), m.score.map([1, 2]), m.score.partial(y=1).map([1, 2])
        (6, [3, 6], [4, 7])

    .. versionadded:: 0.1
    """

    __class_getitem__ = classmethod(GenericAlias)  # type: ignore[var-annotated]
    __slots__ = ("_args", "_func", "_kind", "_kwargs", "_options", "_subject")

    def __init__(
        self,
        func: ParallelFunction[Any, Any],
        subject: Any,
        kind: str,
        options: Options,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._func = func
        self._subject = subject
        self._kind = kind
        self._options = options
        self._args = args
        self._kwargs = kwargs

    # -- introspection ---------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ("__name__", "__qualname__", "__module__", "__annotations__", "__dict__"):
            return getattr(self._func._func, name)
        msg = f"{type(self).__name__!r} object has no attribute {name!r}"
        raise AttributeError(msg)

    __doc__ = _Doc(__doc__)  # type: ignore[assignment]

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """The plain bound method (with fixed arguments), for ``inspect.signature``."""
        fn = self._func._func
        if self._kind in ("method", "classmethod", "misplaced-classmethod"):
            fn = MethodType(fn, self._subject)
        if self._args or self._kwargs:
            return functools.partial(fn, *self._args, **self._kwargs)
        return fn  # type: ignore[no-any-return]

    @property
    def __self__(self) -> Any:
        return self._subject

    def __repr__(self) -> str:
        extra = ""
        if self._args or self._kwargs:
            extra += (
                f" partial({', '.join([*map(repr, self._args), *(f'{k}={v!r}' for k, v in self._kwargs.items())])})"
            )
        given = self._options.given()
        if given:
            extra += f" options({', '.join(f'{k}={v!r}' for k, v in given.items())})"
        return f"<parallel bound method {self._func.__qualname__} of {self._subject!r}{extra}>"

    def __reduce__(self) -> Any:
        # Like a stdlib bound method, (getattr, (subject, name)): the subject
        # carries its class, so stdlib pickle writes a __main__ class by name
        # (fork children and the caller have it), and cloudpickle copies it
        # by value; the descriptor itself is never named. Options and fixed
        # arguments, when there are any, are re-applied by _rebind.
        name = self._attribute_name()
        if name is None:  # not reachable by name (a super() view, a detached descriptor)
            return (
                BoundParallelMethod,
                (self._func, self._subject, self._kind, self._options, self._args, self._kwargs),
            )
        if self._options is self._func._options and not self._args and not self._kwargs:
            return (getattr, (self._subject, name))
        return (_rebind, (self._subject, name, self._options, self._args, self._kwargs))

    def _attribute_name(self) -> str | None:
        """A name under which ``getattr(subject, name)`` gives this descriptor again."""
        if self._kind == "function":
            return None
        cls = type(self._subject) if self._kind == "method" else self._subject
        names = [self._func._name, self._func.__name__]
        for name in dict.fromkeys(n for n in names if n):
            for klass in getattr(cls, "__mro__", ()):
                if name in klass.__dict__:
                    if _unwrap_descriptor(klass.__dict__[name]) is self._func:
                        return name
                    break
        return None

    # -- plain call --------------------------------------------------------
    def __call__(self, /, *args: P.args, **kwargs: P.kwargs) -> R:
        fn = self._func._func
        lead: tuple[Any, ...] = (
            (self._subject,) if self._kind in ("method", "classmethod", "misplaced-classmethod") else ()
        )
        if self._kwargs:
            kwargs = {**self._kwargs, **kwargs}  # type: ignore[assignment]
        return fn(*lead, *self._args, *args, **kwargs)  # type: ignore[no-any-return]

    # -- copies ----------------------------------------------------------
    def options(self, /, **options: Any) -> BoundParallelMethod[P, R]:
        """A copy with these options; ``m.score`` itself is unchanged.

        Example:
            >>> m.score.options(n_jobs=2).map([1, 2])
            [3, 6]
        """
        check_option_names(options, where=f"{self._func.__qualname__}.options")
        layer = split_options(options, where=f"{self._func.__qualname__}.options", allow_ordered=True)
        return BoundParallelMethod(
            self._func, self._subject, self._kind, self._options.merge(layer), self._args, self._kwargs
        )

    def partial(self, /, *args: Any, **kwargs: Any) -> BoundParallelMethod[..., R]:
        """Fix leading arguments and keywords, like :func:`functools.partial`.

        Example:
            >>> m.score.partial(y=5).map(range(3))
            [5, 8, 11]
        """
        return BoundParallelMethod(
            self._func, self._subject, self._kind, self._options, (*self._args, *args), {**self._kwargs, **kwargs}
        )

    # -- parallel surface ------------------------------------------------
    def _check_bindable(self, what: str) -> None:
        if self._kind == "misplaced-classmethod":
            qualname = self._func.__qualname__
            msg = (
                f"{qualname}.{what}() cannot find its class: @parallelizable is under "
                "@classmethod. Put @parallelizable above @classmethod (outermost)."
            )
            raise TypeError(msg)

    def _layer(self, options: dict[str, Any], what: str, allow_ordered: bool) -> Options:
        self._check_bindable(what)
        call = split_options(
            options,
            where=f"{self._func.__qualname__}.{what}",
            allow_ordered=allow_ordered,
            parameter=self._takes_keyword,
        )
        return self._options.merge(call)

    def _takes_keyword(self, name: str) -> Literal["named", "any"] | None:
        """Whether the method itself takes ``name=``: as a parameter, through ``**kwargs``, or not."""
        try:
            params = inspect.signature(self._func._func).parameters.values()
        except (TypeError, ValueError):  # no signature (some builtins): cannot tell
            return None
        found: Literal["named", "any"] | None = None
        for p in params:
            if p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                return "named"
            if p.kind is p.VAR_KEYWORD:
                found = "any"
        return found

    def map(self, /, *iterables: Iterable[Any], **options: Any) -> list[R]:
        """Call the method on every item, in parallel; results in input order.

        Several iterables are zipped (stopping at the shortest), as with the
        builtin :func:`map`. Options (``n_jobs=``, ``backend=``...) may be
        given as keywords.

        Example:
            >>> m.score.map([1, 2], [10, 20])
            [13, 26]
        """
        from ._runner import run_map

        opts = self._layer(options, "map", allow_ordered=False)
        return run_map(self, opts, _zip_items(iterables, self._func.__qualname__, "map"))

    def starmap(self, iterable: Iterable[Iterable[Any]], /, **options: Any) -> list[R]:
        """Like :meth:`map`, but each item is a tuple of positional arguments.

        Example:
            >>> m.score.starmap([(1, 10), (2, 20)])
            [13, 26]
        """
        from ._runner import run_map

        opts = self._layer(options, "starmap", allow_ordered=False)
        return run_map(self, opts, _star_items(iterable, self._func.__qualname__))

    def imap(self, /, *iterables: Iterable[Any], **options: Any) -> Iterator[R]:
        """Lazy :meth:`map`: reads its input with bounded read-ahead.

        ``ordered=False`` yields results as they complete.

        Example:
            >>> list(m.score.imap(range(3)))
            [0, 3, 6]
        """
        from ._runner import run_imap

        opts = self._layer(options, "imap", allow_ordered=True)
        return run_imap(self, opts, _zip_items(iterables, self._func.__qualname__, "imap"))

    def explain(self, /, **options: Any) -> Explanation:
        """How ``self`` will travel to workers; see :func:`parallelmethods.explain`."""
        from ._explain import explain_bound

        return explain_bound(self, self._layer(options, "explain", allow_ordered=True))


def _unwrap_descriptor(attr: Any) -> Any:
    """The ParallelFunction in a class attribute, through classmethod/staticmethod."""
    if isinstance(attr, (classmethod, staticmethod)):
        return attr.__func__
    return attr


def _check_iterable(obj: Any, where: str, position: str) -> Iterator[Any]:
    try:
        return iter(obj)
    except TypeError:
        msg = (
            f"{where}() argument {position} must be iterable, not {type(obj).__name__} ({obj!r:.60}); "
            "pass a list, range or generator of items"
        )
        raise TypeError(msg) from None


class Items(NamedTuple):
    """The input of a map: an iterator, and whether each element is a tuple of
    arguments (``star``) or the single argument itself (one iterable: no
    1-tuple per item to build, pickle and unpack)."""

    iterator: Iterator[Any]
    star: bool


def _zip_items(iterables: tuple[Iterable[Any], ...], qualname: str, what: str) -> Items:
    where = f"{qualname}.{what}"
    if not iterables:
        msg = f"{where}() needs at least one iterable of items, e.g. {what}(range(10))"
        raise TypeError(msg)
    its = [_check_iterable(it, where, str(i + 1)) for i, it in enumerate(iterables)]
    if len(its) == 1:
        return Items(its[0], star=False)
    return Items(zip(*its, strict=False), star=True)  # stops at the shortest, like map()


def _star_items(iterable: Iterable[Iterable[Any]], qualname: str) -> Items:
    return Items(_star_gen(iterable, qualname), star=True)


def _star_gen(iterable: Iterable[Iterable[Any]], qualname: str) -> Iterator[tuple[Any, ...]]:
    where = f"{qualname}.starmap"
    it = _check_iterable(iterable, where, "1")

    def gen() -> Iterator[tuple[Any, ...]]:
        for i, args in enumerate(it):
            try:
                yield tuple(args)
            except TypeError:
                msg = f"{where}(): item {i} ({args!r:.60}) is not a tuple of arguments; use map() for single arguments"
                raise TypeError(msg) from None

    return gen()
