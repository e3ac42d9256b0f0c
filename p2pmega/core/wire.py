"""The chunk-transfer protocol as a sans-I/O state machine: bytes in, events out.

It contains no networking code at all: no socket, clock or task (h11 style). The asyncio pump
around it lives in p2pmega.net.transfer; the byte layout is documented in docs/PROTOCOL.md.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from p2pmega.core.chunking import MAX_SEALED_CHUNK_BYTES, ChunkId
from p2pmega.errors import RemoteProtocolError

PROTOCOL_VERSION: Final = 1

# Frame header: u32 length of everything after the prefix, u8 version, u8 type, u32 request id.
_HEADER = struct.Struct(">IBBI")
PREFIX_BYTES: Final = 4
HEADER_BYTES: Final = _HEADER.size
CHUNK_ID_BYTES: Final = 32
_STORE_FIXED = struct.Struct(">32sI")  # chunk id, lease seconds
_RENEW_FIXED = struct.Struct(">IH")  # lease seconds, id count
_COUNT = struct.Struct(">H")
_ERROR_FIXED = struct.Struct(">B")

# 4096 ids are 128 KiB of request and 4 KiB of reply: large enough that a holder with 100 GiB of
# 1 MiB chunks renews everything in 25 round trips, small enough to stay far below one chunk frame.
MAX_BATCH_IDS: Final = 4096
# Leases travel as whole seconds in a u32 (136 years), so the largest lease is 2**32 - 1 seconds.
MAX_LEASE_S: Final = 2**32 - 1
# Error text is for logs only; 256 bytes fit one line and keep a hostile peer from sending novels.
MAX_ERROR_MESSAGE_BYTES: Final = 256
# The biggest frame is a StoreRequest with a maximum chunk: header (10) + chunk id (32) + lease (4).
# 4 KiB of slack covers that and leaves room for a future field without a version bump of the limit.
FRAME_SLACK_BYTES: Final = 4096
MAX_FRAME_BYTES: Final = MAX_SEALED_CHUNK_BYTES + FRAME_SLACK_BYTES
# A server keeps at most 64 KiB of receive buffer per connection between frames: it may have 128
# mostly idle connections. Large frames arrive in buffers from ``allocate`` (the server's pool).
_SERVER_KEEP_BYTES: Final = 64 << 10
# The smallest room get_buffer() lends: a quarter of asyncio's own 256 KiB reads, so small frames
# do not cost a system call each.
_MIN_RECEIVE_BYTES: Final = 64 << 10
# A server hands a StoreRequest at least this large its receive buffer itself (no copy of the
# chunk), if at most _SERVER_KEEP_BYTES of the next frame have to move to a fresh buffer.
_HAND_OVER_BYTES: Final = 64 << 10
# What precedes the data in a ChunkData frame: header and chunk id (see send_chunk_data_in_place).
CHUNK_DATA_HEAD_BYTES: Final = HEADER_BYTES + CHUNK_ID_BYTES
# Request id 0 is reserved for errors about the whole connection (BUSY, TOO_LARGE before a header).
CONNECTION_REQUEST_ID: Final = 0
_MAX_REQUEST_ID: Final = 2**32 - 1


class Role(enum.Enum):
    """Which side of a connection this state machine plays."""

    CLIENT = "client"
    SERVER = "server"


class MessageType(enum.IntEnum):
    """The type byte of a frame. Requests have the top bit clear, replies have it set."""

    STORE = 0x01
    FETCH = 0x02
    HAS = 0x03
    RENEW = 0x04
    STORE_OK = 0x81
    CHUNK_DATA = 0x82
    HAS_REPLY = 0x83
    RENEW_REPLY = 0x84
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    """The code of an Error reply. Unknown codes received from a peer decode as INTERNAL."""

    NOT_FOUND = 1
    QUOTA_FULL = 2
    BAD_HASH = 3
    TOO_LARGE = 4
    UNSUPPORTED_VERSION = 5
    BAD_REQUEST = 6
    BUSY = 7
    INTERNAL = 8


class Sentinel(enum.Enum):
    """Singleton values returned by next_event()."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = Sentinel.NEED_DATA


@dataclass(frozen=True)
class StoreRequest:
    """Store ``data`` under ``chunk_id`` and keep it for at least ``lease_s`` seconds.

    A server receives a large chunk as a view of the buffer it was received into (no copy); the
    connection lets go of that buffer, so the view stays valid until the receiver lets go of it
    (the transfer server recycles it once the store call is done).
    """

    request_id: int
    chunk_id: ChunkId
    lease_s: int
    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True)
