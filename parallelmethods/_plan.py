"""Everything decided before any work starts: backend, worker count, route for ``self``.

The backend is the instance joblib itself would use (an enclosing
``joblib.parallel_config(...)`` is honoured exactly as joblib would), and the
route follows what its workers are, read from joblib's public backend
attributes (``uses_threads``, ``supports_sharedmem``) and exact classes;
never the name it was registered under:

===========================================  =========  ==============================================
backend                                      route      why
===========================================  =========  ==============================================
workers are threads or share memory          reference  same process: share self, copy nothing
(``uses_threads``/``supports_sharedmem``:
threading, sequential, user thread
backends), or 1 local worker (joblib then
runs the tasks in the caller)
joblib's own MultiprocessingBackend          fork       our watched subclass forks after self is
(exact type), fork start method                         registered: inherited, never pickled
the same, any other start method             file       fresh local processes: pickle once, map a file
(forkserver: Python 3.14's default; spawn)
joblib's own LokyBackend and subclasses      file       loky's local reusable workers: pickle once,
of LokyBackend                                          cache by state
dask (``DaskDistributedBackend``)            cluster    other machines: bytes scattered once per map
                                                        (_dask), whatever the cluster's size
Ray (``RayBackend``, ``register_ray()``)     cluster    other machines: bytes put in Ray's object store
                                                        once per map, chunks run as Ray tasks (_ray)
other remote backends (a class from          inline     other machines: bytes inside every task
``ray``/``dask``/``distributed``),                      (no shared file system, no scatter API)
a user's MultiprocessingBackend subclass,
any other process backend
===========================================  =========  ==============================================

Three backends are swapped for ours, always on joblib's documented
extension point (a backend class) and with the user's settings: joblib's
own ``MultiprocessingBackend`` (exact type) for
:class:`~parallelmethods._mpwatch.WatchedMultiprocessingBackend` (the same
pool, plus a dead-worker watchdog); dask's ``DaskDistributedBackend`` for
a subclass of it (:func:`parallelmethods._dask.cluster_backend`: same
client, ``submit`` arguments and ``scatter=`` data; never fewer than 2 jobs,
so joblib never runs a task in the caller; lost scattered bytes re-sent;
``KilledWorker`` delivered instead of a hang); Ray's ``RayBackend`` for
:class:`~parallelmethods._ray.RayTaskBackend` (same ``ray_remote_args``;
Ray tasks on Ray's long-lived workers instead of a new actor pool per
call). Any other backend instance, a user's subclass included, is used as
given. A cluster backend is routed "cluster" before anything else: its
tasks run on the cluster even with one worker or ``n_jobs=1``
(``backend="dask"`` means the cluster, always: the API's "never in the
caller's process").
A subclass of MultiprocessingBackend gets the bytes ("inline") route, not
the fork route: fork inheritance only holds for the pool we create; a
subclass of LokyBackend keeps loky's local workers, which share our file
system, so it gets the file route.

The "inline" route sends the payload in every task's arguments: one copy per
chunk (about 4 per worker per map), each worker unpickles it at most once
per distinct state. That is acceptable for the generic remote backend (no
scatter or object store to use through joblib's API); dask and Ray have
their own ship-once route ("cluster").
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import joblib

from . import _compat, _dispatch
from ._compat import LokyBackend, MultiprocessingBackend, SequentialBackend
from ._mpwatch import WatchedMultiprocessingBackend
from ._options import Options, Resolved, resolve
from ._ray import is_ray_backend

if TYPE_CHECKING:
    from ._descriptor import BoundParallelMethod

__all__ = ["Plan", "plan_for", "route_for"]


@dataclass
class Plan:
    """What a call will do: backend, worker count, route for ``self``."""

    opts: Resolved
    backend: Any
    backend_name: str
    n_jobs: int
    effective_n_jobs: int
    route: str  # "reference" | "fork" | "file" | "cluster" | "inline"
    subject: Any
    kind: str
    name: str
    mro_index: int
    label: str
    exclude: tuple[str, ...]
    spec: tuple[Any, ...] = field(default=())
    #: Where the workers run: "caller" (joblib runs the tasks in this
    #: process), "threads", "local processes" or "remote".
    workers: str = "local processes"


def _backend_name(backend: Any) -> str:
    for name, cls in _compat.registered_backends().items():
        if type(backend) is cls:
            return str(name)
    if type(backend) is WatchedMultiprocessingBackend:
        return "multiprocessing"
    return type(backend).__name__


def _uses_threads(backend: Any) -> bool:
    """joblib's public capability flags: the workers share this process's memory."""
    return bool(getattr(backend, "uses_threads", False) or getattr(backend, "supports_sharedmem", False))


def route_for(backend: Any, effective_n_jobs: int) -> tuple[str, str]:
    """``(route, workers)`` for ``backend``; see the table in the module docstring.

    ``backend`` is the instance that will run (joblib's MultiprocessingBackend
    already swapped for the watched one by :func:`_own_backend`).
    """
    if _compat.is_dask_backend(backend) or is_ray_backend(backend):
        # Before the n_jobs == 1 rule: our cluster backends never report 1
        # job, so joblib never runs their tasks in the caller.
        return "cluster", "remote"
    if isinstance(backend, SequentialBackend) or effective_n_jobs == 1:
        return "reference", "caller"  # joblib runs n_jobs=1 in the caller itself
    if _uses_threads(backend):
        return "reference", "threads"
    if _compat.is_remote_backend(backend):
        return "inline", "remote"
    if type(backend) is WatchedMultiprocessingBackend:
        if _compat.multiprocessing_start_method(backend) == "fork":
            return "fork", "local processes"
        return "file", "local processes"
    if isinstance(backend, LokyBackend):
        return "file", "local processes"  # loky's workers: local, share our file system
    if isinstance(backend, MultiprocessingBackend):
        return "inline", "local processes"  # a user's pool: not forked by us
    return "inline", "remote"  # unknown: assume nothing about where it runs


def _own_backend(backend: Any, opts: Resolved | None = None) -> Any:
    """joblib's own MultiprocessingBackend becomes our watched one, dask's and Ray's our
    cluster ones (same cluster, same settings); anything else is kept."""
    if _compat.is_dask_backend(backend):
        from ._dask import cluster_backend

        return cluster_backend(backend)
    if is_ray_backend(backend):
        from ._ray import RayTaskBackend

        # With timeout=, a task past the limit is cancelled with force=True
        # (its worker process is killed; Ray starts another).
        return RayTaskBackend.from_backend(backend, force_cancel=opts is not None and opts.timeout is not None)
    if type(backend) is MultiprocessingBackend:
        # joblib's pool waits forever on a task whose worker died; ours watches.
        return WatchedMultiprocessingBackend(**_compat.backend_init_kwargs(backend))
    return backend


def _active_backend(backend_opt: str | None) -> tuple[Any, int | None]:
    if backend_opt is None:
        backend, n_jobs = _compat.active_backend()
    else:
        if backend_opt == "dask":
            _require_dask_client()
        with joblib.parallel_config(backend=backend_opt):
            backend, n_jobs = _compat.active_backend()
    if _compat.is_dask_backend(backend):
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
    backend_name = _backend_name(backend)  # the name the user chose ("dask", "ray"), before ours replaces it
    backend = _own_backend(backend, opts)
    effective = backend.effective_n_jobs(n_jobs)
    route, workers = route_for(backend, effective)

    if opts.timeout is not None and workers == "caller":
        msg = (
            f"timeout={opts.timeout} cannot be enforced: with backend={backend_name!r} and "
            f"{effective} worker the work runs in your own process and cannot be stopped. "
            "Use n_jobs >= 2 with a process backend, or backend='threading'."
        )
        raise ValueError(msg)
    if opts.timeout is not None and not getattr(backend, "supports_timeout", False):
        msg = (
            f"timeout={opts.timeout} cannot be enforced: backend {backend_name!r} does not support "
            "timeouts (its supports_timeout is False). Use backend='loky' or 'threading'."
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
    plan = Plan(
        opts,
        backend,
        backend_name,
        n_jobs,
        effective,
        route,
        subject,
        kind,
        name,
        mro_index,
        label,
        exclude,
        workers=workers,
    )
    owner = type(subject).__qualname__ if kind == "method" else label
    # Local process workers follow the caller's cwd and sys.path (the loop's
    # view); threads share them already; a cluster's workers keep their own
    # (another machine may not have the folder: docs/clusters.md).
    follow = workers == "local processes" and route != "reference"
    context = _dispatch.CallContext(uuid.uuid4().hex, _cwd(), tuple(sys.path), follow, owner)
    plan.spec = (kind, name, mro_index, bound._args, bound._kwargs, opts.on_error, opts.check_mutations, context, star)
    return plan


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # the caller's folder was removed: nothing to follow
        return ""
