"""Payload files go where joblib would put them, with room checked, and never stay behind.

The container cases run a child Python under a REAL small tmpfs mounted over
/dev/shm in a private mount namespace (``unshare --mount``), as Docker's
default 64 MB /dev/shm; they are skipped where that is not permitted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import types

import joblib
import pytest

from parallelmethods import ParallelMethodsError, _transport, parallelizable
from parallelmethods._transport import FILE_PREFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Holder:
    def __init__(self, n: int) -> None:
        self.data = list(range(n))

    @parallelizable
    def at(self, i: int) -> int:
        return self.data[i]


def _ours(folder: str, pid: int | None = None) -> list[str]:
    prefix = f"{FILE_PREFIX}{os.getpid() if pid is None else pid}-"
    return sorted(n for n in os.listdir(folder) if n.startswith(prefix)) if os.path.isdir(folder) else []


# ---------------------------------------------------------------------------
# Folder choice (no namespace needed).
# ---------------------------------------------------------------------------


def test_parallel_config_temp_folder_is_honoured(tmp_path: object) -> None:
    """parallel_config(temp_folder=...) wins, as in joblib; the file goes with its object."""
    import gc

    folder = os.path.join(str(tmp_path), "chosen")
    h = Holder(100)
    with joblib.parallel_config(temp_folder=folder):
        assert _transport.temp_folders() == ([folder], True)
        assert h.at.map([1, 99], backend="loky", n_jobs=2) == [1, 99]
        assert len(_ours(folder)) == 1  # kept while h lives (unchanged-object shortcut)
    del h
    gc.collect()
    assert _ours(folder) == []


def test_joblib_temp_folder_env(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """JOBLIB_TEMP_FOLDER is used when no parallel_config sets a folder; parallel_config beats it."""
    monkeypatch.setenv("JOBLIB_TEMP_FOLDER", str(tmp_path))
    assert _transport.temp_folders() == ([str(tmp_path)], True)
    other = os.path.join(str(tmp_path), "other")
    with joblib.parallel_config(temp_folder=other):
        assert _transport.temp_folders() == ([other], True)
    monkeypatch.delenv("JOBLIB_TEMP_FOLDER")
    folders, chosen = _transport.temp_folders()
    assert not chosen and folders[-1] == os.path.abspath(__import__("tempfile").gettempdir())


class _Unwritable:
    nbytes = 10  # claims a size, but is no buffer: f.write raises TypeError mid-file


def test_partial_file_removed_on_any_write_error(tmp_path: object) -> None:
    """A write that fails half-way (here not for lack of space) leaves no file and no tracker entry."""
    payload = types.SimpleNamespace(main=b"x" * 100_000, buffers=(_Unwritable(),), digest="d")
    with joblib.parallel_config(temp_folder=str(tmp_path)):
        with pytest.raises(TypeError):
            _transport._write(payload)  # type: ignore[arg-type]
        assert os.listdir(str(tmp_path)) == []
        assert Holder(5).at.map([4], backend="loky", n_jobs=2) == [4]


def test_nowhere_with_room_names_size_folders_and_fix(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the chosen folder has no room: a ParallelMethodsError with the size, the folder, the fix."""
    monkeypatch.setattr(_transport, "_free_bytes", lambda folder: 1000)
    h = Holder(50_000)
    with joblib.parallel_config(temp_folder=str(tmp_path)), pytest.raises(ParallelMethodsError) as info:
        h.at.map([1], backend="loky", n_jobs=2)
    msg = str(info.value)
    assert str(tmp_path) in msg and "(1.0 KB free)" in msg, msg
    assert "KB payload of self (Holder, for Holder.at)" in msg, msg
    assert "JOBLIB_TEMP_FOLDER" in msg and "parallel_config(temp_folder=...)" in msg and "--shm-size" in msg
    assert os.listdir(str(tmp_path)) == []
    monkeypatch.undo()
    assert h.at.map([1], backend="loky", n_jobs=2) == [1]  # later maps work


# ---------------------------------------------------------------------------
# A real 64 MB /dev/shm (Docker's default), in a private mount namespace.
# ---------------------------------------------------------------------------


