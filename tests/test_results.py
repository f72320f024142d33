"""Large results come back out of band (parallelmethods._results): equal to the loop's, writable, no file left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from parallelmethods import _results, parallelizable
from parallelmethods._dispatch import CallContext, FileHandle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 200_000  # float64: 1.6 MB, above MIN_FILE_BYTES

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX mappings, /dev/shm")


def _shape(i: int) -> Any:
    kind = i % 6
    if kind == 0:
        return np.full(BIG, float(i))
    if kind == 1:
        return np.asfortranarray(np.arange(BIG, dtype=np.int64).reshape(400, 500) + i)
    if kind == 2:
        return np.arange(2 * BIG, dtype=np.float64)[::2] + i  # non-contiguous view's copy is contiguous
    if kind == 3:
        return np.arange(2 * BIG, dtype=np.float64).reshape(2, BIG)[:, ::2]  # non-contiguous: in band
    if kind == 4:
        return np.array([{"i": i}, "x", None] * 10, dtype=object)  # object array: in band
    return {"a": np.full((50, 100, 100), i, dtype=np.float32), "small": np.arange(10), "i": i}


class Maker:
    def __init__(self) -> None:
        self.k = 1

    @parallelizable
    def make(self, i: int) -> Any:
        if i % 7 == 6:
            raise ValueError(f"bad {i}")
        return _shape(i)

    @parallelizable
    def array(self, i: int) -> Any:
        return np.full(BIG, float(i))

    @parallelizable
    def slow_last(self, i: int, last: int) -> Any:
        if i == last:
            time.sleep(120)
        return np.full(BIG, float(i))

    @parallelizable
    def die_after_writing(self, i: int, marker: str) -> Any:
        if not os.path.exists(marker):
            open(marker, "w").close()
            _results._watch_folder = lambda caller, folder: os._exit(1)  # type: ignore[assignment]
        return np.full(BIG, float(i))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            # pickle (any route, naive joblib too) makes a non-contiguous array contiguous
            and (a.strides == b.strides or not (b.flags.c_contiguous or b.flags.f_contiguous))
            and bool((a == b).all())
        )
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in b)
    if isinstance(b, BaseException):
        return type(a) is type(b) and str(a) == str(b)
    return bool(a == b)


def _leftovers(pid: int | None = None) -> list[str]:
    prefix = f"parallelmethods-{pid if pid is not None else os.getpid()}-r"
    found = []
    for folder in {"/dev/shm", tempfile.gettempdir()}:
        if os.path.isdir(folder):
            # Result files end with _results' suffix; a payload file (.pkl) whose
            # random part happens to start with "r" is not one of them.
            found += [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(_results._SUFFIX)]
    return found


@pytest.fixture(autouse=True)
def _nothing_left() -> Iterator[None]:
    yield
    # A run stopped early (an error, a closed imap) ends in the background:
    # its last results are swept when it has ended (_runner.DRAIN_SECONDS).
    deadline = time.monotonic() + 5
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers() == []


def _shape_or_error(i: int) -> Any:
    if i % 7 == 6:
        raise ValueError(f"bad {i}")
    return _shape(i)


def test_pack_and_load_round_trip_in_process() -> None:
    from joblib.externals.loky.backend.resource_tracker import ensure_running

    ensure_running()  # as in a worker: a tracker shared with the caller
    folder = tempfile.mkdtemp()
    try:
        handle = FileHandle(os.path.join(folder, f"parallelmethods-{os.getpid()}-x.pkl"), "k", 0, ())
        ctx = CallContext("abc123", os.getcwd(), tuple(sys.path), True)
        value = (0, [_shape(i) for i in range(6)], False, False)
        out = _results.pack(value, handle, ctx)
        assert isinstance(out, _results.OutOfBand)
        # kinds 0, 1, 2 and 5's float32: large and contiguous; the 1.6 MB stream
        # (non-contiguous arrays stay in it) is a file of its own too.
        assert len(out.paths) == 4 + out.main_in_file and out.main_in_file
        assert all(os.path.exists(p) for p in out.paths)
        _first, got, _, _ = _results.load(out)
        assert not any(os.path.exists(p) for p in out.paths)  # unlinked once mapped
        assert all(_equal(g, e) for g, e in zip(got, value[1]))
        got[0][:] = -1  # writable and private
        assert (got[0] == -1).all() and (value[1][0] == 0).all()
        assert got[1].flags.f_contiguous and got[1].flags.writeable
    finally:
        os.rmdir(folder)


def test_large_plain_data_stream_comes_back_in_a_file() -> None:
    """~2 MB of lists and tuples (no buffer): the pickle stream itself travels in a file, not the pipe."""
    from joblib.externals.loky.backend.resource_tracker import ensure_running

    ensure_running()
    folder = tempfile.mkdtemp()
    try:
        handle = FileHandle(os.path.join(folder, f"parallelmethods-{os.getpid()}-x.pkl"), "k", 0, ())
        ctx = CallContext("abc124", os.getcwd(), tuple(sys.path), True)
        value = (0, [[(j, j * 0.5, f"row{j}") for j in range(50_000)]], False, False)
        out = _results.pack(value, handle, ctx)
        assert isinstance(out, _results.OutOfBand) and out.main_in_file and out.main == b""
        assert _results.load(out) == value
        assert not any(os.path.exists(p) for p in out.paths)
    finally:
        os.rmdir(folder)


def test_small_results_stay_in_band() -> None:
    handle = FileHandle(f"/dev/shm/parallelmethods-{os.getpid()}-x.pkl", "k", 0, ())
    out = _results.pack((0, [np.arange(10), "x"], False, False), handle, None)
    assert isinstance(out, bytes)


@pytest.mark.parametrize("backend", ["loky", "multiprocessing"])
def test_large_results_equal_the_loop_and_are_writable(backend: str) -> None:
    items = range(24)
    got = Maker().make.map(items, backend=backend, n_jobs=2, on_error="return")
    expected = [_result(i) for i in items]
    assert all(_equal(g, e) for g, e in zip(got, expected))
    for g in got:
        arr = g["a"] if isinstance(g, dict) else g
        if isinstance(arr, np.ndarray) and arr.dtype != object:
            assert arr.flags.writeable
            arr[...] = 0
            assert not arr.any()


def _result(i: int) -> Any:
    try:
        return _shape_or_error(i)
    except ValueError as e:
        return e


@pytest.mark.parametrize("backend", ["loky", "multiprocessing"])
def test_many_results(backend: str) -> None:
    got = Maker().array.map(range(150), backend=backend, n_jobs=2)
    assert [float(g[0]) for g in got] == [float(i) for i in range(150)]
    assert all(g.shape == (BIG,) for g in got)


@pytest.mark.parametrize("ordered", [True, False])
def test_imap(ordered: bool) -> None:
    got = list(Maker().array.imap(range(20), backend="loky", n_jobs=2, ordered=ordered))
    assert sorted(float(g[0]) for g in got) == [float(i) for i in range(20)]
    if ordered:
        assert [float(g[-1]) for g in got] == [float(i) for i in range(20)]


def test_abandoned_imap_and_raise_leave_nothing() -> None:
    it = Maker().array.imap(range(40), backend="loky", n_jobs=2, batch_size=1)
    next(it)
    time.sleep(0.5)  # other chunks complete: their files wait, unread
    it.close()
    with pytest.raises(ValueError, match="bad 6"):
        Maker().make.map(range(30), backend="loky", n_jobs=2, batch_size=1)


def test_worker_dying_after_writing_leaves_nothing(tmp_path: Any) -> None:
    marker = str(tmp_path / "died")
    try:
        got = Maker().die_after_writing.partial(marker=marker).map(range(6), backend="loky", n_jobs=2, batch_size=1)
    except Exception:
        got = None
    assert os.path.exists(marker)
    if got is not None:
        assert [float(g[0]) for g in got] == [float(i) for i in range(6)]


CALLER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_results import Maker
if sys.argv[1] == "loky":  # results are read as they come: read one, then stop reading
    # Unordered: an ordered imap may decode (and so map and unlink) later items
    # of its window while it waits for item 0; unordered stops after the first.
    it = Maker().array.imap(range(8), backend="loky", n_jobs=2, batch_size=1, ordered=False)
    next(it)
    time.sleep(120)
else:  # multiprocessing reads each chunk as it arrives: with on_error="return" item 0's
    # result is logged (its array in a file) as it ends, and item 1 of its chunk never ends
    Maker().slow_last.partial(last=1).map(range(2), backend=sys.argv[1], n_jobs=2, batch_size=2, on_error="return")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["loky", "multiprocessing"])
def test_killed_caller_leaves_no_result_files(backend: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *sys.path])}
    env.pop("JOBLIB_TEMP_FOLDER", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CALLER.format(root=ROOT)), backend],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _leftovers(proc.pid):  # results are back, unread: the caller is not reading
            assert proc.poll() is None
            assert time.monotonic() < deadline, "the result files never appeared"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while (_leftovers(proc.pid) or _board_files(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(proc.pid) == []
    assert _board_files(proc.pid) == []


def _board_files(pid: int) -> list[str]:
    found = []
    for folder in {"/dev/shm", tempfile.gettempdir()}:
        if os.path.isdir(folder):
            found += [n for n in os.listdir(folder) if n.startswith(f"parallelmethods-{pid}-b")]
    return found


# -- chunks of large results are packed as each item ends (_results.STREAM_BYTES) --


class Rows:
    """Plain data (no buffer) of a chosen size per item; reports how its chunk was being packed."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.sizes = sizes

    @parallelizable
    def rows(self, i: int, bad: int = -1, unpicklable: int = -1) -> Any:
        # The worker loop's `stream` when this item ran: None (the first item
        # decides), True (packed as items end) or False (the list at the end).
        loop = sys._getframe(1)
        stream = loop.f_locals.get("stream", "?") if loop.f_code.co_name == "_run_items" else "not in a worker"
        if i == bad:
            raise ValueError(f"bad {i}")
        out: dict[str, Any] = {"i": i, "rows": [(j, f"r{j}") for j in range(self.sizes.get(i, 10))], "stream": stream}
        if i == unpicklable:
            import threading

            out["lock"] = threading.Lock()
        return out


