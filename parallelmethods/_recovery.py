"""Recovery from pool failures, as an explicit state machine.

The actors: the *runner* (``_runner.py``) cuts items into chunks and owns the
*executor* (one ``joblib.Parallel`` call over a list of chunks) and the
*collector* (turns a chunk's results into values, raises the method's own
errors). This module owns the *units of work* and the only loop that moves
them: :class:`Recovery` (loky's ``_ExecutorManagerThread`` in spirit: one
loop, named states, a comment per transition).

States. Every item belongs to exactly one unit (a chunk, or a single item
after isolation) and is in that unit's state:

=========  ==================================================================
PENDING    not sent yet, or to be sent again
RUNNING    handed to the pool in the current run; no result yet
DONE       its result reached the caller (a value, or the method's own
           exception with ``on_error="return"``)
FAILED     lost to the pool for good: a ``WorkerCrashedError`` /
           ``TimeoutError`` takes its place (``on_error="return"`` only)
=========  ==================================================================

Transitions happen only in :meth:`Recovery._move`. A *pool failure* is a
worker that died (``os._exit``, a signal, the OOM killer) or a task that ran
past ``timeout=``; it aborts the whole run, and every chunk that was sent
but whose result had not reached the caller is *lost*. Then, in order:

1. *salvage* (the board, ``_board.py``, local process routes with recovery
   on): the items a lost chunk's worker finished before the failure are in
   its log; they are DONE (a chunk is cut in two: the logged part and the
   rest), never run again;
2. another call in this process stopped loky's shared executor under this
   one (its timeout or its error aborts it): every running unit goes back
   to PENDING with no loss and runs again, at most :data:`MAX_STOPPED`
   times. (A worker *crash* in another call breaks the shared pool too, and
   cannot be told from one of ours: it is a loss like any other, which
   ``retries=`` recovers);
3. a chunk never handed to the pool goes back to PENDING as it was;
4. *culprits* (the board, a crash, not a timeout): the items that the first
   dead worker(s) were running (their slot holds a dead pid) are cut out as
   single units and take a loss each (LOST_ALONE below); every other lost
   item is a BYSTANDER: back to PENDING, no loss, in the next batch;
5. else (no board, or the board is not sure) several items lost together
   (an *ambiguous* loss): each becomes its own unit, marked *alone*, back to
   PENDING. Units marked alone run one at a time, one item per task, with
   nothing else in the pool, so a later loss is certainly that item's own.
   The ambiguous loss counts as one loss of every item in it, but never
   fails an item by itself;
6. one item lost alone (LOST_ALONE): its own loss. It runs again, alone,
   while its losses are at most ``retries``; then it is FAILED
   (``on_error="return"``) or the call raises (``on_error="raise"``).

A method's own exception is never a loss and never re-runs. With
``on_error="raise"`` and ``retries=0`` there is no recovery: the first pool
failure raises, naming every item in flight.

Exact execution counts (a *run* of an item is a time it started):

- an item whose result reached the caller, or whose worker logged its
  result before a crash, never runs again;
- an item never started before a failure runs once more, in a batch;
- with the board's culprit: an item that crashes its worker every time runs
  at most ``retries + 1`` times; a bystander that was running when the pool
  was killed runs again (an item whose result reached its log never does);
- without it (dask, Ray, no pidfd, a worker that died outside an item,
  timeouts): an item lost to the pool runs at most ``retries + 1`` times in
  all, with one exception: with ``retries=0`` and ``on_error="return"``, an
  item lost together with other in-flight items gets one run alone to tell
  whether it is the culprit, so it runs at most twice; an innocent item
  that was merely in flight runs at most twice (once in the batch that
  died, once alone) and gets its result. Isolated items re-run one at a
  time (one pool call each): slow, never wrong.

End of a run: :meth:`Recovery.run` checks that every unit is DONE or FAILED
and that the units cover every item exactly once; anything else is an
internal error raised as ``ParallelMethodsError``, never a ``None`` in the
results.
"""

