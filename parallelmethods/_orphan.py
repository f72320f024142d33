"""Workers end within a second or two of their caller's death (SIGKILL, the OOM killer).

What happens without this (measured, joblib 1.6 / loky 3.5): a loky worker
waits for work in ``call_queue.get(timeout=idle_worker_timeout)`` and never
looks at its parent; the queue's pipes are held by every worker, so the
caller's death closes nothing they read. The workers are re-parented to init
(or a container's sub-reaper) and live until the idle timeout (300 s). loky's
resource tracker, which unlinks our registered payload files, only cleans up
when *every* process holding its pipe has exited, that is the caller and all
workers: so the payload files in /dev/shm (RAM) stay for those 300 s too.
The multiprocessing backend's pool workers have no idle timeout at all.

:func:`watch_caller`, called by the worker code for every chunk (cheap after
the first), starts one daemon thread per worker process that notices the
caller's death (``os.getppid()`` changes when the parent dies; a poll every
:data:`POLL_SECONDS`) and then:

1. removes the dead caller's payload files in the folders this worker has
   read from (and tells loky's tracker, so it does not try again);
2. on Linux, stops the caller's other, idle, loky workers (they never ran
   our code, so they cannot watch for themselves): see
   :func:`_orphaned_siblings` for how they are told from anyone else's;
3. exits (``os._exit``): nobody is left to receive its results.

Once the workers are gone, loky's tracker sees its pipe close and removes
whatever else was registered. Only processes whose parent *is* the caller
are watched: threads in the caller, dask or ray workers on other machines (or
under a nanny) are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

from . import _compat

__all__ = ["POLL_SECONDS", "watch_caller"]

#: How often a worker checks that its caller is alive.
POLL_SECONDS = 0.5
_FILE_PREFIX = "parallelmethods-"
_LOKY_WORKER_MARK = _compat.LOKY_WORKER_CMDLINE_MARK

_lock = threading.Lock()
_watching_in: int | None = None  # pid of the process whose watchdog runs (fork copies it)
_caller: int | None = None
_folders: set[str] = set()


def _caller_of(handle: Any) -> tuple[int | None, str | None]:
    """The caller's pid and the payload folder a handle tells of (duck-typed on _dispatch's handles)."""
    path = getattr(handle, "path", None)
    if isinstance(path, str):  # FileHandle: <folder>/parallelmethods-<pid>-<random>.pkl
        name = os.path.basename(path)
        if name.startswith(_FILE_PREFIX):
            digits = name[len(_FILE_PREFIX) :].split("-", 1)[0]
            if digits.isdigit():
                return int(digits), os.path.dirname(path)
        return None, None
    pid = getattr(handle, "pid", None)  # LocalHandle: fork route
    return (pid, None) if isinstance(pid, int) else (None, None)


def watch_caller(handle: Any) -> None:
    """Start (once per process) the watchdog that ends this worker when its caller dies.

    ``handle`` is the chunk's ``self`` handle; a no-op unless this process is
    a direct child of the caller named by it (a local process worker).
    """
    global _watching_in, _caller
    pid, folder = _caller_of(handle)
    if pid is None:
        return
    me = os.getpid()
    if _watching_in == me:  # the hot path: one comparison and maybe a set add
        if folder is not None and pid == _caller and folder not in _folders:
            _folders.add(folder)
        return
    if pid == me or os.getppid() != pid:
        return  # threads in the caller, or not the caller's own child (nanny, forkserver, remote)
    with _lock:
        if _watching_in == me:
            return
        _watching_in, _caller = me, pid
        _folders.clear()
        if folder is not None:
            _folders.add(folder)
        threading.Thread(target=_watch, args=(pid,), name="parallelmethods-orphan-watch", daemon=True).start()


def _watch(caller: int) -> None:
    while os.getppid() == caller:
        time.sleep(POLL_SECONDS)
    _clean_up(caller)
    os._exit(1)


def _clean_up(caller: int) -> None:
    prefix = f"{_FILE_PREFIX}{caller}-"
    for folder in list(_folders):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(prefix):
                    _remove(os.path.join(folder, name))
    for pid in _orphaned_siblings():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        return
    with contextlib.suppress(Exception):  # the tracker may already be gone
        _compat.untrack_file(path)


# ----- Linux /proc: who are my sibling loky workers ---------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str]:
    stat = _read(f"/proc/{pid}/stat")
    # "pid (comm) state ppid ... starttime(22nd)": comm may hold spaces and parentheses
    return stat[stat.rfind(")") + 2 :].split() if stat else []


def _orphaned_siblings() -> list[int]:
    """The dead caller's other loky workers (Linux; elsewhere none).

    Called once, after the caller died: its workers (this one included) were
    re-parented to init or a sub-reaper. A sibling is a loky worker adopted
    by the same reaper, in the same process group, that holds one of the
    pipes this worker inherited from the caller (loky's call queue and
    resource tracker; loky passes workers no other descriptors). A loky
    worker of a live program has that program as its parent, and another
    program's workers share none of these pipes: neither is ever chosen.
    """
    if not sys.platform.startswith("linux"):
        return []
    me, reaper, group = os.getpid(), os.getppid(), os.getpgrp()
    mine = _pipes(me)
    if not mine:
        return []
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            fields = _stat_fields(int(entry))
            # fields[1] = ppid, fields[2] = process group
            if len(fields) < 3 or fields[1] != str(reaper) or fields[2] != str(group):
                continue
            if _LOKY_WORKER_MARK in _read(f"/proc/{entry}/cmdline").replace("\0", " ") and mine & _pipes(int(entry)):
                found.append(int(entry))
    return found


def _pipes(pid: int) -> set[str]:
    """The pipes ``pid`` holds beyond stdin/stdout/stderr ("pipe:[inode]")."""
    held = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if fd.isdigit() and int(fd) > 2:
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("pipe:"):
                        held.add(target)
    return held
