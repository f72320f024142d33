"""Version shims (attrs' ``_compat.py`` in spirit)."""

from __future__ import annotations

import sys

PY_3_11_PLUS = sys.version_info >= (3, 11)


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``; on 3.10 set ``__notes__`` (kept by pickle, not displayed)."""
    if PY_3_11_PLUS:
        exc.add_note(note)  # type: ignore[attr-defined,unused-ignore]
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
    notes.append(note)
    try:
        exc.__notes__ = notes  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass
