"""What users are told when they get it wrong, and call surfaces that take any keyword (issues 11, 14)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest

from parallelmethods import BoundParallelMethod, ParallelFunction, ParallelMixin, parallelizable

from . import _models as M


class Kw:
    @parallelizable(backend="threading")
    def collect(self, x: int, **extra: Any) -> int:
        return x

    @parallelizable(backend="threading")
    def named(self, x: int, func: int = 0, self_: int = 0) -> tuple[int, int]:
        return (x, func)


@parallelizable(backend="threading")
def takes_self(x: int, self: int = 0, func: int = 0) -> tuple[int, int, int]:
    return (x, self, func)


# -- option typos -------------------------------------------------------------


def test_decorator_option_typo_suggests_the_option() -> None:
    """@parallelizable(n_job=2) names n_jobs instead of a bare Options.__init__ error."""
    with pytest.raises(
        TypeError, match=r"parallelizable\(\) got an unexpected keyword argument 'n_job': did you mean 'n_jobs'\?"
    ):
        parallelizable(n_job=2)  # type: ignore[call-overload]


def test_options_typo_suggests_the_option() -> None:
    """.options(njobs=2) suggests n_jobs."""
    with pytest.raises(TypeError, match=r"Model\.score\.options\(\) .*'njobs': did you mean 'n_jobs'\?"):
        M.Model(1).score.options(njobs=2)


def test_map_typo_suggests_the_option_not_partial() -> None:
    """map(xs, njobs=2) on a method without such a parameter suggests n_jobs and not .partial()."""
    with pytest.raises(TypeError, match=r"did you mean 'n_jobs'\?") as info:
        M.Model(1).score.map([1], njobs=2)
    assert ".partial(" not in str(info.value)


def test_map_keyword_of_the_method_suggests_partial() -> None:
    """map(xs, y=5) where y is the method's own parameter points to .partial(y=5)."""
    with pytest.raises(TypeError, match=r"\.partial\(y=5\)\.map\(\.\.\.\)") as info:
        M.Model(1).score.map([1], y=5)
    assert "did you mean" not in str(info.value)


def test_map_keyword_taken_by_var_keyword_suggests_both() -> None:
    """A method with **kwargs gets the closest option and the .partial() route."""
    with pytest.raises(TypeError, match=r"did you mean 'n_jobs'\?.*\.partial\(njobs=2\)\.map"):
        Kw().collect.map([1], njobs=2)


def test_imap_typo_suggests_the_option_at_the_call() -> None:
    """imap(xs, bakend=...) raises at the call with a suggestion, before next()."""
    with pytest.raises(TypeError, match=r"imap\(\) .*did you mean 'backend'\?"):
        M.Model(1).score.imap([1], bakend="threading")


def test_unrelated_keyword_lists_the_options() -> None:
    """A keyword that is neither close to an option nor a parameter lists the options."""
    with pytest.raises(TypeError, match=r"neither an option \(backend, .*\) nor a parameter of the method"):
        M.Model(1).score.map([1], zzz=2)


def test_backend_typo_suggests_the_backend() -> None:
    """backend='lokky' suggests 'loky'."""
    with pytest.raises(ValueError, match=r"backend='lokky' is not a known joblib backend; did you mean 'loky'\?"):
        M.Model(1).score.map([1], backend="lokky")


def test_backend_typo_on_the_decorator_suggests_the_backend() -> None:
    """@parallelizable(backend='threads') suggests 'threading' at decoration."""
    with pytest.raises(ValueError, match=r"did you mean 'threading'\?"):
        parallelizable(backend="threads")


# -- what can be decorated ---------------------------------------------------


def test_cached_property_is_refused_at_decoration() -> None:
    """functools.cached_property: TypeError naming it and saying to decorate a method of the item."""
    with pytest.raises(
        TypeError, match=r"functools\.cached_property object \(area\).*decorate a method that takes the item"
    ):

        class Shape:
            @parallelizable  # type: ignore[prop-decorator]
            @functools.cached_property
            def area(self) -> int:
                return 1


def test_property_is_refused_at_decoration() -> None:
    """property: TypeError naming it."""
    with pytest.raises(TypeError, match=r"got a property object \(_size\), which is not a function"):
        parallelizable(property(_size))  # type: ignore[call-overload]


def _size(self: object) -> int:
    return 1


def test_partial_object_is_refused_with_the_partial_fix() -> None:
    """functools.partial: TypeError pointing to decorating the function and using .partial()."""
    with pytest.raises(
        TypeError,
        match=r"functools\.partial object of pow: decorate the function itself.*parallelizable\(pow\)\.partial",
    ):
        parallelizable(functools.partial(pow, 2))


