"""Doctest namespace: the ``m`` that method docstrings use (threading backend, no processes)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _doctest_model(doctest_namespace: dict[str, Any]) -> None:
    from parallelmethods import parallelizable

    class Model:
        def __init__(self, w: int) -> None:
            self.w = w

        @parallelizable(backend="threading")
        def score(self, x: int, y: int = 0) -> int:
            return self.w * x + y

    doctest_namespace["m"] = Model(3)
