"""Run a Python script as its own ``__main__``, the way a user's script or notebook code runs."""

from __future__ import annotations

import os
import subprocess
import sys


def run_script(tmp_path: object, source: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Write ``source`` to a file in ``tmp_path`` and run it with this interpreter and sys.path."""
    script = os.path.join(str(tmp_path), "script.py")
    with open(script, "w") as f:
        f.write(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=timeout, env=env)
