"""Every failure is a clear, named error, fast; nothing hangs; the next map works."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from parallelmethods import ParallelMethodsError, ParallelMixin, SerializationError, WorkerCrashedError, parallelizable

from . import _faulty as F
from . import _models as M
from ._scripts import run_script
from .conftest import FORK_ROUTE

N = 2


def _next_map_works(backend: str) -> None:
    assert M.Model(2).score.map(range(6), backend=backend, n_jobs=N) == [0, 2, 4, 6, 8, 10]


CRASH_TABLE = [
    # (what, call, expected exception, message match)
    (
        "pickling self",
        lambda o, b: F.HoldsLock().f.map([1], backend=b, n_jobs=N),
        SerializationError,
        r"self\.lock \(_thread\.lock\)",
    ),
    (
        "unpickling self in the worker",
        lambda o, b: F.UnpicklesBadly().f.map(range(4), backend=b, n_jobs=N),
        ParallelMethodsError,
        r"while rebuilding self \(UnpicklesBadly\) in a worker: RuntimeError .*cannot be rebuilt here",
    ),
    ("inside the method", lambda o, b: o.method_raises.map(range(10), backend=b, n_jobs=N), KeyError, "no 7"),
    (
        "pickling the result",
        lambda o, b: o.result_unpicklable.map(range(3), backend=b, n_jobs=N),
        SerializationError,
        "result of item 1",
    ),
    (
        "unpickling the result",
        lambda o, b: o.result_fails_in_caller.map(range(3), backend=b, n_jobs=N),
        ParallelMethodsError,
        "could not be rebuilt in the caller",
    ),
    ("os._exit(1)", lambda o, b: o.exits.map(range(8), backend=b, n_jobs=N), WorkerCrashedError, r"exit code 1"),
    ("SIGKILL", lambda o, b: o.killed.map(range(8), backend=b, n_jobs=N), WorkerCrashedError, r"SIGKILL"),
    ("timeout", lambda o, b: o.sleeps.map(range(4), backend=b, n_jobs=N, timeout=1), TimeoutError, r"timeout=1s"),
]


FORK_NEVER_PICKLES_SELF = {"pickling self", "unpickling self in the worker"}


@pytest.mark.parametrize(("what", "call", "exc", "match"), CRASH_TABLE, ids=[c[0] for c in CRASH_TABLE])
def test_crash_table(process_backend: str, what: str, call: object, exc: type, match: str) -> None:
    """Each failure stage gives the documented error in under 5 s, then a map succeeds."""
    t0 = time.monotonic()
    if process_backend == "multiprocessing" and FORK_ROUTE and what in FORK_NEVER_PICKLES_SELF:
        # The fork route never pickles self: these stages do not exist there.
        assert call(F.Faulty(), process_backend)  # type: ignore[operator]
        return
    with pytest.raises(exc, match=match):
        call(F.Faulty(), process_backend)  # type: ignore[operator]
    assert time.monotonic() - t0 < 5, f"{what} took too long"
    _next_map_works(process_backend)


def test_method_error_keeps_type_note_and_traceback(process_backend: str) -> None:
    """The original type and message come back with a note naming the item and the worker traceback as cause."""
    with pytest.raises(KeyError) as info:
        F.Faulty().method_raises.map(range(10), backend=process_backend, n_jobs=N)
    assert "parallelmethods: raised by Faulty.method_raises on item 7" in info.value.__notes__
    assert "method_raises" in str(info.value.__cause__) and "KeyError" in str(info.value.__cause__)


def test_on_error_return_puts_exceptions_in_place(backend: str) -> None:
    """on_error='return' puts the exception, with its note, in the item's place."""
    out = F.Faulty().method_raises.map(range(9), backend=backend, n_jobs=N, on_error="return")
    assert out[:7] == list(range(7)) and out[8] == 8
    assert isinstance(out[7], KeyError) and "on item 7" in out[7].__notes__[0]


def test_unrebuildable_exception_becomes_parallelmethodserror() -> None:
    """An exception whose __init__ pickle cannot call becomes ParallelMethodsError with type name and traceback."""
    with pytest.raises(ParallelMethodsError, match="FinickyError") as info:
        F.Faulty().finicky.map(range(4), backend="loky", n_jobs=N)
    assert info.value.type_name is not None and info.value.type_name.endswith("FinickyError")
    assert "finicky" in (info.value.traceback_text or "")


def test_argument_that_cannot_travel_names_item() -> None:
    """An unpicklable argument names 'argument 0 of item 3'."""
    items = [1, 2, 3, threading.Lock()]
    with pytest.raises(SerializationError, match="argument 0 of item 3"):
        M.Model(1).varargs.map(items, backend="loky", n_jobs=N)


