"""The local chunk store: content-addressed files plus a small SQLite index of leases and quota.

Synchronous and thread-safe; async callers use ``asyncio.to_thread``. It keeps opaque sealed
chunks and knows nothing of keys, manifests or the network. On-disk layout: docs/STORAGE.md.

Modules: ``store`` (ChunkStore), ``files`` (the chunk files, directory lock, atomic writes),
``index`` (the SQLite index and repair after a crash), ``sizes`` (parse_size for the quota option).
"""

from p2pmega.storage.files import CHUNKS_DIR, LOCK_NAME, TMP_DIR, TMP_SUFFIX
from p2pmega.storage.index import INDEX_NAME, SCHEMA_VERSION, RepairReport
from p2pmega.storage.sizes import DEFAULT_QUOTA_BYTES, parse_size
from p2pmega.storage.store import ChunkStore

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
