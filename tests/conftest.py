from __future__ import annotations

import os
import sys

import pytest

# Workers must import tests._models by name: make the repo root importable in
# them too (loky passes sys.path on; forked workers inherit it).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ALL_BACKENDS = ["loky", "multiprocessing", "threading", "sequential"]
PROCESS_BACKENDS = ["loky", "multiprocessing"]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=PROCESS_BACKENDS)
def process_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def counts_dir(tmp_path: object) -> str:
    return str(tmp_path)
