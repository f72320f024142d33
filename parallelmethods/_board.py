"""The board of one run of items: who is running which item, what finished, and a stop flag.

Why: when a worker process dies, joblib and loky say only that the pool broke
(and the exit codes), not which item killed the worker nor which items the
workers had already finished. Without that, every item in flight is a
suspect: recovery re-runs them all, the culprit once more to tell it from
the bystanders, and results the workers had finished are computed again.
The board answers both questions, with files and a pidfd per worker, on the
local process routes only (loky and other local process backends: "file";
multiprocessing: "fork"; POSIX). Threads cannot crash apart from the caller;
dask and Ray keep their own books.

Layout. One board per :class:`~parallelmethods._recovery.Recovery` (a map, or
one window of an ``imap``), in the payload temp folder (``/dev/shm`` when it
has room)::

    parallelmethods-<caller pid>-b<tag>.board      8 header bytes, then one int32 per item
    parallelmethods-<caller pid>-b<tag>-<first>.log  the results of the chunk starting at <first>

* Header byte 0 is the *stop flag*: the caller sets it when it stops reading
  a run on purpose (a method's error with ``on_error="raise"``, an abandoned
  ``imap``); workers check it before each item (quick items: between
  blocks of ~10 ms, at most 256 items, ``_dispatch.MAX_BLOCK``) and return at
  once, so the run ends quickly *without* killing loky's warm workers.
* With recovery on (``on_error="return"`` or ``retries=``): a worker writes its
  pid into an item's slot when the item starts and ``-pid`` when it ends, and
  appends the item's result to its chunk's log (length-prefixed records, each
  packed as :mod:`parallelmethods._results` packs results: large buffers in
  their own files). The chunk then returns only "n results, in the log". A
  crash loses nothing that finished: the caller reads the logs of the lost
  chunks (:meth:`Board.salvage`).
* :class:`DeathWatch` (a caller thread, recovery on, Linux >= 5.3) holds a
  pidfd for every child process and records which died first. loky kills the
  other workers only after it noticed a death (``terminate_broken``), and the
  multiprocessing watchdog only after our callback, so the first death is the
  worker that died on its own; the item whose slot holds its pid (started, not
  ended) killed it (:meth:`Board.culprits`).

Anything less certain (no pidfd, two workers dead in the same instant with
indistinguishable exit codes, a worker that died outside an item, e.g. while
rebuilding ``self``) returns no culprit, and recovery falls back to isolation
(see ``_recovery.py``): slower, never wrong.

Files never outlive the run: the caller removes the board and its logs when
the run ends (:meth:`Board.close`); the names hold the caller's pid, so the
workers' orphan watchdog (:mod:`parallelmethods._orphan`) removes them if the
caller dies, and the next process to map sweeps those of dead pids.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import pickle
import select
import signal
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["Board", "BoardRef", "DeathWatch", "Logged", "WorkerBoard", "attach"]

_HEADER = 8
_LEN = struct.Struct("<Q")
_STOPPED = 1


@dataclass(frozen=True)
class BoardRef:
    """What a task carries: the board's path, the index of its slot 0, and whether to mark and log."""

    path: str
    base: int
    log: bool


@dataclass(frozen=True)
class Logged:
    """A chunk's results are the ``n`` records of the log at ``path`` (not in the task's return value)."""

    n: int
    path: str

    def load(self) -> list[Any]:
        """The results, in order (the log is removed); a short log is an internal error."""
        values = read_log(self.path, self.n, strict=True)
        if len(values) != self.n:
            from ._recovery import internal_error

            msg = f"the log {os.path.basename(self.path)} holds {len(values)} of its {self.n} results"
            raise internal_error(msg)
        return values


def read_log(path: str, n: int | None = None, strict: bool = False) -> list[Any]:
    """The results a chunk log holds (complete records only, at most ``n``); the log is removed.

    ``strict``: a record that cannot be rebuilt raises (a chunk that returned);
    else what comes before it is what is salvaged.
    """
    from . import _results

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    values: list[Any] = []
    at = 0
    while at + _LEN.size <= len(data) and (n is None or len(values) < n):
        (size,) = _LEN.unpack_from(data, at)
        end = at + _LEN.size + size
        if end > len(data):
            break  # the worker died while writing this record
        record = data[at + _LEN.size : end]
        try:
            packed = pickle.loads(record[1:]) if record[:1] == b"O" else record[1:]
            values.append(_results.load(packed))
        except Exception:
            if strict:
                raise
            break
        at = end
    return values


