"""PeerConnection: one pooled connection of a TransferClient to one holder, on the shared pump.

Requests are pipelined and replies matched by request id; the connection fails every pending
request when it breaks, or when it moves no data for its idle timeout (core.wire ClientDeadlines).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Final

from p2pmega import errors
from p2pmega.core.ids import Address
from p2pmega.core.wire import (
    CONNECTION_REQUEST_ID,
    NEED_DATA,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    ClientDeadlines,
    ConnectionClosed,
    Error,
    Reply,
    Request,
    Role,
    TimedOut,
    TransferConnection,
)
from p2pmega.net.buffers import BufferPool
from p2pmega.net.pump import LayerStack, Pump

log = logging.getLogger("p2pmega.net.transfer")

# Receive buffer a connection keeps between frames; a chunk arrives in a buffer of the client's
# BufferPool, which fetch_into takes back once its consumer is done with the chunk.
_KEEP_BUFFER_BYTES: Final = 64 << 10
# A connection with requests pending checks its progress this many times per idle timeout, so a
# stalled one fails between 1 and 1.25 idle timeouts after its last byte moved.
_PROGRESS_CHECKS_PER_TIMEOUT: Final = 4


def where(addr: Address) -> str:
    """``host:port`` of ``addr``, for messages."""
    return f"{addr[0]}:{addr[1]}"


class PeerConnection(Pump):
    """One pooled client connection: pipelined requests, replies matched by request id.

    A BufferedProtocol (net.pump) rather than a StreamReader: the socket receives straight into
    core.wire's buffer, which saves three copies of every chunk (measured with bench/transfer.py).
    """

    def __init__(
        self,
        addr: Address,
        buffers: BufferPool,
        idle_timeout_s: float,
        *,
        layers: LayerStack,
        received: Counter[Address] | None = None,
    ) -> None:
        self.addr = addr
        # Bytes received from each holder, over all of a client's connections (TransferClient.received_bytes).
        self._received = received if received is not None else Counter()
        # Progress watchdog: while requests are pending, the bytes the holder acknowledged plus the
        # bytes it sent us must grow at least once every idle_timeout_s, however large the request.
        self.deadlines = ClientDeadlines(
            idle_timeout_s, checks_per_timeout=_PROGRESS_CHECKS_PER_TIMEOUT
        )
        super().__init__(
            TransferConnection(
                role=Role.CLIENT,
                keep_buffer_bytes=_KEEP_BUFFER_BYTES,
                allocate=buffers.take,
                release=buffers.give,
                deadlines=self.deadlines,
            ),
            layers=layers,
        )
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.node_id: bytes | None = (
            None  # the holder's proven node id (core.node_id), once secured
        )
        self.answered = 0  # replies received so far; a reused connection may have gone stale
        self.last_used = self.loop.time()
        self._writable = asyncio.Event()
        self._writable.set()
        # Resolved once the layers proved the holder (or refused it): see wait_secured().
        self._secured: asyncio.Future[None] = self.loop.create_future()

    @property
    def closed(self) -> bool:
        """True once the connection failed or was dropped: it takes no more requests."""
        return self.closing

    async def wait_secured(self) -> bytes | None:
        """Wait until the channel handshake proved the holder; its Ed25519 key (None: plain layers).

        The caller bounds the wait (TransferClient's connect timeout).

        Raises:
            errors.PeerIncompatible: the holder speaks another protocol version.
            errors.PeerUnreachable: the holder refused the connection (BUSY), failed the
                handshake or closed.
        """
        await asyncio.shield(self._secured)
        return self.peer_public_key

    # -- the pump's hooks ----------------------------------------------------------------------------

    def buffer_updated(self, nbytes: int) -> None:
        self._received[self.addr] += nbytes
        super().buffer_updated(nbytes)

    def channel_ready(self) -> None:
        if not self._secured.done():
            self._secured.set_result(None)

    def channel_failed(self, exc: errors.RemoteProtocolError) -> None:
        peer = where(self.addr)
        failure: errors.NetworkError
        version = getattr(exc, "peer_version", None)
        refused = getattr(exc, "refused", None)
        if version is not None:
            failure = errors.PeerIncompatible(
                f"holder {peer} speaks transfer protocol version {version}, this p2pmega "
                f"{PROTOCOL_VERSION}; one of you must upgrade"
            )
        elif refused is not None:
            failure = errors.PeerUnreachable(
                f"peer {peer} dropped the connection: {refused.name}; try another holder"
            )
        else:
            log.debug("channel to %s failed: %s", peer, exc)
            failure = errors.PeerUnreachable(
                f"peer {peer} failed the channel handshake or sent a bad record; try another holder"
            )
        self._fail(failure)

    def data_received(self) -> None:
        self._drain_events()

    def peer_closed(self) -> bool:
        self._drain_events()
        return False

    def lost(self, exc: Exception | None) -> None:
        reason = f" ({exc})" if exc else ""
        self._fail(errors.PeerUnreachable(f"connection to {where(self.addr)} was lost{reason}"))

    def writing_paused(self) -> None:
        self._writable.clear()

    def writing_resumed(self) -> None:
        self._writable.set()

    def timed_out(self, verdict: TimedOut) -> None:
        self._fail(
            errors.TransferTimeout(
                f"peer {where(self.addr)} did not answer: {verdict.message}; try another holder"
            )
        )

    # -- requests ------------------------------------------------------------------------------------

    def _drain_events(self) -> None:
        try:
            while (event := self.conn.next_event()) is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    raise errors.PeerUnreachable(f"peer {where(self.addr)} closed the connection")
                if isinstance(event, Error) and event.request_id == CONNECTION_REQUEST_ID:
                    raise errors.PeerUnreachable(
                        f"peer {where(self.addr)} dropped the connection: "
                        f"{event.code.name} {event.message}"
                    )
                if isinstance(event, REQUEST_TYPES):
                    raise AssertionError("a client connection yields only replies")
                self.answered += 1
                future = self.pending.pop(event.request_id, None)
                if future is not None and not future.done():
                    future.set_result(event)
        except errors.PeerUnreachable as exc:
            self._fail(exc)
        except errors.RemoteProtocolError as exc:
            log.debug("dropping %s: %s", where(self.addr), exc)
            self._fail(
                errors.PeerUnreachable(
                    f"peer {where(self.addr)} broke the transfer protocol; try another holder"
                )
            )

    def _fail(self, failure: errors.NetworkError, *, reset: bool = False) -> None:
        self.abort(reset=reset)
        self._writable.set()
        if not self._secured.done():
            self._secured.set_exception(failure)
            self._secured.exception()  # retrieved here: nobody may be waiting any more
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
        if self.closed or self.transport is None:
            raise errors.PeerUnreachable(f"connection to {where(self.addr)} is closed")
        request_id = self.conn.new_request_id()
        buffers = self.conn.send(event(request_id))
        loop = self.loop
        future: asyncio.Future[Reply] = loop.create_future()
        self.last_used = now = loop.time()
        first = not self.pending
        if first:
            # Time spent idle in the pool is not a stall.
            self.deadlines.acknowledged(self.acked_bytes(), now)
        self.deadlines.request_sent(now, first=first)
        self.pending[request_id] = future
        self.rearm()
        try:
            self.write(buffers)
            await self._writable.wait()
            return await future
        finally:
            self.pending.pop(request_id, None)
            self.last_used = loop.time()

    def drop(self, *, reset: bool = False) -> None:
        """Close now; requests still waiting fail with PeerUnreachable. With ``reset``, bytes the kernel still
        holds for the peer are dropped too (a cancelled upload stops using the link at once)."""
        self._fail(
            errors.PeerUnreachable(f"connection to {where(self.addr)} was closed locally"),
            reset=reset,
        )

    async def close(self) -> None:
        self.drop()