from __future__ import annotations

import enum
import multiprocessing
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._board import Board
from ._compat import add_note, is_executor_shutdown, loky_pool_errors
from ._mpwatch import WorkerDied
from .errors import ParallelMethodsError, WorkerCrashedError

if TYPE_CHECKING:
    from ._plan import Plan
    from ._runner import _Collector, _Executor

__all__ = ["PoolFailure", "Recovery", "State", "is_pool_failure", "map_pool_error"]


#: How often a map re-runs its items after other calls stopped the shared pool.
MAX_STOPPED = 5


class State(enum.Enum):
    """Where an item is; see the module docstring."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Event(enum.Enum):
    """What happened to a unit; :meth:`Recovery._move` maps (state, event) to the next state."""

    SENT = "sent"  # put in the run about to start
    RESULT = "result"  # its chunk's results reached the caller
    UNSENT = "unsent"  # the run failed before the pool took the chunk
    STOPPED = "stopped"  # another call in this process stopped the shared pool under it
    LOST_WITH_OTHERS = "lost with others"  # the run failed with several items in flight
    LOST_ALONE = "lost alone"  # the run failed with this one item in flight
    BYSTANDER = "bystander"  # the run failed, and the board says another item killed the worker


# ----------------------------------------------------------------------------
# Pool failures: what they are and which error names them.
# ----------------------------------------------------------------------------


class PoolFailure(Exception):
    """The pool itself failed (dead worker, timeout) during one executor run.

    ``dispatched``/``completed`` hold the first index of the chunks the pool
    took and of those whose results reached the caller.
    """

    def __init__(self, error: BaseException, dispatched: set[int], completed: set[int], deaths_from: int = 0) -> None:
        super().__init__(str(error))
        self.error = error
        self.dispatched = dispatched
        self.completed = completed
        self.deaths_from = deaths_from  # the board's first death record of this run


def is_pool_failure(err: BaseException) -> bool:
    """A dead worker, a timeout, or a pool stopped by another call (as opposed to a method's error)."""
    if isinstance(err, (TimeoutError, multiprocessing.TimeoutError, WorkerDied, *loky_pool_errors())):
        return True
    if is_executor_shutdown(err):
        return True
    # dask retries a task whose worker died (distributed.scheduler.allowed-failures),
    # then raises KilledWorker; data lost with the worker cancels its dependents.
    return type(err).__name__ in ("KilledWorker", "FutureCancelledError")


def _exit_codes(err: BaseException) -> tuple[int, ...]:
    codes = getattr(err, "exitcodes", None)
    if codes:
        return tuple(codes)
    return tuple(int(c) for c in re.findall(r"\((-?\d+)\)", str(err)))


def _signal_name(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


def describe_items(items: list[int]) -> str:
    items = sorted(items)
    if not items:
        return "none"
    shown = ", ".join(map(str, items[:10]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > 10 else "")


def map_pool_error(plan: Plan, err: BaseException, in_flight: list[int]) -> BaseException:
    """The error the user sees for a pool failure: WorkerCrashedError or TimeoutError."""
    if isinstance(err, (TimeoutError, multiprocessing.TimeoutError)):
        if plan.route == "cluster":
            from ._ray import is_ray_backend

            if is_ray_backend(plan.backend):
                after = "Its Ray task was cancelled with ray.cancel(force=True), which killed the worker process running it; Ray starts a new one when needed."
            else:
                after = (
                    "dask cannot stop a running task: it keeps its worker thread until the method returns "
                    "(its result is discarded); the map's tasks that had not started were cancelled."
                )
        elif plan.route == "reference":
            after = "The thread cannot be stopped and finishes in the background."
        else:
            after = "Process workers were stopped and replaced."
        msg = f"{plan.label} took longer than timeout={plan.opts.timeout}s on an item (in flight: {describe_items(in_flight)}). {after}"
        return TimeoutError(msg)
    if is_pool_failure(err):
        codes = _exit_codes(err)
        how = ", ".join(_signal_name(c) for c in codes) if codes else "unknown exit status"
        restart = "The pool was restarted; the next map works."
        if plan.workers == "remote":
            # A cluster reports no exit code; its own words say which worker and how.
            said = str(err).strip().splitlines()
            if type(err).__name__ == "FutureCancelledError":
                how = "dask cancelled the task: the worker running it, or holding its input, died"
            else:
                how = f"{type(err).__name__}: {said[0]}" if said else type(err).__name__
            restart = (
                "The cluster replaces dead workers (dask's nanny, Ray's raylet) and self is sent again if the "
                "cluster lost it; the next map works."
            )
        msg = (
            f"a worker process died while running {plan.label} ({how}). Likely causes: "
            "os._exit() or sys.exit() in the method, a segfault in native code, or the OOM killer. "
            f"Items in flight: {describe_items(in_flight)}. {restart} "
            "Use on_error='return' or retries=N to keep the other results."
        )
        return WorkerCrashedError(msg, method=plan.label, exitcodes=codes, items=tuple(sorted(in_flight)))
    return err


# ----------------------------------------------------------------------------
# The state machine.
# ----------------------------------------------------------------------------


@dataclass
class _Unit:
    """Items ``first ... first + len(items) - 1``, sent together, in one state."""

    first: int
    items: list[Any]
    state: State = State.PENDING
    losses: int = 0  # runs of these items lost to the pool
    alone: bool = False  # from now on runs alone: a loss is certainly its own


def has_board(plan: Plan) -> bool:
    """Whether runs of ``plan`` get a board: local process routes on POSIX (see _board)."""
    return plan.route in ("file", "fork") and os.name == "posix"


def internal_error(what: str) -> ParallelMethodsError:
    return ParallelMethodsError(
        f"parallelmethods internal error: {what}. Please report it with the call that caused it."
    )


class Recovery:
    """Runs ``items`` (indices ``start``...) to completion, recovering from pool failures.

    :meth:`run` yields ``(first index, values)`` once for every item, as
    results arrive or as items fail for good.
    """

    def __init__(
        self, plan: Plan, executor: _Executor, collector: _Collector, start: int, items: list[Any], chunk_size: int
    ) -> None:
        self.plan = plan
        self.executor = executor
        self.collector = collector
        self.start = start
        self.n_items = len(items)
        self.units: dict[int, _Unit] = {
            start + i: _Unit(start + i, items[i : i + chunk_size]) for i in range(0, len(items), chunk_size)
        }
        self.recover = plan.opts.on_error == "return" or plan.opts.retries > 0
        self.stopped = 0  # times another call stopped the shared pool under this one
        # The board (local process routes): a stop flag, and with recovery on,
        # which worker runs which item and the results that ended (_board).
        self.board = Board.create(start, len(items), log=self.recover) if has_board(plan) else None

    # -- the only place where a unit changes state ---------------------------
    def _move(self, unit: _Unit, event: Event) -> None:
        match unit.state, event:
            case State.PENDING, Event.SENT:
                # Chosen for the next run (a batch of chunks, or one item alone).
                unit.state = State.RUNNING
            case State.RUNNING, Event.RESULT:
                # Its results reached the caller: it never runs again.
                unit.state = State.DONE
            case State.RUNNING, Event.UNSENT:
                # The run failed before the pool took it: it did not run, no loss.
                unit.state = State.PENDING
            case State.RUNNING, Event.STOPPED:
                # Another call's timeout or abort stopped loky's shared executor:
                # not this item's doing, no loss; it runs again.
                unit.state = State.PENDING
            case State.RUNNING, Event.LOST_WITH_OTHERS:
                # Ambiguous loss: split into single items that each run alone;
                # the loss counts for each of them, but fails none of them.
                del self.units[unit.first]  # the chunk is gone; its items live on as singles
                for offset, item in enumerate(unit.items):
                    single = _Unit(unit.first + offset, [item], State.PENDING, unit.losses + 1, alone=True)
                    self.units[single.first] = single
            case State.RUNNING, Event.BYSTANDER:
                # The board pins the crash on another item: this one was only
                # in flight (not started, ended, or running on a worker that
                # was killed after the crash); no loss, it runs again.
                unit.state = State.PENDING
            case State.RUNNING, Event.LOST_ALONE if unit.losses + 1 <= self.plan.opts.retries:
                # Its own loss, retries left: run it again, alone.
                unit.losses += 1
                unit.alone = True
                unit.state = State.PENDING
            case State.RUNNING, Event.LOST_ALONE:
                # Its own loss, no retries left: failed for good.
                unit.losses += 1
                unit.state = State.FAILED
            case _:
                msg = f"item {unit.first} cannot go from {unit.state.name} on {event.name}"
                raise internal_error(msg)

    # -- scheduling ------------------------------------------------------------
    def _next_run(self) -> list[_Unit]:
        """Every pending batch unit together; else the first unit that runs alone."""
        pending = [u for u in self.units.values() if u.state is State.PENDING]
        batch = sorted((u for u in pending if not u.alone), key=lambda u: u.first)
        if batch:
            return batch
        alone = sorted((u for u in pending if u.alone), key=lambda u: u.first)
        return alone[:1]

    # -- the loop ----------------------------------------------------------------
    def run(self) -> Iterator[tuple[int, list[Any]]]:
        try:
            yield from self._run()
        finally:
            if self.board is not None:
                self.board.close()

    def _run(self) -> Iterator[tuple[int, list[Any]]]:
        timeout = self.plan.opts.timeout
        while run := self._next_run():
            for unit in run:
                self._move(unit, Event.SENT)
            outputs = self.executor.run([(u.first, u.items) for u in run], timeout, self.board)
            try:
                for first, results, mutated, had_error in outputs:
                    done = self.units.get(first)
                    if done is None or done.state is not State.RUNNING:
                        msg = f"a result for item {first}, which is not running"
                        raise internal_error(msg)
                    values = self.collector.accept(first, results, mutated, had_error)
                    if len(values) != len(done.items):
                        msg = f"{len(values)} results for the {len(done.items)} items from {first}"
                        raise internal_error(msg)
                    self._move(done, Event.RESULT)
                    yield first, values
            except PoolFailure as failure:
                yield from self._after_failure(run, failure)
            finally:
                outputs.close()  # now, not when a traceback lets go of it: joblib aborts here
        self._check_resolved()

    def _after_failure(self, run: list[_Unit], failure: PoolFailure) -> Iterator[tuple[int, list[Any]]]:
        lost_firsts = set(failure.dispatched)
        # Results the workers finished before the failure are not lost: their
        # chunks' logs hold them (recovery on, local process routes).
        for unit in [u for u in run if u.state is State.RUNNING and u.first in failure.dispatched]:
            rest, salvaged = self._salvage(unit)
            if rest is not None:
                lost_firsts.add(rest.first)
            if salvaged is not None:
                yield salvaged
        if self.board is not None and self.board.ref.log:
            self.executor.sweep_results()  # the logs are read: now unread result files can go
        running = [u for u in self.units.values() if u.state is State.RUNNING]
        if is_executor_shutdown(failure.error):
            self.stopped += 1
            if self.stopped > MAX_STOPPED:
                msg = (
                    f"{self.plan.label}: the shared loky executor was shut down under this map "
                    f"{self.stopped} times by other calls in this process (their timeouts or errors); giving up"
                )
                raise ParallelMethodsError(msg) from failure.error
            for unit in running:
                self._move(unit, Event.STOPPED)
            return
        lost = [u for u in running if u.first in lost_firsts]
        in_flight = [u.first + i for u in lost for i in range(len(u.items))]
        if not self.recover:
            raise map_pool_error(self.plan, failure.error, in_flight) from failure.error
        for unit in running:
            if unit.first not in lost_firsts:
                self._move(unit, Event.UNSENT)
        culprits = self._culprits(failure, in_flight)
        if self.board is not None and self.board.ref.log:
            self.board.settle(in_flight)  # the broken pool's workers are gone before the next run
        if culprits:
            # The board names the item that killed the worker: only it takes a
            # loss; every other item in flight runs again, in the next batch.
            for unit in lost:
                for piece in self._cut(unit, culprits, alone=True):
                    if piece.first in culprits:
                        yield from self._lose_alone(piece, failure)
                    else:
                        self._move(piece, Event.BYSTANDER)
            return
        if len(in_flight) > 1:
            for unit in lost:
                self._move(unit, Event.LOST_WITH_OTHERS)
            return
        for unit in lost:  # the one item in flight (a run alone, or the last of a batch)
            yield from self._lose_alone(unit, failure)

    def _lose_alone(self, unit: _Unit, failure: PoolFailure) -> Iterator[tuple[int, list[Any]]]:
        self._move(unit, Event.LOST_ALONE)
        if unit.state is State.FAILED:
            yield unit.first, [self._failed_value(unit, failure)]

    def _culprits(self, failure: PoolFailure, in_flight: list[int]) -> set[int]:
        """Items the board says killed their worker in this run (empty: not known, or a timeout)."""
        if self.board is None or isinstance(failure.error, (TimeoutError, multiprocessing.TimeoutError)):
            return set()
        found = self.board.culprits(in_flight, failure.deaths_from, tuple(getattr(failure.error, "pids", ())))
        return set(found or ())

    def _salvage(self, unit: _Unit) -> tuple[_Unit | None, tuple[int, list[Any]] | None]:
        """Take the results a lost chunk's log holds: ``(the unit of the rest or None, its done part)``."""
        values = self.board.salvage(unit.first, len(unit.items)) if self.board is not None else []
        if not values:
            return unit, None
        done, *rest = self._cut(unit, {unit.first + len(values)} if len(values) < len(unit.items) else set())
        from ._dispatch import RemoteError

        had_error = any(isinstance(v, RemoteError) for v in values)
        accepted = self.collector.accept(done.first, values, False, had_error)
        self._move(done, Event.RESULT)
        return (rest[0] if rest else None), (done.first, accepted)

    def _cut(self, unit: _Unit, at: set[int], alone: bool = False) -> list[_Unit]:
        """Split ``unit`` so that each index in ``at`` starts a piece (and, with ``alone``, is one).

        Used for two cuts: a salvaged prefix (``at`` = the first item not
        done) and culprits (each alone, bystanders in between kept together).
        """
        pieces: list[_Unit] = []
        start = 0
        for offset in range(1, len(unit.items) + 1):
            index = unit.first + offset
            if offset == len(unit.items) or index in at or (alone and index - 1 in at):
                pieces.append(_Unit(unit.first + start, unit.items[start:offset], unit.state, unit.losses, unit.alone))
                start = offset
        del self.units[unit.first]
        for piece in pieces:
            self.units[piece.first] = piece
        return pieces

    def _failed_value(self, unit: _Unit, failure: PoolFailure) -> BaseException:
        error = map_pool_error(self.plan, failure.error, [unit.first])
        if self.plan.opts.on_error == "raise":
            raise error from failure.error
        error.__cause__ = failure.error
        add_note(error, f"parallelmethods: raised by {self.plan.label} on item {unit.first}")
        self.collector.count(1)
        return error

    def _check_resolved(self) -> None:
        covered = 0
        for unit in self.units.values():
            if unit.state not in (State.DONE, State.FAILED):
                msg = f"item {unit.first} is still {unit.state.name} at the end of the map"
                raise internal_error(msg)
            covered += len(unit.items)
        if covered != self.n_items:
            msg = f"{covered} of {self.n_items} items were resolved"
            raise internal_error(msg)
