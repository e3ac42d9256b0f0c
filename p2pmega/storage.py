"""The local chunk store: content-addressed files plus a small SQLite index of leases and quota.

Synchronous and thread-safe; async callers use ``asyncio.to_thread``. It keeps opaque sealed
chunks and knows nothing of keys, manifests or the network. On-disk layout: docs/STORAGE.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from p2pmega.core.chunking import (
    MAX_SEALED_CHUNK_BYTES,
    ChunkId,
    short_id,
    verify_chunk,
)
from p2pmega.errors import (
    BadOption,
    ChunkHashMismatch,
    ChunkNotStored,
    QuotaExceeded,
    StorageError,
    StoreCorrupt,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Version of the index schema below; bump it (and docs/STORAGE.md) on any change."""

# 10 GB is a share of a laptop disk most users will not notice, yet holds ~10,000 1 MiB chunks.
DEFAULT_QUOTA_BYTES = 10 * 1000**3

INDEX_NAME = "index.sqlite3"
LOCK_NAME = "lock"
CHUNKS_DIR = "chunks"
TMP_DIR = "tmp"
TMP_SUFFIX = ".tmp"

# One level of 256 shard directories keeps every directory small (40 files per shard at the default
# quota, 4,000 at a million chunks) and lets all of them be created, and fsynced, once at open.
_SHARDS = tuple(f"{i:02x}" for i in range(256))
_CHUNK_NAME = re.compile(r"[0-9a-f]{64}")

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE chunks (
        id BLOB PRIMARY KEY CHECK (length(id) = 32),
        size INTEGER NOT NULL CHECK (size >= 0),
        stored_at REAL NOT NULL,
        lease_expiry REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX chunks_by_expiry ON chunks (lease_expiry)",
    """CREATE TABLE usage (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        used_bytes INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL
    )""",
    "INSERT INTO usage VALUES (1, 0, 0)",
    """CREATE TRIGGER chunks_added AFTER INSERT ON chunks BEGIN
        UPDATE usage SET used_bytes = used_bytes + NEW.size, chunk_count = chunk_count + 1;
    END""",
    """CREATE TRIGGER chunks_removed AFTER DELETE ON chunks BEGIN
        UPDATE usage SET used_bytes = used_bytes - OLD.size, chunk_count = chunk_count - 1;
    END""",
)

_LIVE_ROW_SQL = "SELECT lease_expiry FROM chunks WHERE id = ? AND lease_expiry > ?"

# Decimal units are 1000-based and binary units 1024-based (IEC 80000-13); a bare number is bytes.
_SIZE_UNITS = {"": 1, "b": 1} | {
    unit: base**power
    for power, prefix in enumerate("kmgt", start=1)
    for unit, base in (
        (prefix, 1000),
        (prefix + "b", 1000),
        (prefix + "i", 1024),
        (prefix + "ib", 1024),
    )
}
_SIZE_TEXT = re.compile(
    r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE
)


