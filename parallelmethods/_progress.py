"""The optional tqdm progress bar (counts items, not chunks).

The bar is the one ``tqdm.auto`` would pick: a widget in Jupyter (notebook,
lab, VS Code, Colab) when ipywidgets is installed (``pip install
'parallelmethods[notebook]'``), a text bar on stderr everywhere else. The
choice is made here, with ``tqdm.autonotebook``'s own tests, rather than by
importing ``tqdm.auto``: that import warns ``TqdmWarning: IProgress not
found`` in a notebook without ipywidgets (a missing optional widget is not
the user's problem to read about on every run), and silencing it would take
``warnings.catch_warnings()``, which swaps the process-wide warning filters
and can lose or let through warnings of maps running in other threads. If the
user imported ``tqdm.auto`` already, its bar is used as is.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = ["bar_class", "make_bar"]

_MISSING = "progress=True needs tqdm: pip install 'parallelmethods[progress]' (or pip install tqdm)"


def _in_jupyter() -> bool:
    """A Jupyter kernel that can show widgets (``tqdm.autonotebook``'s test, without importing it)."""
    if "ipykernel.zmqshell" in sys.modules:
        if any(name == "QT_API" or name.startswith("SPYDER") for name in os.environ):
            return False  # jupyter-qtconsole / spyder
        try:
            shell = sys.modules["IPython"].get_ipython().__class__.__name__.lower()
        except Exception:  # noqa: BLE001 - no IPython shell to ask: not a widget front end
            return False
        return "qt" not in shell and "spyder" not in shell
    return "IPython.utils._process_emscripten" in sys.modules  # jupyterlite


def _widget_bar() -> Any:
    """``tqdm.notebook.tqdm`` when ipywidgets can be imported, else None (no import attempted)."""
    try:
        if importlib.util.find_spec("ipywidgets") is None:
            return None
        from tqdm.notebook import IProgress, tqdm
    except Exception:  # noqa: BLE001 - a broken widget install: fall back to the text bar
        return None
    return tqdm if IProgress is not None else None


def bar_class() -> Any:
    """The bar class ``tqdm.auto`` would give, chosen without any warning; ImportError naming the extra."""
    cached = sys.modules.get("tqdm.auto")
    if cached is not None:
        return cached.tqdm
    try:
        from tqdm.std import tqdm
    except ImportError:
        raise ImportError(_MISSING) from None
    if _in_jupyter():
        widget = _widget_bar()
        if widget is not None:
            return widget
    return tqdm


def make_bar(plan: Plan, total: int | None) -> Any:
    """A bar (widget in Jupyter, text on stderr elsewhere), or None when ``progress`` is off."""
    if not plan.opts.progress:
        return None
    return bar_class()(total=total, desc=plan.label, unit="item", leave=True)
