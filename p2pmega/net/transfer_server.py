"""TransferServer: serves a ChunkStore over TCP, one BufferedProtocol per connection around core.wire.

This module only moves bytes, enforces ServerLimits and maps store errors to typed Error replies;
the protocol rules live in p2pmega.core.wire.

The socket receives straight into core.wire's frame buffer (no StreamReader copies), requests run
in the server's worker threads without a task each, and finished requests come back to the event
loop in batches, with one wake-up for all that finished meanwhile (see _Workers).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from p2pmega import errors
from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.core.wire import (
    CHUNK_DATA_HEAD_BYTES,
    CONNECTION_REQUEST_ID,
    MAX_FRAME_BYTES,
    NEED_DATA,
    ConnectionClosed,
    Error,
    ErrorCode,
    Expiry,
    FetchRequest,
    HasReply,
    HasRequest,
    ProtocolViolation,
    RenewReply,
    RenewRequest,
    Reply,
    Request,
    Role,
    ServerDeadlines,
    StoreOK,
    StoreRequest,
    Timeouts,
    TransferConnection,
)
from p2pmega.net.buffers import BufferPool, recycle
from p2pmega.net.progress import unacknowledged_bytes

if TYPE_CHECKING:
    from p2pmega.storage import ChunkStore

# Both sides log as p2pmega.net.transfer, as they did when they were one module.
log = logging.getLogger("p2pmega.net.transfer")

# How long stop() and a protocol violation wait for a refused peer to take our final Error frame.
_CLOSE_GRACE_S: Final = 1.0
# Threads that run store calls: enough to overlap the fsyncs of concurrent stores.
_WORKER_THREADS: Final = 8


@dataclass(frozen=True)
class _Chunk:
    """A fetched chunk: its ChunkData frame at ``start`` in a buffer of BufferPool.

    The frame's ``size`` data bytes follow CHUNK_DATA_HEAD_BYTES of room for its header.
    """

    buffer: bytearray
    start: int
    size: int


@dataclass(frozen=True)
class ServerLimits:
    """Hard limits of a TransferServer; the reason for each default is in docs/PROTOCOL.md."""

    max_connections: int = 128
    max_connections_per_ip: int = 8
    max_inflight_per_connection: int = 8
    max_inflight_per_ip: int = 16
    max_inflight_total: int = 32
    idle_timeout_s: float = 60.0
    stall_timeout_s: float = 30.0
    min_rate_bytes_s: int = 4096
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
        if self.idle_timeout_s <= 0 or self.stall_timeout_s <= 0 or self.min_rate_bytes_s <= 0:
            raise ValueError("ServerLimits timeouts and rates must be positive")


def _answer(store: ChunkStore, event: Request, buffers: BufferPool) -> Reply | _Chunk:
    """Run one request against the store (in a worker thread); every failure becomes an Error."""
    try:
        if isinstance(event, StoreRequest):
            newly = store.put(event.chunk_id, event.data, lease_s=event.lease_s)
            return StoreOK(event.request_id, newly)
        if isinstance(event, FetchRequest):
            taken: list[bytearray] = []
            starts: list[int] = []

            def room(size: int) -> memoryview:
                # The chunk goes after room for its frame header (send_chunk_data_in_place), on a
                # direct I/O boundary, so the disk reads it into place.
                taken.append(buffers.take(CHUNK_DATA_HEAD_BYTES + size + store.ROOM_SPARE_BYTES))
                starts.append(store.room_offset(taken[-1], CHUNK_DATA_HEAD_BYTES))
                return memoryview(taken[-1])[starts[-1] + CHUNK_DATA_HEAD_BYTES :]

            try:
                size = store.read_into(event.chunk_id, room)
            except BaseException:
                for buffer in taken:
                    buffers.give(buffer)
                raise
            return _Chunk(taken[0], starts[0], size)
        if isinstance(event, HasRequest):
            return HasReply(event.request_id, tuple(store.has_many(event.ids)))
        return RenewReply(event.request_id, tuple(store.renew(event.ids, lease_s=event.lease_s)))
    except errors.ChunkNotStored:
        return Error(event.request_id, ErrorCode.NOT_FOUND, "chunk not stored here")
    except errors.ChunkHashMismatch:
        if isinstance(event, StoreRequest):
            return Error(event.request_id, ErrorCode.BAD_HASH, "data does not hash to the chunk id")
        # ChunkStore.get found the file rotten and dropped it: we no longer hold the chunk.
        return Error(event.request_id, ErrorCode.NOT_FOUND, "chunk was corrupt on disk and dropped")
    except errors.QuotaExceeded:
        return Error(event.request_id, ErrorCode.QUOTA_FULL, "store quota is full")
    except errors.UsageError as exc:
        return Error(event.request_id, ErrorCode.BAD_REQUEST, f"refused: {type(exc).__name__}")
    except errors.StorageError as exc:
        return Error(event.request_id, ErrorCode.INTERNAL, f"store failed: {type(exc).__name__}")
    except OSError as exc:
        message = f"disk error: {exc.strerror or type(exc).__name__}"
        return Error(event.request_id, ErrorCode.INTERNAL, message)
    except Exception:
        # A bug in the store must not leave the peer waiting for its timeout.
        log.exception("store raised unexpectedly on request %d", event.request_id)
        return Error(event.request_id, ErrorCode.INTERNAL, "internal error")


_Done = tuple["_Connection", Request, Reply | _Chunk]


class _Workers:
    """Store calls in worker threads; results return to the loop in batches.

    Plain threads on one queue (a ThreadPoolExecutor costs a Future, a work item and a semaphore
    per request). A thread that finishes a request queues the reply and wakes the loop only if no
    wake-up is pending already, so requests that finish close together cost one wake-up.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, store: ChunkStore, buffers: BufferPool
    ) -> None:
        self._loop = loop
        self._store = store
        self.buffers = buffers
        self._jobs: queue.SimpleQueue[tuple[_Connection, Request] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: deque[_Done] = deque()
        self._wake_pending = False
        self._running = 0
        self._idle: asyncio.Future[None] | None = None
        # Daemon threads: a process that exits without stop() loses at most writes that were
        # never acknowledged, which the store's repair at open removes (as after kill -9).
        self._threads = [
            threading.Thread(target=self._work, name=f"p2pmega-transfer-{i}", daemon=True)
            for i in range(_WORKER_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, connection: _Connection, event: Request) -> None:
        self._running += 1
        self._jobs.put((connection, event))

    def _work(self) -> None:
        store, buffers, jobs = self._store, self.buffers, self._jobs
        while (job := jobs.get()) is not None:
            connection, event = job
            reply = _answer(store, event, buffers)
            with self._lock:
                self._done.append((connection, event, reply))
                wake = not self._wake_pending
                self._wake_pending = True
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:
                    return  # the loop is closed: the server was never stopped, nobody waits

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, deque()
            self._wake_pending = False
        self._running -= len(done)
        for connection, event, reply in done:
            try:
                connection.finished(event, reply, self.buffers)
            except Exception:
                log.exception("sending the reply to request %d failed", event.request_id)
                connection.abort()
                connection.release(event.request_id)  # its slot, which connection_lost cannot see
                if isinstance(reply, _Chunk):
                    self.buffers.give(reply.buffer)
        if not self._running and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def wait_idle(self) -> None:
        """Until every submitted request has finished (store writes are never abandoned)."""
        if self._running:
            self._idle = self._loop.create_future()
            await self._idle

    def shutdown(self) -> None:
        """Let the threads end (each takes one None off the queue once the jobs are done)."""
        for _ in self._threads:
            self._jobs.put(None)


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
        self._workers: _Workers | None = None
        self.buffers = BufferPool()
        self._connections: set[_Connection] = set()
        self._per_ip: Counter[str] = Counter()
        self._inflight_per_ip: Counter[str] = Counter()
        self._inflight_total = 0
        # Connections that stopped reading for want of an in-flight slot, in arrival order.
        self._blocked: dict[_Connection, None] = {}
        self._stopping = False

    @property
    def connections(self) -> int:
        """How many connections are being served right now."""
        return len(self._connections)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet parsed, summed over all connections (for memory checks)."""
        return sum(c.conn.buffered_bytes for c in self._connections)

    def peer_hosts(self) -> list[str]:
        """The source address of every connection being served, sorted (one entry per connection)."""
        return sorted(self._per_ip.elements())

    async def start(self) -> None:
        """Listen on ``host:port``; ``.port`` holds the real port afterwards.

        Raises:
            OSError: the address cannot be bound. Left unconverted on purpose: node.py retries
                another port when the TCP side of a UDP-chosen port number is taken.
        """
        loop = asyncio.get_running_loop()
        # Workers first: the server accepts connections as soon as it is bound.
        self._workers = _Workers(loop, self._store, self.buffers)
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self), host=self._host, port=self._requested_port, backlog=1024
            )
        except BaseException:
            self._workers.shutdown()
            self._workers = None
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.debug("transfer server listening on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening, close every connection and wait for the requests being answered."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        if self._workers is not None:
            # Store writes run to the end, so no chunk acknowledged (or about to be) is lost
            # half-written; reads are short and must not outlive the store.
            await self._workers.wait_idle()
            self._workers.shutdown()
            self._workers = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- used by _Connection -----------------------------------------------------------------------

    def admit(self, connection: _Connection) -> bool:
        limits = self.limits
        ip = connection.ip
        if (
            self._stopping
            or len(self._connections) >= limits.max_connections
            or self._per_ip[ip] >= limits.max_connections_per_ip
        ):
            return False
        self._connections.add(connection)
        self._per_ip[ip] += 1
        return True

    def forget(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._per_ip[connection.ip] -= 1
            if not self._per_ip[connection.ip]:
                del self._per_ip[connection.ip]
        self._blocked.pop(connection, None)

    def has_slot(self, connection: _Connection) -> bool:
        """Whether every limit allows ``connection`` one more request in flight."""
        limits = self.limits
        return (
            connection.inflight < limits.max_inflight_per_connection
            and self._inflight_per_ip[connection.ip] < limits.max_inflight_per_ip
            and self._inflight_total < limits.max_inflight_total
        )

    def take_slot(self, connection: _Connection) -> None:
        self._inflight_per_ip[connection.ip] += 1
        self._inflight_total += 1

    def release_slot(self, connection: _Connection) -> None:
        ip = connection.ip
        self._inflight_per_ip[ip] -= 1
        if not self._inflight_per_ip[ip]:
            del self._inflight_per_ip[ip]
        self._inflight_total -= 1
        for blocked in list(self._blocked):
            if self._inflight_total >= self.limits.max_inflight_total:
                break
            blocked.unblock()

    def block(self, connection: _Connection) -> None:
        self._blocked[connection] = None

    def unblocked(self, connection: _Connection) -> None:
        self._blocked.pop(connection, None)

    def submit(self, connection: _Connection, event: Request) -> None:
        assert self._workers is not None  # noqa: S101 - connections exist only while started
        self._workers.submit(connection, event)

    def stored(self, chunk_id: ChunkId) -> None:
        if self._on_stored is None:
            return
        try:
            self._on_stored(chunk_id)
        except Exception:
            log.exception("on_stored callback failed for chunk %s", short_id(chunk_id))


class _Connection(asyncio.BufferedProtocol):
    """One client connection: frames in, requests to the workers, replies out, limits enforced.

    Timers measure progress, not size, so a peer on a slow link is served and a slowloris is not;
    the rules are core.wire's ServerDeadlines, which this pump tells what happened and when. Any
    miss aborts the connection (an idle one is closed). One TimerHandle serves all of them: it is
    re-armed only when a deadline earlier than the armed one appears, and re-checks on firing.
    """

    def __init__(self, server: TransferServer) -> None:
        self.server = server
        self.limits = limits = server.limits
        self._loop = asyncio.get_running_loop()
        self.deadlines = ServerDeadlines(
            Timeouts(
                stall_s=limits.stall_timeout_s,
                min_rate_bytes_s=limits.min_rate_bytes_s,
                idle_s=limits.idle_timeout_s,
            ),
            now=self._loop.time(),
        )
        self.conn = TransferConnection(
            role=Role.SERVER,
            max_frame_bytes=limits.max_frame_bytes,
            allocate=server.buffers.take,
            deadlines=self.deadlines,
        )
        self.ip = "?"
        self._transport: asyncio.Transport | None = None
        self._closing = False  # no more requests are read; replies still go out unless aborted
        self._blocked = False
        self._eof = False  # the peer closed its side (core.wire decides whether cleanly)
        self._peer_done = False  # the peer closed its side at a frame boundary
        self._inflight: set[int] = set()  # request ids holding a slot, until their reply is taken
        self._timer: asyncio.TimerHandle | None = None
        self._written = 0  # bytes of replies written, to tell how many the peer acknowledged

    @property
    def inflight(self) -> int:
        """Requests of this connection holding an in-flight slot."""
        return len(self._inflight)

    # -- asyncio callbacks ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - TCP gives a Transport
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        if not self.server.admit(self):
            log.debug("refused BUSY connection from %s: %d open", self.ip, self.server.connections)
            self._closing = True
            refusal = TransferConnection(role=Role.SERVER)
            busy = Error(CONNECTION_REQUEST_ID, ErrorCode.BUSY, "too many connections; retry later")
            transport.writelines(refusal.send(busy))
            # close() flushes the small Error frame in the background; a peer that never reads
            # cannot hold more than this one frame of ours.
            transport.close()
            return
        self._rearm()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        conn.buffer_updated(nbytes)
        if self._closing:
            return
        self.deadlines.received(nbytes, self._loop.time())
        if not conn.frame_pending:  # a large frame arrives in several reads: parse once, at the end
            self._pump()

    def eof_received(self) -> bool:
        if not self._closing:
            self._eof = True
            self.conn.receive_data(b"")
            self._pump()
        return True  # keep the socket open for the replies still owed; we close it ourselves

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Replies written but never taken free their slots now; requests still in the workers
        # free theirs when they finish.
        for request_id in self.deadlines.abandon_untaken():
            self.release(request_id)
        self.server.forget(self)

    def pause_writing(self) -> None:
        self.deadlines.writing_paused(self._acked_bytes(), self._loop.time())

    def resume_writing(self) -> None:
        for request_id in self.deadlines.writing_resumed(self._loop.time()):
            self._done(request_id)

    # -- requests ------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Parse and dispatch frames while in-flight slots allow; stop reading when they do not."""
        conn = self.conn
        server = self.server
        while not self._closing:
            if not conn.receiving_frame and not self._eof:
                # Nothing buffered (the usual case after a frame): no need to ask core.wire.
                self._need_data()
                return
            if not server.has_slot(self):
                if not self._blocked:
                    # Backpressure: with every slot taken we stop reading, so the peer's own TCP
                    # window fills up instead of our memory.
                    self._blocked = True
                    self.deadlines.reading_paused(self._loop.time())
                    server.block(self)
                    self._pause_reading()
                return
            try:
                event = conn.next_event()
            except ProtocolViolation as exc:
                self._refuse(exc)
                return
            if event is NEED_DATA:
                self._need_data()
                return
            if isinstance(event, ConnectionClosed):
                self._peer_done = True
                self._close_when_answered()
                return
            if not isinstance(event, StoreRequest | FetchRequest | HasRequest | RenewRequest):
                raise AssertionError("a server connection yields only requests")
            server.take_slot(self)
            self._inflight.add(event.request_id)
            self.deadlines.request_arrived(event.request_id, self._loop.time())
            self._rearm()
            server.submit(self, event)

    def _need_data(self) -> None:
        now = self._loop.time()
        if self._blocked:
            self._blocked = False
            self.server.unblocked(self)
            self._resume_reading()
            # The sender could not send while we did not read: that time is not its stall.
            self.deadlines.reading_resumed(now)
        self.deadlines.waiting_for_data(self.conn.receiving_frame, now)
        self._rearm()

    def unblock(self) -> None:
        """A slot was freed somewhere: parse on if this connection can now take one."""
        if self._blocked and not self._closing:
            self._pump()

    def finished(self, event: Request, reply: Reply | _Chunk, buffers: BufferPool) -> None:
        """A worker answered ``event``: send the reply (unless the connection is gone)."""
        request_id = event.request_id
        if isinstance(event, StoreRequest):
            recycle(event.data, buffers)
            if isinstance(reply, StoreOK) and reply.newly_stored:
                self.server.stored(event.chunk_id)
        transport = self._transport
        if transport is None or transport.is_closing() or self.conn.failed:
            if isinstance(reply, _Chunk):
                buffers.give(reply.buffer)
            self.release(request_id)
            return
        if isinstance(reply, _Chunk):
            # Header, chunk id and data leave in one write from the buffer they were read into.
            frame = memoryview(reply.buffer)[reply.start :]
            out = self.conn.send_chunk_data_in_place(request_id, frame, reply.size)
            self._written += len(out)  # before the write, which may call pause_writing
            transport.write(out)
            del frame, out  # a view left alive would keep the pool from taking the buffer back
            if not transport.get_write_buffer_size():
                # The socket took it all, so the transport holds no reference to the buffer.
                buffers.give(reply.buffer)
        else:
            for buffer in self.conn.send(reply):
                self._written += len(buffer)
                transport.write(buffer)
        # A reply the paused socket did not take is taken when it drains (resume_writing).
        if self.deadlines.reply_written(request_id, self._loop.time()):
            self._done(request_id)
        else:
            self._rearm()

    def _done(self, request_id: int) -> None:
        self.release(request_id)
        if self._peer_done:
            self._close_when_answered()

    def release(self, request_id: int) -> None:
        """Free the in-flight slot of ``request_id`` (once; later calls do nothing)."""
        if request_id not in self._inflight:
            return
        self._inflight.discard(request_id)
        self.deadlines.forget(request_id)
        self.server.release_slot(self)

    def _close_when_answered(self) -> None:
        if not self._inflight and self._transport is not None:
            self._closing = True
            self._transport.close()

    # -- closing -------------------------------------------------------------------------------------

    def _refuse(self, exc: ProtocolViolation) -> None:
        """Send the one Error a protocol violation earns, then close (abort if not taken soon)."""
        log.debug("refused %s from %s: %s", exc.code.name, self.ip, exc)
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        for buffer in self.conn.send(Error(exc.request_id, exc.code, str(exc))):
            transport.write(buffer)
        transport.close()
        self._loop.call_later(_CLOSE_GRACE_S, transport.abort)

    def abort(self) -> None:
        """Drop the connection now, discarding unsent bytes (the peer is not reading, or we stop)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # -- timers --------------------------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        """Make sure the timer fires no later than ``deadline``."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _rearm(self) -> None:
        deadline = self.conn.next_deadline()
        if deadline is not None:
            self._arm(deadline)

    def _acked_bytes(self) -> int:
        """Bytes of our replies the peer has acknowledged so far."""
        if self._transport is None:
            return 0
        return self._written - unacknowledged_bytes(self._transport)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self._loop.time()
        if self.deadlines.write_paused:
            self.deadlines.acknowledged(self._acked_bytes(), now)  # progress is polled now
        verdict = self.conn.handle_timer(now)
        if verdict is None:
            self._rearm()
            return
        log.debug("closing %s: %s", self.ip, verdict.message)
        if verdict.rule is Expiry.IDLE:
            self._closing = True
            if self._transport is not None:
                self._transport.close()
        else:
            self.abort()
