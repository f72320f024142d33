from __future__ import annotations

import os
import sys

import pytest

# Workers must import tests._models by name: make the repo root importable in
# them too (loky passes sys.path on; forked workers inherit it).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Byte-compile the package (and the tests' helper modules) once, as pip
# does for an installed package. Why: with PYTHONDONTWRITEBYTECODE=1 (set on
# the CI machines) an editable install is compiled from source again in every
# fresh interpreter the tests start: each loky worker, each script, each
# notebook kernel (~0.1 s each, hundreds of them). compileall writes the
# files even so; __pycache__ is ignored by git.
if sys.dont_write_bytecode:
    import compileall

    for _folder in ("parallelmethods", "tests"):
        compileall.compile_dir(os.path.join(ROOT, _folder), quiet=1, maxlevels=0)

# CI runs the whole suite a second time with PM_START_METHOD=forkserver: the
# default start method of Python 3.14 on Linux, which this machine does not
# have. Then joblib's multiprocessing backend does not fork from the caller,
# and self takes the file route there too.
START_METHOD = os.environ.get("PM_START_METHOD")
if START_METHOD:
    import multiprocessing

    multiprocessing.set_start_method(START_METHOD, force=True)

#: Whether joblib's multiprocessing backend forks from the caller here (the fork route).
FORK_ROUTE = (START_METHOD or "fork") == "fork"

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