def parse_size(text: str) -> int:
    """Parse a human byte count such as ``10GB``, ``512MiB``, ``1.5G`` or ``100000``.

    Args:
        text: A non-negative number, optionally with a unit (case-insensitive): B, K/KB, M/MB,
            G/GB, T/TB (powers of 1000) or Ki/KiB, Mi/MiB, Gi/GiB, Ti/TiB (powers of 1024).

    Returns:
        The number of bytes, rounded down to a whole byte.

    Raises:
        BadOption: ``text`` is not a number with a known unit.
    """
    match = _SIZE_TEXT.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise BadOption(
            f"size {text!r} is not a byte count; write e.g. 10GB, 512MiB, 1.5G or 100000"
        )
    return int(Decimal(match.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class RepairReport:
    """What opening the store had to clean up after a crash (all zero after a clean shutdown)."""

    temp_files: int = 0
    """Unfinished writes removed from ``tmp/``."""
    orphan_files: int = 0
    """Chunk files without an index row (written, never acknowledged): removed."""
    missing_files: int = 0
    """Index rows whose file is gone: removed."""
    size_mismatches: int = 0
    """Files whose size differs from their row: both removed."""

    @property
    def repaired(self) -> bool:
        """Whether anything was cleaned up."""
        return any((self.temp_files, self.orphan_files, self.missing_files, self.size_mismatches))


class ChunkStore:
    """Chunks on disk under ``root``, each with a lease; at most ``quota_bytes`` of them.

    Every method may be called from several threads at once. A chunk is *live* while its lease has
    not expired; expired chunks stay on disk (and count towards ``used_bytes``) until
    `collect_garbage` or a put that needs their space removes them, but are never served.
    """

    def __init__(
        self,
        root: Path,
        *,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (creating if needed) the store at ``root`` and repair what a crash left behind.

        Args:
            root: The store directory; created with mode 0700 if missing.
            quota_bytes: Most chunk bytes the store may hold.
            clock: Wall-clock seconds; leases are absolute times from this clock.

        Raises:
            BadOption: ``quota_bytes`` is negative.
            StorageError: The directory cannot be used, or another process has the store open.
            StoreCorrupt: The index is unreadable or from a newer p2pmega.
        """
        if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int) or quota_bytes < 0:
            raise BadOption(f"quota {quota_bytes!r} is not a byte count >= 0; pass e.g. 10GB")
        self._root = Path(root)
        self._chunks_dir = self._root / CHUNKS_DIR
        self._tmp_dir = self._root / TMP_DIR
        self._index_path = self._root / INDEX_NAME
        self._quota = quota_bytes
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._pending: set[bytes] = set()  # ids being written; their bytes are in _reserved
        self._reserved = 0
        self._used = 0
        self._count = 0
        self._closed = False
        self._lock_fd = self._lock_root()
        try:
            self._make_dirs()
            self._db = self._open_index()
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self.repair_report = self._reconcile()
        except BaseException:
            self._db.close()
            os.close(self._lock_fd)
            raise

    # --- opening ---------------------------------------------------------------------------

    def _lock_root(self) -> int:
        """Create ``root`` and lock it exclusively; the kernel releases the lock even on kill -9."""
        path = self._root / LOCK_NAME
        try:
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(
                f"cannot open chunk store {self._root}: {exc.strerror}; check path and permissions"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"chunk store {self._root} is in use by another process; stop it or use another "
                "data directory"
            ) from exc
        return fd

    def _make_dirs(self) -> None:
        try:
            self._tmp_dir.mkdir(mode=0o700, exist_ok=True)
            self._chunks_dir.mkdir(mode=0o700, exist_ok=True)
            for shard in _SHARDS:
                (self._chunks_dir / shard).mkdir(mode=0o700, exist_ok=True)
            _fsync_dir(self._chunks_dir)
            _fsync_dir(self._root)
        except OSError as exc:
            raise StorageError(
                f"cannot create chunk store directories in {self._root}: {exc.strerror}; "
                "check permissions and free space"
            ) from exc

    def _open_index(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self._index_path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreCorrupt(
                f"cannot open index {self._index_path} ({exc}); check permissions, or move it "
                "aside to start an empty store"
            ) from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged put must survive a power cut, or its (row-less) file would be
            # discarded as an orphan on the next open while the uploader believes it is stored.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                version: int | None
                tables = {
                    row[0]
                    for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                if not tables:
                    for statement in _SCHEMA:
                        db.execute(statement)
                    db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                    version = SCHEMA_VERSION
                elif "schema_version" in tables:
                    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
                    version = row[0] if row else None
                else:
                    version = None
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            db.close()
            raise StoreCorrupt(
                f"index {self._index_path} is unreadable ({exc}); move it aside to start an empty "
                "store, or use another data directory"
            ) from exc
        if version != SCHEMA_VERSION:
            db.close()
            raise StoreCorrupt(
                f"index {self._index_path} has schema version {version}, this p2pmega reads "
                f"version {SCHEMA_VERSION}; upgrade p2pmega or use another data directory"
            )
        return db

    def _reconcile(self) -> RepairReport:
        """Make index and files agree after a crash: no partial, orphan or missing chunk survives.

        Files are renamed into place before their row commits, and rows are deleted before their
        files are unlinked, so a crash leaves at most orphan files, stale rows and temp files.
        """
        try:
            temp_files = self._remove_temp_files()
            on_disk = self._scan_chunk_files()
        except OSError as exc:
            raise StorageError(
                f"cannot scan chunk store {self._root}: {exc.strerror} ({exc.filename}); "
                "check permissions"
            ) from exc
        with self._cond, self._transaction() as db:
            rows = dict(db.execute("SELECT id, size FROM chunks").fetchall())
            missing = [cid for cid in rows if cid not in on_disk]
            wrong_size = [cid for cid, size in rows.items() if on_disk.get(cid, size) != size]
            db.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c in missing + wrong_size])
            total, count = db.execute(
                "SELECT coalesce(sum(size), 0), count(*) FROM chunks"
            ).fetchone()
            recorded = db.execute("SELECT used_bytes, chunk_count FROM usage").fetchone()
            if tuple(recorded) != (total, count):
                log.warning(
                    "index usage %s disagreed with its rows %s; fixed", recorded, (total, count)
                )
                db.execute("UPDATE usage SET used_bytes = ?, chunk_count = ?", (total, count))
            self._used, self._count = total, count
        orphans = [cid for cid in on_disk if cid not in rows]
        for cid in orphans + wrong_size:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path_of(ChunkId(cid)))
        report = RepairReport(
            temp_files=temp_files,
            orphan_files=len(orphans),
            missing_files=len(missing),
            size_mismatches=len(wrong_size),
        )
        if report.repaired:
            log.warning("chunk store %s repaired after an unclean stop: %s", self._root, report)
        return report

    def _remove_temp_files(self) -> int:
        removed = 0
        for entry in os.scandir(self._tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        return removed

    def _scan_chunk_files(self) -> dict[bytes, int]:
        """Size of every well-named chunk file, by id; anything else is logged and left alone."""
        on_disk: dict[bytes, int] = {}
        for shard in _SHARDS:
            for entry in os.scandir(self._chunks_dir / shard):
                name = entry.name
                if _CHUNK_NAME.fullmatch(name) and name.startswith(shard) and entry.is_file():
                    on_disk[bytes.fromhex(name)] = entry.stat().st_size
                else:
                    log.warning("ignoring %s: not a chunk file of this store", entry.path)
        return on_disk

    # --- public API ---------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The store directory."""
        return self._root

    @property
    def quota_bytes(self) -> int:
        """Most chunk bytes the store may hold."""
        return self._quota

    @property
    def used_bytes(self) -> int:
        """Bytes of every chunk on disk, expired ones not yet collected included."""
        with self._cond:
            return self._used

    @property
    def chunk_count(self) -> int:
        """Number of chunks on disk, expired ones not yet collected included."""
        with self._cond:
            return self._count

    def put(self, chunk_id: ChunkId, data: bytes, *, lease_s: float) -> bool:
        """Store a chunk durably, or extend the lease of the copy already stored.

        Costs one hash, one write and its fsyncs; an existing copy is not re-read.

        Args:
            chunk_id: The id ``data`` must hash to.
            data: The sealed chunk, at most ``MAX_SEALED_CHUNK_BYTES``.
            lease_s: Seconds from now the chunk must be kept; an existing lease is never shortened.

        Returns:
            True if the chunk was newly stored, False if it was already there.

        Raises:
            BadOption: ``lease_s`` is not a positive finite number.
            ChunkHashMismatch: ``data`` does not hash to ``chunk_id``.
            QuotaExceeded: The chunk does not fit in the quota, even after removing expired chunks.
            StorageError: ``data`` is larger than any valid chunk, or the disk failed.
        """
        size = len(data)
        if size > MAX_SEALED_CHUNK_BYTES:
            raise StorageError(
                f"chunk {short_id(chunk_id)} is {size} bytes, over the "
                f"{MAX_SEALED_CHUNK_BYTES}-byte limit of any valid chunk; refuse it"
            )
        _check_lease(lease_s)
        verify_chunk(chunk_id, data)
        key = bytes(chunk_id)
        with self._cond:
            while key in self._pending:
                self._cond.wait()
            self._check_open()
            now = self._clock()
            with self._transaction() as db:
                extended = db.execute(
                    "UPDATE chunks SET lease_expiry = max(lease_expiry, ?) WHERE id = ?",
                    (now + lease_s, key),
                ).rowcount
            if extended:
                return False
            self._reserve_locked(chunk_id, size, now)
            self._pending.add(key)
        try:
            self._write_file(chunk_id, data)
            with self._cond:
                try:
                    self._check_open()
                    now = self._clock()
                    with self._transaction() as db:
                        db.execute(
                            "INSERT INTO chunks VALUES (?, ?, ?, ?)",
                            (key, size, now, now + lease_s),
                        )
                except BaseException:
                    _unlink_quietly(self._path_of(chunk_id))
                    raise
                self._used += size
                self._count += 1
        finally:
            with self._cond:
                self._pending.discard(key)
                self._reserved -= size
                self._cond.notify_all()
        log.debug("stored chunk %s (%d bytes)", short_id(chunk_id), size)
        return True

    def get(self, chunk_id: ChunkId) -> bytes:
        """Read a live chunk and check its hash; a chunk that rotted on disk is deleted.

        Args:
            chunk_id: The chunk to read.

        Returns:
            Its exact stored bytes.

        Raises:
            ChunkNotStored: The chunk is not here, or its lease expired.
            ChunkHashMismatch: The bytes on disk no longer match the id; the chunk was deleted.
            StorageError: The disk failed.
        """
        with self._cond:
            self._check_open()
            rows = self._query("SELECT lease_expiry FROM chunks WHERE id = ?", (bytes(chunk_id),))
            live = bool(rows) and rows[0][0] > self._clock()
        if not live:
            raise _not_stored(chunk_id)
        path = self._path_of(chunk_id)
        try:
            with open(path, "rb") as file:
                data = file.read()
                try:
                    verify_chunk(chunk_id, data)
                except ChunkHashMismatch:
                    # Still holding the file open, so its inode cannot be reused by a new copy.
                    self._discard_rotten(chunk_id, os.fstat(file.fileno()).st_ino)
                    raise ChunkHashMismatch(
                        f"stored chunk {short_id(chunk_id)} ({len(data)} bytes) no longer matches "
                        "its id and was deleted; fetch it from another holder"
                    ) from None
        except FileNotFoundError:
            self._forget_missing(chunk_id)
            raise _not_stored(chunk_id) from None
        except OSError as exc:
            raise StorageError(
                f"cannot read chunk {short_id(chunk_id)} at {path}: {exc.strerror}; check the disk"
            ) from exc
        return data

    def has_many(self, ids: Sequence[ChunkId]) -> list[bool]:
        """Which of ``ids`` are live here.

        Args:
            ids: Chunk ids, in any order, repeats allowed.

        Returns:
            One bool per id, in order.
        """
        with self._cond:
            self._check_open()
            now = self._clock()
            return [bool(self._query(_LIVE_ROW_SQL, (bytes(cid), now))) for cid in ids]

    def renew(self, ids: Sequence[ChunkId], *, lease_s: float) -> list[bool]:
        """Extend the leases of live chunks to at least ``lease_s`` seconds from now.

        Args:
            ids: Chunk ids.
            lease_s: Seconds from now; a longer existing lease is kept.

        Returns:
            One bool per id: whether it is live here (and so was renewed).

        Raises:
            BadOption: ``lease_s`` is not a positive finite number.
            StorageError: The index could not be written.
        """
        _check_lease(lease_s)
        with self._cond:
            self._check_open()
            now = self._clock()
            with self._transaction() as db:
                return [
                    db.execute(
                        "UPDATE chunks SET lease_expiry = max(lease_expiry, ?) "
                        "WHERE id = ? AND lease_expiry > ?",
                        (now + lease_s, bytes(cid), now),
                    ).rowcount
                    == 1
                    for cid in ids
                ]

    def collect_garbage(self) -> int:
        """Delete every chunk whose lease has expired.

        Returns:
            How many chunks were deleted.

        Raises:
            StorageError: The index could not be written.
        """
        with self._cond:
            self._check_open()
            removed = self._collect_locked(self._clock())
        if removed:
            log.info("garbage collector removed %d expired chunks", removed)
        return removed

    def ids(self) -> list[ChunkId]:
        """Every live chunk id (to re-announce them), in byte order."""
        with self._cond:
            self._check_open()
            rows = self._query(
                "SELECT id FROM chunks WHERE lease_expiry > ? ORDER BY id", (self._clock(),)
            )
        return [ChunkId(row[0]) for row in rows]

    def lease_expiry(self, chunk_id: ChunkId) -> float | None:
        """When a live chunk's lease ends (a ``clock`` time), or None if it is not live here."""
        with self._cond:
            self._check_open()
            rows = self._query(_LIVE_ROW_SQL, (bytes(chunk_id), self._clock()))
        return float(rows[0][0]) if rows else None

    def close(self) -> None:
        """Close the index and release the directory lock; calling it again does nothing."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()
            finally:
                os.close(self._lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals (the *_locked methods need self._cond held) -----------------------------------

    def _path_of(self, chunk_id: ChunkId) -> Path:
        name = chunk_id.hex()
        return self._chunks_dir / name[:2] / name

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"chunk store {self._root} is closed; open a new ChunkStore")

    def _query(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        """Run a read-only statement; an SQLite failure (I/O error) becomes a StorageError."""
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(
                f"chunk index {self._index_path} cannot be read ({exc}); check the disk"
            ) from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; an SQLite failure (disk full, I/O) becomes a StorageError."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StorageError(
                f"chunk index {self._index_path} failed ({exc}); check free disk space"
            ) from exc

    def _reserve_locked(self, chunk_id: ChunkId, size: int, now: float) -> None:
        """Claim quota for an in-flight write, collecting expired chunks if that makes room."""
        if self._used + self._reserved + size > self._quota and self._collect_locked(now):
            log.info("collected expired chunks to make room for %s", short_id(chunk_id))
        if self._used + self._reserved + size > self._quota:
            raise QuotaExceeded(
                f"chunk {short_id(chunk_id)} ({size} bytes) does not fit: {self._used} bytes "
                f"stored and {self._reserved} being written of the {self._quota}-byte quota; "
                "raise --quota or store it elsewhere"
            )
        self._reserved += size

    def _collect_locked(self, now: float) -> int:
        with self._transaction() as db:
            expired = [
                row[0]
                for row in db.execute(
                    "DELETE FROM chunks WHERE lease_expiry <= ? RETURNING id", (now,)
                ).fetchall()
            ]
            self._used, self._count = db.execute(
                "SELECT used_bytes, chunk_count FROM usage"
            ).fetchone()
        # Unlinked while still locked: a put of the same id must not race with this unlink.
        for cid in expired:
            _unlink_quietly(self._path_of(ChunkId(cid)))
        return len(expired)

    def _write_file(self, chunk_id: ChunkId, data: bytes) -> None:
        """Write to a temp file, fsync it, rename it into place and fsync the directory."""
        final = self._path_of(chunk_id)
        try:
            fd, tmp = tempfile.mkstemp(
                dir=self._tmp_dir, prefix=chunk_id.hex()[:16] + ".", suffix=TMP_SUFFIX
            )
        except OSError as exc:
            raise StorageError(
                f"cannot create a file in {self._tmp_dir}: {exc.strerror}; check the disk"
            ) from exc
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            _unlink_quietly(Path(tmp))
            raise StorageError(
                f"cannot write chunk {short_id(chunk_id)} ({len(data)} bytes) to {final}: "
                f"{exc.strerror}; check free disk space"
            ) from exc
        except BaseException:
            _unlink_quietly(Path(tmp))
            raise

    def _discard_rotten(self, chunk_id: ChunkId, inode: int) -> None:
        """Delete a chunk whose file (``inode``) failed its hash check, unless it was replaced."""
        path = self._path_of(chunk_id)
        with self._cond:
            try:
                same_file = os.stat(path).st_ino == inode
            except FileNotFoundError:
                same_file = False
            if same_file and not self._closed:
                self._delete_row_locked(chunk_id)
                _unlink_quietly(path)
        log.warning("chunk %s failed its hash check on read and was deleted", short_id(chunk_id))

    def _forget_missing(self, chunk_id: ChunkId) -> None:
        """Drop the row of a chunk whose file vanished (unless collected or re-stored meanwhile)."""
        with self._cond:
            if self._closed or self._path_of(chunk_id).exists():
                return
            if self._delete_row_locked(chunk_id):
                log.warning(
                    "chunk %s was listed but its file is gone; forgot it", short_id(chunk_id)
                )

    def _delete_row_locked(self, chunk_id: ChunkId) -> bool:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM chunks WHERE id = ?", (bytes(chunk_id),)).rowcount
            self._used, self._count = db.execute(
                "SELECT used_bytes, chunk_count FROM usage"
            ).fetchone()
        return deleted == 1


def _check_lease(lease_s: float) -> None:
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float):
        raise BadOption(f"lease {lease_s!r} is not a number of seconds; pass e.g. lease_s=86400")
    if not (math.isfinite(lease_s) and lease_s > 0):
        raise BadOption(f"lease {lease_s!r} s is not positive and finite; pass e.g. lease_s=86400")


def _not_stored(chunk_id: ChunkId) -> ChunkNotStored:
    return ChunkNotStored(
        f"chunk {short_id(chunk_id)} is not stored here (or its lease expired); ask another holder"
    )


def _fsync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
