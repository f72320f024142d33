"""Run the methods of your own classes in parallel.

Example:
    >>> from parallelmethods import parallelizable
    >>> class Model:
    ...     def __init__(self, w): self.w = w
    ...     @parallelizable(backend="threading")
    ...     def score(self, x): return self.w * x
    >>> Model(3).score.map(range(4))
    [0, 3, 6, 9]
"""

from __future__ import annotations

from ._decorator import parallelizable
from ._descriptor import BoundParallelMethod, ParallelFunction
from ._explain import Explanation, explain
from ._mixin import ParallelMixin
from .errors import ParallelMethodsError, SerializationError, WorkerCrashedError

__version__ = "0.1.0"

__all__ = [
    "BoundParallelMethod",
    "Explanation",
    "ParallelFunction",
    "ParallelMethodsError",
    "ParallelMixin",
    "SerializationError",
    "WorkerCrashedError",
    "__version__",
    "explain",
    "parallelizable",
]