class FetchRequest:
    """Send the bytes stored under ``chunk_id``."""

    request_id: int
    chunk_id: ChunkId


@dataclass(frozen=True)
class HasRequest:
    """Which of ``ids`` are held? At most MAX_BATCH_IDS ids."""

    request_id: int
    ids: tuple[ChunkId, ...]


@dataclass(frozen=True)
class RenewRequest:
    """Extend the lease of each held id in ``ids`` to at least ``lease_s`` seconds from now."""

    request_id: int
    ids: tuple[ChunkId, ...]
    lease_s: int


@dataclass(frozen=True)
class StoreOK:
    """The chunk is durably stored; ``newly_stored`` is False if it was already held."""

    request_id: int
    newly_stored: bool


@dataclass(frozen=True)
class ChunkData:
    """The bytes of a chunk, unverified: the receiver must hash-check them before use.

    A client receives a large chunk as a view of the buffer it was received into (no copy), as a
    server receives a large StoreRequest.
    """

    request_id: int
    chunk_id: ChunkId
    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True)
class HasReply:
    """One flag per id of the HasRequest, in order."""

    request_id: int
    flags: tuple[bool, ...]


@dataclass(frozen=True)
class RenewReply:
    """One flag per id of the RenewRequest, in order: True if the lease was renewed."""

    request_id: int
    flags: tuple[bool, ...]


