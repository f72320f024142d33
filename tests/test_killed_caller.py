"""A caller killed with SIGKILL leaves nothing behind after a few seconds: no workers, no payload files.

Without the worker-side watchdog (parallelmethods._orphan) loky workers wait
for their idle timeout (300 s) and keep the payload files in /dev/shm alive
(loky's resource tracker removes them only when every worker has exited).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from parallelmethods._transport import FILE_PREFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE = 10.0  # seconds the workers and files may take to go

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; SIGKILL semantics")

CALLER = """
import json, os, sys, time
import numpy as np
from parallelmethods import parallelizable

BACKEND, N_JOBS, ITEMS, THEN = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

class Big:
    def __init__(self):
        self.a = np.ones(4_000_000)  # 32 MB: worth freeing

    @parallelizable
    def where(self, x, pause=0.02):
        time.sleep(pause)
        return os.getpid()

big = Big()
opts = dict(backend=BACKEND, n_jobs=N_JOBS)
ran = set(big.where.map(range(ITEMS), **opts))
ran |= set(big.where.map(range(ITEMS), **opts))  # warm workers, same state
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"ran": sorted(ran)}, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
if THEN == "busy":  # killed while its workers run tasks
    big.where.partial(pause=60).map(range(2 * N_JOBS), **opts)
time.sleep(120)
"""


def _children_of(pid: int) -> set[int]:
    """Every child process of ``pid``: its workers and loky's resource trackers."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rfind(")") + 2 :].split()[1] == str(pid):
                found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def _payload_files(pid: int) -> list[str]:
    import tempfile

    prefix = f"{FILE_PREFIX}{pid}-"
    found = []
    for folder in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(folder):
            found += [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(prefix)]
    return found


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("backend", "n_jobs", "items", "then"),
    [
        ("loky", 2, 40, "sleep"),  # warm workers, caller idle
        ("loky", 2, 40, "busy"),  # workers in the middle of long tasks
        ("loky", 4, 1, "sleep"),  # idle workers that never ran a task of ours
        ("multiprocessing", 2, 40, "busy"),  # forked pool workers (no idle timeout at all)
    ],
)
def test_sigkilled_caller_leaves_no_workers_nor_files(
    tmp_path: object, backend: str, n_jobs: int, items: int, then: str
) -> None:
    script = os.path.join(str(tmp_path), "caller.py")
    report = os.path.join(str(tmp_path), "pids.json")
    with open(script, "w") as f:
        f.write(textwrap.dedent(CALLER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *sys.path])}
    env.pop("JOBLIB_TEMP_FOLDER", None)
    proc = subprocess.Popen(
        [sys.executable, script, report, backend, str(n_jobs), str(items), then],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # like a real program: its own session, not pytest's
    )
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(report):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the caller never reported its workers"
            time.sleep(0.2)
        with open(report) as f:
            seen = json.load(f)
        if backend == "loky":
            assert _payload_files(proc.pid), "the unchanged-object payload file should exist while the caller lives"
        if then == "busy":
            time.sleep(2)  # the long tasks have started
        children = _children_of(proc.pid)
        workers = children - {p for p in children if "resource_tracker" in _cmdline(p)}
        if backend == "loky" or then == "busy":
            assert len(workers) >= n_jobs, {p: _cmdline(p) for p in children}
        if backend == "loky":
            assert set(seen["ran"]) <= workers
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.monotonic()
    while time.monotonic() - killed_at < GRACE and (any(_alive(p) for p in children) or _payload_files(proc.pid)):
        time.sleep(0.2)
    left = sorted(p for p in children if _alive(p))
    cmdlines = {p: _cmdline(p)[:150] for p in left}
    for p in left:  # do not leave them to the next test
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    assert left == [], f"still running {GRACE:.0f} s after the caller was killed: {cmdlines}"
    assert _payload_files(proc.pid) == []