@pytest.mark.parametrize("fault", ["exits", "killed", "sleeps"])
def test_on_error_return_survives_crash_and_timeout(process_backend: str, fault: str) -> None:
    """A dead worker or timeout gives WorkerCrashedError/TimeoutError in that item's place; the rest completes."""
    kw: dict[str, object] = {"timeout": 1} if fault == "sleeps" else {}
    bad = 2 if fault == "sleeps" else 3
    out = getattr(F.Faulty(), fault).map(range(6), backend=process_backend, n_jobs=N, on_error="return", **kw)
    expected_type = TimeoutError if fault == "sleeps" else WorkerCrashedError
    assert isinstance(out[bad], expected_type)
    assert [v for i, v in enumerate(out) if i != bad] == [i for i in range(6) if i != bad]


def test_retries_rerun_lost_items(process_backend: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """retries=1 re-runs an item whose worker died once; the map then succeeds."""
    faulty = F.Faulty()
    faulty.marker = os.path.join(str(tmp_path), "died-once")  # not an env var: a forkserver's workers keep its env
    assert faulty.flaky_exit.map(range(6), backend=process_backend, n_jobs=N, retries=1) == list(range(6))


def test_retries_never_rerun_method_exceptions() -> None:
    """retries does not re-run an exception raised by the method itself."""
    calls = []

    class C:
        @parallelizable
        def f(self, x: int) -> int:
            calls.append(x)
            raise ValueError("x")

    with pytest.raises(ValueError, match="x"):
        C().f.map([1], backend="threading", retries=3)
    assert calls == [1]


BAD_INPUT = [
    (lambda: M.Model(1).score.map([1], n_jobs=0), ValueError, "n_jobs=0"),
    (lambda: M.Model(1).score.map([1], backend="nope"), ValueError, "not a known joblib backend"),
    (lambda: M.Model(1).score.options(on_error="x"), ValueError, "'raise'.*'return'"),
    (lambda: parallelizable(batch_size=0), ValueError, "batch_size=0"),
    (lambda: M.Model(1).score.map([1], timeout=-1), ValueError, "timeout=-1"),
    (lambda: M.Model(1).score.map([1], retries=-1), ValueError, "retries=-1"),
    (lambda: M.Model(1).score.map(5), TypeError, "must be iterable"),
    (lambda: M.Model(1).score.map([1], y=5), TypeError, r"\.partial\(y=5\)"),
    (lambda: M.Model(1).score.map([1], ordered=False), TypeError, "imap"),
    (lambda: M.Model(1).score.imap(5), TypeError, "must be iterable"),
    (lambda: M.Model(1).score.imap([1], backend="nope"), ValueError, "not a known"),
    (lambda: M.Model(1).score.map([1], backend="sequential", timeout=1), ValueError, "cannot be enforced"),
    (lambda: parallelizable(42), TypeError, "not callable or a descriptor"),  # type: ignore[call-overload]
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUT)
def test_bad_input_table(call: object, exc: type, match: str) -> None:
    """Bad values raise where given, before any work, with a message naming the fix."""
    with pytest.raises(exc, match=match):
        call()  # type: ignore[operator]


def test_bad_mixin_name() -> None:
    """parallel=('missing',) is a TypeError at class creation."""
    with pytest.raises(TypeError, match="'missing', which C does not define"):

        class C(ParallelMixin, parallel=("missing",)):
            pass


def test_concurrent_maps_from_threads() -> None:
    """Four threads mapping on one object at once all get their results."""
    m = M.Model(3)
    results: dict[int, list[int]] = {}

    def work(k: int) -> None:
        results[k] = m.score.partial(y=k).map(range(50), backend="loky", n_jobs=N)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert dict(results.items()) == {k: [3 * i + k for i in range(50)] for k in range(4)}


def test_two_imaps_read_in_turn_and_abandoned(process_backend: str) -> None:
    """Two imaps read alternately both complete; an abandoned imap leaves the next map working."""
    a, b = M.Model(1), M.Model(10)
    ia = a.score.imap(range(10), backend=process_backend, n_jobs=N)
    ib = b.score.imap(range(10), backend=process_backend, n_jobs=N)
    pairs = [(next(ia), next(ib)) for _ in range(10)]
    assert pairs == [(i, 10 * i) for i in range(10)]
    abandoned = a.score.imap(range(1000), backend=process_backend, n_jobs=N)
    assert next(abandoned) == 0
    abandoned.close()  # type: ignore[attr-defined]
    _next_map_works(process_backend)


class Nester:
    @parallelizable
    def outer(self, x: int) -> list[int]:
        return M.Model(x).score.map(range(3))


def test_nested_map_inside_worker() -> None:
    """A map inside a worker (nested) works."""
    assert Nester().outer.map([1, 2], backend="loky", n_jobs=N) == [[0, 1, 2], [0, 2, 4]]


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from tests._models import Model
    from parallelmethods import parallelizable

    class Slow:
        @parallelizable
        def f(self, x):
            time.sleep(30)
            return x

    print("START", flush=True)
    Slow().f.map(range(8), backend={backend!r}, n_jobs=2)
    """
)


@pytest.mark.parametrize("backend_name", ["loky", "multiprocessing"])
def test_ctrl_c_exits_fast_without_orphans(tmp_path: object, backend_name: str) -> None:
    """SIGINT during a long map: the process exits within 3 s and leaves no child processes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(str(tmp_path), "long.py")
    with open(script, "w") as f:
        f.write(CTRL_C_SCRIPT.format(root=root, backend=backend_name))
    proc = subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "START"
    ps = psutil.Process(proc.pid)
    deadline = time.monotonic() + 30
    while len(ps.children(recursive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    children = ps.children(recursive=True)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    assert time.monotonic() - t0 < 3
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []


def _our_children() -> list[psutil.Process]:
    return [
        p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_no_leaks(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 process maps with failures and crashes: no orphans, no files of ours left, bounded worker cache."""
    import gc

    from parallelmethods._transport import FILE_PREFIX

    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    f = F.Faulty()
    for i in range(100):
        backend = "loky" if i % 2 else "multiprocessing"
        m = M.Model(i)
        if i % 10 == 3:
            with pytest.raises(WorkerCrashedError):
                f.exits.map(range(6), backend=backend, n_jobs=N)
        elif i % 10 == 5:
            with pytest.raises(KeyError):
                f.method_raises.map(range(9), backend=backend, n_jobs=N)
        else:
            assert m.score.map(range(20), backend=backend, n_jobs=N) == [i * x for x in range(20)]

    class Probe:
        @parallelizable
        def cache(self, x: int) -> int:
            from parallelmethods import _dispatch as d

            time.sleep(0.05)
            return int(d.cache_info()["size"])

    from parallelmethods import _dispatch

    assert max(Probe().cache.map(range(8), backend="loky", n_jobs=N)) <= _dispatch.CACHE_SIZE
    # Payload files live as long as their objects (the unchanged-object shortcut), then go.
    del f, m
    gc.collect()
    ours = f"{FILE_PREFIX}{os.getpid()}-"
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith(ours)] if os.path.isdir("/dev/shm") else []
    assert leftovers == []
    assert [n for n in os.listdir(__import__("tempfile").gettempdir()) if n.startswith(ours)] == []
    # Only loky's reusable workers (and its resource tracker) may remain; multiprocessing pools are gone.
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True, kill_workers=True)
    deadline = time.monotonic() + 10

    def workers() -> list[psutil.Process]:
        # loky's resource tracker and multiprocessing's forkserver serve the whole process.
        return [
            p
            for p in _our_children()
            if not any(k in " ".join(p.cmdline()) for k in ("resource_tracker", "forkserver"))
        ]

    while time.monotonic() < deadline and workers():
        time.sleep(0.2)
    assert workers() == []
    # joblib's own memmapping folders are removed by its resource tracker at exit; ours are gone now.
    new_shm = (set(os.listdir("/dev/shm")) - shm_before) if os.path.isdir("/dev/shm") else set()
    assert {n for n in new_shm if n.startswith(ours)} == set()


def test_payload_files_go_with_their_objects() -> None:
    """Concurrent maps on one object, then the object dies: none of its payload files remain."""
    import gc

    from parallelmethods._transport import FILE_PREFIX

    ours = f"{FILE_PREFIX}{os.getpid()}-"

    def files() -> set[str]:
        return {n for n in os.listdir("/dev/shm") if n.startswith(ours)} if os.path.isdir("/dev/shm") else set()

    before = files()
    m = M.Model(5)
    threads = [
        threading.Thread(target=m.score.map, args=(range(20),), kwargs={"backend": "loky", "n_jobs": N})
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(files() - before) <= 1  # at most the one kept for the live object
    del m, threads
    gc.collect()
    assert files() - before == set()


def test_threading_timeout_raises_and_thread_finishes_in_background() -> None:
    """With threading, timeout raises TimeoutError near the limit; the thread is left to finish."""
    done = threading.Event()

    class Slow:
        @parallelizable
        def f(self, x: int) -> int:
            if x == 1:
                time.sleep(3)
                done.set()
            return x

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="cannot be stopped"):
        Slow().f.map(range(3), backend="threading", n_jobs=N, timeout=0.5)
    assert time.monotonic() - t0 < 2.5
    assert done.wait(10)  # the thread finished on its own
    _next_map_works("threading")


class _Inner:
    def __init__(self) -> None:
        self.handle = threading.Lock()


class _NestedHolder:
    def __init__(self) -> None:
        self.inner = _Inner()

    @parallelizable
    def f(self, x: int) -> int:
        return x


class _SlotsHolder:
    __slots__ = ("guard", "name")

    def __init__(self) -> None:
        self.name = "x"
        self.guard = threading.Lock()

    @parallelizable
    def f(self, x: int) -> int:
        return x


@pytest.mark.parametrize(
    ("obj", "path"),
    [(_NestedHolder(), r"self\.inner\.handle \(_thread\.lock\)"), (_SlotsHolder(), r"self\.guard \(_thread\.lock\)")],
)
def test_serialization_error_paths(obj: object, path: str) -> None:
    """Nested attributes and __slots__ attributes are named by their path."""
    with pytest.raises(SerializationError, match=path):
        obj.f.map([1], backend="loky", n_jobs=N)  # type: ignore[attr-defined]


class _RefusesPickling:
    def __reduce_ex__(self, protocol: object) -> object:
        raise TypeError("this object refuses to be pickled")

    @parallelizable
    def f(self, x: int) -> int:
        return x


def test_serialization_error_when_self_itself_refuses() -> None:
    """No attribute to blame: the error says to give the class a __getstate__, not to exclude ''."""
    with pytest.raises(SerializationError, match=r"self \(.*_RefusesPickling\).*give the class a __getstate__") as info:
        _RefusesPickling().f.map([1], backend="loky", n_jobs=N)
    assert "''" not in str(info.value)


def test_without_dask_installed_backend_dask_says_what_to_install(tmp_path: object) -> None:
    """Without dask.distributed the library works, and backend='dask' names the extra to install."""
    out = run_script(
        tmp_path,
        (
            "import sys\n"
            "sys.modules['distributed'] = None  # as if not installed\n"
            "from parallelmethods import parallelizable\n"
            "@parallelizable\n"
            "def sq(x): return x * x\n"
            "assert sq.map([1, 2], backend='threading') == [1, 4]\n"
            "try:\n"
            "    sq.map([1], backend='dask')\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n"
        ),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR" in out.stdout and "parallelmethods[dask]" in out.stdout


def test_kept_payload_files_are_bounded() -> None:
    """At most KEPT_FILES live objects keep a payload file between calls."""
    from parallelmethods._transport import FILE_PREFIX, KEPT_FILES

    ours = f"{FILE_PREFIX}{os.getpid()}-"
    before = {n for n in os.listdir("/dev/shm") if n.startswith(ours)} if os.path.isdir("/dev/shm") else set()
    alive = [M.Model(i) for i in range(KEPT_FILES + 3)]
    for m in alive:
        assert m.score.map([1], backend="loky", n_jobs=N) == [m.w]
    now = {n for n in os.listdir("/dev/shm") if n.startswith(ours)} if os.path.isdir("/dev/shm") else set()
    assert len(now - before) <= KEPT_FILES


def test_killed_caller_leaves_no_payload_file(tmp_path: object) -> None:
    """A caller killed with SIGKILL (no atexit) still leaves no payload file: loky's tracker removes it."""
    from parallelmethods._transport import FILE_PREFIX

    script = os.path.join(str(tmp_path), "killed.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(script, "w") as f:
        f.write(
            f"import sys, time\nsys.path.insert(0, {root!r})\n"
            "from tests._models import Model\n"
            "m = Model(3)\n"
            "assert m.score.map(range(4), backend='loky', n_jobs=2) == [0, 3, 6, 9]\n"
            "print('READY', flush=True)\n"
            "time.sleep(60)\n"
        )
    proc = subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    ours = f"{FILE_PREFIX}{proc.pid}-"
    assert [n for n in os.listdir("/dev/shm") if n.startswith(ours)], "the live object's file should be kept"
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())
    ]
    proc.kill()
    proc.wait(10)
    # loky's orphaned workers would exit at their idle timeout (300 s); end them now.
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [n for n in os.listdir("/dev/shm") if n.startswith(ours)]:
        time.sleep(0.2)
    assert [n for n in os.listdir("/dev/shm") if n.startswith(ours)] == []
