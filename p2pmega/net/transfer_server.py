"""TransferServer: serves a ChunkStore over TCP, one asyncio task per connection around core.wire.

This module only moves bytes, enforces ServerLimits and maps store errors to typed Error replies;
the protocol rules live in p2pmega.core.wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from p2pmega import errors
from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.core.wire import (
    CONNECTION_REQUEST_ID,
    MAX_FRAME_BYTES,
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

# Both sides log as p2pmega.net.transfer, as they did when they were one module.
log = logging.getLogger("p2pmega.net.transfer")

# One read takes up to 1 MiB: a whole default chunk per system call on loopback.
_READ_BYTES: Final = 1 << 20
# The server's StreamReader pauses the socket past 2 x this: what a stalled connection may buffer
# on top of the one partial frame held by core.wire.
_SERVER_STREAM_LIMIT: Final = 256 << 10
# How long stop() waits for a refused peer to take its final Error frame before aborting.
_CLOSE_GRACE_S: Final = 1.0


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