def _log_path(board_path: str, first: int) -> str:
    return f"{board_path[: -len('.board')]}-{first}.log"


# ---------------------------------------------------------------------------
# Caller side.
# ---------------------------------------------------------------------------


class Board:
    """The caller's side of one board; ``None`` from :meth:`create` when no file can be made."""

    def __init__(self, path: str, base: int, log: bool, mm: mmap.mmap) -> None:
        self.path = path
        self.ref = BoardRef(path, base, log)
        self.base = base
        self._mm = mm
        self.watch = DeathWatch() if log and DeathWatch.available() else None
        self._handed_off = False

    @classmethod
    def create(cls, base: int, n_items: int, log: bool) -> Board | None:
        from ._transport import FILE_PREFIX, temp_folders

        for folder in temp_folders()[0]:
            path = os.path.join(folder, f"{FILE_PREFIX}{os.getpid()}-b{uuid.uuid4().hex[:16]}.board")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError:
                continue
            try:
                os.ftruncate(fd, _HEADER + 4 * n_items)  # sparse: pages appear as workers write
                mm = mmap.mmap(fd, _HEADER + 4 * n_items)
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            os.close(fd)
            board = cls(path, base, log, mm)
            if board.watch is not None:
                board.watch.start()
            return board
        return None  # no board: no stop flag, no salvage, isolation only (as before)

    def stop(self) -> None:
        """Ask the workers to skip every item they have not started."""
        self._mm[0] = _STOPPED

    def hand_off(self) -> None:
        """A drain thread now owns the board: only its ``close(final=True)`` removes it."""
        self._handed_off = True

    def states(self, first: int, n: int) -> tuple[int, ...]:
        """Per item: 0 not started, pid running, -pid ended."""
        return struct.unpack_from(f"<{n}i", self._mm, _HEADER + 4 * (first - self.base))

    def salvage(self, first: int, n: int) -> list[Any]:
        """Results a worker finished for the chunk at ``first`` before the run failed."""
        if not self.ref.log:
            return []
        return read_log(_log_path(self.path, first), n)

    def culprits(
        self, items: list[int], since: int, known: tuple[int, ...] = (), wait: float = 2.0
    ) -> list[int] | None:
        """The items of ``items`` whose worker died on its own, first, since death ``since``; None when unsure.

        ``known``: pids the pool itself saw dead before it killed the others
        (our multiprocessing watchdog's ``WorkerDied.pids``); they come first.
        Unsure (None) whenever a wrong answer is possible: a worker of ours
        died outside an item, a running worker was never watched, or the
        death in an item was a SIGKILL/SIGTERM (the OOM killer, or loky
        killing a bystander: they look alike).
        """
        if not self.ref.log:
            return None
        running = {i: s for i in items if (s := self.states(i, 1)[0]) > 0}
        if not running:
            return None
        deaths: list[dict[int, int | None]] = [dict.fromkeys(known, 0)] if known else []
        pids = set(running.values()) - set(known)  # the running workers whose death we must see
        if pids:
            if self.watch is None or not self.watch.watches(pids):
                return None  # a running worker we never watched (or no pidfd): its death is unknown
            # The pool kills every other worker after a crash: once all of ours
            # are seen dead, each one's exit code says whether it died on its own
            # (two items can crash two workers at once; the pool saw the first).
            if not self.watch.wait_dead(pids, wait):
                return None
        if self.watch is not None:
            deaths += [self.watch.resolve(d) for d in self.watch.deaths_since(since, 0.0)]
        killed = (-signal.SIGKILL, -signal.SIGTERM)  # how loky / the multiprocessing pool end the others
        # Unknown: not read yet, or 255, what multiprocessing reports for a
        # forkserver child whose status it could not read.
        unknown = (None, 255)
        found: set[int] = set()
        for dead in deaths:
            hit = {pid: code for pid, code in dead.items() if pid in running.values()}
            if not found:
                if not hit:
                    if any(code not in killed for code in dead.values()):
                        return None  # someone died on its own outside an item: maybe ours, while rebuilding self
                    continue  # killed (an earlier pool's worker being stopped): not this run's crash
                # The first death in an item: those that no one killed died on their own.
                if any(code in unknown for code in hit.values()):
                    return None
                found = {pid for pid, code in hit.items() if code not in killed}
                if not found:
                    return None
            else:
                # Later deaths: one with an exit code of its own is a culprit too
                # (two items can crash two workers at once); one we cannot
                # read could be either: unsure.
                if any(code in unknown for pid, code in hit.items() if pid not in found):
                    return None
                found |= {pid for pid, code in hit.items() if code not in killed}
        return [i for i, pid in running.items() if pid in found] or None

    def settle(self, items: list[int], timeout: float = 2.0) -> None:
        """After a crash: wait until the workers that ran ``items`` are gone, then clear their slots.

        Why: loky fails the run's futures first and kills the other workers
        after; one still alive could mark an item of the next run, or a death
        seen late could be taken for the next run's crash.
        """
        pids = {abs(s) for i in items if (s := self.states(i, 1)[0])}
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if _alive(pid) and not (self.watch and self.watch.saw_die(pid))}
            if pids:
                time.sleep(0.01)
        for i in items:
            struct.pack_into("<i", self._mm, _HEADER + 4 * (i - self.base), 0)

    def close(self, final: bool = False) -> None:
        if self._handed_off and not final:
            return  # tasks still running read the stop flag; the drain thread closes
        if self.watch is not None:
            self.watch.stop()
        with contextlib.suppress(Exception):
            self._mm.close()
        folder, name = os.path.split(self.path)
        stem = name[: -len(".board")]
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self.ref.log:
            with contextlib.suppress(OSError):
                for other in os.listdir(folder):
                    if other.startswith(stem + "-") and other.endswith(".log"):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(folder, other))


