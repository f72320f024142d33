"""The optional tqdm progress bar (counts items, not chunks).

``tqdm.auto`` picks the bar: a widget in Jupyter (notebook, lab, VS Code,
Colab) when ipywidgets is installed (``pip install 'parallelmethods[notebook]'``),
a text bar on stderr everywhere else. In a notebook without ipywidgets,
tqdm warns ``TqdmWarning: IProgress not found`` when ``tqdm.auto`` is first
imported and then draws the text bar; we draw the same text bar without the
warning: a missing optional widget is not the user's problem to read about
on every run.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = ["make_bar", "bar_class"]


def bar_class() -> Any:
    """``tqdm.auto.tqdm``, imported without tqdm's "IProgress not found" warning."""
    cached = sys.modules.get("tqdm.auto")
    if cached is not None:
        return cached.tqdm
    try:
        from tqdm.std import TqdmWarning
    except ImportError:
        msg = "progress=True needs tqdm: pip install 'parallelmethods[progress]' (or pip install tqdm)"
        raise ImportError(msg) from None
    with warnings.catch_warnings():
        # Only tqdm's own warnings about which bar it can draw (IProgress /
        # ipywidgets missing or too old; "notebook mode" notices). The
        # catch is confined to this one import, made once per process.
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm
    return tqdm


def make_bar(plan: Plan, total: int | None) -> Any:
    """A ``tqdm.auto`` bar (widget in Jupyter, text on stderr elsewhere), or None when ``progress`` is off."""
    if not plan.opts.progress:
        return None
    return bar_class()(total=total, desc=plan.label, unit="item", leave=True)
