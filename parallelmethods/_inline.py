"""The inline route: ``self`` as bytes inside every task's arguments.

For backends whose workers may not share our file system or our process
tree, and that offer no scatter/object-store API through joblib: a user's
``MultiprocessingBackend`` subclass, any other registered process backend
we cannot see into (_plan's table). Not dask nor Ray: they take the
"cluster" route (_dask, _ray), which ships ``self`` once per map.

Cost: the payload travels once per chunk (the runner cuts about 4 chunks per
worker), not once per map as on the file and cluster routes; each worker
still unpickles it at most once per distinct state (the state cache,
_statecache, keyed as on the other routes). Fine for a small or medium
``self``; a large one is better served by loky (file route) or dask
(scattered once). Nothing is written anywhere, so nothing needs cleaning up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ._dispatch import InlineHandle

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = ["inline_payload"]


@contextlib.contextmanager
def inline_payload(plan: Plan) -> Iterator[tuple[InlineHandle, bytes]]:
    """Serialize ``plan.subject`` once for this call: ``(handle, blob)`` for ``run_chunk``.

    Mirrors :func:`parallelmethods._dask.scatter_payload`; the blob is the
    pickle stream then the out-of-band buffers, back to back, as
    ``_dispatch._rebuild`` reads an :class:`InlineHandle`.
    """
    from ._serialize import fingerprint, root_reduce
    from ._transport import lineage_of, serialize_subject, state_key

    rv = root_reduce(plan.subject, plan.exclude)
    key = state_key(plan, fingerprint(plan.subject, rv))
    payload = serialize_subject(plan, rv, key)
    blob = b"".join([payload.main, *(bytes(b) for b in payload.buffers)])
    handle = InlineHandle(
        payload.digest, len(payload.main), tuple(b.nbytes for b in payload.buffers), lineage_of(plan.subject)
    )
    yield handle, blob