class DeathWatch(threading.Thread):
    """Records, in order, which child processes died (one dict pid -> exit code per wake-up)."""

    POLL_MS = 20

    @staticmethod
    def available() -> bool:
        return hasattr(os, "pidfd_open") and hasattr(select, "poll")

    def __init__(self) -> None:
        super().__init__(name="parallelmethods-death-watch", daemon=True)
        self._deaths: list[dict[int, int | None]] = []
        self._changed = threading.Condition()
        self._stop_event = threading.Event()
        self._procs: dict[int, Any] = {}  # pid -> its multiprocessing Process, for exit codes
        self._watched: set[int] = set()  # pids with a pidfd, ever
        self._dead: set[int] = set()  # pids seen dead

    def mark(self) -> int:
        with self._changed:
            return len(self._deaths)

    def deaths_since(self, since: int, wait: float) -> list[dict[int, int | None]]:
        with self._changed:
            if len(self._deaths) <= since and wait > 0:
                self._changed.wait(wait)
            return list(self._deaths[since:])

    def stop(self) -> None:
        self._stop_event.set()

    def watches(self, pids: set[int]) -> bool:
        """Whether every pid of ``pids`` has a pidfd here (a death we can see)."""
        with self._changed:
            return pids <= self._watched

    def wait_dead(self, pids: set[int], timeout: float) -> bool:
        """Wait until every pid of ``pids`` is seen dead; False if one still lives after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not pids <= self._dead:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def saw_die(self, pid: int) -> bool:
        with self._changed:
            return pid in self._dead

    def resolve(self, dead: dict[int, int | None]) -> dict[int, int | None]:
        """``dead`` with exit codes that were not known yet when the death was seen."""
        out = dict(dead)
        for pid, code in dead.items():
            proc = self._procs.get(pid)
            if code is None and proc is not None:
                with contextlib.suppress(Exception):
                    out[pid] = proc.exitcode
        return out

    def run(self) -> None:
        poller = select.poll()
        watched: dict[int, tuple[int, Any]] = {}  # fd -> (pid, process)
        pids: set[int] = set()
        try:
            while not self._stop_event.is_set():
                try:
                    children = multiprocessing.active_children()
                except Exception:  # noqa: BLE001 - a child set changing under us: next round
                    children = []
                for proc in children:
                    if proc.pid is None or proc.pid in pids:
                        continue
                    try:
                        fd = os.pidfd_open(proc.pid)
                    except OSError:
                        continue  # already gone and reaped: not ours to judge
                    pids.add(proc.pid)
                    self._procs[proc.pid] = proc
                    with self._changed:
                        self._watched.add(proc.pid)
                    watched[fd] = (proc.pid, proc)
                    poller.register(fd, select.POLLIN)
                ready = poller.poll(self.POLL_MS)
                if not ready:
                    continue
                dead: dict[int, int | None] = {}
                for fd, _ in ready:
                    pid, proc = watched.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    try:
                        code = proc.exitcode
                    except Exception:  # noqa: BLE001
                        code = None
                    dead[pid] = code  # None: not reaped yet, unknown
                with self._changed:
                    self._deaths.append(dead)
                    self._dead.update(dead)
                    self._changed.notify_all()
        finally:
            for fd in watched:
                with contextlib.suppress(OSError):
                    os.close(fd)


# ---------------------------------------------------------------------------
# Worker side.
# ---------------------------------------------------------------------------


class WorkerBoard:
    """A worker's view of a board: the stop flag, the item marks, the chunk log."""

    __slots__ = ("_fd", "_mm", "_slots", "base", "log", "path", "pid")

    def __init__(self, ref: BoardRef, mm: mmap.mmap, fd: int) -> None:
        self._fd = fd  # kept: a board with no name left (nlink 0) is a run that has ended
        self.path = ref.path
        self.base = ref.base
        self.log = ref.log
        self._mm = mm
        self._slots = memoryview(mm)[_HEADER:].cast("i")
        self.pid = os.getpid()

    def stopped(self) -> bool:
        return self._mm[0] == _STOPPED

    def ended_run(self) -> bool:
        """The stop flag, or the caller has removed the board (its run is over): once per chunk."""
        if self._mm[0] == _STOPPED:
            return True
        try:
            return os.fstat(self._fd).st_nlink == 0
        except OSError:
            return True

    def started(self, index: int) -> None:
        self._slots[index - self.base] = self.pid

    def ended(self, index: int) -> None:
        self._slots[index - self.base] = -self.pid

    def open_log(self, first: int) -> ChunkLog | None:
        if not self.log:
            return None
        try:
            return ChunkLog(_log_path(self.path, first))
        except OSError:
            return None  # results travel in the return value, as without a board

    def release(self) -> None:
        self._slots.release()
        with contextlib.suppress(Exception):
            self._mm.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)


