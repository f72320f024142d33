"""The optional tqdm progress bar (counts items, not chunks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._plan import Plan


def make_bar(plan: Plan, total: int | None) -> Any:
    """A ``tqdm.auto`` bar on stderr, or None when ``progress`` is off."""
    if not plan.opts.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        msg = "progress=True needs tqdm: pip install 'parallelmethods[progress]' (or pip install tqdm)"
        raise ImportError(msg) from None
    return tqdm(total=total, desc=plan.label, unit="item", leave=True)
