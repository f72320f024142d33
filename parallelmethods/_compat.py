"""Version shims (attrs' ``_compat.py`` in spirit)."""

from __future__ import annotations

import sys

PY_3_11_PLUS = sys.version_info >= (3, 11)


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``; on 3.10 set ``__notes__`` (kept by pickle, not displayed)."""
    if PY_3_11_PLUS:
        exc.add_note(note)  # type: ignore[attr-defined,unused-ignore]
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
    notes.append(note)
    try:
        exc.__notes__ = notes  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass


# ---------------------------------------------------------------------------
# cloudpickle internals. Every touch of a private name of joblib, loky,
# multiprocessing, cloudpickle or dask belongs in this module, with the
# versions it was checked on and a test in tests/test_compat.py.
# ---------------------------------------------------------------------------


def cloudpickle_by_value(obj: object) -> bool:
    """Whether cloudpickle would pickle this class or function by value.

    Why: the state cache must fingerprint *code* that travels by value
    (``__main__``, notebooks, ``<locals>``, modules registered with
    ``cloudpickle.register_pickle_by_value``), so that a redefined class or
    helper is shipped again. cloudpickle's own decision is the private
    ``_should_pickle_by_reference`` (cloudpickle 2.0 to 3.1 at least; checked
    on 2.2.1 and 3.1.3). If it disappears we fall back to the cases we can
    see ourselves (``__main__``, ``<locals>``, lambdas); the registry then
    goes unseen, and tests/test_compat.py fails loudly.
    """
    import cloudpickle

    decide = getattr(getattr(cloudpickle, "cloudpickle", None), "_should_pickle_by_reference", None)
    if decide is None:  # pragma: no cover - caught by tests/test_compat.py
        return False
    try:
        return not decide(obj)
    except Exception:  # noqa: BLE001 - odd objects (no __qualname__...): cloudpickle copies them
        return True


# ---------------------------------------------------------------------------
# loky internals.
# ---------------------------------------------------------------------------

_LOKY_LEAK_LIMIT: int | None = None
LOKY_EXECUTOR_MODULE = "joblib.externals.loky.process_executor"


def raise_loky_leak_limit(held: int) -> None:
    """Tell loky's leak guard, in this worker only, that ``held`` bytes are our cache.

    Why: a loky worker compares its RSS with its size after its first task
    and exits ("Memory leak detected") when it grew by more than the private
    ``process_executor._MAX_MEMORY_LEAK_SIZE`` (300 MB; joblib 1.3 to 1.6,
    loky 3.4 to 3.5). A cached 1M-entry dict or a mapped 200 MB array is
    deliberate growth, and the restart would throw the cache away (measured:
    warm calls fell back to full unpickling). Only in processes where loky's
    executor is loaded; if the name is gone the guard is left as is, and
    tests/test_compat.py fails loudly.
    """
    global _LOKY_LEAK_LIMIT
    executor = sys.modules.get(LOKY_EXECUTOR_MODULE)
    if executor is None or not hasattr(executor, "_MAX_MEMORY_LEAK_SIZE"):
        return
    if _LOKY_LEAK_LIMIT is None:
        _LOKY_LEAK_LIMIT = int(getattr(executor, "_MAX_MEMORY_LEAK_SIZE"))  # noqa: B009
    setattr(executor, "_MAX_MEMORY_LEAK_SIZE", _LOKY_LEAK_LIMIT + held)  # noqa: B010