class ChunkLog:
    """Append-only records of one chunk's results, each written whole with one ``write``."""

    __slots__ = ("_fd", "ok", "path")

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.ok = True
        self.path = path

    def add(self, packed: Any) -> None:
        if not self.ok:
            return
        body = b"O" + pickle.dumps(packed, protocol=5) if not isinstance(packed, bytes) else b"B" + packed
        data = _LEN.pack(len(body)) + body
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self.ok = False  # no room: the chunk's results go back in its return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_attached: WorkerBoard | None = None


class _Gone:
    """The board of a run that has ended: every task of it is stopped."""

    log = False

    def stopped(self) -> bool:
        return True

    def ended_run(self) -> bool:
        return True


_GONE: WorkerBoard = _Gone()  # type: ignore[assignment]


def attach(ref: BoardRef | None) -> WorkerBoard | None:
    """This worker's view of the board ``ref``; one board stays mapped per process."""
    global _attached
    if ref is None:
        return None
    current = _attached
    if current is not None and current.path == ref.path:
        return current
    try:
        fd = os.open(ref.path, os.O_RDWR)
    except FileNotFoundError:
        return _GONE  # removed: the caller has finished with this run
    except OSError:
        return None
    try:
        mm = mmap.mmap(fd, 0)
    except (OSError, ValueError):
        os.close(fd)
        return None
    if current is not None:
        current.release()
    _attached = WorkerBoard(ref, mm, fd)
    # If the caller dies, this worker's orphan watchdog removes the board and
    # the logs with the caller's other files (their names hold its pid).
    folder, name = os.path.split(ref.path)
    caller = name.split("-")[1]
    if caller.isdigit():
        from ._results import _watch_folder

        _watch_folder(int(caller), folder)
    return _attached