def test_callable_instance_is_refused_with_the_call_fix() -> None:
    """A callable instance: TypeError pointing to decorating its class's __call__."""

    class Doubler:
        def __call__(self, x: int) -> int:
            return 2 * x

    with pytest.raises(TypeError, match=r"callable object rather than a function: decorate .*Doubler\.__call__"):
        parallelizable(Doubler())


def test_classmethod_over_a_property_is_refused() -> None:
    """A classmethod wrapping something that is not a function is refused too."""
    with pytest.raises(TypeError, match=r"@classmethod over property object"):
        parallelizable(classmethod(property(_size)))  # type: ignore[arg-type]


def test_function_like_wrappers_are_accepted() -> None:
    """lru_cache wrappers and builtins keep working: they have a name and a qualified name."""
    assert parallelizable(functools.lru_cache(abs)).map([-1, 2], backend="threading") == [1, 2]
    assert parallelizable(abs).map([-3], backend="threading") == [3]


# -- docs ----------------------------------------------------------------------


def test_bound_class_docstring_is_visible_to_getdoc() -> None:
    """inspect.getdoc(BoundParallelMethod) is its class docstring, for help() and the API page."""
    doc = inspect.getdoc(BoundParallelMethod)
    assert doc is not None and doc.startswith("``m.score``: the method bound to ``m``")


def test_bound_object_doc_is_the_methods_doc() -> None:
    """m.score.__doc__ and inspect.getdoc(m.score) stay the method's own docstring."""
    m = M.Model(1)
    assert m.score.__doc__ == M.Model.score.__doc__ == inspect.getdoc(m.score)


# -- positional-only call surfaces (issue 14) --------------------------------


def test_function_call_passes_self_and_func_keywords() -> None:
    """A decorated function with parameters named self and func takes them as keywords."""
    assert takes_self(1, self=2, func=3) == (1, 2, 3)


def test_partial_passes_self_and_func_keywords() -> None:
    """.partial(self=..., func=...) fixes parameters of those names."""
    assert takes_self.partial(self=2, func=3).map([1]) == [(1, 2, 3)]


def test_bound_call_passes_a_func_keyword() -> None:
    """m.named(1, func=2) reaches the method's func parameter."""
    assert Kw().named(1, func=2) == (1, 2)


def test_module_function_surfaces_are_positional_only() -> None:
    """Every public call surface takes its own first parameter positionally only."""
    for name in ("__call__", "map", "imap", "starmap", "partial", "options", "explain"):
        for cls in (ParallelFunction, BoundParallelMethod):
            params = list(inspect.signature(getattr(cls, name)).parameters.values())
            assert params[0].kind is inspect.Parameter.POSITIONAL_ONLY, (cls.__name__, name)


# -- ParallelMixin keeps decorator options (issue 14) ---------------------------


class Built(ParallelMixin, parallel=("build", "double")):
    @classmethod
    @parallelizable(backend="threading", n_jobs=2)
    def build(cls, x: int) -> tuple[str, int]:
        return (cls.__name__, x)

    @staticmethod
    @parallelizable(backend="threading", n_jobs=2)
    def double(x: int) -> int:
        return 2 * x


def test_mixin_classmethod_above_decorator_keeps_its_options() -> None:
    """@classmethod over @parallelizable(...) in a listed mixin method keeps the decorator's options."""
    assert Built.build.options()._options.given() == {"backend": "threading", "n_jobs": 2}


def test_mixin_classmethod_above_decorator_binds_the_class() -> None:
    """The normalised classmethod still maps bound to its class."""
    assert Built.build.map([1, 2]) == [("Built", 1), ("Built", 2)]


def test_mixin_staticmethod_above_decorator_keeps_its_options() -> None:
    """@staticmethod over @parallelizable(...) in a listed mixin method keeps the options too."""
    assert Built.double.options()._options.given() == {"backend": "threading", "n_jobs": 2}
    assert Built.double.map([1, 2]) == [2, 4]


class _HoldsSqlite(ParallelMixin, parallel=("f",)):
    def __init__(self) -> None:
        import sqlite3

        self.conn = sqlite3.connect(":memory:")

    def f(self, x: int) -> int:
        return x


def test_explain_fix_fits_the_backend() -> None:
    """explain() does not offer threading to a threading user, and tells sqlite users about check_same_thread."""
    from parallelmethods import explain

    on_threads = explain(_HoldsSqlite().f, backend="threading").problems[0].fix
    assert (
        on_threads.startswith("nothing to do with backend='threading'") and "use backend='threading'" not in on_threads
    )
    on_loky = explain(_HoldsSqlite().f, backend="loky", n_jobs=2).problems[0].fix
    assert "exclude=" in on_loky and "check_same_thread=False" in on_loky
