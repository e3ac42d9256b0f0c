"""The receive buffer of one transfer connection: bytes in, whole frames out, with no decoding.

It checks a frame's length and version before buffering the rest of it, lends its spare room to
the socket (asyncio.BufferedProtocol style) and hands a large frame's data over without a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from p2pmega.core.wire.codec import HEADER, bad
from p2pmega.core.wire.events import (
    HEADER_BYTES,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
)

# A server keeps at most 64 KiB of receive buffer per connection between frames: it may have 128
# mostly idle connections. Large frames arrive in buffers from ``allocate`` (the server's pool).
SERVER_KEEP_BYTES: Final = 64 << 10
# The smallest room get_buffer() lends: a quarter of asyncio's own 256 KiB reads, so small frames
# do not cost a system call each.
_MIN_RECEIVE_BYTES: Final = 64 << 10
# A frame at least this large may have its data handed over (no copy of the chunk), if at most
# SERVER_KEEP_BYTES of the next frame have to move to a fresh buffer.
_HAND_OVER_BYTES: Final = 64 << 10

_T = TypeVar("_T")


@dataclass(frozen=True)
class Frame:
    """A whole frame in the buffer: its type byte, request id and where it ends."""

    kind: int
    request_id: int
    start: int
    end: int

    @property
    def large(self) -> bool:
        """Large enough that handing its data over beats copying it."""
        return self.end - self.start >= _HAND_OVER_BYTES + PREFIX_BYTES


class ReceiveBuffer:
    """Bytes received and not parsed yet, and spare room the socket can receive straight into."""

    def __init__(
        self,
        *,
        max_frame_bytes: int,
        keep_bytes: int,
        allocate: Callable[[int], bytearray],
        release: Callable[[bytearray], None] | None = None,
        grow_with_arrival: bool = True,
    ) -> None:
        """Create an empty buffer.

        Args:
            max_frame_bytes: Largest frame accepted, prefix included.
            keep_bytes: Buffer kept between frames for reuse; a larger one is freed once empty.
            allocate: Makes the buffer for a frame larger than ``keep_bytes``, given the bytes it
                must hold at least (it may hold more).
            release: Takes back a buffer from ``allocate`` once a larger one replaced it.
            grow_with_arrival: Lend room as bytes arrive (at most doubling) rather than the whole
                declared frame at once. A server must (strangers open connections to it and declare
                what they like); a client may lend the whole reply it asked for, saving the steps.
        """
        self.max_frame_bytes = max_frame_bytes
        self._keep_bytes = keep_bytes
        self._allocate = allocate
        self._release = release
        self._grow_with_arrival = grow_with_arrival
        # Received bytes not parsed yet are _buffer[_start:_end]; _buffer[_end:] is spare room
        # that get_buffer() lends out so that a socket can receive straight into it.
        self._buffer = bytearray()
        self._start = 0
        self._end = 0
        # Where the frame being received ends in _buffer, once its prefix told; else 0.
        self._frame_end = 0
        # After a hand-over: how large the fresh receive buffer grows when it must grow.
        self._regrow_bytes = 0
        self.peer_closed = False

    @property
    def has_bytes(self) -> bool:
        """True while part of a frame is buffered."""
        return self._end > self._start

    @property
    def frame_pending(self) -> bool:
        """True while the frame being received is known to be incomplete."""
        return self._end < self._frame_end

    @property
    def size(self) -> int:
        """Size of the buffer (at most one frame plus one read, for memory checks)."""
        return len(self._buffer)

    def clear(self) -> None:
        """Drop everything: the connection failed."""
        self._buffer = bytearray()
        self._start = self._end = self._frame_end = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer; ``b""`` means the peer closed its sending side.

        Raises:
            ValueError: data arrived after the peer already closed.
        """
        if data:
            if self.peer_closed:
                raise ValueError("data received after the peer closed")
            size = len(data)
            self._make_room(size)
            self._buffer[self._end : self._end + size] = data
            self._end += size
        else:
            self.peer_closed = True

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Lend spare room, at least 64 KiB and the rest of the current frame once its length is known.

        Args:
            sizehint: The caller's wish, or -1 for no preference.

        Returns:
            A writable view; receive into it, then call buffer_updated() before anything else.
        """
        want = max(sizehint, _MIN_RECEIVE_BYTES)
        arrived = self._end - self._start
        if arrived >= PREFIX_BYTES:
            length = int.from_bytes(self._buffer[self._start : self._start + PREFIX_BYTES], "big")
            if PREFIX_BYTES + length <= self.max_frame_bytes:
                # The room grows with the bytes that arrived (at most doubling), never to the
                # size a frame declares: a peer that declares 4 MiB and sends 10 bytes costs 64 KiB,
                # not 4 MiB (issue 16). After a large frame, _make_room regrows at once.
                rest = PREFIX_BYTES + length - arrived
                if self._grow_with_arrival:
                    rest = min(rest, max(arrived, _MIN_RECEIVE_BYTES))
                want = max(want, rest)
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
        if missing > len(buffer) or (missing > 0 and self._end + size > self._keep_bytes):
            # Growing for a large frame: one buffer of the final size, and only the bytes already
            # received move (extend() would allocate, zero and copy the whole room twice).
            needed = max(self._end + size, self._regrow_bytes)
            grown = self._allocate(needed) if needed > self._keep_bytes else bytearray(needed)
            if len(grown) < needed:
                raise ValueError(f"allocate({needed}) returned {len(grown)} bytes")
            grown[: self._end] = buffer[: self._end]
            self._buffer = grown
            if self._release is not None and len(buffer) > self._keep_bytes:
                # It came from allocate: a pool can lend it again (a warm buffer fits a whole
                # frame at the first growth, so steps cost nothing once the pool is warm).
                self._release(buffer)
        elif missing > 0:
            buffer.extend(bytes(missing))

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None if more bytes are needed or the peer closed cleanly.

        Raises:
            ProtocolViolation: the frame is too large, too short or of another version, or the
                peer closed in the middle of it.
        """
        buffer, start = self._buffer, self._start
        available = self._end - start
        if available < PREFIX_BYTES:
            if self.peer_closed and available:
                raise bad("peer closed in the middle of a frame", 0)
            return None
        length = int.from_bytes(buffer[start : start + PREFIX_BYTES], "big")
        # Refuse an oversized or undersized frame from its prefix alone, before buffering any of it.
        if length + PREFIX_BYTES > self.max_frame_bytes:
            raise bad(
                f"frame of {length + PREFIX_BYTES} bytes exceeds {self.max_frame_bytes}",
                0,
                ErrorCode.TOO_LARGE,
            )
        if length < HEADER_BYTES - PREFIX_BYTES:
            raise bad(f"frame length {length} is shorter than a header", 0)
        version = buffer[start + PREFIX_BYTES] if available > PREFIX_BYTES else PROTOCOL_VERSION
        if version != PROTOCOL_VERSION:
            raise bad(
                f"unsupported protocol version {version}, expected {PROTOCOL_VERSION}",
                0,
                ErrorCode.UNSUPPORTED_VERSION,
            )
        end = start + PREFIX_BYTES + length
        if self._end < end:
            if self.peer_closed:
                raise bad("peer closed in the middle of a frame", 0)
            self._frame_end = end
            return None
        self._frame_end = 0
        _, _, kind, request_id = HEADER.unpack_from(buffer, start)
        return Frame(kind, request_id, start, end)

    def decode(self, frame: Frame, decode: Callable[[int, memoryview, bool], _T]) -> _T:
        """``decode(request_id, body, True)`` of ``frame``, then drop the frame.

        The body is a view valid only during the call.
        """
        buffer = self._buffer
        with memoryview(buffer) as view:
            body = view[frame.start + HEADER_BYTES : frame.end]
            try:
                event = decode(frame.request_id, body, True)
            finally:
                body.release()
        end = frame.end
        self._start = end
        if end == self._end:
            self._start = self._end = 0
            if len(buffer) > self._keep_bytes:
                self._buffer = bytearray()
        return event

    def can_hand_over(self, frame: Frame) -> bool:
        """Whether `hand_over` may give ``frame``'s data away: large, and little follows it."""
        return frame.large and self._end - frame.end <= SERVER_KEEP_BYTES

    def hand_over(
        self, frame: Frame, decode: Callable[[int, memoryview, bool], _T], data_offset: int
    ) -> tuple[_T, memoryview]:
        """``decode`` the frame's body up to its data, and give the data away as a view.

        The buffer lets go of its bytearray, so the view stays valid as long as it is kept, and
        starts a fresh one with the bytes after the frame (the start of the next one, at most
        SERVER_KEEP_BYTES). The fresh buffer grows to the handed-over one's size at once when the
        next large frame comes, as the next one mostly is as large.

        Args:
            frame: From next_frame(), with can_hand_over(frame) true.
            decode: Called as ``decode(request_id, body, False)``: decodes the body with its data
                left out (a view valid only during the call).
            data_offset: Bytes of the body before the data.
        """
        start, end = frame.start, frame.end
        self._regrow_bytes = min(len(self._buffer), self._keep_bytes)
        with memoryview(self._buffer) as view:
            body = view[start + HEADER_BYTES : end]
            try:
                event = decode(frame.request_id, body, False)
            finally:
                body.release()
            self._buffer = bytearray(view[end : self._end])
            self._start, self._end = 0, len(self._buffer)
            # A slice outlives the view it was cut from (both refer to the buffer itself).
            return event, view[start + HEADER_BYTES + data_offset : end]
