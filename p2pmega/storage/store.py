"""ChunkStore: put, get, lease and collect chunks, within a quota, from several threads at once.

It keeps opaque sealed chunks and knows nothing of keys, manifests or the network. The files live
in p2pmega.storage.files, the SQLite index (and repair after a crash) in p2pmega.storage.index.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from p2pmega.core.chunking import (
    ChunkId,
    check_stored_chunk,
    short_id,
    verify_chunk,
)
from p2pmega.core.renewal import RENEW_KEY_BYTES
from p2pmega.defaults import MAX_LEASE_S
from p2pmega.errors import (
    BadOption,
    ChunkHashMismatch,
    ChunkNotStored,
    QuotaExceeded,
    SourceLimitExceeded,
    StorageError,
)
from p2pmega.storage.files import (
    CHUNKS_DIR,
    DIRECT_ALIGN,
    TMP_DIR,
    chunk_file,
    chunk_path,
    direct_io_offset,
    direct_io_works,
    lock_root,
    make_dirs,
    open_chunk_for_read,
    read_chunk,
    unlink_quietly,
    write_chunk_file,
)
from p2pmega.storage.index import INDEX_NAME, ChunkIndex, drop_malformed, reconcile
from p2pmega.storage.sizes import DEFAULT_QUOTA_BYTES
from p2pmega.storage.sources import SourceLimits, StoreRates, describe_source

# The whole store logs as p2pmega.storage, as it did when it was one module.
log = logging.getLogger("p2pmega.storage")

_LIVE_ROW_SQL = "SELECT lease_expiry FROM chunks WHERE id = ? AND lease_expiry > ?"
_LIVE_SIZE_SQL = "SELECT size FROM chunks WHERE id = ? AND lease_expiry > ?"
_RENEW_SQL = (
    "UPDATE chunks SET lease_expiry = max(lease_expiry, ?) WHERE id = ? AND lease_expiry > ?"
)
DEFAULT_LIMITS: Final = SourceLimits()
# The source a chunk stored from this machine (not over the network) is recorded with.
LOCAL_SOURCE: Final = b""


class ChunkStore:
    """Chunks on disk under ``root``, each with a lease; at most ``quota_bytes`` of them.

    Every method may be called from several threads at once. A chunk is *live* while its lease has
    not expired; expired chunks stay on disk (and count towards ``used_bytes``) until
    `collect_garbage` or a put that needs their space removes them, but are never served.

    A chunk stored over the network records its source network and, if the sharer sent one, the
    file's renewal key; ``limits`` bound what one source network may hold and how fast it may store,
    and only a renewal signed with that key extends the lease (docs/STORAGE.md).
    """

    # Room a `read_into` buffer needs past ``head + size`` so that `room_offset` fits in it.
    ROOM_SPARE_BYTES: Final = 2 * DIRECT_ALIGN

    @staticmethod
    def room_offset(buffer: bytearray, head: int) -> int:
        """Where in ``buffer`` to put ``head`` bytes so that `read_into` fills what follows copy-free.

        The disk then reads the chunk straight into ``buffer[offset + head:]`` (docs/STORAGE.md,
        "Reads"). The offset is below ROOM_SPARE_BYTES / 2; any buffer works, this one saves a copy.
        """
        return direct_io_offset(buffer, head)

    def __init__(
        self,
        root: Path,
        *,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        clock: Callable[[], float] = time.time,
        direct_io: bool | None = None,
        limits: SourceLimits = DEFAULT_LIMITS,
        rate_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open (creating if needed) the store at ``root`` and repair what a crash left behind.

        Args:
            root: The store directory; created with mode 0700 if missing.
            quota_bytes: Most chunk bytes the store may hold.
            clock: Wall-clock seconds; leases are absolute times from this clock.
            direct_io: Write chunks with O_DIRECT (bypassing the page cache); None uses it
                where the filesystem allows it. Reads always go through the page cache.
            limits: What one source network may hold and how fast it may store.
            rate_clock: Monotonic seconds for the store-rate buckets.

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
        # Plain strings for the per-chunk paths: pathlib costs tens of microseconds per chunk.
        self._chunks_str = str(self._chunks_dir)
        self._tmp_str = str(self._tmp_dir)
        self._quota = quota_bytes
        self._clock = clock
        self.limits = limits
        self._rates = StoreRates(limits.rate_bytes_per_min, rate_clock)
        self._reserved_by_source: dict[bytes, int] = {}
        self._cond = threading.Condition(threading.Lock())
        self._pending: set[bytes] = set()  # ids being written; their bytes are in _reserved
        self._reserved = 0
        self._used = 0
        self._count = 0
        self._closed = False
        self._lock_fd = lock_root(self._root)
        try:
            make_dirs(self._root)
            self._index = ChunkIndex(self._root / INDEX_NAME, now=clock())
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            with self._cond:
                self.repair_report, self._used, self._count = reconcile(self._index, self._root)
                if self._index.upgraded_from == 1 and drop_malformed(self._index, self._root):
                    self._used, self._count = self._index.query(
                        "SELECT used_bytes, chunk_count FROM usage", ()
                    )[0]
            self._direct = direct_io_works(self._tmp_str) if direct_io is None else direct_io
        except BaseException:
            self._index.close()
            os.close(self._lock_fd)
            raise

    # --- public API ---------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The store directory."""
        return self._root

    @property
    def direct_io(self) -> bool:
        """Whether chunks are written with O_DIRECT (False after the filesystem refused it)."""
        return self._direct

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

    def put(
        self,
        chunk_id: ChunkId,
        data: bytes | bytearray | memoryview,
        *,
        lease_s: float,
        source: bytes | None = None,
        renew_key: bytes | None = None,
    ) -> bool:
        """Store a chunk durably (a local put of a chunk already stored extends its lease).

        Costs one hash, one write and its fsyncs; an existing copy is not re-read.

        Args:
            chunk_id: The id ``data`` must hash to.
            data: The sealed chunk, at most ``MAX_SEALED_CHUNK_BYTES``; any bytes-like object
                (not copied, and not kept after the call).
            lease_s: Seconds from now the chunk must be kept (at most MAX_LEASE_S are granted).
            source: The network the chunk came from (core.node_id.network_of), None for this
                machine. A chunk from the network counts against its source's share of the quota
                and store rate, and storing it again changes nothing: only a signed renewal
                extends its lease. A local put of a live chunk extends the lease, never shortens it.
            renew_key: The file's renewal public key (core.renewal), kept with the chunk; None:
                only its source network may renew it, unsigned.

        Returns:
            True if the chunk was newly stored, False if it was already there.

        Raises:
            BadOption: ``lease_s`` is not a positive finite number, or ``renew_key`` not 32 bytes.
            BadChunk: ``data`` is not shaped like a stored chunk (header, kind, size).
            ChunkHashMismatch: ``data`` does not hash to ``chunk_id``.
            SourceLimitExceeded: ``source`` holds its share of the quota, or stored too fast.
            QuotaExceeded: The chunk does not fit in the quota, even after removing expired chunks.
            StorageError: The disk failed.
        """
        size = len(data)
        lease_s = _check_lease(lease_s)
        if renew_key is not None and len(renew_key) != RENEW_KEY_BYTES:
            raise BadOption(f"a renewal key is {RENEW_KEY_BYTES} bytes, got {len(renew_key)}")
        check_stored_chunk(data)
        verify_chunk(chunk_id, data)
        key = bytes(chunk_id)
        origin = LOCAL_SOURCE if source is None else bytes(source)
        index = self._index
        with self._cond:
            while key in self._pending:
                self._cond.wait()
            self._check_open()
            now = self._clock()
            # A read first: a new chunk (the usual case) then costs no write transaction here.
            rows = index.query("SELECT lease_expiry FROM chunks WHERE id = ?", (key,))
            if rows and source is None:
                index.write(
                    "UPDATE chunks SET lease_expiry = max(lease_expiry, ?) WHERE id = ?",
                    (now + lease_s, key),
                )
                return False
            if rows and float(rows[0][0]) > now:
                # Storing again is no way around renewal: the lease and the renewal key stay as they are.
                return False
            if rows:
                # Expired, not yet collected: stored afresh, for (and counted against) this source.
                self._delete_row_locked(chunk_id)
                unlink_quietly(chunk_file(self._chunks_str, key))
            if source is not None:
                self._check_source_locked(origin, size, now)
            self._reserve_locked(chunk_id, size, now)
            if source is not None:
                try:
                    self._rates.take(origin, size)
                except SourceLimitExceeded:
                    self._reserved -= size
                    raise
                self._reserved_by_source[origin] = self._reserved_by_source.get(origin, 0) + size
            self._pending.add(key)
        stored = False
        try:
            direct = self._direct
            wrote_direct = write_chunk_file(
                self._chunks_str, self._tmp_str, chunk_id, data, direct=direct
            )
            if direct and not wrote_direct:
                self._direct = False
                log.info("%s refuses O_DIRECT writes; writing through the page cache", self._root)
            with self._cond:
                try:
                    self._check_open()
                    now = self._clock()
                    index.write(
                        "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                        (key, size, now, now + lease_s, origin, renew_key),
                    )
                except BaseException:
                    unlink_quietly(chunk_file(self._chunks_str, key))
                    raise
                self._used += size
                self._count += 1
                stored = True
        finally:
            with self._cond:
                self._pending.discard(key)
                self._reserved -= size
                if source is not None:
                    left = self._reserved_by_source[origin] - size
                    if left:
                        self._reserved_by_source[origin] = left
                    else:
                        del self._reserved_by_source[origin]
                    if not stored:
                        self._rates.refund(origin, size)
                self._cond.notify_all()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("stored chunk %s (%d bytes)", short_id(chunk_id), size)
        return True

    def source_bytes(self, source: bytes) -> int:
        """Bytes of the chunks on disk that ``source`` stored (expired ones not yet collected included)."""
        with self._cond:
            self._check_open()
            return self._source_bytes_locked(source)

    def _source_bytes_locked(self, source: bytes) -> int:
        rows = self._index.query("SELECT used_bytes FROM sources WHERE source = ?", (source,))
        return int(rows[0][0]) if rows else 0

    def free_bytes(self, source: bytes | None = None) -> int:
        """Bytes a new chunk from ``source`` may still take here: what a SPACE request answers.

        Chunks whose lease ended count as free (a store collects them when it needs the room). From
        the network, the room is also bounded by what is left of the source's share of the quota.

        Args:
            source: The asking network (core.node_id.network_of); None for this machine.

        Returns:
            0 .. quota_bytes.

        Raises:
            StorageError: the store is closed.
        """
        with self._cond:
            self._check_open()
            now = self._clock()
            expired = self._expired_bytes_locked(now)
            free = self._quota - self._used - self._reserved + expired
            cap = self.limits.cap_bytes(self._quota)
            if source is not None and cap < self._quota:
                held = self._source_bytes_locked(source) + self._reserved_by_source.get(source, 0)
                free = min(free, cap - held + self._expired_bytes_locked(now, source))
            return max(0, min(free, self._quota))

    def _expired_bytes_locked(self, now: float, source: bytes | None = None) -> int:
        if source is None:
            rows = self._index.query(
                "SELECT coalesce(sum(size), 0) FROM chunks WHERE lease_expiry <= ?", (now,)
            )
        else:
            rows = self._index.query(
                "SELECT coalesce(sum(size), 0) FROM chunks WHERE lease_expiry <= ? AND source = ?",
                (now, source),
            )
        return int(rows[0][0])

    def _check_source_locked(self, source: bytes, size: int, now: float) -> None:
        """Refuse a chunk that would take ``source`` past its share of the quota."""
        cap = self.limits.cap_bytes(self._quota)
        if cap >= self._quota:
            return  # one network may fill the store: the quota alone decides

        def held() -> int:
            return self._source_bytes_locked(source) + self._reserved_by_source.get(source, 0)

        if held() + size > cap and self._collect_locked(now):
            log.info("collected expired chunks to make room for %s", describe_source(source))
        if held() + size > cap:
            raise SourceLimitExceeded(
                f"{describe_source(source)} holds {held()} bytes here, and {size} more would pass "
                f"its {cap}-byte share of the quota; store elsewhere"
            )

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
        buffers: list[bytearray] = []

        def room(size: int) -> memoryview:
            buffers.append(bytearray(size))
            return memoryview(buffers[0])

        size = self.read_into(chunk_id, room)
        with memoryview(buffers[0]) as view:
            return bytes(view[:size])

    def read_into(self, chunk_id: ChunkId, room: Callable[[int], memoryview]) -> int:
        """`get` into a buffer of the caller's (reused between chunks, with room in front).

        Once the chunk's size is known, ``room(size + 1)`` must return a writable view of at least
        that many bytes (one more than the chunk, to notice a file that grew); the chunk lands at
        its start, hash-checked like `get`'s result. Bytes after it, up to the next DIRECT_ALIGN
        boundary, may be overwritten. A view placed with `room_offset` and that much room is
        filled by the disk directly, with no copy.

        Args:
            chunk_id: The chunk to read.
            room: Lends the buffer, given the bytes needed; called at most once.

        Returns:
            The chunk's size.

        Raises:
            ChunkNotStored, ChunkHashMismatch, StorageError: As for `get`.
            ValueError: ``room`` lent less than asked.
        """
        fd, size = self._open_live(chunk_id)
        try:
            view = room(size + 1)
            if len(view) <= size:
                raise ValueError(f"read_into asked for {size + 1} bytes of room, got {len(view)}")
            try:
                got = read_chunk(fd, view, size + 1)
            except OSError as exc:
                raise self._read_failed(chunk_id, exc) from exc
            self._verify_or_discard(chunk_id, fd, view[:got], size)
        finally:
            os.close(fd)
        return size

    def _open_live(self, chunk_id: ChunkId) -> tuple[int, int]:
        """Open a live chunk's file: (descriptor, size from the index)."""
        key = bytes(chunk_id)
        with self._cond:
            self._check_open()
            rows = self._index.query(_LIVE_SIZE_SQL, (key, self._clock()))
        if not rows:
            raise _not_stored(chunk_id)
        try:
            fd = open_chunk_for_read(chunk_file(self._chunks_str, key), direct=self._direct)
        except FileNotFoundError:
            self._forget_missing(chunk_id)
            raise _not_stored(chunk_id) from None
        except OSError as exc:
            raise self._read_failed(chunk_id, exc) from exc
        return fd, int(rows[0][0])

    def _verify_or_discard(
        self, chunk_id: ChunkId, fd: int, data: bytes | memoryview, size: int
    ) -> None:
        """Check the bytes read; delete a rotten chunk (``fd`` still open pins its inode)."""
        try:
            if len(data) != size:
                raise ChunkHashMismatch(f"{len(data)} bytes where the index says {size}")
            verify_chunk(chunk_id, data)
        except ChunkHashMismatch:
            # Still holding the file open, so its inode cannot be reused by a new copy.
            self._discard_rotten(chunk_id, os.fstat(fd).st_ino)
            raise ChunkHashMismatch(
                f"stored chunk {short_id(chunk_id)} ({size} bytes) no longer matches "
                "its id and was deleted; fetch it from another holder"
            ) from None

    def _read_failed(self, chunk_id: ChunkId, exc: OSError) -> StorageError:
        return StorageError(
            f"cannot read chunk {short_id(chunk_id)} at {self._path_of(chunk_id)}: "
            f"{exc.strerror}; check the disk"
        )

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
            return [bool(self._index.query(_LIVE_ROW_SQL, (bytes(cid), now))) for cid in ids]

    def renew(self, ids: Sequence[ChunkId], *, lease_s: float) -> list[bool]:
        """Extend the leases of live chunks to at least ``lease_s`` seconds from now, whoever stored them.

        For this machine's own duties (a keeper renewing what its own store holds); a request from
        the network goes through `renew_signed` or `renew_unsigned`.

        Args:
            ids: Chunk ids.
            lease_s: Seconds from now (at most MAX_LEASE_S); a longer existing lease is kept.

        Returns:
            One bool per id: whether it is live here (and so was renewed).

        Raises:
            BadOption: ``lease_s`` is not a positive finite number.
            StorageError: The index could not be written.
        """
        lease_s = _check_lease(lease_s)
        return self._renew_where(ids, lambda now: now + lease_s, "", ())

    def renew_signed(
        self, ids: Sequence[ChunkId], *, renew_key: bytes, expiry: float
    ) -> list[bool]:
        """Extend the live chunks stored with ``renew_key`` to at least ``expiry`` (a ``clock`` time).

        The caller has checked the renewal's signature (core.renewal.check_renewal); at most
        MAX_LEASE_S from now is granted, and a longer existing lease is kept.

        Returns:
            One bool per id: whether it is live here with that renewal key (and so was renewed).

        Raises:
            StorageError: The index could not be written.
        """
        key = bytes(renew_key)
        return self._renew_where(
            ids, lambda now: min(expiry, now + MAX_LEASE_S), " AND renew_key = ?", (key,)
        )

    def renew_unsigned(
        self, ids: Sequence[ChunkId], *, lease_s: float, source: bytes
    ) -> list[bool]:
        """Extend the live chunks without a renewal key that ``source`` (a network) stored itself.

        Chunks with a renewal key need `renew_signed`; chunks of unknown source (kept from an index
        of version 1) cannot be renewed over the network at all.

        Returns:
            One bool per id: whether it was renewed.

        Raises:
            BadOption: ``lease_s`` is not a positive finite number.
            StorageError: The index could not be written.
        """
        lease_s = _check_lease(lease_s)
        if source == LOCAL_SOURCE:
            return [False] * len(ids)
        return self._renew_where(
            ids,
            lambda now: now + lease_s,
            " AND renew_key IS NULL AND source = ?",
            (bytes(source),),
        )

    def _renew_where(
        self,
        ids: Sequence[ChunkId],
        expiry_of: Callable[[float], float],
        condition: str,
        params: tuple[bytes, ...],
    ) -> list[bool]:
        """Extend the live ``ids`` that also meet ``condition`` to at least ``expiry_of(now)``."""
        sql = _RENEW_SQL + condition
        with self._cond:
            self._check_open()
            now = self._clock()
            expiry = expiry_of(now)
            with self._index.transaction() as db:
                return [
                    db.execute(sql, (expiry, bytes(cid), now, *params)).rowcount == 1 for cid in ids
                ]

    def renew_key(self, chunk_id: ChunkId) -> bytes | None:
        """The renewal key a live chunk was stored with (None: none, or not live here).

        Repair sends it with the copies it makes, so the file's keeper can renew those too.
        """
        with self._cond:
            self._check_open()
            rows = self._index.query(
                "SELECT renew_key FROM chunks WHERE id = ? AND lease_expiry > ?",
                (bytes(chunk_id), self._clock()),
            )
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

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
            rows = self._index.query(
                "SELECT id FROM chunks WHERE lease_expiry > ? ORDER BY id", (self._clock(),)
            )
        return [ChunkId(row[0]) for row in rows]

    def leases(self, ids: Sequence[ChunkId]) -> list[int]:
        """Whole seconds left on the lease of each of ``ids``, rounded up; 0 if not live here.

        Rounding up keeps 0 for "not held": a chunk with half a second left reads 1.

        Args:
            ids: Chunk ids, in any order, repeats allowed.

        Returns:
            One count per id, in order.
        """
        with self._cond:
            self._check_open()
            now = self._clock()
            expiries = [self._index.query(_LIVE_ROW_SQL, (bytes(cid), now)) for cid in ids]
        return [math.ceil(float(rows[0][0]) - now) if rows else 0 for rows in expiries]

    def lease_expiry(self, chunk_id: ChunkId) -> float | None:
        """When a live chunk's lease ends (a ``clock`` time), or None if it is not live here."""
        with self._cond:
            self._check_open()
            rows = self._index.query(_LIVE_ROW_SQL, (bytes(chunk_id), self._clock()))
        return float(rows[0][0]) if rows else None

    def close(self) -> None:
        """Close the index and release the directory lock; calling it again does nothing."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            try:
                self._index.close()
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
        return chunk_path(self._chunks_dir, chunk_id)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"chunk store {self._root} is closed; open a new ChunkStore")

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
        with self._index.transaction() as db:
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
            unlink_quietly(self._path_of(ChunkId(cid)))
        return len(expired)

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
                unlink_quietly(path)
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
        with self._index.transaction() as db:
            deleted = db.execute("DELETE FROM chunks WHERE id = ?", (bytes(chunk_id),)).rowcount
            self._used, self._count = db.execute(
                "SELECT used_bytes, chunk_count FROM usage"
            ).fetchone()
        return deleted == 1


def _check_lease(lease_s: float) -> float:
    """``lease_s`` capped at MAX_LEASE_S: the longest lease this holder grants, whatever was asked."""
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float):
        raise BadOption(f"lease {lease_s!r} is not a number of seconds; pass e.g. lease_s=86400")
    if not (math.isfinite(lease_s) and lease_s > 0):
        raise BadOption(f"lease {lease_s!r} s is not positive and finite; pass e.g. lease_s=86400")
    return min(float(lease_s), MAX_LEASE_S)


def _not_stored(chunk_id: ChunkId) -> ChunkNotStored:
    return ChunkNotStored(
        f"chunk {short_id(chunk_id)} is not stored here (or its lease expired); ask another holder"
    )
