"""Every ```python snippet in README.md and docs/*.md runs, as a user would run it.

The rule of the docs: they are real pages a user reads, and every snippet in them runs. Each
page's snippets are joined, in order, into one script (later snippets may use what earlier ones
defined, as on the page) and run in a fresh Python with the repository on ``PYTHONPATH``, in a
temporary directory. ``LOKY_MAX_CPU_COUNT=2`` makes the snippets' default ``n_jobs`` (all cores)
two workers on any machine. Outputs that a snippet shows in a comment are asserted in the snippet
itself or checked here against its stdout.

docs/clusters.md is not run here (it needs a dask cluster and is being rewritten separately).

Snippets that start a ``multiprocessing`` pool keep their work under ``if __name__ == "__main__":``,
which that backend needs where processes are not forked (macOS, Windows, Python 3.14); loky does
not need it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_RUN = {"docs/clusters.md"}  # rewritten separately; needs a dask cluster
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)
#: Languages a fence may use; python fences run, the others are shell commands or output.
LANGUAGES = {"python", "bash", "sh", "text"}

#: Lines each page's script must print (outputs its comments show, checked here).
EXPECTED_STDOUT: dict[str, list[str]] = {
    "README.md": [
        "[0, 6, 12, 18, 24, 30, 36, 42, 48, 54]\n",
        "route:",  # explain(m.score)
        "[(1,), (2,), None]\n",
    ],
    "docs/index.md": ["[0, 6, 12, 18, 24, 30, 36, 42, 48, 54]\n"],
    "docs/mixin.md": ["[(1,), (2,), None]\n"],
    "docs/state.md": ["[(1,), (2,), None]\n"],
    "docs/errors.md": [
        "{1: ZeroDivisionError('division by zero')}\n",
        "parallelmethods: raised by Model.score on item 1\n",
    ],
    "docs/where-it-runs.md": ["[0, 2, 4, 6]\n", "[1, 3, 5, 7, 9]\n[-1, 1, 3, 5, 7]\n57\n", "cloudpickle"],
}


def _pages() -> list[str]:
    pages = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    return [p.replace(os.sep, "/") for p in pages]


def _fences(page: str) -> list[tuple[str, str, int]]:
    """``(language, code, first line number)`` of each fenced block of ``page``."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


RUN_PAGES = [p for p in _pages() if p not in NOT_RUN and any(lang == "python" for lang, _, _ in _fences(p))]


def test_pages_are_found() -> None:
    assert {
        "README.md",
        "docs/index.md",
        "docs/method-kinds.md",
        "docs/mixin.md",
        "docs/state.md",
        "docs/errors.md",
        "docs/backends.md",
        "docs/where-it-runs.md",
    } <= set(RUN_PAGES)
    assert set(EXPECTED_STDOUT) <= set(RUN_PAGES)


@pytest.mark.parametrize("page", [p for p in _pages() if p not in NOT_RUN])
def test_fences_are_labelled(page: str) -> None:
    """Every fence names its language, so that no Python hides in a fence that is not run."""
    for lang, _, line in _fences(page):
        assert lang in LANGUAGES, f"{page}:{line}: fence language {lang!r} (use one of {sorted(LANGUAGES)})"


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_snippets_run(page: str, tmp_path: object) -> None:
    parts = []
    for lang, code, line in _fences(page):
        if lang == "python":
            parts.append(f"# ---- {page}, line {line} ----\n{code}")
    script = os.path.join(str(tmp_path), "snippets.py")
    source = "\n".join(parts)
    with open(script, "w", encoding="utf-8") as f:
        f.write(source)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *sys.path]), "LOKY_MAX_CPU_COUNT": "2"}
    env.pop("JOBLIB_TEMP_FOLDER", None)
    out = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=90, env=env, cwd=str(tmp_path)
    )

    numbered = "\n".join(f"{i:4} {s}" for i, s in enumerate(source.splitlines(), 1))
    assert out.returncode == 0, f"the snippets of {page} failed:\n{numbered}\n--- stderr:\n{out.stderr}"
    assert "Traceback" not in out.stderr, f"{page}: an error was printed:\n{out.stderr}"
    for expected in EXPECTED_STDOUT.get(page, []):
        assert expected in out.stdout, f"{page}: expected {expected!r} in the output:\n{out.stdout}"
