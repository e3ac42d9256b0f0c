"""Asyncio pump around core.wire: TransferServer serves a ChunkStore; TransferClient pools links.

This module only moves bytes and maps errors; the protocol rules live in p2pmega.core.wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

from p2pmega import errors
from p2pmega.core.chunking import ChunkId, short_id, verify_chunk
from p2pmega.core.wire import (
    CONNECTION_REQUEST_ID,
    MAX_BATCH_IDS,
    MAX_FRAME_BYTES,
    MAX_LEASE_S,
    NEED_DATA,
    ChunkData,
    ConnectionClosed,
    Error,
    ErrorCode,
    FetchRequest,
    HasReply,
    HasRequest,
    ProtocolViolation,
    RenewReply,
    RenewRequest,
    Reply,
    Request,
    Role,
    StoreOK,
    StoreRequest,
    TransferConnection,
)

if TYPE_CHECKING:
    from p2pmega.storage import ChunkStore

log = logging.getLogger(__name__)

Address = tuple[str, int]

# One read takes up to 1 MiB: a whole default chunk per system call on loopback.
_READ_BYTES: Final = 1 << 20
# The server's StreamReader pauses the socket past 2 x this: what a stalled connection may buffer
# on top of the one partial frame held by core.wire.
_SERVER_STREAM_LIMIT: Final = 256 << 10
# How long stop() waits for a refused peer to take its final Error frame before aborting.
_CLOSE_GRACE_S: Final = 1.0
# The client closes pooled connections idle this long: before the holder's 60 s idle timeout, and
# so that a client that talked to many holders does not keep a receive buffer for each of them.
_POOL_IDLE_S: Final = 20.0
_POOL_SWEEP_INTERVAL_S: Final = 5.0


@dataclass(frozen=True)
class ServerLimits:
    """Hard limits of a TransferServer; the reason for each default is in docs/PROTOCOL.md."""

    max_connections: int = 128
    max_connections_per_ip: int = 8
    max_inflight_per_connection: int = 8
    max_inflight_per_ip: int = 16
    max_inflight_total: int = 32
    idle_timeout_s: float = 60.0
    request_timeout_s: float = 30.0
    max_frame_bytes: int = MAX_FRAME_BYTES

    def __post_init__(self) -> None:
        for name in (
            "max_connections",
            "max_connections_per_ip",
            "max_inflight_per_connection",
            "max_inflight_per_ip",
            "max_inflight_total",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be at least 1")
        if self.idle_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("ServerLimits timeouts must be positive")


def _write_all(writer: asyncio.StreamWriter, buffers: list[bytes]) -> None:
    """Write a frame's buffers one by one; writelines() would first join the body to the header."""
    for buffer in buffers:
        writer.write(buffer)


