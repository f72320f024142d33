"""The cluster route: ``self`` scattered to dask.distributed once per map call.

Why scatter bytes and not the object: dask's own ``scatter``/``Client.map``
tokenize (hash) the object to name it, which for a 50 MB dict costs seconds.
Bytes scattered with ``hash=False`` are not tokenized; each worker fetches
them once, rebuilds once per distinct state (the state cache of local
workers, _statecache) and keeps it for the next call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ._dispatch import InlineHandle
from ._serialize import Payload

__all__ = ["scatter_payload"]


@contextlib.contextmanager
def scatter_payload(payload: Payload, lineage: str = "") -> Iterator[tuple[InlineHandle, Any]]:
    """Scatter ``payload`` to the active client; release it afterwards."""
    from distributed import get_client

    client = get_client()
    blob = b"".join([payload.main, *(bytes(b) for b in payload.buffers)])
    # broadcast: every worker needs the bytes, and a copy on each survives
    # the death of any one of them.
    future = client.scatter(blob, hash=False, broadcast=True)  # type: ignore[no-untyped-call,unused-ignore]
    handle = InlineHandle(payload.digest, len(payload.main), tuple(b.nbytes for b in payload.buffers), lineage)
    try:
        yield handle, future
    finally:
        future.release()