def _rows_loop(sizes: dict[int, int], n: int) -> list[Any]:
    return [{"i": i, "rows": [(j, f"r{j}") for j in range(sizes.get(i, 10))]} for i in range(n)]


@pytest.mark.parametrize("backend", ["loky", "multiprocessing"])
def test_chunk_with_a_large_first_result_is_packed_as_items_end(backend: str) -> None:
    """Chunks of 4: a chunk whose first result is large packs each later one as it ends; results equal the loop's."""
    big = 20_000  # ~200 KB pickled: above STREAM_BYTES
    # chunk 0: first large, the rest small; chunk 4: first small, a later one large;
    # chunk 8: all large; chunk 12: all small
    sizes = {0: big, 6: big, 8: big, 9: big, 10: big, 11: big}
    got = Rows(sizes).rows.map(range(16), backend=backend, n_jobs=2, batch_size=4)
    assert [{k: v for k, v in g.items() if k != "stream"} for g in got] == _rows_loop(sizes, 16)
    firsts = {0, 4, 8, 12}
    assert all(got[i]["stream"] is None for i in firsts)  # the first item decides
    assert [i for i in range(16) if i not in firsts and got[i]["stream"] is True] == [1, 2, 3, 9, 10, 11]
    assert [i for i in range(16) if i not in firsts and got[i]["stream"] is False] == [5, 6, 7, 13, 14, 15]


