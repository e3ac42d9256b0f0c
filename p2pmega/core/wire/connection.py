"""TransferConnection: one side of one transfer connection, as a state machine with no I/O.

It matches replies to outstanding requests and refuses anything out of turn; frame bodies are
encoded and decoded by codec.py and received into buffer.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from p2pmega.core.wire.buffer import SERVER_KEEP_BYTES, ReceiveBuffer
from p2pmega.core.wire.codec import DATA_OFFSET, DECODERS, ENCODERS, HEADER, bad
from p2pmega.core.wire.deadline import ClientDeadlines, ServerDeadlines, TimedOut
from p2pmega.core.wire.events import (
    CHUNK_DATA_HEAD_BYTES,
    CONNECTION_REQUEST_ID,
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    MAX_REQUEST_ID,
    NEED_DATA,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    REPLY_FOR,
    REQUEST_TYPES,
    ChunkData,
    ConnectionClosed,
    Error,
    ErrorCode,
    Event,
    ExpectRequest,
    FetchRequest,
    HasReply,
    HasRequest,
    LeasesReply,
    LeasesRequest,
    MessageType,
    ProtocolViolation,
    RenewReply,
    RenewRequest,
    RenewSignedRequest,
    Reply,
    Request,
    Role,
    Sentinel,
    StoreRequest,
)

# Which large frames each role receives with their data handed over (no copy of the chunk).
_HANDED_OVER: Final = {
    Role.SERVER: frozenset(
        {
            MessageType.STORE,
            MessageType.STORE_KEYED,
            MessageType.STORE_FORWARD,
            MessageType.FORWARDED_STORE,
        }
    ),
    Role.CLIENT: frozenset({MessageType.CHUNK_DATA}),
}


@dataclass
class _Outstanding:
    """What a reply must match: the request's type, its chunk id (FETCH), its id count (batches)."""

    kind: MessageType
    chunk_id: bytes = b""
    count: int = 0


def _outstanding(kind: MessageType, event: Request) -> _Outstanding:
    if isinstance(event, FetchRequest):
        return _Outstanding(kind, chunk_id=event.chunk_id)
    if isinstance(
        event, HasRequest | RenewRequest | LeasesRequest | RenewSignedRequest | ExpectRequest
    ):
        return _Outstanding(kind, count=len(event.ids))
    return _Outstanding(kind)


def _answer_count(event: Event) -> int | None:
    """How many answers a batch reply holds (one per id of its request); None if no batch."""
    if isinstance(event, HasReply | RenewReply):
        return len(event.flags)
    if isinstance(event, LeasesReply):
        return len(event.remaining_s)
    return None


