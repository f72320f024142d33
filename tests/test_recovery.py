"""Recovery from dead workers and timeouts: no lost item, exact execution counts, BaseException, imap read-ahead."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from parallelmethods import ParallelMethodsError, WorkerCrashedError, parallelizable
from parallelmethods._mpwatch import WorkerDied
from parallelmethods._recovery import PoolFailure, Recovery

from . import _crashers as C
from .conftest import FORK_ROUTE

N = 2


# ----------------------------------------------------------------------------
# The state machine against a simulated pool: every rule of the module
# docstring, over many shapes, without processes.
# ----------------------------------------------------------------------------


@dataclass
class _Opts:
    on_error: str
    retries: int
    timeout: float | None = None


@dataclass
class _Plan:
    opts: _Opts
    label: str = "Sim.run"
    route: str = "sim"  # no real board: _simulate sets a _SimBoard when asked
    workers: str = "local"


class _SimPool:
    """Runs chunks in order, ``prefetch`` tasks handed to the pool ahead; a culprit item kills it."""

    def __init__(self, culprits: dict[int, int], prefetch: int) -> None:
        self.culprits = dict(culprits)  # item -> how many more of its runs crash (-1: always)
        self.prefetch = prefetch
        self.task_runs: dict[int, int] = {}  # item -> tasks that contained it and were handed to the pool
        self.ended: dict[int, int] = {}  # item -> runs that reached its end
        self.started: dict[int, int] = {}  # item -> runs that started it

    def sweep_results(self) -> None:
        pass

    def run(
        self, chunks: list[tuple[int, list[Any]]], timeout: float | None, board: Any = None
    ) -> Iterator[tuple[int, list[Any], bool, bool]]:
        dispatched: set[int] = set()
        completed: set[int] = set()

        def dispatch_up_to(k: int) -> None:
            for first, items in chunks[: k + 1]:
                if first not in dispatched:
                    dispatched.add(first)
                    for item in items:
                        self.task_runs[item] = self.task_runs.get(item, 0) + 1

        for k, (first, items) in enumerate(chunks):
            dispatch_up_to(k + self.prefetch)
            for offset, item in enumerate(items):
                self.started[item] = self.started.get(item, 0) + 1
                left = self.culprits.get(item, 0)
                if left != 0:
                    self.culprits[item] = left - 1 if left > 0 else -1
                    if board is not None:  # what the real board knows: the log so far, the item running
                        board.logs[first] = [10 * x for x in items[:offset]]
                        board.running = item
                    raise PoolFailure(WorkerDied((1,)), set(dispatched), set(completed))
                self.ended[item] = self.ended.get(item, 0) + 1
            completed.add(first)
            yield first, [10 * x for x in items], False, False


class _SimBoard:
    """The two answers of _board.Board: logged results of a lost chunk, and the item that killed the worker."""

    class ref:  # as Board.ref
        log = True

    def __init__(self) -> None:
        self.logs: dict[int, list[Any]] = {}
        self.running: int | None = None

    def settle(self, items: list[int]) -> None:
        pass

    def salvage(self, first: int, n: int) -> list[Any]:
        return self.logs.pop(first, [])[:n]

    def culprits(self, in_flight: list[int], since: int, known: tuple[int, ...] = ()) -> list[int] | None:
        return [self.running] if self.running in in_flight else None

    def close(self) -> None:
        pass


class _Collector:
    def accept(self, first: int, results: list[Any], mutated: bool, had_error: bool) -> list[Any]:
        return results

    def count(self, n: int) -> None:
        pass


def _simulate(
    n: int, chunk: int, prefetch: int, culprits: dict[int, int], on_error: str, retries: int, board: bool = False
) -> tuple[list[Any] | BaseException, dict[int, int]]:
    pool = _SimPool(culprits, prefetch)
    plan: Any = _Plan(_Opts(on_error, retries))
    out: list[Any] = [None] * n
    seen: list[int] = []
    recovery = Recovery(plan, pool, _Collector(), 0, list(range(n)), chunk)  # type: ignore[arg-type]
    if board:
        recovery.board = _SimBoard()  # type: ignore[assignment]
    _simulate.last_pool = pool  # type: ignore[attr-defined]
    try:
        for first, values in recovery.run():
            out[first : first + len(values)] = values
            seen.extend(range(first, first + len(values)))
    except WorkerCrashedError as e:
        return e, pool.task_runs
    assert sorted(seen) == list(range(n)), "every item resolved exactly once"
    return out, pool.task_runs


@pytest.mark.parametrize("board", [False, True], ids=["isolation", "board"])
@pytest.mark.parametrize("seed", range(300))
def test_simulated_counts(seed: int, board: bool) -> None:
    """Against a simulated pool, every item resolves once and runs no more often than the documented counts.

    With the board (the worker's dying item is known, finished results are
    logged): a crashing item runs at most retries + 1 times, whatever
    on_error, and no item runs to its end twice. Without it (isolation):
    at most max(retries + 1, 2) with on_error="return", and an innocent item
    at most twice.
    """
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    chunk = rng.randint(1, 6)
    prefetch = rng.randint(0, 4)
    on_error = rng.choice(["return", "raise"])
    retries = rng.choice([0, 0, 1, 2, 3])
    culprits = {i: rng.choice([1, 2, -1]) for i in rng.sample(range(n), rng.randint(0, min(3, n)))}
    out, task_runs = _simulate(n, chunk, prefetch, culprits, on_error, retries, board)
    ended = _simulate.last_pool.ended  # type: ignore[attr-defined]
    if board:
        assert max(ended.values(), default=0) <= 1, ended
        task_runs = _simulate.last_pool.started  # type: ignore[attr-defined]
    limit = max(retries + 1, 2) if on_error == "return" and not board else retries + 1
    for item in range(n):
        runs = task_runs.get(item, 0)
        if item in culprits:
            assert runs <= limit, (item, runs, culprits)
        elif not board:
            assert runs <= 2, (item, runs)  # once in a batch that died, once alone
    if isinstance(out, BaseException):
        assert on_error == "raise"
        return
    for item, value in enumerate(out):
        if isinstance(value, WorkerCrashedError):
            assert item in culprits and value.items == (item,)
            assert f"on item {item}" in value.__notes__[0]
        else:
            assert value == 10 * item


def test_simulated_crash_once_recovers_with_retries() -> None:
    """A crash-once item with retries=1 gets its result, whatever the chunking."""
    for chunk, prefetch in itertools.product([1, 3, 40], [0, 2]):
        out, runs = _simulate(40, chunk, prefetch, {3: 1}, "return", 1)
        assert out == [10 * i for i in range(40)]
        assert runs[3] == 2


def test_simulated_crash_always_runs_retries_plus_one() -> None:
    """An item that always crashes runs exactly retries+1 times (retries >= 1) and fails alone."""
    for retries in (1, 2, 3):
        out, runs = _simulate(40, 5, 2, {3: -1}, "return", retries)
        assert isinstance(out, list) and isinstance(out[3], WorkerCrashedError)
        assert runs[3] == retries + 1


# ----------------------------------------------------------------------------
# Real worker processes.
# ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_crash_on_item_3_of_40_returns_every_result(process_backend: str, tmp_path: Any) -> None:
    """os._exit on item 3 of 40 with on_error='return': item 3 is a WorkerCrashedError, every other item is correct, none is None."""
    d = str(tmp_path)
    out = C.Crasher(d).run.map(range(40), backend=process_backend, n_jobs=N, on_error="return")
    assert len(out) == 40 and None not in out
    assert isinstance(out[3], WorkerCrashedError) and out[3].items == (3,)
    assert "parallelmethods: raised by Crasher.run on item 3" in out[3].__notes__
    assert [v for i, v in enumerate(out) if i != 3] == [10 * i for i in range(40) if i != 3]
    runs = C.runs(d)
    assert set(runs) == set(range(40))
    # retries=0: the board pins the crash on item 3 (Linux pidfd); under forkserver
    # multiprocessing often cannot read its workers' exit codes: isolation, twice.
    assert runs[3] == 1 or (runs[3] == 2 and process_backend == "multiprocessing" and not FORK_ROUTE)
    assert max(runs.values()) <= 2  # a bystander killed mid-item runs again
    # No item runs to its end twice, but for a bystander that loky killed in the
    # instant between its method returning and its result reaching the log.
    ends = C.runs(d, "end")
    assert sum(1 for c in ends.values() if c > 1) <= N - 1 and 3 not in ends


@pytest.mark.timeout(120)
def test_retries_with_crash_once_gives_all_results(process_backend: str, tmp_path: Any) -> None:
    """retries=2 and an item that crashes its worker once: every result is correct, the item ran twice."""
    d = str(tmp_path)
    out = C.Crasher(d, once=True).run.map(range(40), backend=process_backend, n_jobs=N, retries=2)
    assert out == [10 * i for i in range(40)]
    runs = C.runs(d)
    assert runs[3] == 2 and max(runs.values()) <= 2


@pytest.mark.timeout(120)
def test_crash_always_runs_retries_plus_one_times(process_backend: str, tmp_path: Any) -> None:
    """retries=2 and an item that always crashes: it runs exactly 3 times, then fails; others get their results."""
    d = str(tmp_path)
    out = C.Crasher(d).run.map(range(20), backend=process_backend, n_jobs=N, retries=2, on_error="return")
    assert isinstance(out[3], WorkerCrashedError)
    assert [v for i, v in enumerate(out) if i != 3] == [10 * i for i in range(20) if i != 3]
    runs = C.runs(d)
    assert runs[3] == 3 and max(v for k, v in runs.items() if k != 3) <= 2


@pytest.mark.timeout(120)
def test_crash_always_with_raise_stops_after_retries(process_backend: str, tmp_path: Any) -> None:
    """retries=1 and on_error='raise': the item runs at most twice, then WorkerCrashedError names it."""
    d = str(tmp_path)
    with pytest.raises(WorkerCrashedError) as info:
        C.Crasher(d).run.map(range(20), backend=process_backend, n_jobs=N, retries=1)
    assert info.value.items == (3,)
    assert C.runs(d)[3] <= 2


@pytest.mark.timeout(120)
def test_completed_items_never_run_again(tmp_path: Any) -> None:
    """On loky, item 3 crashes after the other items' results arrived: none of them runs again, item 3 runs once (lost alone).

    (On multiprocessing joblib hands back a run's results all at once, so no
    result has reached the caller when a worker dies: every item sent counts
    as in flight; test_crash_on_item_3_of_40_returns_every_result covers it.)
    """
    d = str(tmp_path)
    out = C.Crasher(d, delay=3.0).run.map(range(12), backend="loky", n_jobs=N, on_error="return", batch_size=1)
    assert isinstance(out[3], WorkerCrashedError)
    assert [v for i, v in enumerate(out) if i != 3] == [10 * i for i in range(12) if i != 3]
    assert C.runs(d) == dict.fromkeys(range(12), 1)


@pytest.mark.timeout(120)
def test_timeout_is_rerun_under_retries(tmp_path: Any) -> None:
    """An item that times out once is re-run under retries=1 and the map completes."""
    d = str(tmp_path)
    out = C.Sleeper(d, slow=2).run.map(range(6), backend="loky", n_jobs=N, timeout=1, retries=1)
    assert out == list(range(6))
    assert C.runs(d)[2] == 2


@pytest.mark.timeout(120)
def test_imap_recovers_every_item(process_backend: str, tmp_path: Any) -> None:
    """imap with a crashing item and on_error='return' yields every item in order."""
    out = list(C.Crasher(str(tmp_path)).run.imap(range(30), backend=process_backend, n_jobs=N, on_error="return"))
    assert len(out) == 30 and isinstance(out[3], WorkerCrashedError)
    assert [v for i, v in enumerate(out) if i != 3] == [10 * i for i in range(30) if i != 3]


# ----------------------------------------------------------------------------
# BaseException from the method never ends the caller.
# ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_system_exit_with_on_error_return(backend: str) -> None:
    """sys.exit(3) in the method with on_error='return': the SystemExit takes its item's place, with the note."""
    out = C.Exiter().run.map(range(5), backend=backend, n_jobs=N, on_error="return")
    assert [v for i, v in enumerate(out) if i != 2] == [0, 1, 3, 4]
    assert isinstance(out[2], SystemExit) and out[2].code == 3
    assert "parallelmethods: raised by Exiter.run on item 2" in out[2].__notes__