def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Drop a connection now, discarding unsent bytes (the peer is not reading or is gone)."""
    writer.transport.abort()


class TransferServer:
    """Serves a ChunkStore over TCP on ``host:port`` (the same number as the node's DHT UDP port).

    Every request is answered or refused with a typed Error; every protocol violation gets one
    Error frame and a closed connection. Disk work runs in threads, off the event loop.
    """

    def __init__(
        self,
        store: ChunkStore,
        *,
        host: str,
        port: int,
        on_stored: Callable[[ChunkId], None] | None = None,
        limits: ServerLimits = ServerLimits(),
    ) -> None:
        self._store = store
        self._host = host
        self._requested_port = port
        self._on_stored = on_stored
        self.limits = limits
        self.port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._per_ip: Counter[str] = Counter()
        self._inflight_total = asyncio.Semaphore(limits.max_inflight_total)
        # One address cannot hold every global slot (e.g. with slow readers on several sockets).
        self._inflight_per_ip: dict[str, asyncio.Semaphore] = {}
        # Store writes run in threads and are shielded from cancellation; stop() waits for them so
        # that no chunk acknowledged (or about to be) is lost half-written.
        self._writes: set[asyncio.Future[bool]] = set()
        self._connections: dict[asyncio.Task[None], TransferConnection] = {}
        self._stopping = False

    @property
    def connections(self) -> int:
        """How many connections are being served right now."""
        return len(self._handlers)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet parsed, summed over all connections (for memory checks)."""
        return sum(conn.buffered_bytes for conn in self._connections.values())

    def peer_hosts(self) -> list[str]:
        """The source address of every connection being served, sorted (one entry per connection)."""
        return sorted(self._per_ip.elements())

    async def start(self) -> None:
        """Listen on ``host:port``; ``.port`` holds the real port afterwards.

        Raises:
            OSError: the address cannot be bound. Left unconverted on purpose: node.py retries
                another port when the TCP side of a UDP-chosen port number is taken.
        """
        self._server = await asyncio.start_server(
            self._on_connection,
            host=self._host,
            port=self._requested_port,
            limit=_SERVER_STREAM_LIMIT,
            backlog=1024,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.debug("transfer server listening on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening, close every connection and wait for in-flight store writes."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        limits = self.limits
        if (
            len(self._handlers) >= limits.max_connections
            or self._per_ip[ip] >= limits.max_connections_per_ip
        ):
            log.debug("refused BUSY connection from %s: %d open", ip, len(self._handlers))
            refusal = TransferConnection(role=Role.SERVER)
            writer.writelines(
                refusal.send(
                    Error(
                        CONNECTION_REQUEST_ID, ErrorCode.BUSY, "too many connections; retry later"
                    )
                )
            )
            # close() flushes the small Error frame in the background; a peer that never reads
            # cannot hold more than this one frame of ours.
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - start_server runs every callback in a task
        self._handlers.add(task)
        self._per_ip[ip] += 1
        if ip not in self._inflight_per_ip:
            self._inflight_per_ip[ip] = asyncio.Semaphore(limits.max_inflight_per_ip)
        conn = TransferConnection(role=Role.SERVER, max_frame_bytes=limits.max_frame_bytes)
        self._connections[task] = conn
        try:
            await self._serve(conn, reader, writer, ip)
        except asyncio.CancelledError:
            # stop() cancels handlers; asyncio's start_server callback would log a cancelled
            # handler task as an error, so a shutdown ends the handler normally instead.
            if not self._stopping:
                raise
        finally:
            self._handlers.discard(task)
            del self._connections[task]
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]
                del self._inflight_per_ip[ip]

    async def _serve(
        self,
        conn: TransferConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ip: str,
    ) -> None:
        limits = self.limits
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(limits.max_inflight_per_connection)
        answers: set[asyncio.Task[None]] = set()
        frame_deadline: float | None = None
        graceful = False
        try:
            while True:
                # A frame must arrive whole within the request timeout (no slowloris); between
                # frames the idle timeout applies.
                if conn.receiving_frame:
                    if frame_deadline is None:
                        frame_deadline = loop.time() + limits.request_timeout_s
                    timeout = max(frame_deadline - loop.time(), 0.0)
                else:
                    frame_deadline = None
                    timeout = limits.idle_timeout_s
                try:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(_READ_BYTES)
                except TimeoutError:
                    if conn.receiving_frame:
                        log.debug(
                            "closing %s: frame not completed in %.1fs", ip, limits.request_timeout_s
                        )
                        return
                    if answers:
                        continue
                    log.debug("closing %s: idle for %.1fs", ip, limits.idle_timeout_s)
                    graceful = True
                    return
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, ConnectionClosed):
                        graceful = True
                        if answers:
                            await asyncio.wait(answers)
                        return
                    if not isinstance(
                        event, StoreRequest | FetchRequest | HasRequest | RenewRequest
                    ):
                        raise AssertionError("a server connection yields only requests")
                    # Backpressure: with every slot taken we stop reading, so the peer's own TCP
                    # window fills up instead of our memory.
                    ip_slots = self._inflight_per_ip[ip]
                    await slots.acquire()
                    try:
                        await ip_slots.acquire()
                        try:
                            await self._inflight_total.acquire()
                        except BaseException:
                            ip_slots.release()
                            raise
                    except BaseException:
                        slots.release()
                        raise
                    answer = asyncio.create_task(self._answer(conn, writer, event, ip))
                    answers.add(answer)
                    answer.add_done_callback(answers.discard)
                    answer.add_done_callback(functools.partial(self._release, slots, ip_slots))
        except ProtocolViolation as exc:
            log.debug("refused %s from %s: %s", exc.code.name, ip, exc)
            if not writer.is_closing():
                _write_all(writer, conn.send(Error(exc.request_id, exc.code, str(exc))))
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(_CLOSE_GRACE_S):
                        await writer.drain()
            graceful = True
        except OSError as exc:
            log.debug("connection from %s failed: %s", ip, exc)
        finally:
            for answer in answers:
                answer.cancel()
            if answers:
                await asyncio.gather(*answers, return_exceptions=True)
            if graceful and not writer.is_closing():
                writer.close()
            else:
                _close_writer(writer)

    def _release(
        self, slots: asyncio.Semaphore, ip_slots: asyncio.Semaphore, _answer: asyncio.Task[None]
    ) -> None:
        slots.release()
        ip_slots.release()
        self._inflight_total.release()

    async def _answer(
        self, conn: TransferConnection, writer: asyncio.StreamWriter, event: Request, ip: str
    ) -> None:
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                reply = await self._reply_to(event, ip)
                if writer.is_closing() or conn.failed:
                    return
                _write_all(writer, conn.send(reply))
                await writer.drain()
        except TimeoutError:
            log.debug(
                "closing %s: reply %d not taken in %.1fs",
                ip,
                event.request_id,
                self.limits.request_timeout_s,
            )
            _close_writer(writer)
        except OSError as exc:
            log.debug("closing %s: %s", ip, exc)
            _close_writer(writer)

    def _refuse(self, event: Request, ip: str, code: ErrorCode, message: str) -> Error:
        log.debug("refused %s %d from %s: %s", code.name, event.request_id, ip, message)
        return Error(event.request_id, code, message)

    async def _reply_to(self, event: Request, ip: str) -> Reply:
        store = self._store
        try:
            if isinstance(event, StoreRequest):
                write = asyncio.ensure_future(
                    asyncio.to_thread(store.put, event.chunk_id, event.data, lease_s=event.lease_s)
                )
                self._writes.add(write)
                write.add_done_callback(self._writes.discard)
                newly = await asyncio.shield(write)
                if newly and self._on_stored is not None:
                    try:
                        self._on_stored(event.chunk_id)
                    except Exception:
                        log.exception(
                            "on_stored callback failed for chunk %s", short_id(event.chunk_id)
                        )
                return StoreOK(event.request_id, newly)
            if isinstance(event, FetchRequest):
                data = await asyncio.to_thread(store.get, event.chunk_id)
                return ChunkData(event.request_id, event.chunk_id, data)
            if isinstance(event, HasRequest):
                flags = await asyncio.to_thread(store.has_many, list(event.ids))
                return HasReply(event.request_id, tuple(flags))
            renewed = await asyncio.to_thread(store.renew, list(event.ids), lease_s=event.lease_s)
            return RenewReply(event.request_id, tuple(renewed))
        except errors.ChunkNotStored:
            return self._refuse(event, ip, ErrorCode.NOT_FOUND, "chunk not stored here")
        except errors.ChunkHashMismatch:
            if isinstance(event, StoreRequest):
                return self._refuse(
                    event, ip, ErrorCode.BAD_HASH, "data does not hash to the chunk id"
                )
            # ChunkStore.get found the file rotten and dropped it: we no longer hold the chunk.
            return self._refuse(
                event, ip, ErrorCode.NOT_FOUND, "chunk was corrupt on disk and dropped"
            )
        except errors.QuotaExceeded:
            return self._refuse(event, ip, ErrorCode.QUOTA_FULL, "store quota is full")
        except errors.UsageError as exc:
            return self._refuse(event, ip, ErrorCode.BAD_REQUEST, f"refused: {type(exc).__name__}")
        except errors.StorageError as exc:
            return self._refuse(
                event, ip, ErrorCode.INTERNAL, f"store failed: {type(exc).__name__}"
            )
        except OSError as exc:
            return self._refuse(
                event, ip, ErrorCode.INTERNAL, f"disk error: {exc.strerror or type(exc).__name__}"
            )
        except Exception:
            # A bug in the store must not leave the peer waiting for its timeout.
            log.exception("store raised unexpectedly on request %d from %s", event.request_id, ip)
            return Error(event.request_id, ErrorCode.INTERNAL, "internal error")


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

    def __init__(self, addr: Address) -> None:
        self.addr = addr
        self.conn = TransferConnection(role=Role.CLIENT)
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.closed = False
        self.answered = 0  # replies received so far; a reused connection may have gone stale
        self.last_used = asyncio.get_running_loop().time()
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - TCP gives a Transport
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if not self.closed:
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

    def _fail(self, failure: errors.PeerUnreachable) -> None:
        self.closed = True
        self._writable.set()
        if self._transport is not None:
            self._transport.abort()
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(failure)

    async def request(self, event: Callable[[int], Request]) -> Reply:
        """Send one request built for a fresh request id and wait for its reply.

        Raises:
            errors.PeerUnreachable: the connection is or becomes unusable.
        """
        if self.closed or self._transport is None:
            raise errors.PeerUnreachable(f"connection to {_where(self.addr)} is closed")
        request_id = self.conn.new_request_id()
        buffers = self.conn.send(event(request_id))
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        loop = asyncio.get_running_loop()
        self.last_used = loop.time()
        try:
            # Separate writes: the transport sends the chunk body straight from our buffer
            # instead of first joining it to the header.
            for buffer in buffers:
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


class TransferClient:
    """Talks to holders' TransferServers, reusing up to ``max_connections_per_peer`` connections.

    Every fetched chunk is hash-checked (in a thread) before it is returned.
    """

    def __init__(
        self,
        *,
        local_host: str | None = None,
        timeout_s: float = 10.0,
        max_connections_per_peer: int = 4,
    ) -> None:
        if timeout_s <= 0 or max_connections_per_peer < 1:
            raise ValueError("timeout_s must be positive and max_connections_per_peer at least 1")
        self.local_host = local_host
        self.timeout_s = timeout_s
        self.max_connections_per_peer = max_connections_per_peer
        self._pool: dict[Address, list[_PeerConnection]] = {}
        self._opening: dict[Address, asyncio.Lock] = {}
        self._closed = False
        self._next_sweep = 0.0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
        async with lock:
            found = None if fresh else self._idle_or_none(addr)
            if found is not None:
                return found
            local = (self.local_host, 0) if self.local_host else None
            loop = asyncio.get_running_loop()
            try:
                _, peer_conn = await loop.create_connection(
                    functools.partial(_PeerConnection, addr), addr[0], addr[1], local_addr=local
                )
            except OSError as exc:
                raise errors.PeerUnreachable(
                    f"cannot connect to {_where(addr)} ({exc.strerror or exc}); try another holder"
                ) from exc
            self._pool.setdefault(addr, []).append(peer_conn)
            return peer_conn

    async def _request(
        self, addr: Address, event: Callable[[int], Request], chunk_id: bytes = b""
    ) -> Reply:
        peer_conn: _PeerConnection | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
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
        except TimeoutError:
            # A peer that does not answer in time is not reused: its replies may never come.
            if peer_conn is not None:
                await peer_conn.close()
            raise errors.TransferTimeout(
                f"peer {_where(addr)} did not answer within {self.timeout_s:g}s; try another holder"
            ) from None
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
            errors.TransferTimeout: no answer within ``timeout_s``.
            ValueError: ``data`` exceeds MAX_SEALED_CHUNK_BYTES or ``lease_s`` is not positive.
        """
        lease = _lease_seconds(lease_s)
        reply = await self._request(
            addr, lambda rid: StoreRequest(rid, chunk_id, lease, data), chunk_id
        )
        if not isinstance(reply, StoreOK):
            raise AssertionError("core.wire matches STORE with STORE_OK")
        return reply.newly_stored

    async def fetch(self, addr: Address, chunk_id: ChunkId) -> bytes:
        """Fetch the chunk ``chunk_id`` from ``addr`` and verify its hash.

        Raises:
            errors.ChunkNotStored: the peer does not have it.
            errors.ChunkHashMismatch: the peer sent bytes that do not hash to ``chunk_id``.
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no answer within ``timeout_s``.
        """
        reply = await self._request(addr, lambda rid: FetchRequest(rid, chunk_id), chunk_id)
        if not isinstance(reply, ChunkData):
            raise AssertionError("core.wire matches FETCH with CHUNK_DATA")
        try:
            await asyncio.to_thread(verify_chunk, chunk_id, reply.data)
        except errors.ChunkHashMismatch:
            log.debug(
                "peer %s sent bad bytes for chunk %s; dropping its connections",
                _where(addr),
                short_id(chunk_id),
            )
            for peer_conn in self._pool.pop(addr, []):
                await peer_conn.close()
            raise
        return reply.data

    async def fetch_any(self, addrs: Sequence[Address], chunk_id: ChunkId) -> tuple[bytes, Address]:
        """Fetch ``chunk_id`` from the first holder in ``addrs`` that serves it intact.

        Returns:
            The verified bytes and the address that served them.

        Raises:
            errors.ChunkUnavailable: every holder failed (names how many were tried and why).
        """
        reasons: Counter[str] = Counter()
        for addr in addrs:
            try:
                return await self.fetch(addr, chunk_id), addr
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
            f"no holder served chunk {short_id(chunk_id)} (tried {len(addrs)} holders"
            f"{': ' + why if why else ''}); retry later or ask more peers"
        )

    async def has(self, addr: Address, ids: Sequence[ChunkId]) -> list[bool]:
        """Which of ``ids`` does ``addr`` hold? Batches larger than MAX_BATCH_IDS are split.

        Raises:
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no answer within ``timeout_s``.
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
            errors.TransferTimeout: no answer within ``timeout_s``.
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
