"""Everything decided before any work starts: backend, worker count, route for ``self``.

The route follows the backend class, not its name, so an enclosing
``joblib.parallel_config(...)`` is honoured exactly as joblib would:

========================================  ===========  ======================================
backend                                   route        why
========================================  ===========  ======================================
threading, sequential, or 1 worker        reference    same process: share self, copy nothing
multiprocessing with the fork start       fork         the pool forks after self is registered
dask (DaskDistributedBackend)             cluster      other machines: bytes, scattered once
loky and other process backends           file         reusable workers: pickle once, cache
========================================  ===========  ======================================
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import joblib
from joblib._parallel_backends import MultiprocessingBackend, SequentialBackend, ThreadingBackend
from joblib.parallel import get_active_backend

from . import _dispatch
from ._mpwatch import WatchedMultiprocessingBackend
from ._options import Options, Resolved, resolve

if TYPE_CHECKING:
    from ._descriptor import BoundParallelMethod

__all__ = ["Plan", "plan_for"]


@dataclass
class Plan:
    """What a call will do: backend, worker count, route for ``self``."""

    opts: Resolved
    backend: Any
    backend_name: str
    n_jobs: int
    effective_n_jobs: int
    route: str  # "reference" | "fork" | "file" | "cluster"
    subject: Any
    kind: str
    name: str
    mro_index: int
    label: str
    exclude: tuple[str, ...]
    spec: tuple[Any, ...] = field(default=())


def _backend_name(backend: Any) -> str:
    from joblib.parallel import BACKENDS

    for name, cls in BACKENDS.items():
        if type(backend) is cls:
            return str(name)
    if isinstance(backend, MultiprocessingBackend):
        return "multiprocessing"
    return type(backend).__name__


def _active_backend(backend_opt: str | None) -> tuple[Any, int | None]:
    if backend_opt is None:
        backend, n_jobs = get_active_backend()
    else:
        if backend_opt == "dask":
            _require_dask_client()
        with joblib.parallel_config(backend=backend_opt):
            backend, n_jobs = get_active_backend()
    if type(backend).__name__ == "DaskDistributedBackend":
        _require_dask_client()
    return backend, n_jobs


def _require_dask_client() -> None:
    try:
        from distributed import get_client
    except ImportError:
        msg = (
            "backend='dask' needs dask.distributed: pip install 'parallelmethods[dask]', "
            "then start a client: from dask.distributed import Client; client = Client()"
        )
        raise ImportError(msg) from None
    try:
        get_client()
    except ValueError:
        msg = (
            "backend='dask' runs on the active dask.distributed Client, and there is none. "
            "Start one first: `from dask.distributed import Client; client = Client()` for "
            "a local cluster, or Client('tcp://scheduler:8786') for an existing one."
        )
        raise ValueError(msg) from None


def _find_owner(bound: BoundParallelMethod[Any, Any]) -> tuple[str, int]:
    """(attribute name, index in the MRO of the class that holds this descriptor)."""
    func: Any = bound._func
    if bound._kind == "function":
        return func.__name__, 0
    mro = type(bound._subject).__mro__ if bound._kind == "method" else bound._subject.__mro__
    name = func._name or func.__name__
    for i, klass in enumerate(mro):
        if klass.__dict__.get(name) is func:
            return name, i
    for i, klass in enumerate(mro):  # aliased: the same descriptor under another name
        for attr, value in klass.__dict__.items():
            if value is func:
                return attr, i
    msg = f"cannot find {func.__qualname__} in the class of {bound._subject!r}"
    raise TypeError(msg)


def plan_for(bound: BoundParallelMethod[Any, Any], layer: Options, star: bool = True) -> Plan:
    """Decide backend, n_jobs and route; raises on bad input before any work."""
    opts = resolve(layer)
    backend, config_n_jobs = _active_backend(opts.backend)
    # Our default is all cores (-1); joblib's own "unset" means 1. An enclosing
    # parallel_config(n_jobs=...) still wins over that default.
    n_jobs: int = opts.n_jobs if opts.n_jobs is not None else (config_n_jobs if config_n_jobs is not None else -1)
    if isinstance(backend, MultiprocessingBackend) and not isinstance(backend, WatchedMultiprocessingBackend):
        # joblib's pool waits forever on a task whose worker died; ours watches.
        backend = WatchedMultiprocessingBackend(nesting_level=backend.nesting_level, **backend.backend_kwargs)
    effective = backend.effective_n_jobs(n_jobs)
    backend_name = _backend_name(backend)

    if isinstance(backend, (ThreadingBackend, SequentialBackend)) or effective == 1:
        route = "reference"  # same process: share self, never copy it
    elif isinstance(backend, MultiprocessingBackend) and multiprocessing.get_start_method() == "fork":
        route = "fork"  # workers are forked after we register self: inherited
    elif backend_name == "dask" or type(backend).__name__ == "DaskDistributedBackend":
        route = "cluster"
    else:
        route = "file"  # loky's reusable workers: ship once, cache by digest

    if opts.timeout is not None and route == "reference" and not isinstance(backend, ThreadingBackend):
        msg = (
            f"timeout={opts.timeout} cannot be enforced: with backend={backend_name!r} and "
            f"{effective} worker the work runs in your own process and cannot be stopped. "
            "Use n_jobs >= 2 with a process backend, or backend='threading'."
        )
        raise ValueError(msg)

    name, mro_index = _find_owner(bound)
    kind = bound._kind
    subject = bound._subject
    if kind == "method":
        label = f"{type(subject).__qualname__}.{name}"
        exclude = tuple(getattr(type(subject), "__parallel_exclude__", ()))
    elif kind == "function":
        label, exclude = bound._func.__qualname__, ()
    else:
        label, exclude = f"{subject.__qualname__}.{name}", ()
    plan = Plan(opts, backend, backend_name, n_jobs, effective, route, subject, kind, name, mro_index, label, exclude)
    owner = type(subject).__qualname__ if kind == "method" else label
    # Local process workers follow the caller's cwd and sys.path (the loop's
    # view); threads share them already; a cluster's workers keep their own
    # (another machine may not have the folder: docs/clusters.md).
    context = _dispatch.CallContext(uuid.uuid4().hex, _cwd(), tuple(sys.path), route in ("fork", "file"), exclude, owner)
    plan.spec = (kind, name, mro_index, bound._args, bound._kwargs, opts.on_error, opts.check_mutations, context, star)
    return plan


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # the caller's folder was removed: nothing to follow
        return ""


