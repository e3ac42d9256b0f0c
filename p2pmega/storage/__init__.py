"""The disk: the local chunk store (content-addressed files plus a small SQLite index of leases and quota), and the
small state files of share, fetch and the node, each written the one atomic way.

Synchronous and thread-safe; async callers use ``asyncio.to_thread``. The chunk store keeps opaque sealed
chunks and knows nothing of keys, manifests or the network. On-disk layout: docs/STORAGE.md, docs/FORMAT.md.

Modules: ``store`` (ChunkStore), ``files`` (the chunk files, directory lock), ``index`` (the SQLite index and
repair after a crash), ``sizes`` (parse_size for the quota option), ``atomic`` (write_atomically), ``share_state``
(a share's resume state), ``part_file`` (fetch's part file and resume state), ``links`` (the sharer's link list).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from p2pmega.storage.sizes import DEFAULT_QUOTA_BYTES, parse_size

if TYPE_CHECKING:
    from p2pmega.storage.files import CHUNKS_DIR, LOCK_NAME, TMP_DIR, TMP_SUFFIX
    from p2pmega.storage.index import INDEX_NAME, SCHEMA_VERSION, RepairReport
    from p2pmega.storage.store import ChunkStore

# The rest loads on first use (PEP 562): a share or fetch client names DEFAULT_QUOTA_BYTES through
# node settings but never opens a store, and sqlite3 with the store modules cost ~20 ms a command.
_LAZY = {
    "CHUNKS_DIR": "files",
    "LOCK_NAME": "files",
    "TMP_DIR": "files",
    "TMP_SUFFIX": "files",
    "INDEX_NAME": "index",
    "SCHEMA_VERSION": "index",
    "RepairReport": "index",
    "ChunkStore": "store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "CHUNKS_DIR",
    "DEFAULT_QUOTA_BYTES",
    "INDEX_NAME",
    "LOCK_NAME",
    "SCHEMA_VERSION",
    "TMP_DIR",
    "TMP_SUFFIX",
    "ChunkStore",
    "RepairReport",
    "parse_size",
]