class TransferConnection:
    """One side of one transfer connection: feed it bytes, read events; give it events, write bytes.

    Requests may be pipelined: a client may send many before the first reply, and a server may
    answer them in any order, matched by request id. Anything that breaks the protocol raises
    ProtocolViolation and leaves the connection failed; a server may still send one final Error.
    """

    def __init__(
        self,
        *,
        role: Role,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        keep_buffer_bytes: int | None = None,
        allocate: Callable[[int], bytearray] = bytearray,
        release: Callable[[bytearray], None] | None = None,
        deadlines: ServerDeadlines | ClientDeadlines | None = None,
    ) -> None:
        """Create one side of a connection.

        Args:
            role: CLIENT sends requests and receives replies; SERVER the other way round.
            max_frame_bytes: Largest frame accepted, prefix included.
            keep_buffer_bytes: Receive buffer kept between frames for reuse; a larger one is freed
                once empty. Defaults to one frame for a client (few, busy connections) and
                SERVER_KEEP_BYTES for a server (many, mostly idle connections).
            allocate: Makes the receive buffer for a frame larger than ``keep_buffer_bytes``,
                given the bytes it must hold at least (it may hold more). A server recycles the
                buffers its large StoreRequests hand over, so each chunk does not cost a fresh
                megabyte.
            release: Takes back a buffer from ``allocate`` that the receive buffer outgrew (it
                grows with the bytes that arrive, so a frame may pass through a few).
            deadlines: The timeouts of this side (ServerDeadlines for a server, ClientDeadlines
                for a client), which its pump feeds; None: no timer ever runs.

        Raises:
            ValueError: ``max_frame_bytes`` cannot hold a header, or ``deadlines`` are the other
                side's.
        """
        if max_frame_bytes < PREFIX_BYTES + HEADER_BYTES:
            raise ValueError(f"max_frame_bytes must be at least {PREFIX_BYTES + HEADER_BYTES}")
        wanted = ServerDeadlines if role is Role.SERVER else ClientDeadlines
        if deadlines is not None and not isinstance(deadlines, wanted):
            raise ValueError(f"a {role.value} connection takes {wanted.__name__}")
        self.deadlines = deadlines
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        if keep_buffer_bytes is None:
            keep_buffer_bytes = max_frame_bytes if role is Role.CLIENT else SERVER_KEEP_BYTES
        self._receive = ReceiveBuffer(
            max_frame_bytes=max_frame_bytes,
            keep_bytes=keep_buffer_bytes,
            allocate=allocate,
            release=release,
            grow_with_arrival=role is Role.SERVER,
        )
        self._failed = False
        self._closed = False
        # Requests sent (client) or received (server) and not answered yet, by request id.
        self._outstanding: dict[int, _Outstanding] = {}
        self._next_request_id = 1

    @property
    def outstanding(self) -> int:
        """How many requests are awaiting a reply on this connection."""
        return len(self._outstanding)

    @property
    def receiving_frame(self) -> bool:
        """True while part of a frame is buffered: the pump applies the per-request timeout."""
        return self._receive.has_bytes

    @property
    def frame_pending(self) -> bool:
        """True while the frame being received is known to be incomplete.

        Then next_event() would return NEED_DATA, so a pump may skip it until more bytes arrive.
        """
        return self._receive.frame_pending

    @property
    def buffered_bytes(self) -> int:
        """Size of the receive buffer (at most one frame plus one read, for memory checks)."""
        return self._receive.size

    @property
    def failed(self) -> bool:
        """True once the peer broke the protocol."""
        return self._failed

    def new_request_id(self) -> int:
        """A request id not in use on this connection (never 0, which names the connection).

        Raises:
            RuntimeError: if every request id is in use.
        """
        for _ in range(len(self._outstanding) + 1):
            request_id = self._next_request_id
            self._next_request_id = request_id + 1 if request_id < MAX_REQUEST_ID else 1
            if request_id not in self._outstanding:
                return request_id
        raise RuntimeError("every request id is in use on this connection")

    # Timers: time is a parameter, never read (aioquic style).

    def next_deadline(self) -> float | None:
        """When the pump must call handle_timer() next, in its loop's seconds; None: no timer."""
        deadlines = self.deadlines
        if isinstance(deadlines, ServerDeadlines):
            return deadlines.next_deadline(self.receiving_frame)
        if deadlines is None:
            return None
        return deadlines.next_deadline()

    def handle_timer(self, now: float) -> TimedOut | None:
        """Check the deadlines at ``now``; a verdict means the connection must go (once).

        Call it when next_deadline() has come (earlier is harmless). A client's pump first reports
        the acknowledged bytes (``deadlines.acknowledged``), and so does a server's while its
        writing is paused, since the pump alone can ask the kernel.

        Returns:
            None while every rule holds, else the rule broken.
        """
        deadlines = self.deadlines
        if isinstance(deadlines, ServerDeadlines):
            return deadlines.handle_timer(now, self.receiving_frame)
        if deadlines is None:
            return None
        return deadlines.handle_timer(now, pending=bool(self._outstanding))

    # Sending.

    def send(self, event: Request | Reply) -> list[bytes | memoryview]:
        """Encode ``event`` as one frame.

        Returns:
            Buffers to write in order (header first, then any chunk body, never concatenated).

        Raises:
            ValueError: the event is not valid for this role or state (a bug in the caller).
        """
        if self._failed and not (self.role is Role.SERVER and isinstance(event, Error)):
            raise ValueError("the connection failed; only a server's final Error may be sent")
        kind, encode = ENCODERS[type(event)]
        request_id = event.request_id
        if self.role is Role.CLIENT:
            if not 0 < request_id <= MAX_REQUEST_ID or request_id in self._outstanding:
                raise ValueError(f"request id {request_id} is invalid or in use")
            if not isinstance(event, REQUEST_TYPES):
                raise ValueError(f"a client cannot send {type(event).__name__}")
            frames = self._frame(kind, request_id, *encode(event))
            self._outstanding[request_id] = _outstanding(kind, event)
            return frames
        if isinstance(event, Error):
            # After a violation the offending request may never have been registered; the final
            # Error still names it so the peer can tell which request broke the connection.
            known = request_id == CONNECTION_REQUEST_ID or request_id in self._outstanding
            if not known and not self._failed:
                raise ValueError(f"no request {request_id} awaits a reply")
            self._outstanding.pop(request_id, None)
            return self._frame(kind, request_id, *encode(event))
        pending = self._outstanding.get(request_id)
        if pending is None:
            raise ValueError(f"no request {request_id} awaits a reply")
        if REPLY_FOR[pending.kind] is not kind:
            raise ValueError(
                f"{type(event).__name__} does not answer a {pending.kind.name} request"
            )
        if isinstance(event, ChunkData) and event.chunk_id != pending.chunk_id:
            raise ValueError("ChunkData must carry the requested chunk id")
        count = _answer_count(event)
        if count is not None and count != pending.count:
            raise ValueError(f"reply needs {pending.count} answers, got {count}")
        frames = self._frame(kind, request_id, *encode(event))
        del self._outstanding[request_id]
        return frames

    def _frame(
        self, kind: MessageType, request_id: int, body: bytes, tail: bytes | memoryview = b""
    ) -> list[bytes | memoryview]:
        length = HEADER_BYTES - PREFIX_BYTES + len(body) + len(tail)
        if length + PREFIX_BYTES > self.max_frame_bytes:
            raise ValueError(
                f"frame of {length + PREFIX_BYTES} bytes exceeds {self.max_frame_bytes}"
            )
        head = HEADER.pack(length, PROTOCOL_VERSION, kind, request_id) + body
        return [head, tail] if tail else [head]

    def send_chunk_data_in_place(
        self, request_id: int, frame: bytearray | memoryview, size: int
    ) -> memoryview:
        """Answer FetchRequest ``request_id`` with a ChunkData whose data the caller already placed.

        A server that reads a chunk into ``frame[CHUNK_DATA_HEAD_BYTES:]`` gets the whole frame
        back as one buffer (header and chunk id written in front), so the chunk is neither copied
        nor sent in two pieces. Otherwise the same as ``send(ChunkData(...))``.

        Args:
            request_id: The FetchRequest being answered.
            frame: ``size`` data bytes at offset CHUNK_DATA_HEAD_BYTES.
            size: Number of data bytes.

        Returns:
            ``frame[:CHUNK_DATA_HEAD_BYTES + size]``, to write as it is.

        Raises:
            ValueError: as for send(): no FetchRequest ``request_id`` awaits a reply, the frame
                would exceed the limit, or ``frame`` is too short.
        """
        if self.role is not Role.SERVER or self._failed:
            raise ValueError("only a working server connection answers with ChunkData")
        pending = self._outstanding.get(request_id)
        if pending is None or pending.kind is not MessageType.FETCH:
            raise ValueError(f"no FETCH request {request_id} awaits a reply")
        end = CHUNK_DATA_HEAD_BYTES + size
        if not 0 <= size <= len(frame) - CHUNK_DATA_HEAD_BYTES:
            raise ValueError(f"frame of {len(frame)} bytes cannot hold {size} data bytes")
        if end > self.max_frame_bytes:
            raise ValueError(f"frame of {end} bytes exceeds {self.max_frame_bytes}")
        HEADER.pack_into(
            frame, 0, end - PREFIX_BYTES, PROTOCOL_VERSION, MessageType.CHUNK_DATA, request_id
        )
        frame[HEADER_BYTES:CHUNK_DATA_HEAD_BYTES] = pending.chunk_id
        del self._outstanding[request_id]
        return memoryview(frame)[:end]

    # Receiving.

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer; ``b""`` means the peer closed its sending side.

        Raises:
            ValueError: data arrived after the peer already closed.
        """
        self._receive.receive_data(data)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Lend spare room of the receive buffer (asyncio.BufferedProtocol style), saving a copy.

        Receive into it, then call buffer_updated() with the byte count before anything else.
        When the current frame's length is known, the room covers the rest of that frame.

        Args:
            sizehint: The caller's wish, or -1 for no preference.

        Returns:
            A writable view of at least 64 KiB.
        """
        return self._receive.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` received into the view from get_buffer().

        Raises:
            ValueError: more bytes than the lent room.
        """
        self._receive.buffer_updated(nbytes)

    def next_event(self) -> Event | Literal[Sentinel.NEED_DATA]:
        """The next complete event, or NEED_DATA if more bytes are needed.

        Raises:
            ProtocolViolation: the peer sent something invalid; the connection is failed for good.
        """
        if self._failed:
            raise ProtocolViolation("connection already failed", code=ErrorCode.BAD_REQUEST)
        if self._closed:
            return ConnectionClosed()
        try:
            return self._parse()
        except ProtocolViolation:
            self._failed = True
            self._receive.clear()
            raise

    def _parse(self) -> Event | Literal[Sentinel.NEED_DATA]:
        receive = self._receive
        frame = receive.next_frame()
        if frame is None:
            if receive.peer_closed and not receive.has_bytes:
                self._closed = True
                return ConnectionClosed()
            return NEED_DATA
        request_id = frame.request_id
        try:
            kind = MessageType(frame.kind)
        except ValueError:
            raise bad(f"unknown message type 0x{frame.kind:02x}", request_id) from None
        pending = self._check_turn(kind, request_id)
        decode = DECODERS[kind]
        event: Event
        if kind in _HANDED_OVER[self.role] and receive.can_hand_over(frame):
            event, data = receive.hand_over(frame, decode, DATA_OFFSET[kind])
            if isinstance(event, StoreRequest):
                event = dataclasses.replace(event, data=data)
            elif isinstance(event, ChunkData):
                event = ChunkData(event.request_id, event.chunk_id, data)
        else:
            event = receive.decode(frame, decode)
        if self.role is Role.SERVER:
            assert isinstance(event, REQUEST_TYPES)  # noqa: S101 - _check_turn let only requests by
            self._outstanding[request_id] = _outstanding(kind, event)
        else:
            self._check_reply(kind, request_id, event, pending)
        return event

    def _check_turn(self, kind: MessageType, request_id: int) -> _Outstanding | None:
        """Refuse a frame this side does not expect; return the request a reply answers."""
        if self.role is Role.SERVER:
            if kind not in REPLY_FOR:
                raise bad(f"a server does not accept {kind.name} frames", request_id)
            if request_id == CONNECTION_REQUEST_ID or request_id in self._outstanding:
                raise bad(f"request id {request_id} is reserved or already in flight", 0)
            return None
        pending = self._outstanding.get(request_id)
        if kind is MessageType.ERROR:
            if request_id != CONNECTION_REQUEST_ID and pending is None:
                raise bad(f"ERROR answers unknown request {request_id}", request_id)
            return pending
        if pending is None:
            raise bad(f"{kind.name} answers unknown request {request_id}", request_id)
        if REPLY_FOR[pending.kind] is not kind:
            raise bad(f"{kind.name} does not answer a {pending.kind.name} request", request_id)
        return pending

    def _check_reply(
        self, kind: MessageType, request_id: int, event: Event, pending: _Outstanding | None
    ) -> None:
        """Refuse a reply that does not fit its request, else mark the request answered."""
        if pending is not None:
            if isinstance(event, ChunkData) and event.chunk_id != pending.chunk_id:
                raise bad("CHUNK_DATA carries a chunk id that was not asked for", request_id)
            count = _answer_count(event)
            if count is not None and count != pending.count:
                unit = "u32 seconds" if isinstance(event, LeasesReply) else "0/1 flags"
                raise bad(f"{kind.name} must hold {pending.count} {unit}", request_id)
            del self._outstanding[request_id]