@dataclass(frozen=True)
class Error:
    """A typed refusal of one request (or of the connection when request_id is 0)."""

    request_id: int
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed its sending side at a frame boundary."""


Request = StoreRequest | FetchRequest | HasRequest | RenewRequest
Reply = StoreOK | ChunkData | HasReply | RenewReply | Error
Event = Request | Reply | ConnectionClosed

_REPLY_FOR: Final[dict[MessageType, MessageType]] = {
    MessageType.STORE: MessageType.STORE_OK,
    MessageType.FETCH: MessageType.CHUNK_DATA,
    MessageType.HAS: MessageType.HAS_REPLY,
    MessageType.RENEW: MessageType.RENEW_REPLY,
}


class ProtocolViolation(RemoteProtocolError):
    """The peer broke the protocol; the connection is dead.

    ``code`` and ``request_id`` say what a server should answer (one Error frame) before closing.
    """

    def __init__(self, message: str, *, code: ErrorCode, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass
class _Outstanding:
    kind: MessageType
    chunk_id: bytes = b""
    count: int = 0


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _check_ids(ids: tuple[ChunkId, ...]) -> None:
    if not 1 <= len(ids) <= MAX_BATCH_IDS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_IDS} ids, got {len(ids)}")
    for chunk_id in ids:
        if len(chunk_id) != CHUNK_ID_BYTES:
            raise ValueError(f"chunk ids are {CHUNK_ID_BYTES} bytes, got {len(chunk_id)}")


def _check_lease(lease_s: int) -> None:
    if not 0 < lease_s <= MAX_LEASE_S:
        raise ValueError(f"lease_s must be 1..{MAX_LEASE_S} whole seconds, got {lease_s}")


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
    ) -> None:
        """Create one side of a connection.

        Args:
            role: CLIENT sends requests and receives replies; SERVER the other way round.
            max_frame_bytes: Largest frame accepted, prefix included.
            keep_buffer_bytes: Receive buffer kept between frames for reuse; a larger one is freed
                once empty. Defaults to one frame for a client (few, busy connections) and
                _SERVER_KEEP_BYTES for a server (many, mostly idle connections).
            allocate: Makes the receive buffer for a frame larger than ``keep_buffer_bytes``,
                given the bytes it must hold at least (it may hold more). A server recycles the
                buffers its large StoreRequests hand over, so each chunk does not cost a fresh
                megabyte.

        Raises:
            ValueError: ``max_frame_bytes`` cannot hold a header.
        """
        if max_frame_bytes < PREFIX_BYTES + HEADER_BYTES:
            raise ValueError(f"max_frame_bytes must be at least {PREFIX_BYTES + HEADER_BYTES}")
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        if keep_buffer_bytes is None:
            keep_buffer_bytes = max_frame_bytes if role is Role.CLIENT else _SERVER_KEEP_BYTES
        self._keep_buffer_bytes = keep_buffer_bytes
        self._allocate = allocate
        # Received bytes not parsed yet are _buffer[_start:_end]; _buffer[_end:] is spare room
        # that get_buffer() lends out so that a socket can receive straight into it.
        self._buffer = bytearray()
        self._start = 0
        self._end = 0
        # Where the frame being received ends in _buffer, once its prefix told; else 0.
        self._frame_end = 0
        # After a hand-over: how large the fresh receive buffer grows when it must grow.
        self._regrow_bytes = 0
        self._peer_closed = False
        self._state = _State.OPEN
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
        return self._end > self._start

    @property
    def frame_pending(self) -> bool:
        """True while the frame being received is known to be incomplete.

        Then next_event() would return NEED_DATA, so a pump may skip it until more bytes arrive.
        """
        return self._end < self._frame_end

    @property
    def buffered_bytes(self) -> int:
        """Size of the receive buffer (at most one frame plus one read, for memory checks)."""
        return len(self._buffer)

    @property
    def failed(self) -> bool:
        """True once the peer broke the protocol."""
        return self._state is _State.FAILED

    def new_request_id(self) -> int:
        """A request id not in use on this connection (never 0, which names the connection).

        Raises:
            RuntimeError: if every request id is in use.
        """
        for _ in range(len(self._outstanding) + 1):
            request_id = self._next_request_id
            self._next_request_id = request_id + 1 if request_id < _MAX_REQUEST_ID else 1
            if request_id not in self._outstanding:
                return request_id
        raise RuntimeError("every request id is in use on this connection")

    # Sending.

    def send(self, event: Request | Reply) -> list[bytes | memoryview]:
        """Encode ``event`` as one frame.

        Returns:
            Buffers to write in order (header first, then any chunk body, never concatenated).

        Raises:
            ValueError: the event is not valid for this role or state (a bug in the caller).
        """
        if self._state is _State.FAILED and not (
            self.role is Role.SERVER and isinstance(event, Error)
        ):
            raise ValueError("the connection failed; only a server's final Error may be sent")
        if self.role is Role.CLIENT:
            return self._send_request(event)
        return self._send_reply(event)

    def _frame(
        self, kind: MessageType, request_id: int, body: bytes, tail: bytes | memoryview = b""
    ) -> list[bytes | memoryview]:
        length = HEADER_BYTES - PREFIX_BYTES + len(body) + len(tail)
        if length + PREFIX_BYTES > self.max_frame_bytes:
            raise ValueError(
                f"frame of {length + PREFIX_BYTES} bytes exceeds {self.max_frame_bytes}"
            )
        head = _HEADER.pack(length, PROTOCOL_VERSION, kind, request_id) + body
        return [head, tail] if tail else [head]

    def _send_request(self, event: Request | Reply) -> list[bytes | memoryview]:
        request_id = event.request_id
        if not 0 < request_id <= _MAX_REQUEST_ID or request_id in self._outstanding:
            raise ValueError(f"request id {request_id} is invalid or in use")
        if isinstance(event, StoreRequest):
            if len(event.chunk_id) != CHUNK_ID_BYTES:
                raise ValueError(f"chunk ids are {CHUNK_ID_BYTES} bytes, got {len(event.chunk_id)}")
            _check_lease(event.lease_s)
            if len(event.data) > MAX_SEALED_CHUNK_BYTES:
                raise ValueError(
                    f"chunk of {len(event.data)} bytes exceeds {MAX_SEALED_CHUNK_BYTES} bytes"
                )
            body = _STORE_FIXED.pack(event.chunk_id, event.lease_s)
            frames = self._frame(MessageType.STORE, request_id, body, event.data)
            pending = _Outstanding(MessageType.STORE)
        elif isinstance(event, FetchRequest):
            if len(event.chunk_id) != CHUNK_ID_BYTES:
                raise ValueError(f"chunk ids are {CHUNK_ID_BYTES} bytes, got {len(event.chunk_id)}")
            frames = self._frame(MessageType.FETCH, request_id, bytes(event.chunk_id))
            pending = _Outstanding(MessageType.FETCH, chunk_id=event.chunk_id)
        elif isinstance(event, HasRequest):
            _check_ids(event.ids)
            body = _COUNT.pack(len(event.ids)) + b"".join(event.ids)
            frames = self._frame(MessageType.HAS, request_id, body)
            pending = _Outstanding(MessageType.HAS, count=len(event.ids))
        elif isinstance(event, RenewRequest):
            _check_ids(event.ids)
            _check_lease(event.lease_s)
            body = _RENEW_FIXED.pack(event.lease_s, len(event.ids)) + b"".join(event.ids)
            frames = self._frame(MessageType.RENEW, request_id, body)
            pending = _Outstanding(MessageType.RENEW, count=len(event.ids))
        else:
            raise ValueError(f"a client cannot send {type(event).__name__}")
        self._outstanding[request_id] = pending
        return frames

    def _send_reply(self, event: Request | Reply) -> list[bytes | memoryview]:
        request_id = event.request_id
        if isinstance(event, Error):
            # After a violation the offending request may never have been registered; the final
            # Error still names it so the peer can tell which request broke the connection.
            known = request_id == CONNECTION_REQUEST_ID or request_id in self._outstanding
            if not known and self._state is not _State.FAILED:
                raise ValueError(f"no request {request_id} awaits a reply")
            self._outstanding.pop(request_id, None)
            message = event.message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_BYTES]
            body = _ERROR_FIXED.pack(event.code) + message
            return self._frame(MessageType.ERROR, request_id, body)
        pending = self._outstanding.get(request_id)
        if pending is None:
            raise ValueError(f"no request {request_id} awaits a reply")
        expected = _REPLY_FOR[pending.kind]
        if isinstance(event, StoreOK) and expected is MessageType.STORE_OK:
            frames = self._frame(
                MessageType.STORE_OK, request_id, b"\x01" if event.newly_stored else b"\x00"
            )
        elif isinstance(event, ChunkData) and expected is MessageType.CHUNK_DATA:
            if event.chunk_id != pending.chunk_id:
                raise ValueError("ChunkData must carry the requested chunk id")
            frames = self._frame(
                MessageType.CHUNK_DATA, request_id, bytes(event.chunk_id), event.data
            )
        elif isinstance(event, HasReply | RenewReply) and (
            (isinstance(event, HasReply) and expected is MessageType.HAS_REPLY)
            or (isinstance(event, RenewReply) and expected is MessageType.RENEW_REPLY)
        ):
            if len(event.flags) != pending.count:
                raise ValueError(f"reply needs {pending.count} flags, got {len(event.flags)}")
            body = _COUNT.pack(len(event.flags)) + bytes(event.flags)
            frames = self._frame(expected, request_id, body)
        else:
            raise ValueError(
                f"{type(event).__name__} does not answer a {pending.kind.name} request"
            )
        del self._outstanding[request_id]
        return frames

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
        if self.role is not Role.SERVER or self._state is _State.FAILED:
            raise ValueError("only a working server connection answers with ChunkData")
        pending = self._outstanding.get(request_id)
        if pending is None or pending.kind is not MessageType.FETCH:
            raise ValueError(f"no FETCH request {request_id} awaits a reply")
        end = CHUNK_DATA_HEAD_BYTES + size
        if not 0 <= size <= len(frame) - CHUNK_DATA_HEAD_BYTES:
            raise ValueError(f"frame of {len(frame)} bytes cannot hold {size} data bytes")
        if end > self.max_frame_bytes:
            raise ValueError(f"frame of {end} bytes exceeds {self.max_frame_bytes}")
        _HEADER.pack_into(
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
        if data:
            if self._peer_closed:
                raise ValueError("data received after the peer closed")
            size = len(data)
            self._make_room(size)
            self._buffer[self._end : self._end + size] = data
            self._end += size
        else:
            self._peer_closed = True

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Lend spare room of the receive buffer (asyncio.BufferedProtocol style), saving a copy.

        Receive into it, then call buffer_updated() with the byte count before anything else.
        When the current frame's length is known, the room covers the rest of that frame.

        Args:
            sizehint: The caller's wish, or -1 for no preference.

        Returns:
            A writable view of at least 64 KiB.
        """
        want = max(sizehint, _MIN_RECEIVE_BYTES)
        if self._end - self._start >= PREFIX_BYTES:
            length = int.from_bytes(self._buffer[self._start : self._start + PREFIX_BYTES], "big")
            if PREFIX_BYTES + length <= self.max_frame_bytes:
                want = max(want, self._start + PREFIX_BYTES + length - self._end)
        self._make_room(want)
        return memoryview(self._buffer)[self._end : self._end + want]

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` received into the view from get_buffer().

        Raises:
            ValueError: more bytes than the lent room.
        """
        if not 0 <= self._end + nbytes <= len(self._buffer):
            raise ValueError(f"{nbytes} bytes do not fit the lent buffer")
        self._end += nbytes

    def _make_room(self, size: int) -> None:
        """Ensure ``size`` spare bytes after _end. No view of _buffer may be alive here."""
        buffer = self._buffer
        if self._start:
            # Drop parsed bytes; CPython removes a bytearray's head without moving the rest.
            del buffer[: self._start]
            self._end -= self._start
            if self._frame_end:
                self._frame_end -= self._start
            self._start = 0
        missing = self._end + size - len(buffer)
        if missing > len(buffer):
            # Growing for a large frame: one buffer of the final size, and only the bytes already
            # received move (extend() would allocate, zero and copy the whole room twice).
            needed = max(self._end + size, self._regrow_bytes)
            grown = (
                self._allocate(needed) if needed > self._keep_buffer_bytes else bytearray(needed)
            )
            if len(grown) < needed:
                raise ValueError(f"allocate({needed}) returned {len(grown)} bytes")
            grown[: self._end] = buffer[: self._end]
            self._buffer = grown
        elif missing > 0:
            buffer.extend(bytes(missing))

    def next_event(self) -> Event | Literal[Sentinel.NEED_DATA]:
        """The next complete event, or NEED_DATA if more bytes are needed.

        Raises:
            ProtocolViolation: the peer sent something invalid; the connection is failed for good.
        """
        if self._state is _State.FAILED:
            raise ProtocolViolation("connection already failed", code=ErrorCode.BAD_REQUEST)
        if self._state is _State.CLOSED:
            return ConnectionClosed()
        try:
            return self._parse()
        except ProtocolViolation:
            self._state = _State.FAILED
            self._buffer = bytearray()
            self._start = self._end = self._frame_end = 0
            raise

    def _parse(self) -> Event | Literal[Sentinel.NEED_DATA]:
        buffer, start = self._buffer, self._start
        available = self._end - start
        if available < PREFIX_BYTES:
            if not self._peer_closed:
                return NEED_DATA
            if available:
                raise ProtocolViolation(
                    "peer closed in the middle of a frame", code=ErrorCode.BAD_REQUEST
                )
            self._state = _State.CLOSED
            return ConnectionClosed()
        length = int.from_bytes(buffer[start : start + PREFIX_BYTES], "big")
        # Refuse an oversized or undersized frame from its prefix alone, before buffering any of it.
        if length + PREFIX_BYTES > self.max_frame_bytes:
            raise ProtocolViolation(
                f"frame of {length + PREFIX_BYTES} bytes exceeds {self.max_frame_bytes}",
                code=ErrorCode.TOO_LARGE,
            )
        if length < HEADER_BYTES - PREFIX_BYTES:
            raise ProtocolViolation(
                f"frame length {length} is shorter than a header", code=ErrorCode.BAD_REQUEST
            )
        version = buffer[start + PREFIX_BYTES] if available > PREFIX_BYTES else PROTOCOL_VERSION
        if version != PROTOCOL_VERSION:
            raise ProtocolViolation(
                f"unsupported protocol version {version}, expected {PROTOCOL_VERSION}",
                code=ErrorCode.UNSUPPORTED_VERSION,
            )
        end = start + PREFIX_BYTES + length
        if self._end < end:
            if self._peer_closed:
                raise ProtocolViolation(
                    "peer closed in the middle of a frame", code=ErrorCode.BAD_REQUEST
                )
            self._frame_end = end
            return NEED_DATA
        self._frame_end = 0
        _, _, kind_byte, request_id = _HEADER.unpack_from(buffer, start)
        if length >= _HAND_OVER_BYTES and self._end - end <= _SERVER_KEEP_BYTES:
            if kind_byte == MessageType.STORE and self.role is Role.SERVER:
                return self._hand_over_store(request_id, start, end)
            if kind_byte == MessageType.CHUNK_DATA and self.role is Role.CLIENT:
                return self._hand_over_chunk(request_id, start, end)
        with memoryview(buffer) as view:
            body = view[start + HEADER_BYTES : end]
            try:
                event = self._decode(kind_byte, request_id, body)
            finally:
                body.release()
        self._start = end
        if end == self._end:
            self._start = self._end = 0
            if len(buffer) > self._keep_buffer_bytes:
                self._buffer = bytearray()
        return event

    def _hand_over_store(self, request_id: int, start: int, end: int) -> StoreRequest:
        """Decode a large STORE frame whose data stays where it was received (no copy)."""
        event, data = self._hand_over(MessageType.STORE, request_id, start, end, _STORE_FIXED.size)
        assert isinstance(event, StoreRequest)  # noqa: S101 - _decode_request made it
        return StoreRequest(event.request_id, event.chunk_id, event.lease_s, data)

    def _hand_over_chunk(self, request_id: int, start: int, end: int) -> ChunkData:
        """Decode a large CHUNK_DATA frame whose data stays where it was received (no copy)."""
        event, data = self._hand_over(
            MessageType.CHUNK_DATA, request_id, start, end, CHUNK_ID_BYTES
        )
        assert isinstance(event, ChunkData)  # noqa: S101 - _decode_reply made it
        return ChunkData(event.request_id, event.chunk_id, data)

    def _hand_over(
        self, kind: MessageType, request_id: int, start: int, end: int, fixed: int
    ) -> tuple[Event, memoryview]:
        """Decode the frame at ``start:end`` leaving out its data, and give the data away as a view.

        The connection lets go of its receive buffer, so the view stays valid as long as it is
        kept, and starts a fresh buffer with the bytes after the frame (the start of the next one,
        at most _SERVER_KEEP_BYTES). The fresh buffer grows to the handed-over one's size at once
        when the next large frame comes, as the next one mostly is as large.
        """
        self._regrow_bytes = min(len(self._buffer), self._keep_buffer_bytes)
        with memoryview(self._buffer) as view:
            body = view[start + HEADER_BYTES : end]
            try:
                event = self._decode(kind, request_id, body, data=False)
            finally:
                body.release()
            self._buffer = bytearray(view[end : self._end])
            self._start, self._end = 0, len(self._buffer)
            # A slice outlives the view it was cut from (both refer to the buffer itself).
            return event, view[start + HEADER_BYTES + fixed : end]

    def _decode(
        self, kind_byte: int, request_id: int, body: memoryview, *, data: bool = True
    ) -> Event:
        try:
            kind = MessageType(kind_byte)
        except ValueError:
            raise ProtocolViolation(
                f"unknown message type 0x{kind_byte:02x}",
                code=ErrorCode.BAD_REQUEST,
                request_id=request_id,
            ) from None
        if self.role is Role.SERVER:
            return self._decode_request(kind, request_id, body, data=data)
        return self._decode_reply(kind, request_id, body, data=data)

    def _decode_ids(
        self, kind: MessageType, request_id: int, body: memoryview, offset: int
    ) -> tuple[ChunkId, ...]:
        (count,) = _COUNT.unpack_from(body, offset)
        offset += _COUNT.size
        if not 1 <= count <= MAX_BATCH_IDS or len(body) != offset + count * CHUNK_ID_BYTES:
            raise ProtocolViolation(
                f"{kind.name} batch of {count} ids mismatches its frame or exceeds {MAX_BATCH_IDS}",
                code=ErrorCode.BAD_REQUEST,
                request_id=request_id,
            )
        return tuple(
            ChunkId(bytes(body[i : i + CHUNK_ID_BYTES]))
            for i in range(offset, offset + count * CHUNK_ID_BYTES, CHUNK_ID_BYTES)
        )

    def _decode_request(
        self, kind: MessageType, request_id: int, body: memoryview, *, data: bool = True
    ) -> Request:
        """Decode a request; with ``data=False`` a STORE's data is left out (the caller has it)."""

        def bad(message: str) -> ProtocolViolation:
            return ProtocolViolation(message, code=ErrorCode.BAD_REQUEST, request_id=request_id)

        if kind not in _REPLY_FOR:
            raise bad(f"a server does not accept {kind.name} frames")
        if request_id == CONNECTION_REQUEST_ID or request_id in self._outstanding:
            raise ProtocolViolation(
                f"request id {request_id} is reserved or already in flight",
                code=ErrorCode.BAD_REQUEST,
            )
        event: Request
        if kind is MessageType.STORE:
            if len(body) < _STORE_FIXED.size:
                raise bad("STORE frame is too short")
            chunk_id, lease_s = _STORE_FIXED.unpack_from(body)
            if lease_s == 0:
                raise bad("STORE lease must be at least 1 second")
            if len(body) - _STORE_FIXED.size > MAX_SEALED_CHUNK_BYTES:
                raise ProtocolViolation(
                    f"chunk of {len(body) - _STORE_FIXED.size} bytes exceeds the maximum",
                    code=ErrorCode.TOO_LARGE,
                    request_id=request_id,
                )
            chunk = bytes(body[_STORE_FIXED.size :]) if data else b""
            event = StoreRequest(request_id, ChunkId(chunk_id), lease_s, chunk)
        elif kind is MessageType.FETCH:
            if len(body) != CHUNK_ID_BYTES:
                raise bad("FETCH frame must hold exactly one chunk id")
            event = FetchRequest(request_id, ChunkId(bytes(body)))
        elif kind is MessageType.HAS:
            if len(body) < _COUNT.size:
                raise bad("HAS frame is too short")
            event = HasRequest(request_id, self._decode_ids(kind, request_id, body, 0))
        else:
            if len(body) < _RENEW_FIXED.size:
                raise bad("RENEW frame is too short")
            (lease_s,) = struct.unpack_from(">I", body)
            if lease_s == 0:
                raise bad("RENEW lease must be at least 1 second")
            ids = self._decode_ids(kind, request_id, body, 4)
            event = RenewRequest(request_id, ids, lease_s)
        count = len(event.ids) if isinstance(event, HasRequest | RenewRequest) else 0
        chunk_id_seen = event.chunk_id if isinstance(event, FetchRequest) else b""
        self._outstanding[request_id] = _Outstanding(kind, chunk_id=chunk_id_seen, count=count)
        return event

    def _decode_reply(
        self, kind: MessageType, request_id: int, body: memoryview, *, data: bool = True
    ) -> Reply:
        """Decode a reply; with ``data=False`` a CHUNK_DATA's data is left out (the caller has it)."""

        def bad(message: str) -> ProtocolViolation:
            return ProtocolViolation(message, code=ErrorCode.BAD_REQUEST, request_id=request_id)

        if kind is MessageType.ERROR:
            if (
                len(body) < _ERROR_FIXED.size
                or len(body) > _ERROR_FIXED.size + MAX_ERROR_MESSAGE_BYTES
            ):
                raise bad("ERROR frame has a bad length")
            if request_id != CONNECTION_REQUEST_ID and request_id not in self._outstanding:
                raise bad(f"ERROR answers unknown request {request_id}")
            self._outstanding.pop(request_id, None)
            try:
                code = ErrorCode(body[0])
            except ValueError:
                code = ErrorCode.INTERNAL
            message = _printable(bytes(body[1:]).decode("utf-8", "replace"))
            return Error(request_id, code, message)
        pending = self._outstanding.get(request_id)
        if pending is None:
            raise bad(f"{kind.name} answers unknown request {request_id}")
        if _REPLY_FOR[pending.kind] is not kind:
            raise bad(f"{kind.name} does not answer a {pending.kind.name} request")
        reply: Reply
        if kind is MessageType.STORE_OK:
            if len(body) != 1 or body[0] > 1:
                raise bad("STORE_OK must hold one 0/1 byte")
            reply = StoreOK(request_id, body[0] == 1)
        elif kind is MessageType.CHUNK_DATA:
            if len(body) < CHUNK_ID_BYTES or body[:CHUNK_ID_BYTES] != pending.chunk_id:
                raise bad("CHUNK_DATA carries a chunk id that was not asked for")
            chunk = bytes(body[CHUNK_ID_BYTES:]) if data else b""
            reply = ChunkData(request_id, ChunkId(pending.chunk_id), chunk)
        else:
            if len(body) < _COUNT.size:
                raise bad(f"{kind.name} frame is too short")
            (count,) = _COUNT.unpack_from(body)
            flags = body[_COUNT.size :]
            if count != pending.count or len(flags) != count or any(b > 1 for b in flags):
                raise bad(f"{kind.name} must hold {pending.count} 0/1 flags")
            values = tuple(b == 1 for b in flags)
            reply = (
                HasReply(request_id, values)
                if kind is MessageType.HAS_REPLY
                else RenewReply(request_id, values)
            )
        del self._outstanding[request_id]
        return reply