def _namespace_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return "mount namespaces are Linux-only"
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    try:
        out = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unshare failed to run: {exc}"
    if out.returncode != 0:
        return f"not permitted to mount a tmpfs in a private mount namespace here: {out.stderr.strip()}"
    return None


def _run_in_small_shm(tmp_path: object, body: str, mounts: str = "") -> subprocess.CompletedProcess[str]:
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    script = os.path.join(str(tmp_path), "script.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(body))
    tmpdir = os.path.join(str(tmp_path), "systemtmp")
    os.makedirs(tmpdir, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *sys.path]), "TMPDIR": tmpdir}
    env.pop("JOBLIB_TEMP_FOLDER", None)
    shell = f'mount -t tmpfs -o size=64m tmpfs /dev/shm && {mounts} exec "$0" "$@"'
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, sys.executable, script, tmpdir],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # The system temp folder is a real one shared with the host: nothing of the child's is left there.
    assert [n for n in os.listdir(tmpdir) if n.startswith(FILE_PREFIX)] == []
    return out


_PRELUDE = """
    import gc, os, sys, tempfile
    import numpy as np
    from parallelmethods import ParallelMethodsError, parallelizable
    from parallelmethods import _transport
    from parallelmethods._transport import FILE_PREFIX

    TMP = sys.argv[1]
    assert tempfile.gettempdir() == TMP
    OURS = f"{FILE_PREFIX}{os.getpid()}-"

    def ours(folder):
        return sorted(n for n in os.listdir(folder) if n.startswith(OURS))

    def shm_free():
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize

    class Big:
        def __init__(self, n):
            self.a = np.arange(n, dtype=np.float64)

        @parallelizable(backend="loky", n_jobs=2)
        def at(self, i):
            return float(self.a[i])

    assert shm_free() <= 64 * 2**20
"""


@pytest.mark.timeout(300)
def test_big_payload_falls_back_to_system_temp_under_64mb_shm(tmp_path: object) -> None:
    """A ~100 MB self under a 64 MB /dev/shm: right result via the system temp folder, nothing left."""
    out = _run_in_small_shm(
        tmp_path,
        _PRELUDE
        + """
    big = Big(13_000_000)  # 104 MB of float64
    assert big.at.map([0, 7, 12_999_999]) == [0.0, 7.0, 12_999_999.0]
    assert ours("/dev/shm") == [], ours("/dev/shm")
    assert len(ours(TMP)) == 1  # kept while `big` lives, in the system temp folder
    small = Big(1000)
    assert small.at.map([3, 999]) == [3.0, 999.0]
    assert len(ours("/dev/shm")) == 1  # a small payload still goes to RAM
    del big, small
    gc.collect()
    assert ours("/dev/shm") == [] and ours(TMP) == []

    # The free-space check is not the only guard: if /dev/shm fills up between the
    # check and the write (another process), the partial file is removed and the
    # next folder is used. Simulate by lying about free space, with and without
    # the early reservation (posix_fallocate).
    real_free = _transport._free_bytes
    _transport._free_bytes = lambda folder: 1 << 50
    for reserve in (True, False):
        if not reserve:
            del os.posix_fallocate
        big = Big(13_000_000)
        assert big.at.map([12_999_998]) == [12_999_998.0]
        assert ours("/dev/shm") == [] and len(ours(TMP)) == 1
        assert shm_free() > 60 * 2**20  # no partial file holds RAM
        del big
        gc.collect()
        assert ours(TMP) == []
    _transport._free_bytes = real_free
    assert Big(10).at.map([9]) == [9.0]
    gc.collect()
    assert ours("/dev/shm") == [] and ours(TMP) == []
    print("OK")
    """,
    )
    assert "OK" in out.stdout