@pytest.mark.timeout(120)
def test_system_exit_with_on_error_raise(backend: str) -> None:
    """sys.exit(3) in the method with on_error='raise': a ParallelMethodsError names the item and method, the SystemExit is its cause."""
    with pytest.raises(ParallelMethodsError, match=r"Exiter\.run raised SystemExit.* on item 2") as info:
        C.Exiter().run.map(range(5), backend=backend, n_jobs=N)
    assert isinstance(info.value.__cause__, SystemExit) and info.value.__cause__.code == 3
    assert C.Exiter().run.map([0, 1], backend=backend, n_jobs=N) == [0, 1]  # the caller and the pool live on


# ----------------------------------------------------------------------------
# imap's read-ahead is bounded in items.
# ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bk", ["threading", "loky"])
def test_imap_read_ahead_is_bounded(bk: str) -> None:
    """At each yielded result, the input has produced at most READAHEAD_PER_WORKER * n_jobs * MAX_IMAP_CHUNK items beyond those yielded."""
    from parallelmethods._runner import MAX_IMAP_CHUNK, READAHEAD_PER_WORKER

    bound = READAHEAD_PER_WORKER * N * MAX_IMAP_CHUNK
    produced = 0

    def source() -> Iterator[int]:
        nonlocal produced
        for i in range(5000):
            produced += 1
            yield i

    @parallelizable
    def ident(x: int) -> int:
        return x

    ahead = []
    for yielded, value in enumerate(ident.imap(source(), backend=bk, n_jobs=N), start=1):
        assert value == yielded - 1
        ahead.append(produced - yielded)
    assert max(ahead) <= bound
    assert max(ahead) >= bound // 2  # chunks did grow: tiny items stay fast


