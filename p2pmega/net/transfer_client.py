"""TransferClient: talks to holders' TransferServers over a pool of pipelined connections.

This module only moves bytes and maps typed Error replies to exceptions; the protocol rules live
in p2pmega.core.wire.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from p2pmega import errors
from p2pmega.core.chunking import ChunkId, short_id, verify_chunk
from p2pmega.core.ids import Address
from p2pmega.core.wire import (
    CONNECTION_REQUEST_ID,
    MAX_BATCH_IDS,
    MAX_LEASE_S,
    NEED_DATA,
    ChunkData,
    ClientDeadlines,
    ConnectionClosed,
    Error,
    ErrorCode,
    FetchRequest,
    HasReply,
    HasRequest,
    RenewReply,
    RenewRequest,
    Reply,
    Request,
    Role,
    StoreOK,
    StoreRequest,
    TransferConnection,
)
from p2pmega.core.words import counted
from p2pmega.net.buffers import BufferPool, recycle
from p2pmega.net.progress import unacknowledged_bytes
from p2pmega.net.service import Service

# Both sides log as p2pmega.net.transfer, as they did when they were one module.
log = logging.getLogger("p2pmega.net.transfer")

_T = TypeVar("_T")
ChunkBytes = bytes | memoryview

# The client closes pooled connections idle this long: before the holder's 60 s idle timeout, and
# so that a client that talked to many holders does not keep a receive buffer for each of them.
_POOL_IDLE_S: Final = 20.0
_POOL_SWEEP_INTERVAL_S: Final = 5.0
# Receive buffer a connection keeps between frames; a chunk arrives in a buffer of the client's
# BufferPool, which fetch_into takes back once its consumer is done with the chunk.
_KEEP_BUFFER_BYTES: Final = 64 << 10
# A connection with requests pending checks its progress this many times per idle timeout, so a
# stalled one fails between 1 and 1.25 idle timeouts after its last byte moved.
_PROGRESS_CHECKS_PER_TIMEOUT: Final = 4


def _lease_seconds(lease_s: float) -> int:
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    return min(math.ceil(lease_s), MAX_LEASE_S)


def _where(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


class _PeerConnection(asyncio.BufferedProtocol):
    """One pooled client connection: pipelined requests, replies matched by request id.

    A BufferedProtocol rather than a StreamReader: the socket receives straight into core.wire's
    buffer, which saves three copies of every chunk (measured with bench/transfer.py).
    """

    def __init__(self, addr: Address, buffers: BufferPool, idle_timeout_s: float) -> None:
        self.addr = addr
        # Progress watchdog: while requests are pending, the bytes the holder acknowledged plus the
        # bytes it sent us must grow at least once every idle_timeout_s, however large the request.
        self.deadlines = ClientDeadlines(
            idle_timeout_s, checks_per_timeout=_PROGRESS_CHECKS_PER_TIMEOUT
        )
        self.conn = TransferConnection(
            role=Role.CLIENT,
            keep_buffer_bytes=_KEEP_BUFFER_BYTES,
            allocate=buffers.take,
            deadlines=self.deadlines,
        )
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.closed = False
        self.answered = 0  # replies received so far; a reused connection may have gone stale
        self._loop = asyncio.get_running_loop()
        self.last_used = self._loop.time()
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._written = 0
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - TCP gives a Transport
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if not self.closed:
            self.deadlines.received(nbytes, self._loop.time())
            self.conn.buffer_updated(nbytes)
            self._drain_events()

    def eof_received(self) -> bool:
        if not self.closed:
            self.conn.receive_data(b"")
            self._drain_events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f" ({exc})" if exc else ""
        self._fail(errors.PeerUnreachable(f"connection to {_where(self.addr)} was lost{reason}"))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _drain_events(self) -> None:
        try:
            while (event := self.conn.next_event()) is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    raise errors.PeerUnreachable(f"peer {_where(self.addr)} closed the connection")
                if isinstance(event, Error) and event.request_id == CONNECTION_REQUEST_ID:
                    raise errors.PeerUnreachable(
                        f"peer {_where(self.addr)} dropped the connection: "
                        f"{event.code.name} {event.message}"
                    )
                if isinstance(event, StoreRequest | FetchRequest | HasRequest | RenewRequest):
                    raise AssertionError("a client connection yields only replies")
                self.answered += 1
                future = self.pending.pop(event.request_id, None)
                if future is not None and not future.done():
                    future.set_result(event)
        except errors.PeerUnreachable as exc:
            self._fail(exc)
        except errors.RemoteProtocolError as exc:
            log.debug("dropping %s: %s", _where(self.addr), exc)
            self._fail(
                errors.PeerUnreachable(
                    f"peer {_where(self.addr)} broke the transfer protocol; try another holder"
                )
            )

    def _acked(self) -> int:
        """Bytes written that the holder has acknowledged, so far."""
        if self._transport is None:
            return 0
        return self._written - unacknowledged_bytes(self._transport)

    def _rearm(self) -> None:
        deadline = self.conn.next_deadline()
        if deadline is not None and self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._check_progress)

    def _check_progress(self) -> None:
        """Fail every pending request if nothing moved for idle_timeout_s (ClientDeadlines)."""
        self._watchdog = None
        if self.closed:
            return
        now = self._loop.time()
        self.deadlines.acknowledged(self._acked(), now)
        verdict = self.conn.handle_timer(now)
        if verdict is not None:
            self._fail(
                errors.TransferTimeout(
                    f"peer {_where(self.addr)} did not answer: {verdict.message}; "
                    "try another holder"
                )
            )
            return
        self._rearm()

    def _fail(self, failure: errors.NetworkError) -> None:
        self.closed = True
        self._writable.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._transport is not None:
            self._transport.abort()
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(failure)

    async def request(self, event: Callable[[int], Request]) -> Reply:
        """Send one request built for a fresh request id and wait for its reply.

        No deadline for the whole request: it fails only when the connection moves no data for
        ``idle_timeout_s`` (see ClientDeadlines), so a 2 MiB store may take minutes on a slow uplink.

        Raises:
            errors.PeerUnreachable: the connection is or becomes unusable.
            errors.TransferTimeout: the connection moved no data for ``idle_timeout_s``.
        """
        if self.closed or self._transport is None:
            raise errors.PeerUnreachable(f"connection to {_where(self.addr)} is closed")
        request_id = self.conn.new_request_id()
        buffers = self.conn.send(event(request_id))
        loop = self._loop
        future: asyncio.Future[Reply] = loop.create_future()
        self.last_used = now = loop.time()
        first = not self.pending
        if first:
            # Time spent idle in the pool is not a stall.
            self.deadlines.acknowledged(self._acked(), now)
        self.deadlines.request_sent(now, first=first)
        self.pending[request_id] = future
        self._rearm()
        try:
            # Separate writes: the transport sends the chunk body straight from our buffer
            # instead of first joining it to the header.
            for buffer in buffers:
                self._written += len(buffer)
                self._transport.write(buffer)
            await self._writable.wait()
            return await future
        finally:
            self.pending.pop(request_id, None)
            self.last_used = loop.time()

    def drop(self) -> None:
        """Close now; requests still waiting fail with PeerUnreachable."""
        self._fail(errors.PeerUnreachable(f"connection to {_where(self.addr)} was closed locally"))

    async def close(self) -> None:
        self.drop()


class TransferClient(Service):
    """Talks to holders' TransferServers, reusing up to ``max_connections_per_peer`` connections.

    Every fetched chunk is hash-checked (in a thread) before it is returned. ``timeout_s`` is an
    idle timeout: a request fails once its connection moved no data for that long, whatever the
    size of the request (a 2 MiB store takes 17 s alone at 1 Mbit/s). Connecting has its own
    ``connect_timeout_s`` (default: ``timeout_s``).
    """

    def __init__(
        self,
        *,
        local_host: str | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float | None = None,
        max_connections_per_peer: int = 4,
    ) -> None:
        if connect_timeout_s is None:
            connect_timeout_s = timeout_s
        if timeout_s <= 0 or connect_timeout_s <= 0 or max_connections_per_peer < 1:
            raise ValueError("timeouts must be positive and max_connections_per_peer at least 1")
        self.local_host = local_host
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections_per_peer = max_connections_per_peer
        self._pool: dict[Address, list[_PeerConnection]] = {}
        self._opening: dict[Address, asyncio.Lock] = {}
        self._closed = False
        self._next_sweep = 0.0
        self._buffers = BufferPool()

    async def start(self) -> None:
        """Nothing to do: connections open on first use."""

    async def stop(self) -> None:
        """The `Service` name for `close`."""
        await self.close()

    async def close(self) -> None:
        """Close every pooled connection; the client cannot be used afterwards."""
        self._closed = True
        pool, self._pool = self._pool, {}
        for conns in pool.values():
            for peer_conn in conns:
                await peer_conn.close()

    def _sweep(self) -> None:
        """Drop pooled connections idle for _POOL_IDLE_S, at most every _POOL_SWEEP_INTERVAL_S."""
        now = asyncio.get_running_loop().time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _POOL_SWEEP_INTERVAL_S
        for addr in list(self._pool):
            keep = []
            for peer_conn in self._pool[addr]:
                idle_s = now - peer_conn.last_used
                if not peer_conn.closed and not peer_conn.pending and idle_s > _POOL_IDLE_S:
                    peer_conn.drop()
                if not peer_conn.closed:
                    keep.append(peer_conn)
            if keep:
                self._pool[addr] = keep
                continue
            del self._pool[addr]
            lock = self._opening.get(addr)
            if lock is not None and not lock.locked():
                del self._opening[addr]

    def _idle_or_none(self, addr: Address) -> _PeerConnection | None:
        conns = [c for c in self._pool.get(addr, []) if not c.closed]
        self._pool[addr] = conns
        best = min(conns, key=lambda c: len(c.pending), default=None)
        if best is not None and (not best.pending or len(conns) >= self.max_connections_per_peer):
            return best
        return None

    async def _connection(self, addr: Address, *, fresh: bool = False) -> _PeerConnection:
        if self._closed:
            raise errors.PeerUnreachable("the transfer client is closed")
        self._sweep()
        found = None if fresh else self._idle_or_none(addr)
        if found is not None:
            return found
        lock = self._opening.setdefault(addr, asyncio.Lock())
        try:
            # One deadline for waiting on another task's connect and for our own: a holder that
            # does not accept costs each request connect_timeout_s, not a multiple of it.
            async with asyncio.timeout(self.connect_timeout_s), lock:
                found = None if fresh else self._idle_or_none(addr)
                if found is not None:
                    return found
                peer_conn = await self._open(addr)
        except TimeoutError:
            raise errors.TransferTimeout(
                f"cannot connect to {_where(addr)} within {self.connect_timeout_s:g}s; "
                "try another holder"
            ) from None
        self._pool.setdefault(addr, []).append(peer_conn)
        return peer_conn

    async def _open(self, addr: Address) -> _PeerConnection:
        local = (self.local_host, 0) if self.local_host else None
        loop = asyncio.get_running_loop()
        try:
            _, peer_conn = await loop.create_connection(
                functools.partial(_PeerConnection, addr, self._buffers, self.timeout_s),
                addr[0],
                addr[1],
                local_addr=local,
            )
        except ConnectionRefusedError as exc:
            raise errors.PeerRefused(
                f"cannot connect to {_where(addr)}: nothing listens there; try another holder"
            ) from exc
        except OSError as exc:
            raise errors.PeerUnreachable(
                f"cannot connect to {_where(addr)} ({exc.strerror or exc}); try another holder"
            ) from exc
        return peer_conn

    async def _request(
        self, addr: Address, event: Callable[[int], Request], chunk_id: bytes = b""
    ) -> Reply:
        # No deadline around the request: its connection fails it (and every other request on
        # it, and is not reused) once no data moved for timeout_s (_PeerConnection.request).
        peer_conn = await self._connection(addr)
        reused = peer_conn.answered > 0
        try:
            reply = await peer_conn.request(event)
        except errors.PeerUnreachable:
            if not reused:
                raise
            # The holder may have closed this pooled connection for idleness just as we
            # reused it. Every request is idempotent, so retry once on a fresh one.
            log.debug("pooled connection to %s was dropped; reconnecting", _where(addr))
            peer_conn = await self._connection(addr, fresh=True)
            reply = await peer_conn.request(event)
        if isinstance(reply, Error):
            _raise_for(reply, addr, chunk_id)
        return reply

    async def store(self, addr: Address, chunk_id: ChunkId, data: bytes, lease_s: float) -> bool:
        """Ask ``addr`` to store ``data`` under ``chunk_id`` for at least ``lease_s`` seconds.

        Returns:
            True if the chunk was newly stored, False if the peer already held it.

        Raises:
            errors.QuotaExceeded: the peer's quota is full.
            errors.ChunkHashMismatch: the peer found ``data`` does not hash to ``chunk_id``.
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
            ValueError: ``data`` exceeds MAX_SEALED_CHUNK_BYTES or ``lease_s`` is not positive.
        """
        lease = _lease_seconds(lease_s)
        reply = await self._request(
            addr, lambda rid: StoreRequest(rid, chunk_id, lease, data), chunk_id
        )
        if not isinstance(reply, StoreOK):
            raise AssertionError("core.wire matches STORE with STORE_OK")
        return reply.newly_stored

    async def fetch(self, addr: Address, chunk_id: ChunkId) -> ChunkBytes:
        """Fetch the chunk ``chunk_id`` from ``addr`` and verify its hash.

        A large chunk comes as a read-only view of the buffer it was received into (no copy).

        Raises:
            errors.ChunkNotStored: the peer does not have it.
            errors.ChunkHashMismatch: the peer sent bytes that do not hash to ``chunk_id``.
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
        """
        return await self._fetch(addr, chunk_id, _as_is, reuse=False)

    async def fetch_into(
        self, addr: Address, chunk_id: ChunkId, consume: Callable[[ChunkBytes], _T]
    ) -> _T:
        """`fetch`, then ``consume(data)`` in the worker thread that verified it; return its result.

        One thread hop per chunk for hashing and whatever the caller does with the bytes next
        (fetch decrypts and writes them). ``consume`` runs only on bytes that match ``chunk_id``;
        what it raises propagates unchanged. ``data`` is valid only while ``consume`` runs: its
        buffer receives a later chunk (keep a copy, never the view).

        Raises:
            As `fetch`, and whatever ``consume`` raises.
        """
        return await self._fetch(addr, chunk_id, consume, reuse=True)

    async def _fetch(
        self,
        addr: Address,
        chunk_id: ChunkId,
        consume: Callable[[ChunkBytes], _T],
        *,
        reuse: bool,
    ) -> _T:
        reply = await self._request(addr, lambda rid: FetchRequest(rid, chunk_id), chunk_id)
        if not isinstance(reply, ChunkData):
            raise AssertionError("core.wire matches FETCH with CHUNK_DATA")
        try:
            return await asyncio.to_thread(
                _verified, chunk_id, reply.data, consume, self._buffers if reuse else None
            )
        except errors.ChunkHashMismatch:
            log.debug(
                "peer %s sent bad bytes for chunk %s; dropping its connections",
                _where(addr),
                short_id(chunk_id),
            )
            for peer_conn in self._pool.pop(addr, []):
                await peer_conn.close()
            raise

    async def fetch_any(
        self, addrs: Sequence[Address], chunk_id: ChunkId
    ) -> tuple[ChunkBytes, Address]:
        """Fetch ``chunk_id`` from the first holder in ``addrs`` that serves it intact.

        Returns:
            The verified bytes and the address that served them.

        Raises:
            errors.ChunkUnavailable: every holder failed (names how many were tried and why).
        """
        return await self._fetch_any(addrs, chunk_id, _as_is, reuse=False)

    async def fetch_any_into(
        self, addrs: Sequence[Address], chunk_id: ChunkId, consume: Callable[[ChunkBytes], _T]
    ) -> tuple[_T, Address]:
        """`fetch_any` with `fetch_into`'s ``consume``: its result and the address that served.

        Raises:
            errors.ChunkUnavailable: every holder failed (names how many were tried and why).
            Whatever else ``consume`` raises (the next holder is not tried for it); it should
            raise none of the errors that mean a bad holder (hash mismatch, not stored, network).
        """
        return await self._fetch_any(addrs, chunk_id, consume, reuse=True)

    async def _fetch_any(
        self,
        addrs: Sequence[Address],
        chunk_id: ChunkId,
        consume: Callable[[ChunkBytes], _T],
        *,
        reuse: bool,
    ) -> tuple[_T, Address]:
        reasons: Counter[str] = Counter()
        for addr in addrs:
            try:
                return await self._fetch(addr, chunk_id, consume, reuse=reuse), addr
            except errors.ChunkNotStored:
                reasons["not found"] += 1
            except errors.ChunkHashMismatch:
                reasons["bad hash"] += 1
            except errors.TransferTimeout:
                reasons["timeout"] += 1
            except errors.NetworkError:
                reasons["unreachable"] += 1
            log.debug(
                "chunk %s not served by %s; trying the next holder",
                short_id(chunk_id),
                _where(addr),
            )
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        raise errors.ChunkUnavailable(
            f"no holder served chunk {short_id(chunk_id)} (tried {counted(len(addrs), 'holder')}"
            f"{': ' + why if why else ''}); retry later or ask more peers"
        )

    async def has(self, addr: Address, ids: Sequence[ChunkId]) -> list[bool]:
        """Which of ``ids`` does ``addr`` hold? Batches larger than MAX_BATCH_IDS are split.

        Raises:
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
        """
        flags: list[bool] = []
        for start in range(0, len(ids), MAX_BATCH_IDS):
            batch = tuple(ids[start : start + MAX_BATCH_IDS])
            reply = await self._request(addr, functools.partial(HasRequest, ids=batch))
            if not isinstance(reply, HasReply):
                raise AssertionError("core.wire matches HAS with HAS_REPLY")
            flags.extend(reply.flags)
        return flags

    async def renew(self, addr: Address, ids: Sequence[ChunkId], lease_s: float) -> list[bool]:
        """Extend the leases of ``ids`` at ``addr``; True for each id the peer holds and renewed.

        Raises:
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
            ValueError: ``lease_s`` is not positive.
        """
        lease = _lease_seconds(lease_s)
        flags: list[bool] = []
        for start in range(0, len(ids), MAX_BATCH_IDS):
            batch = tuple(ids[start : start + MAX_BATCH_IDS])
            reply = await self._request(
                addr, functools.partial(RenewRequest, ids=batch, lease_s=lease)
            )
            if not isinstance(reply, RenewReply):
                raise AssertionError("core.wire matches RENEW with RENEW_REPLY")
            flags.extend(reply.flags)
        return flags


def _as_is(data: ChunkBytes) -> ChunkBytes:
    return data


def _verified(
    chunk_id: ChunkId,
    data: ChunkBytes,
    consume: Callable[[ChunkBytes], _T],
    buffers: BufferPool | None,
) -> _T:
    """Hash-check ``data``, hand it to ``consume``, then give its buffer to ``buffers`` (if any)."""
    try:
        verify_chunk(chunk_id, data)
        return consume(data)
    finally:
        if buffers is not None:
            recycle(data, buffers)


def _raise_for(reply: Error, addr: Address, chunk_id: bytes) -> None:
    """Turn a typed Error reply into the matching exception."""
    what = f"chunk {short_id(chunk_id)}" if chunk_id else "request"
    where = _where(addr)
    if reply.code is ErrorCode.NOT_FOUND:
        raise errors.ChunkNotStored(f"peer {where} does not hold {what}; try another holder")
    if reply.code is ErrorCode.QUOTA_FULL:
        raise errors.QuotaExceeded(
            f"peer {where} refused {what}: its quota is full; pick another holder"
        )
    if reply.code is ErrorCode.BAD_HASH:
        raise errors.ChunkHashMismatch(f"peer {where} says the bytes of {what} do not match its id")
    raise errors.PeerUnreachable(f"peer {where} refused {what}: {reply.code.name} {reply.message}")
