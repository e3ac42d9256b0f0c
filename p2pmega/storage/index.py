"""The SQLite index of a chunk store: schema, opening, transactions, and repair after a crash.

One row per chunk file (size, lease, source network, renewal key) plus running usage totals, overall
and per source network, kept by triggers. Schema, pragmas and the upgrade from version 1:
docs/STORAGE.md.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pmega.core.chunking import HEADER_BYTES, ChunkId, check_chunk_header
from p2pmega.defaults import MAX_LEASE_S
from p2pmega.errors import BadChunk, StorageError, StoreCorrupt
from p2pmega.storage.files import (
    CHUNKS_DIR,
    TMP_DIR,
    chunk_path,
    remove_temp_files,
    scan_chunk_files,
    unlink_quietly,
)

# The whole store logs as p2pmega.storage, as it did when it was one module.
log = logging.getLogger("p2pmega.storage")

SCHEMA_VERSION = 2
"""Version of the index schema below; bump it (and docs/STORAGE.md) on any change."""

INDEX_NAME = "index.sqlite3"

# Version 2 added each chunk's source network and renewal key, and the per-source usage they feed.
_SOURCES = (
    """CREATE TABLE sources (
        source BLOB PRIMARY KEY,
        used_bytes INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TRIGGER chunks_added_by_source AFTER INSERT ON chunks BEGIN
        INSERT INTO sources VALUES (NEW.source, NEW.size)
            ON CONFLICT (source) DO UPDATE SET used_bytes = used_bytes + NEW.size;
    END""",
    # A network whose last chunk went leaves no row: the table stays as small as the networks holding data.
    """CREATE TRIGGER chunks_removed_by_source AFTER DELETE ON chunks BEGIN
        UPDATE sources SET used_bytes = used_bytes - OLD.size WHERE source = OLD.source;
        DELETE FROM sources WHERE source = OLD.source AND used_bytes = 0;
    END""",
)

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE chunks (
        id BLOB PRIMARY KEY CHECK (length(id) = 32),
        size INTEGER NOT NULL CHECK (size >= 0),
        stored_at REAL NOT NULL,
        lease_expiry REAL NOT NULL,
        source BLOB NOT NULL DEFAULT x'',
        renew_key BLOB CHECK (renew_key IS NULL OR length(renew_key) = 32)
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
    *_SOURCES,
)

# From version 1: the new columns (old chunks have an unknown source, b'', and no renewal key), the per-source
# totals, and every lease cut to the longest a holder now grants (a version-1 holder granted up to 2**32 s).
_UPGRADE_FROM_1 = (
    "ALTER TABLE chunks ADD COLUMN source BLOB NOT NULL DEFAULT x''",
    "ALTER TABLE chunks ADD COLUMN renew_key BLOB "
    "CHECK (renew_key IS NULL OR length(renew_key) = 32)",
    *_SOURCES,
    "INSERT INTO sources SELECT source, sum(size) FROM chunks GROUP BY source",
)


class ChunkIndex:
    """An open index file; SQLite failures surface as StorageError / StoreCorrupt.

    Not locked: the caller (`ChunkStore`) serializes every use.
    """

    def __init__(self, path: Path, *, now: float) -> None:
        """Open the index at ``path``, creating the schema in a new file or upgrading an old one.

        Args:
            path: The index file.
            now: The store's clock; an upgrade from version 1 caps every lease at now + MAX_LEASE_S.

        Raises:
            StoreCorrupt: The index is unreadable or from a newer p2pmega.
        """
        self.path = path
        self._db, self.upgraded_from = _open(path, now)

    def query(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        """Run a read-only statement; an SQLite failure (I/O error) becomes a StorageError."""
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(
                f"chunk index {self.path} cannot be read ({exc}); check the disk"
            ) from exc

    def write(self, sql: str, params: tuple[object, ...]) -> int:
        """Run one data-changing statement as its own transaction; returns the rows it changed.

        One statement in autocommit mode commits (and syncs) exactly as BEGIN ... COMMIT would,
        in one call instead of three.
        """
        try:
            return self._db.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise StorageError(
                f"chunk index {self.path} failed ({exc}); check free disk space"
            ) from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
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
                f"chunk index {self.path} failed ({exc}); check free disk space"
            ) from exc

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()


def _open(path: Path, now: float) -> tuple[sqlite3.Connection, int | None]:
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreCorrupt(
            f"cannot open index {path} ({exc}); check permissions, or move it "
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
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
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
            upgraded_from = None
            if version == 1:
                for statement in _UPGRADE_FROM_1:
                    db.execute(statement)
                db.execute(
                    "UPDATE chunks SET lease_expiry = ? WHERE lease_expiry > ?",
                    (now + MAX_LEASE_S, now + MAX_LEASE_S),
                )
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                upgraded_from, version = 1, SCHEMA_VERSION
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        db.close()
        raise StoreCorrupt(
            f"index {path} is unreadable ({exc}); move it aside to start an empty "
            "store, or use another data directory"
        ) from exc
    if version != SCHEMA_VERSION:
        db.close()
        raise StoreCorrupt(
            f"index {path} has schema version {version}, this p2pmega reads "
            f"version {SCHEMA_VERSION}; upgrade p2pmega or use another data directory"
        )
    if upgraded_from is not None:
        log.info("chunk index %s upgraded from schema version %d", path, upgraded_from)
    return db, upgraded_from


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


def reconcile(index: ChunkIndex, root: Path) -> tuple[RepairReport, int, int]:
    """Make index and files agree after a crash: no partial, orphan or missing chunk survives.

    Files are renamed into place before their row commits, and rows are deleted before their
    files are unlinked, so a crash leaves at most orphan files, stale rows and temp files.

    Returns:
        What was cleaned up, then the bytes and the number of chunks the store now holds.

    Raises:
        StorageError: The store cannot be scanned or the index cannot be written.
    """
    chunks_dir = root / CHUNKS_DIR
    try:
        temp_files = remove_temp_files(root / TMP_DIR)
        on_disk = scan_chunk_files(chunks_dir)
    except OSError as exc:
        raise StorageError(
            f"cannot scan chunk store {root}: {exc.strerror} ({exc.filename}); check permissions"
        ) from exc
    with index.transaction() as db:
        rows = dict(db.execute("SELECT id, size FROM chunks").fetchall())
        missing = [cid for cid in rows if cid not in on_disk]
        wrong_size = [cid for cid, size in rows.items() if on_disk.get(cid, size) != size]
        db.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c in missing + wrong_size])
        total, count = db.execute("SELECT coalesce(sum(size), 0), count(*) FROM chunks").fetchone()
        recorded = db.execute("SELECT used_bytes, chunk_count FROM usage").fetchone()
        if tuple(recorded) != (total, count):
            log.warning(
                "index usage %s disagreed with its rows %s; fixed", recorded, (total, count)
            )
            db.execute("UPDATE usage SET used_bytes = ?, chunk_count = ?", (total, count))
    orphans = [cid for cid in on_disk if cid not in rows]
    for cid in orphans + wrong_size:
        unlink_quietly(chunk_path(chunks_dir, ChunkId(cid)))
    report = RepairReport(
        temp_files=temp_files,
        orphan_files=len(orphans),
        missing_files=len(missing),
        size_mismatches=len(wrong_size),
    )
    if report.repaired:
        log.warning("chunk store %s repaired after an unclean stop: %s", root, report)
    return report, total, count


def drop_malformed(index: ChunkIndex, root: Path) -> int:
    """Remove the chunks a version-1 holder accepted that are no chunk at all (wrong header or size).

    Run once, when the index was upgraded from version 1: reads the first bytes of every chunk file.

    Returns:
        How many chunks were removed.

    Raises:
        StorageError: The index cannot be written.
    """
    chunks_dir = root / CHUNKS_DIR
    malformed = []
    for cid, size in index.query("SELECT id, size FROM chunks", ()):
        path = chunk_path(chunks_dir, ChunkId(cid))
        try:
            with path.open("rb") as file:
                head = file.read(HEADER_BYTES)
            check_chunk_header(head, int(size))
        except (OSError, BadChunk):
            malformed.append(cid)
    with index.transaction() as db:
        db.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c in malformed])
    for cid in malformed:
        unlink_quietly(chunk_path(chunks_dir, ChunkId(cid)))
    if malformed:
        log.warning(
            "removed %d stored chunks that are no p2pmega chunk (stored before holders checked)",
            len(malformed),
        )
    return len(malformed)