@pytest.mark.timeout(300)
def test_nowhere_has_room_raises_named_error_and_leaves_nothing(tmp_path: object) -> None:
    """JOBLIB_TEMP_FOLDER on a tiny tmpfs too: the named error, no file anywhere, later maps work."""
    tiny = os.path.join(str(tmp_path), "tiny")
    os.makedirs(tiny)
    out = _run_in_small_shm(
        tmp_path,
        _PRELUDE
        + f"""
    TINY = {tiny!r}
    os.environ["JOBLIB_TEMP_FOLDER"] = TINY
    big = Big(13_000_000)
    try:
        big.at.map([1])
    except ParallelMethodsError as exc:
        msg = str(exc)
    else:
        raise AssertionError("no error")
    print(msg)
    assert "104.0 MB payload" in msg and TINY in msg and "free" in msg, msg
    assert "JOBLIB_TEMP_FOLDER" in msg and "--shm-size" in msg, msg
    assert ours(TINY) == [] and ours("/dev/shm") == [] and ours(TMP) == []
    # The chosen folder is the only one tried: the same with parallel_config.
    del os.environ["JOBLIB_TEMP_FOLDER"]
    import joblib
    with joblib.parallel_config(temp_folder=TINY):
        try:
            big.at.map([1])
        except ParallelMethodsError as exc:
            assert TINY in str(exc)
        else:
            raise AssertionError("no error")
        assert Big(100).at.map([99]) == [99.0]  # a small payload fits
    assert ours(TINY) == []
    # Nowhere with room without a chosen folder either: /dev/shm and TMP both tiny.
    huge = Big(13_000_000)
    real_free = _transport._free_bytes
    _transport._free_bytes = lambda folder: 10_000_000
    try:
        huge.at.map([1])
    except ParallelMethodsError as exc:
        assert "/dev/shm (10.0 MB free)" in str(exc) and TMP in str(exc), str(exc)
    else:
        raise AssertionError("no error")
    _transport._free_bytes = real_free
    assert big.at.map([5]) == [5.0]  # later maps work (the system temp folder has room)
    del big, huge
    gc.collect()
    assert ours(TINY) == [] and ours("/dev/shm") == [] and ours(TMP) == []
    print("OK")
    """,
        mounts=f"mount -t tmpfs -o size=8m tmpfs {tiny} &&",
    )
    assert "OK" in out.stdout


# ---------------------------------------------------------------------------
# docs/where-it-runs.md: every Python snippet runs.
# ---------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_where_it_runs_snippets_run(tmp_path: object) -> None:
    import re

    page = os.path.join(ROOT, "docs", "where-it-runs.md")
    with open(page) as f:
        snippets = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(snippets) >= 3
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *sys.path])}
    env.pop("JOBLIB_TEMP_FOLDER", None)
    outputs = []
    for i, code in enumerate(snippets):
        script = os.path.join(str(tmp_path), f"snippet{i}.py")
        with open(script, "w") as f:
            f.write(code)
        out = subprocess.run(
            [sys.executable, script], capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path)
        )
        assert out.returncode == 0, f"snippet {i} of {page} failed:\n{code}\n{out.stderr}"
        outputs.append(out.stdout)
    assert "[0, 2, 4, 6]" in outputs[0]
    assert "[1, 3, 5, 7, 9]\n[-1, 1, 3, 5, 7]\n57\n" in outputs[1] and "cloudpickle" in outputs[1]


def test_files_of_dead_processes_are_swept(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload file left by a process that no longer runs (killed with its whole group) is removed by the next map."""
    import psutil

    folder = str(tmp_path)
    monkeypatch.setenv("JOBLIB_TEMP_FOLDER", folder)
    dead = next(p for p in range(4_000_000, 3_000_000, -1) if not psutil.pid_exists(p))
    old = os.path.join(folder, f"parallelmethods-{dead}-leftover.pkl")
    young = os.path.join(folder, f"parallelmethods-{dead}-justnow.pkl")
    alive = os.path.join(folder, f"parallelmethods-{os.getppid()}-alive.pkl")
    for path in (old, young, alive):
        with open(path, "wb") as f:
            f.write(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(alive, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setattr(_transport, "_SWEPT", set())
    assert Doubler().f.map(range(4), backend="loky", n_jobs=2) == [0, 2, 4, 6]
    assert not os.path.exists(old)
    assert os.path.exists(young) and os.path.exists(alive)


class Doubler:
    @parallelizable
    def f(self, x: int) -> int:
        return 2 * x
