"""Exceptions raised by parallelmethods.

::

    Exception
     └── ParallelMethodsError            anything that went wrong in the machinery
          ├── SerializationError          (also a TypeError)   self/argument cannot travel
          └── WorkerCrashedError          (also a RuntimeError) a worker process died

Exceptions raised by *your* method are re-raised with their own type, never
wrapped; a timeout is the builtin :class:`TimeoutError`.
"""

from __future__ import annotations

__all__ = ["ParallelMethodsError", "SerializationError", "WorkerCrashedError"]


class ParallelMethodsError(Exception):
    """Base class of every error raised by parallelmethods itself.

    Also raised, with the original type name, message and worker traceback
    text, when an exception raised by your method cannot be rebuilt in the
    caller (for instance an ``__init__`` that pickle cannot call).

    Example:
        >>> err = ParallelMethodsError("boom", type_name="MyError", traceback_text="...")
        >>> err.type_name
        'MyError'

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, *, type_name: str | None = None, traceback_text: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.traceback_text = traceback_text

    # A keyword-only __init__ breaks BaseException.__reduce__ (it replays only
    # ``args``), so errors crossing a process boundary must say how to rebuild.
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            _rebuild,
            (type(self), self.args, self.__dict__.copy()),
        )


class SerializationError(ParallelMethodsError, TypeError):
    """``self`` or an argument cannot be sent to worker processes.

    ``path`` names the part that failed (``"self.conn"``, ``"argument 0 of
    item 3"``), ``obj_type`` its type name, ``cause`` the pickling error.

    Example:
        >>> import threading
        >>> err = SerializationError("cannot send", path="self._lock", obj_type="_thread.lock")
        >>> isinstance(err, TypeError), err.path
        (True, 'self._lock')

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        obj_type: str | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.obj_type = obj_type
        self.cause = cause


class WorkerCrashedError(ParallelMethodsError, RuntimeError):
    """A worker process died (``os._exit``, a signal, the OOM killer, a segfault).

    ``method`` is the method's qualified name, ``exitcodes`` what is known of
    how the worker(s) ended, ``items`` the 0-based indices that were in flight.
    The pool is replaced; the next map works.

    Example:
        >>> err = WorkerCrashedError("worker died", method="Model.score", items=(3,))
        >>> isinstance(err, RuntimeError), err.items
        (True, (3,))

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        message: str,
        *,
        method: str | None = None,
        exitcodes: tuple[int, ...] = (),
        items: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.method = method
        self.exitcodes = exitcodes
        self.items = items


def _rebuild(cls, args, state):  # type: ignore[no-untyped-def]
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err
