"""Every private name of joblib/loky/cloudpickle we touch still exists and still means what we assume.

These fail loudly on an upgrade that moves one; parallelmethods/_compat.py says
why each is used and on which versions it was checked.
"""

from __future__ import annotations

import importlib
import sys
import types

import cloudpickle

from parallelmethods import _compat


def test_cloudpickle_decides_by_value_for_main_locals_and_registered_modules() -> None:
    """cloudpickle's private _should_pickle_by_reference exists and answers as we rely on."""
    assert callable(getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None))

    def local() -> None: ...

    assert _compat.cloudpickle_by_value(local)  # <locals>: by value
    assert not _compat.cloudpickle_by_value(importlib.import_module)  # importable: by reference
    main_cls = type("InMain", (), {"__module__": "__main__"})
    assert _compat.cloudpickle_by_value(main_cls)
    module = types.ModuleType("pm_registered_mod")
    exec("class Thing:\n    pass\n", module.__dict__)
    module.Thing.__module__ = "pm_registered_mod"
    sys.modules["pm_registered_mod"] = module
    try:
        assert not _compat.cloudpickle_by_value(module.Thing)
        cloudpickle.register_pickle_by_value(module)
        try:
            assert _compat.cloudpickle_by_value(module.Thing)
        finally:
            cloudpickle.unregister_pickle_by_value(module)
    finally:
        del sys.modules["pm_registered_mod"]


def test_loky_leak_limit_name_exists_and_is_raised_only_by_what_we_hold() -> None:
    """loky's private _MAX_MEMORY_LEAK_SIZE exists, is an int, and our adjustment is relative to its original value."""
    executor = importlib.import_module(_compat.LOKY_EXECUTOR_MODULE)
    original = executor._MAX_MEMORY_LEAK_SIZE
    assert isinstance(original, int) and original > 0
    try:
        _compat.raise_loky_leak_limit(1000)
        assert executor._MAX_MEMORY_LEAK_SIZE == original + 1000
        _compat.raise_loky_leak_limit(10)  # not cumulative: base + what is held now
        assert executor._MAX_MEMORY_LEAK_SIZE == original + 10
    finally:
        executor._MAX_MEMORY_LEAK_SIZE = original