@pytest.mark.parametrize("backend", ["loky", "multiprocessing"])
def test_errors_in_a_packed_chunk(backend: str) -> None:
    """A method's error and an unpicklable result inside a packed chunk: named, in their places; the rest intact."""
    from parallelmethods import SerializationError

    sizes = dict.fromkeys(range(8), 20_000)
    m = Rows(sizes).rows.partial(bad=2, unpicklable=5)
    got = m.map(range(8), backend=backend, n_jobs=2, batch_size=4, on_error="return")
    assert isinstance(got[2], ValueError) and str(got[2]) == "bad 2"
    assert isinstance(got[5], SerializationError) and "item 5" in str(got[5]) and "pickled" in str(got[5])
    expected = _rows_loop(sizes, 8)
    for i in (0, 1, 3, 4, 6, 7):
        assert {k: v for k, v in got[i].items() if k != "stream"} == expected[i]
    with pytest.raises(ValueError, match="bad 2"):
        m.map(range(8), backend=backend, n_jobs=2, batch_size=4)
    # With the default on_error="raise", an unpicklable result alone is raised
    # as its SerializationError (never returned as a value).
    with pytest.raises(SerializationError, match=r"result of item 5"):
        Rows(sizes).rows.partial(unpicklable=5).map(range(8), backend=backend, n_jobs=2, batch_size=4)