@pytest.mark.timeout(120)
def test_imap_read_ahead_with_batch_size_and_timeout() -> None:
    """An explicit batch_size bounds the read-ahead at 2 * n_jobs * batch_size items; timeout= at 2 * n_jobs."""
    produced = 0

    def source() -> Iterator[int]:
        nonlocal produced
        for i in range(300):
            produced += 1
            yield i

    @parallelizable
    def ident(x: int) -> int:
        return x

    for opts, bound in (({"batch_size": 5}, 2 * N * 5), ({"timeout": 30}, 2 * N)):
        produced = 0
        ahead = [
            produced - k for k, _ in enumerate(ident.imap(source(), backend="threading", n_jobs=N, **opts), start=1)
        ]
        assert max(ahead) <= bound, opts


def test_no_placeholder_when_the_machine_is_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """An item left unresolved is an internal ParallelMethodsError, never a None in the results."""
    from parallelmethods import _recovery

    monkeypatch.setattr(_recovery.Recovery, "_next_run", lambda self: [])
    with pytest.raises(ParallelMethodsError, match="internal error"):
        C.Exiter().run.map([0, 1], backend="threading", n_jobs=N)


# ----------------------------------------------------------------------------
# A run stopped on purpose (an error, a closed imap) keeps loky's workers warm.
# ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_failing_map_keeps_loky_workers_warm() -> None:
    """on_error='raise' and a method error: the map raises, and the next map runs on the same (warm) loky workers."""
    w = C.Warm()
    before = set(w.pid.map(range(16), backend="loky", n_jobs=N, batch_size=1))
    with pytest.raises(ValueError, match="bad 3"):
        w.fail.map(range(40), backend="loky", n_jobs=N, batch_size=1)
    after = set(w.pid.map(range(16), backend="loky", n_jobs=N, batch_size=1))
    assert after <= before, "the failing map killed loky's workers"
    it = w.pid.imap(range(100), backend="loky", n_jobs=N, batch_size=1)
    next(it)
    it.close()  # type: ignore[attr-defined]
    assert set(w.pid.map(range(16), backend="loky", n_jobs=N, batch_size=1)) <= before


