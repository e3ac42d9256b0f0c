"""TransferServer: serves a ChunkStore over TCP, one pump (net.pump) per connection around core.wire.

This module enforces ServerLimits (connections, in-flight slots, back-pressure); the protocol
rules and timeouts live in p2pmega.core.wire, the store calls in net.transfer_workers.

The socket receives straight into core.wire's frame buffer (no StreamReader copies), requests run
in the server's worker threads without a task each, and finished requests come back to the event
loop in batches, with one wake-up for all that finished meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.core.crypto import new_signing_seed
from p2pmega.core.node_id import network_of
from p2pmega.core.wire import (
    CONNECTION_REQUEST_ID,
    MAX_FRAME_BYTES,
    NEED_DATA,
    REQUEST_TYPES,
    ConnectionClosed,
    Error,
    ErrorCode,
    Expiry,
    ForwardOK,
    ForwardStoreRequest,
    ProtocolViolation,
    Reply,
    Request,
    Role,
    ServerDeadlines,
    StoreOK,
    StoreRequest,
    TimedOut,
    Timeouts,
    TransferConnection,
)
from p2pmega.errors import RemoteProtocolError
from p2pmega.net.buffers import BufferPool, recycle
from p2pmega.net.channel import channel_layers
from p2pmega.net.pump import LayerStack, Pump
from p2pmega.net.transfer_workers import Chunk, Workers
from p2pmega.storage.expect import Expectations

if TYPE_CHECKING:
    from p2pmega.storage import ChunkStore

# Offered a chunk a sharer asked to be forwarded, with the requester's address and how long the chunk took to
# arrive (seconds): True if it will be forwarded.
Forward = Callable[[ForwardStoreRequest, str, float], bool]

log = logging.getLogger("p2pmega.net.transfer")

# How long stop() and a protocol violation wait for a refused peer to take our final Error frame.
_CLOSE_GRACE_S: Final = 1.0
# Loop turns stop() gives connections accepted before it to get their transports, and how long it then waits for
# every connection to be gone.
_ACCEPT_TURNS: Final = 3
_STOP_DRAIN_S: Final = 1.0


@dataclass(frozen=True)
class ServerLimits:
    """Hard limits of a TransferServer; the reason for each default is in docs/PROTOCOL.md."""

    max_connections: int = 128
    # Per IPv4 /24 or IPv6 /48 (core.node_id.network_of): addresses within one network are cheap
    # to hold many of, so the network is what counts (issue 16).
    max_connections_per_network: int = 8
    max_inflight_per_connection: int = 8
    max_inflight_per_ip: int = 16
    max_inflight_total: int = 32
    idle_timeout_s: float = 60.0
    stall_timeout_s: float = 30.0
    min_rate_bytes_s: int = 4096
    max_frame_bytes: int = MAX_FRAME_BYTES
    # A connection must finish the channel handshake this soon after it was accepted: three small
    # messages and one round trip, so 5 s is far above any real path and short enough that a
    # stranger cannot hold a slot without at least proving a key.
    handshake_timeout_s: float = 5.0
    # Receive buffers of all connections together (frames still arriving). Above it, idle
    # connections holding a partial frame are dropped, most crowded network and longest idle
    # first: 32 frames of the largest chunk, as many as max_inflight_total lets work at once.
    max_receive_buffer_bytes: int = 32 * MAX_FRAME_BYTES

    def __post_init__(self) -> None:
        for name in (
            "max_connections",
            "max_connections_per_network",
            "max_inflight_per_connection",
            "max_inflight_per_ip",
            "max_inflight_total",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be at least 1")
        if (
            self.idle_timeout_s <= 0
            or self.stall_timeout_s <= 0
            or self.min_rate_bytes_s <= 0
            or self.handshake_timeout_s <= 0
        ):
            raise ValueError("ServerLimits timeouts and rates must be positive")


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
        node_id: bytes | None = None,
        on_stored: Callable[[ChunkId], None] | None = None,
        on_forward: Forward | None = None,
        limits: ServerLimits = ServerLimits(),
        identity_seed: bytes | None = None,
        layers: LayerStack | None = None,
    ) -> None:
        """Serve ``store`` on ``host:port`` once started.

        Args:
            identity_seed: The node's Ed25519 seed, whose key every client sees proven in the
                channel handshake (a throwaway one if None: the holder then has no lasting id).
            layers: Between each socket and its wire; the authenticated channel unless a test
                passes another stack (net.pump.PlainLayer exercises the wire alone).
            on_forward: Takes each chunk a STORE_FORWARD newly stored (replicate.forward); without
                it every STORE_FORWARD is answered "not forwarding".
        """
        self._store = store
        # What a signed renewal must name (core.renewal); a server without one refuses them all.
        self.node_id = node_id
        self._host = host
        self._requested_port = port
        self._on_stored = on_stored
        self._on_forward = on_forward
        # The forwarded copies sharers announced (EXPECT), until their forwarder delivers them.
        self.expected = Expectations()
        self.limits = limits
        self.buffers = BufferPool()
        if layers is None:
            seed = identity_seed if identity_seed is not None else new_signing_seed()
            layers = channel_layers(Role.SERVER, seed, self.buffers)
        self.layers = layers  # between each socket and its wire (net.pump)
        self.port = port
        self._server: asyncio.Server | None = None
        self._workers: Workers | None = None
        self._connections: set[_Connection] = set()
        # Every connection accepted and not lost yet, admitted or not: stop() waits for them (below).
        self._accepted: set[_Connection] = set()
        self._per_ip: Counter[str] = Counter()
        self._per_network: dict[bytes, set[_Connection]] = {}
        self.evicted = 0  # connections dropped to make room for a newcomer (for tests and logs)
        self._receive_bytes = 0  # sum of the connections' receive buffers, as last counted
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
        self._workers = Workers(
            loop, self._store, self.buffers, holder_id=self.node_id, expected=self.expected
        )
        try:
            self._server = await loop.create_server(
                self._accept, host=self._host, port=self._requested_port, backlog=1024
            )
        except BaseException:
            self._workers.shutdown()
            self._workers = None
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.debug("transfer server listening on %s:%d", self._host, self.port)

    def _accept(self) -> _Connection:
        connection = _Connection(self)
        self._accepted.add(connection)
        return connection

    async def stop(self) -> None:
        """Stop listening, close every connection and wait for the requests being answered."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        if self._server is not None:
            # Accept no more, then let the connections accepted already get their transports before the close:
            # asyncio makes a connection's transport a loop turn after accepting it, and once the server is closed
            # that fails (Server._attach asserts) and leaves the socket open (Python 3.11; a CI run saw it).
            for sock in self._server.sockets:
                loop.remove_reader(sock.fileno())
            for _ in range(_ACCEPT_TURNS):
                await asyncio.sleep(0)
            self._server.close()
        # Those connections refuse themselves (we are stopping) once started; the others are aborted here.
        deadline = loop.time() + _STOP_DRAIN_S
        while self._accepted and loop.time() < deadline:
            for connection in list(self._accepted):
                if connection.transport is not None:
                    connection.abort()
            await asyncio.sleep(0.001)
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
        """Take ``connection`` in, making room by dropping an idle one if a limit is reached.

        Fair rather than first come (issue 16): when the newcomer's network is at its cap, that
        network's longest-idle connection goes; when the server is full, the longest-idle one of
        the network holding most connections goes. Only if no connection is idle is the newcomer
        refused (BUSY).
        """
        if self._stopping:
            return False
        limits = self.limits
        own = self._per_network.get(connection.network, set())
        if len(own) >= limits.max_connections_per_network:
            if not self._evict_from([own]):
                return False
        elif len(self._connections) >= limits.max_connections:
            by_size = sorted(self._per_network.values(), key=len, reverse=True)
            if not self._evict_from(by_size):
                return False
        self._connections.add(connection)
        self._per_ip[connection.ip] += 1
        self._per_network.setdefault(connection.network, set()).add(connection)
        return True

    def _evict_from(self, networks: list[set[_Connection]]) -> bool:
        """Drop the longest-idle connection of the first network in ``networks`` that has one."""
        for members in networks:
            idle = [c for c in members if c.idle]
            if idle:
                victim = min(idle, key=lambda c: c.last_active)
                log.debug("dropping idle connection from %s to make room", victim.ip)
                victim.abort()
                self.forget(victim)
                self.evicted += 1
                return True
        return False

    def count_buffer(self, connection: _Connection, delta: int) -> None:
        """``connection``'s receive buffer changed by ``delta``; above the budget, drop others."""
        self._receive_bytes += delta
        if delta <= 0 or self._receive_bytes <= self.limits.max_receive_buffer_bytes:
            return
        # Whoever holds a partial frame and has no request in flight is a candidate, except the
        # connection whose bytes just arrived (it is making progress right now).
        candidates = [
            c
            for c in self._connections
            if c is not connection and c.idle and c.conn.receiving_frame
        ]
        crowd = {net: len(members) for net, members in self._per_network.items()}
        candidates.sort(key=lambda c: (-crowd.get(c.network, 0), c.last_active))
        for victim in candidates:
            if self._receive_bytes <= self.limits.max_receive_buffer_bytes:
                break
            log.debug("dropping %s: receive buffers over budget", victim.ip)
            victim.abort()
            self.forget(victim)
            self.evicted += 1

    def forget(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._receive_bytes -= connection.counted_bytes
            connection.counted_bytes = 0
            self._connections.discard(connection)
            self._per_ip[connection.ip] -= 1
            if not self._per_ip[connection.ip]:
                del self._per_ip[connection.ip]
            members = self._per_network.get(connection.network)
            if members is not None:
                members.discard(connection)
                if not members:
                    del self._per_network[connection.network]
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

    def forward(self, event: ForwardStoreRequest, requester: str, received_s: float) -> bool:
        """Hand a newly stored chunk to the forwarder; whether it took it."""
        if self._on_forward is None:
            return False
        try:
            return self._on_forward(event, requester, received_s)
        except Exception:
            log.exception("on_forward callback failed for chunk %s", short_id(event.chunk_id))
            return False

    def stored(self, chunk_id: ChunkId) -> None:
        if self._on_stored is None:
            return
        try:
            self._on_stored(chunk_id)
        except Exception:
            log.exception("on_stored callback failed for chunk %s", short_id(chunk_id))


class _Connection(Pump):
    """One client connection: frames in, requests to the workers, replies out, limits enforced.

    Timers measure progress, not size, so a peer on a slow link is served and a slowloris is not;
    the rules are core.wire's ServerDeadlines, which this pump tells what happened and when. Any
    miss aborts the connection; an idle one is closed.
    """

    def __init__(self, server: TransferServer) -> None:
        self.server = server
        self.limits = limits = server.limits
        timeouts = Timeouts(
            stall_s=limits.stall_timeout_s,
            min_rate_bytes_s=limits.min_rate_bytes_s,
            idle_s=limits.idle_timeout_s,
        )
        self.deadlines = ServerDeadlines(timeouts, now=asyncio.get_running_loop().time())
        super().__init__(
            TransferConnection(
                role=Role.SERVER,
                max_frame_bytes=limits.max_frame_bytes,
                allocate=server.buffers.take,
                release=server.buffers.give,
                deadlines=self.deadlines,
            ),
            layers=server.layers,
        )
        self.ip = "?"
        self.network = b""
        self.source = b"?"  # the peer's /24 (/48), set when it connects (storage caps count by it)
        self.last_active = self.loop.time()  # last byte received or reply written
        self.counted_bytes = 0  # our receive buffer as the server last counted it
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._blocked = False
        self._eof = False  # the peer closed its side (core.wire decides whether cleanly)
        self._peer_done = False  # the peer closed its side at a frame boundary
        self._inflight: set[int] = set()  # request ids holding a slot, until their reply is taken
        self._received_s: dict[
            int, float
        ] = {}  # STORE_FORWARD requests: how long each took to arrive

    @property
    def inflight(self) -> int:
        """Requests of this connection holding an in-flight slot."""
        return len(self._inflight)

    @property
    def idle(self) -> bool:
        """True if dropping it loses no work: no request in flight or waiting for a slot."""
        return not self._inflight and not self._blocked and not self.closing

    # -- the pump's hooks ----------------------------------------------------------------------------

    def opened(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        try:
            self.network = network_of(self.ip)
        except ValueError:
            self.network = self.ip.encode()  # not an IP (a Unix socket in a test): its own source
        self.source = self.network
        if not self.server.admit(self):
            log.debug("refused BUSY connection from %s: %d open", self.ip, self.server.connections)
            self.closing = True
            refusal = TransferConnection(role=Role.SERVER)
            # In the clear, before any handshake: it says only "busy", and a client waiting for
            # the server's hello reads it as a refusal (core.wire.handshake).
            for buffer in refusal.send(
                Error(CONNECTION_REQUEST_ID, ErrorCode.BUSY, "too many connections; retry later")
            ):
                transport.write(buffer)
            # close() flushes the small Error frame in the background; a peer that never reads
            # cannot hold more than this one frame of ours.
            transport.close()
            return
        self._handshake_timer = self.loop.call_later(
            self.limits.handshake_timeout_s, self._handshake_late
        )
        self.rearm()

    def _handshake_late(self) -> None:
        self._handshake_timer = None
        if not self.ready and not self.closing:
            log.debug(
                "closing %s: no handshake within %gs", self.ip, self.limits.handshake_timeout_s
            )
            self.abort()

    def channel_ready(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def channel_failed(self, exc: RemoteProtocolError) -> None:
        log.debug("refused %s: %s", self.ip, exc)
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # Close, not abort: an older peer gets the Error frame the layer wrote for it.
        transport.close()
        self.loop.call_later(_CLOSE_GRACE_S, transport.abort)

    def data_received(self) -> None:
        self.last_active = self.loop.time()
        if (
            not self.conn.frame_pending
        ):  # a large frame arrives in several reads: parse once, at the end
            self._pump()
        size = self.conn.buffered_bytes
        if size != self.counted_bytes and not self.closing:
            delta, self.counted_bytes = size - self.counted_bytes, size
            self.server.count_buffer(self, delta)

    def peer_closed(self) -> bool:
        self._eof = True
        self._pump()
        return True  # keep the socket open for the replies still owed; we close it ourselves

    def lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        # Replies written but never taken free their slots now; requests still in the workers
        # free theirs when they finish.
        for request_id in self.deadlines.abandon_untaken():
            self.release(request_id)
        self.server.forget(self)
        self.server._accepted.discard(self)

    def writing_paused(self) -> None:
        self.deadlines.writing_paused(self.acked_bytes(), self.loop.time())

    def writing_resumed(self) -> None:
        for request_id in self.deadlines.writing_resumed(self.loop.time()):
            self._done(request_id)

    def timed_out(self, verdict: TimedOut) -> None:
        log.debug("closing %s: %s", self.ip, verdict.message)
        if verdict.rule is not Expiry.IDLE:
            self.abort()
        elif self.transport is not None:
            self.closing = True
            self.transport.close()

    # -- requests ------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Parse and dispatch frames while in-flight slots allow; stop reading when they do not."""
        conn = self.conn
        server = self.server
        while not self.closing:
            if not conn.receiving_frame and not self._eof:
                # Nothing buffered (the usual case after a frame): no need to ask core.wire.
                self._need_data()
                return
            if not server.has_slot(self):
                if not self._blocked:
                    # Backpressure: with every slot taken we stop reading, so the peer's own TCP
                    # window fills up instead of our memory.
                    self._blocked = True
                    self.deadlines.reading_paused(self.loop.time())
                    server.block(self)
                    self.pause_reading()
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
            if not isinstance(event, REQUEST_TYPES):
                raise AssertionError("a server connection yields only requests")
            server.take_slot(self)
            self._inflight.add(event.request_id)
            now = self.loop.time()
            if isinstance(event, ForwardStoreRequest):
                # How fast the sharer sent it: the forwarder gives the forward as long as the sharer will wait.
                started = self.deadlines.frame_started
                self._received_s[event.request_id] = now - started if started is not None else 0.0
            self.deadlines.request_arrived(event.request_id, now)
            self.rearm()
            server.submit(self, event)

    def _need_data(self) -> None:
        now = self.loop.time()
        if self._blocked:
            self._blocked = False
            self.server.unblocked(self)
            self.resume_reading()
            # The sender could not send while we did not read: that time is not its stall.
            self.deadlines.reading_resumed(now)
        self.deadlines.waiting_for_data(self.conn.receiving_frame, now)
        self.rearm()

    def unblock(self) -> None:
        """A slot was freed somewhere: parse on if this connection can now take one."""
        if self._blocked and not self.closing:
            self._pump()

    def finished(self, event: Request, reply: Reply | Chunk, buffers: BufferPool) -> None:
        """A worker answered ``event``: send the reply (unless the connection is gone)."""
        request_id = event.request_id
        if isinstance(event, StoreRequest):
            recycle(event.data, buffers)
            if isinstance(reply, StoreOK) and reply.newly_stored:
                self.server.stored(event.chunk_id)
            if isinstance(event, ForwardStoreRequest) and isinstance(reply, StoreOK):
                # Only the request that newly stored the chunk is its sharer's: a chunk held already
                # (stored by someone, maybe a stranger replaying it) is never forwarded on request.
                # The data went back to the pool above: the forwarder reads the stored copy.
                job = dataclasses.replace(event, data=b"")
                received_s = self._received_s.pop(request_id, 0.0)
                forwarding = reply.newly_stored and self.server.forward(job, self.ip, received_s)
                reply = ForwardOK(request_id, reply.newly_stored, forwarding)
        transport = self.transport
        if transport is None or transport.is_closing() or self.conn.failed:
            if isinstance(reply, Chunk):
                buffers.give(reply.buffer)
            self.release(request_id)
            return
        if isinstance(reply, Chunk):
            # Header, chunk id and data leave in one write from the buffer they were read into.
            frame = memoryview(reply.buffer)[reply.start :]
            self.write([self.conn.send_chunk_data_in_place(request_id, frame, reply.size)])
            del frame  # a view left alive would keep the pool from taking the buffer back
            if self.layer.copies or not transport.get_write_buffer_size():
                # The layers sealed a copy, or the socket took it all: nothing refers to the buffer.
                buffers.give(reply.buffer)
        else:
            self.write(self.conn.send(reply))
        self.last_active = self.loop.time()
        # A reply the paused socket did not take is taken when it drains (writing_resumed).
        if self.deadlines.reply_written(request_id, self.loop.time()):
            self._done(request_id)
        else:
            self.rearm()

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
        if not self._inflight and self.transport is not None:
            self.closing = True
            self.transport.close()

    def _refuse(self, exc: ProtocolViolation) -> None:
        """Send the one Error a protocol violation earns, then close (abort if not taken soon)."""
        log.debug("refused %s from %s: %s", exc.code.name, self.ip, exc)
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.write(self.conn.send(Error(exc.request_id, exc.code, str(exc))))
        transport.close()
        self.loop.call_later(_CLOSE_GRACE_S, transport.abort)
