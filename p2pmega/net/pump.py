"""Pump: the asyncio glue between a TCP socket and core.wire, written once for client and server.

It moves bytes through a stack of layers into a TransferConnection, writes what the connection
encodes, counts what the peer acknowledged, and runs the connection's one timer; it decides
nothing. What a side does with events, slots and failures is its own subclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from p2pmega.core.wire import TimedOut, TransferConnection
from p2pmega.errors import RemoteProtocolError
from p2pmega.net.progress import unacknowledged_bytes

# SO_LINGER on, 0 s: close() resets the connection and drops unsent bytes.
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)


class Layer(Protocol):
    """One stage between the socket and the wire: bytes from below, bytes to above.

    `PlainLayer` lets the socket receive straight into the wire's buffer (tests and benchmarks of
    the wire alone); net.channel.ChannelLayer, the one peers use, runs the handshake and then
    receives records into its own buffer, opens them into the wire's and seals what the wire
    writes. ``ready`` turns True once the peer is proven (``peer_public_key``, None when the layer
    proves nothing); ``copies`` is True if `outgoing` returns new buffers, so the caller's may be
    reused as soon as it returns.
    """

    ready: bool
    peer_public_key: bytes | None
    copies: bool

    def opened(self, write: Callable[[bytes | bytearray | memoryview], None]) -> None:
        """The socket is connected: ``write`` sends bytes of the layer's own (a handshake)."""
        ...

    def get_buffer(self, sizehint: int) -> memoryview:
        """Room for the socket to receive into (asyncio.BufferedProtocol.get_buffer)."""
        ...

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were received into the room from get_buffer().

        Raises:
            RemoteProtocolError: the peer broke the layer's protocol (the connection is dead).
        """
        ...

    def eof_received(self) -> None:
        """The peer closed its sending side.

        Raises:
            RemoteProtocolError: the peer closed where the layer's protocol does not allow it.
        """
        ...

    def outgoing(
        self, buffers: list[bytes | memoryview]
    ) -> Sequence[bytes | bytearray | memoryview]:
        """What to write to the socket for ``buffers`` of the wire (in order)."""
        ...

    def sent(self) -> None:
        """What `outgoing` returned went to the transport and the caller dropped it: buffers the
        layer allocated may be reused once no view of them is left."""
        ...


class PlainLayer:
    """No transformation: bytes go to the wire as they come, and out as the wire wrote them."""

    ready = True
    peer_public_key: bytes | None = None
    copies = False

    def __init__(self, conn: TransferConnection) -> None:
        # Bound methods, so that a received read costs no extra call (bench/transfer.py).
        self.get_buffer = conn.get_buffer
        self.buffer_updated = conn.buffer_updated
        self._conn = conn

    def opened(self, write: Callable[[bytes | bytearray | memoryview], None]) -> None:
        pass

    def eof_received(self) -> None:
        self._conn.receive_data(b"")

    def outgoing(
        self, buffers: list[bytes | memoryview]
    ) -> Sequence[bytes | bytearray | memoryview]:
        return buffers

    def sent(self) -> None:
        pass


LayerStack = Callable[[TransferConnection], Layer]


class Pump(asyncio.BufferedProtocol):
    """A BufferedProtocol around one TransferConnection; subclasses react to what arrives.

    Hooks (each a no-op or a default here): `channel_ready` once the layers proved the peer,
    `channel_failed` when they refuse it, `data_received` after bytes reached the wire,
    `peer_closed` at EOF, `lost` when the socket is gone, `writing_paused`/`writing_resumed` for
    back-pressure from the socket, `timed_out` when the connection's deadlines give a verdict.
    """

    def __init__(self, conn: TransferConnection, *, layers: LayerStack = PlainLayer) -> None:
        self.conn = conn
        self.layer = layers(conn)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closing = False  # set by subclasses and abort(): nothing more is read
        self._written = 0  # bytes handed to the transport, to tell how many were acknowledged
        self._timer: asyncio.TimerHandle | None = None
        self.ready = False  # the layers proved the peer (channel_ready was called)

    @property
    def peer_public_key(self) -> bytes | None:
        """The Ed25519 key the peer proved in the handshake (None before, or with plain layers)."""
        return self.layer.peer_public_key

    # -- asyncio callbacks ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - TCP gives a Transport
        self.transport = transport
        self.opened(transport)
        if self.closing:
            return
        self.layer.opened(transport.write)
        self._check_ready()

    def _check_ready(self) -> None:
        if not self.ready and self.layer.ready and not self.closing:
            self.ready = True
            self.channel_ready()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.layer.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.layer.buffer_updated(nbytes)
        except RemoteProtocolError as exc:
            self.channel_failed(exc)
            return
        if not self.ready:
            self._check_ready()
        if self.closing:
            return
        deadlines = self.conn.deadlines
        if deadlines is not None:
            deadlines.received(nbytes, self.loop.time())
        self.data_received()

    def eof_received(self) -> bool:
        if self.closing:
            return False  # the transport is closing already
        try:
            self.layer.eof_received()
        except RemoteProtocolError as exc:
            self.channel_failed(exc)
            return False
        return self.peer_closed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()
        self.lost(exc)

    def pause_writing(self) -> None:
        self.writing_paused()

    def resume_writing(self) -> None:
        self.writing_resumed()

    # -- hooks ---------------------------------------------------------------------------------------

    def opened(self, transport: asyncio.Transport) -> None:
        """The socket is connected (before the layers start; set ``closing`` to refuse it)."""

    def channel_ready(self) -> None:
        """The layers proved the peer (``peer_public_key``); the wire's bytes now flow."""

    def channel_failed(self, exc: RemoteProtocolError) -> None:
        """The layers refused the peer (bad handshake or record): by default it is aborted."""
        self.abort()

    def data_received(self) -> None:
        """Bytes reached the wire (not called once closing)."""

    def peer_closed(self) -> bool:
        """The peer closed its side. Returns True to keep our side open (asyncio's convention)."""
        return False

    def lost(self, exc: Exception | None) -> None:
        """The socket is gone."""

    def writing_paused(self) -> None:
        """The transport's buffer is above its high-water mark: stop producing."""

    def writing_resumed(self) -> None:
        """The transport's buffer drained below its low-water mark."""

    def timed_out(self, verdict: TimedOut) -> None:
        """The connection broke a deadline rule: by default it is aborted."""
        self.abort()

    # -- writing and closing -------------------------------------------------------------------------

    def write(self, buffers: list[bytes | memoryview]) -> None:
        """Write the wire's ``buffers`` through the layers, each as its own write (no joining).

        Separate writes let the transport send a chunk straight from its buffer instead of first
        joining it to its header.
        """
        transport = self.transport
        assert transport is not None  # noqa: S101 - only called once connected
        self._write_all(transport, self.layer.outgoing(buffers))
        # _write_all's references are gone: a buffer the transport did not keep can be reused.
        self.layer.sent()

    def _write_all(
        self, transport: asyncio.Transport, buffers: Sequence[bytes | bytearray | memoryview]
    ) -> None:
        for buffer in buffers:
            self._written += len(buffer)  # before the write, which may call pause_writing
            transport.write(buffer)

    def acked_bytes(self) -> int:
        """Bytes written so far that the peer's TCP has acknowledged."""
        if self.transport is None:
            return 0
        return self._written - unacknowledged_bytes(self.transport)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self, *, reset: bool = False) -> None:
        """Drop the connection now, discarding unsent bytes; with ``reset`` the kernel's too (a reset, not a FIN)."""
        self.closing = True
        self.cancel_timer()
        if self.transport is not None:
            # Without a zero linger, closing leaves what the kernel already took (up to its send buffer, MiBs) to
            # go out after the close: a forward abandoned on a 2 Mbit/s uplink kept it full for seconds.
            sock = self.transport.get_extra_info("socket") if reset else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            self.transport.abort()

    # -- the timer -----------------------------------------------------------------------------------

    def rearm(self) -> None:
        """Make sure the timer fires no later than the connection's next deadline.

        One TimerHandle serves every rule: it is moved only when an earlier deadline appears, and
        re-checks (and re-arms) when it fires.
        """
        deadline = self.conn.next_deadline()
        if deadline is None:
            return
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.closing:
            return
        now = self.loop.time()
        deadlines = self.conn.deadlines
        if deadlines is not None:
            # Only we can ask the kernel how far our bytes got; the deadlines judge the answer.
            deadlines.acknowledged(self.acked_bytes(), now)
        verdict = self.conn.handle_timer(now)
        if verdict is None:
            self.rearm()
        else:
            self.timed_out(verdict)
