"""The cluster route needs nothing local: CLI-started dask processes with their own /tmp and /dev/shm.

A LocalCluster's workers share the caller's files, /dev/shm and process
tree, so a route that secretly wrote ``self`` to a file, or looked it up
in an inherited registry, would pass there. Here a ``dask scheduler`` and a
``dask worker`` (with its nanny, which restarts dead workers) run as separate
processes on 127.0.0.1, each in its own mount namespace (``unshare --mount``)
with fresh, empty tmpfs mounts on /tmp and /dev/shm. Only the Python
installation and the repository (and PYTHONPATH entries) are bound back in
when they live under /tmp. Skipped where mount namespaces are not permitted.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from parallelmethods import WorkerCrashedError, explain, parallelizable

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.dask, pytest.mark.timeout(240)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unshare_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm",
            ],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _needed_paths() -> list[str]:
    """What the dask processes must still see: Python, its packages, the repository, PYTHONPATH."""
    import parallelmethods

    paths = {
        sys.prefix,
        sys.base_prefix,
        os.path.realpath(sys.executable),
        ROOT,
        os.path.dirname(os.path.dirname(os.path.abspath(parallelmethods.__file__))),
        *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p],
    }
    return sorted(os.path.realpath(p) for p in paths if p)


def _isolated(argv: list[str], keep: str) -> list[str]:
    """``argv`` run in a new mount namespace with empty /tmp and /dev/shm (needed paths bound back)."""
    under_tmp = [p for p in _needed_paths() if p == "/tmp" or p.startswith("/tmp/")]
    script = [
        "set -e",
        f"mount --bind /tmp {shlex.quote(keep)}",
        "mount -t tmpfs tmpfs /tmp",
        "mount -t tmpfs tmpfs /dev/shm",
    ]
    for path in under_tmp:
        inner = os.path.relpath(path, "/tmp")
        src = os.path.join(keep, inner)
        if os.path.isdir(path):
            script.append(f"mkdir -p {shlex.quote(path)}")
        else:
            script.append(f"mkdir -p {shlex.quote(os.path.dirname(path))} && touch {shlex.quote(path)}")
        script.append(f"mount --bind {shlex.quote(src)} {shlex.quote(path)}")
    script.append(f"umount -l {shlex.quote(keep)}")
    script.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    if not _unshare_works():
        pytest.skip("mount namespaces (unshare --mount + tmpfs) are not permitted here")
    dask_cli = os.path.join(os.path.dirname(sys.executable), "dask")
    if not os.path.exists(dask_cli):
        pytest.skip("the dask command is not installed beside this Python")
    keep = None
    for parent in (os.path.expanduser("~"), "/var/tmp"):  # outside /tmp: a mount point for the old /tmp
        try:
            keep = tempfile.mkdtemp(prefix="pm-isolated-", dir=parent)
            break
        except OSError:
            continue
    if keep is None:
        pytest.skip("no folder outside /tmp to hold the old /tmp while the mounts are set up")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = []
    client = None
    try:
        procs.append(
            subprocess.Popen(
                _isolated([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], keep),
                env=env,
            )
        )
        worker = [
            dask_cli,
            "worker",
            address,
            "--host",
            "127.0.0.1",
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--local-directory",
            "/tmp/dask-worker-space",
        ]
        procs.append(subprocess.Popen(_isolated(worker, keep), env=env))
        deadline = time.monotonic() + 90
        while client is None:
            try:
                client = distributed.Client(address, timeout=5)
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise
                time.sleep(0.5)
        client.wait_for_workers(2, timeout=90)
        yield client
    finally:
        if client is not None:
            client.close()
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(keep, ignore_errors=True)


class Scorer:
    """Defined in a test module the workers could import; shipped by value or reference, never by file."""

    def __init__(self, w: int) -> None:
        self.w = w
        self.table = {i: i * i for i in range(20_000)}

    @parallelizable
    def score(self, x: int) -> int:
        return self.w * x + self.table[x % 100]

    @parallelizable
    def where(self, x: int) -> tuple[int, str, bool]:
        return os.getpid(), os.getcwd(), os.path.exists(_SENTINEL)

    @parallelizable
    def crash_on_3(self, x: int) -> int:
        if x == 3:
            os._exit(1)
        time.sleep(0.05)
        return self.w * x


_SENTINEL = "/tmp/parallelmethods-isolation-sentinel"


def test_workers_do_not_share_our_tmp_or_shm(cluster: Any) -> None:
    """The setup itself: a file the caller writes to /tmp and /dev/shm is invisible to the workers."""
    with open(_SENTINEL, "w") as f:
        f.write("caller")
    shm = "/dev/shm/parallelmethods-isolation-sentinel"
    with open(shm, "w") as f:
        f.write("caller")
    try:
        seen = cluster.run(lambda: (os.path.exists(_SENTINEL), os.path.exists(shm)))
        assert len(seen) == 2 and all(not tmp and not dev for tmp, dev in seen.values())
    finally:
        os.unlink(_SENTINEL)
        os.unlink(shm)


def test_maps_on_isolated_workers(cluster: Any) -> None:
    """First map, second map, a changed object: all correct, none in the caller, nothing read from our files."""
    m = Scorer(3)
    with cluster.as_current():
        assert explain(m.score, backend="dask").route == "cluster"
        xs = list(range(200))
        assert m.score.map(xs, backend="dask") == [3 * x + (x % 100) ** 2 for x in xs]
        assert m.score.map(xs, backend="dask", batch_size=7) == [3 * x + (x % 100) ** 2 for x in xs]
        m.w = 5
        m.table[0] = 1000
        assert m.score.map([0, 1, 100], backend="dask") == [1000, 6, 1500]
        with open(_SENTINEL, "w") as f:
            f.write("caller")
        try:
            where = m.where.map(range(6), backend="dask", n_jobs=1)
        finally:
            os.unlink(_SENTINEL)
    assert all(pid != os.getpid() and not seen for pid, _, seen in where)


def test_crash_on_isolated_workers(cluster: Any) -> None:
    """A worker that dies mid-map: that item is a WorkerCrashedError, the rest complete, the next map works."""
    m = Scorer(2)
    with cluster.as_current():
        out = m.crash_on_3.map(range(8), backend="dask", on_error="return", batch_size=1)
        assert [type(v).__name__ if isinstance(v, BaseException) else v for v in out] == [
            0,
            2,
            4,
            "WorkerCrashedError",
            8,
            10,
            12,
            14,
        ]
        assert isinstance(out[3], WorkerCrashedError) and "Scorer.crash_on_3" in str(out[3])
        cluster.wait_for_workers(2, timeout=90)
        assert m.score.map(range(5), backend="dask") == [2 * x + x * x for x in range(5)]
        m.w = 7
        assert m.crash_on_3.map([1, 2], backend="dask") == [7, 14]