class Rows2(Rows):
    """Rows that can end its worker once (``die``), for sequences on the same workers."""

    @parallelizable
    def rows_or_die(self, i: int, die: int, marker: str) -> Any:
        if i == die and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return {"i": i, "rows": [(j, f"r{j}") for j in range(self.sizes.get(i, 10))]}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["loky", "multiprocessing"])
def test_packed_chunks_in_a_sequence_on_warm_workers(backend: str, tmp_path: Any) -> None:
    """Packed maps after a change to self, a method error and a crash, in one process: each equals the loop's."""
    sizes = dict.fromkeys(range(8), 20_000)
    r = Rows2(sizes)

    def check() -> None:
        got = r.rows.map(range(8), backend=backend, n_jobs=2, batch_size=4)
        assert [{k: v for k, v in g.items() if k != "stream"} for g in got] == _rows_loop(r.sizes, 8)
        assert got[1]["stream"] is True and got[5]["stream"] is True  # still packed

    check()
    r.sizes[5] = 30_000  # the caller's self changed: the workers must see it
    check()
    with pytest.raises(ValueError, match="bad 2"):
        r.rows.partial(bad=2).map(range(8), backend=backend, n_jobs=2, batch_size=4)
    check()
    marker = str(tmp_path / "died")
    got = r.rows_or_die.partial(die=6, marker=marker).map(range(8), backend=backend, n_jobs=2, batch_size=4, retries=1)
    assert os.path.exists(marker)
    assert got == _rows_loop(r.sizes, 8)
    check()


def test_threads_and_sequential_never_pack() -> None:
    """Threads never pack (no copy at all); an inline route (sequential) packs nothing either."""
    sizes = dict.fromkeys(range(6), 20_000)
    for backend in ("threading", "sequential"):
        got = Rows(sizes).rows.map(range(6), backend=backend, n_jobs=2, batch_size=3)
        assert [{k: v for k, v in g.items() if k != "stream"} for g in got] == _rows_loop(sizes, 6)
        assert all(g["stream"] in (False, "not in a worker") for g in got)


class Table:
    def __init__(self) -> None:
        self.table = list(range(20_000))  # ~100 KB pickled: chunks of it are packed item by item

    @parallelizable
    def same(self, i: int) -> Any:
        return self.table


@pytest.mark.parametrize("backend", ["loky", "multiprocessing", "threading"])
def test_the_same_object_returned_by_every_item(backend: str) -> None:
    """Equal to the loop's results everywhere; the very same object only with threads (docs/conformance.md)."""
    t = Table()
    got = t.same.map(range(6), backend=backend, n_jobs=2, batch_size=3)
    assert all(g == t.table for g in got)
    if backend == "threading":
        assert all(g is t.table for g in got)
    else:
        assert all(g is not t.table for g in got)
        assert got[0] is not got[3]  # different chunks