@pytest.mark.timeout(120)
def test_a_failing_map_of_quick_items_stops_between_blocks_and_keeps_workers_warm() -> None:
    """Big chunks of ~1 us items: the chunk still running when another raises stops at its next block, not its end.

    Each chunk takes well over DRAIN_SECONDS; a worker that did not look at
    the stop flag between blocks would be killed by the drain's timeout.
    """
    w = C.Warm()
    before = set(w.pid.map(range(16), backend="loky", n_jobs=N, batch_size=1))
    n = 1_500_000
    with pytest.raises(ValueError, match="bad 3"):
        w.quick.map(range(2 * n), backend="loky", n_jobs=N, batch_size=n)
    after = set(w.pid.map(range(16), backend="loky", n_jobs=N, batch_size=1))
    assert after <= before, "the failing map killed loky's workers"
    assert w.quick.partial().map(range(5, 20), backend="loky", n_jobs=N) == [sum(range(20)) + x for x in range(5, 20)]


@pytest.mark.timeout(120)
def test_a_failing_map_does_not_wait_for_a_long_item() -> None:
    """An item still running long after the error: the map raises at once; the run is aborted after DRAIN_SECONDS."""
    import time

    from parallelmethods._runner import DRAIN_SECONDS

    w = C.Warm(bad=3, slow=0, nap=60.0)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="bad 3"):
        w.fail.map(range(8), backend="loky", n_jobs=N, batch_size=1)
    assert time.monotonic() - t0 < 30
    t0 = time.monotonic()
    assert len(w.pid.map(range(4), backend="loky", n_jobs=N)) == 4
    assert time.monotonic() - t0 < 20 + DRAIN_SECONDS  # the 60 s item was stopped, not waited for
