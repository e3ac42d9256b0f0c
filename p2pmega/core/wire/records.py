"""The transfer channel's records after the handshake: plaintext in, AEGIS-256 records out, and back.

A record is ``u32 length || ciphertext || tag(32)``; the length prefix is the associated data and
the nonce is the record's number in its direction, so a record that is replayed, dropped,
reordered or reflected does not open. Pure: the net layer lends the buffers (docs/PROTOCOL.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from p2pmega.core import crypto
from p2pmega.errors import DecryptionFailed, RemoteProtocolError

RECORD_PREFIX_BYTES: Final = 4
TAG_BYTES: Final = crypto.RECORD_TAG_BYTES
RECORD_OVERHEAD_BYTES: Final = RECORD_PREFIX_BYTES + TAG_BYTES
# 256 KiB of plaintext per record: a 2 MiB chunk is 8 records, so the Python work per record is
# lost in the cipher's (AEGIS-256 runs near 9 GB/s here), while a peer can make us buffer at most
# one record of ciphertext it has not yet authenticated.
MAX_RECORD_PLAINTEXT_BYTES: Final = 256 << 10
# Writes smaller than this are gathered into one record with their neighbours (a frame header and
# its body); larger ones are sealed straight from the caller's buffer.
_GATHER_BYTES: Final = 64 << 10
# The receive buffer starts this small and doubles only when a read fills all the room it was lent,
# up to two largest records by default. A client, which receives chunks from a few holders it chose,
# lets it grow to four: reads of up to ~1 MiB then bring several records each (4.9 reads per MiB
# of chunks before, 1.9 now; bench/transfer.py in one process, 0.1 ms less CPU per MiB; a fetch peaks
# ~12 MiB higher, docs/PROTOCOL.md "Cost").
_MIN_RECEIVE_BYTES: Final = 64 << 10
_LARGEST_RECORD_BYTES: Final = MAX_RECORD_PLAINTEXT_BYTES + RECORD_OVERHEAD_BYTES
MAX_RECEIVE_BYTES: Final = 2 * _LARGEST_RECORD_BYTES
CLIENT_RECEIVE_BYTES: Final = 4 * _LARGEST_RECORD_BYTES


class RecordError(RemoteProtocolError):
    """A record is malformed or does not authenticate: the connection is dead."""


class RecordWriter:
    """Seals outgoing plaintext into records under one key and a counter (one direction)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.counter = 0

    def seal(
        self,
        buffers: Sequence[bytes | bytearray | memoryview],
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> memoryview:
        """Seal ``buffers`` (in order, as one byte stream) into back-to-back records.

        Args:
            buffers: Plaintext pieces; small neighbours share a record, large ones are split.
            allocate: Makes the output buffer, given the bytes it must hold at least (a pool's
                warm buffer saves zero-filling and faulting in a fresh one per chunk).

        Returns:
            A view of the records in the allocated buffer, ready to write.
        """
        pieces: list[bytes | bytearray | memoryview] = []
        pending = bytearray()
        for buffer in buffers:
            if len(buffer) < _GATHER_BYTES:
                pending += buffer
                if len(pending) >= MAX_RECORD_PLAINTEXT_BYTES:
                    pieces.append(pending)
                    pending = bytearray()
                continue
            if pending:
                pieces.append(pending)
                pending = bytearray()
            pieces.append(buffer)
        if pending:
            pieces.append(pending)
        total = sum(len(p) for p in pieces)
        records = sum(-(-len(p) // MAX_RECORD_PLAINTEXT_BYTES) for p in pieces)
        size = total + records * RECORD_OVERHEAD_BYTES
        out = allocate(size)
        at = 0
        with memoryview(out) as view:
            for piece in pieces:
                with memoryview(piece) as source:
                    for start in range(0, len(source), MAX_RECORD_PLAINTEXT_BYTES):
                        plain = source[start : start + MAX_RECORD_PLAINTEXT_BYTES]
                        at = self._seal_one(plain, view, at)
        return memoryview(out)[:size]

    def _seal_one(self, plain: memoryview, view: memoryview, at: int) -> int:
        sealed_bytes = len(plain) + TAG_BYTES
        prefix = view[at : at + RECORD_PREFIX_BYTES]
        prefix[:] = sealed_bytes.to_bytes(RECORD_PREFIX_BYTES, "big")
        body = at + RECORD_PREFIX_BYTES
        crypto.seal_record_into(
            self._key, self.counter, plain, prefix, view[body : body + sealed_bytes]
        )
        self.counter += 1
        return body + sealed_bytes


class RecordReader:
    """Buffers incoming records (one direction) and opens each whole one into the caller's room.

    Use as asyncio's BufferedProtocol does: `get_buffer`, receive into it, `buffer_updated`; then
    while `next_plaintext_bytes` is not None, `open_into` a room of that size.
    """

    def __init__(self, key: bytes, *, max_buffer_bytes: int = MAX_RECEIVE_BYTES) -> None:
        """Open records sealed under ``key``, in a buffer that grows to ``max_buffer_bytes``.

        Raises:
            ValueError: ``max_buffer_bytes`` cannot hold two largest records (a caller bug).
        """
        if max_buffer_bytes < MAX_RECEIVE_BYTES:
            raise ValueError(f"a record buffer needs at least {MAX_RECEIVE_BYTES} bytes")
        self._key = key
        self.counter = 0
        self._max_bytes = max_buffer_bytes
        self._buffer = bytearray(_MIN_RECEIVE_BYTES)
        self._start = 0
        self._end = 0
        self._lent = 0  # room the last get_buffer() lent
        self._filled = False  # the last read took all of it

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet opened."""
        return self._end - self._start

    @property
    def size(self) -> int:
        """Size of the receive buffer (for memory checks)."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> int:
        """Add as much as fits of bytes that arrived some other way (after the handshake).

        Returns:
            How many of ``data`` were taken; open the whole records, then pass the rest.
        """
        taken = 0
        while taken < len(data):
            with self.get_buffer(len(data) - taken) as room:
                size = min(len(room), len(data) - taken)
                room[:size] = data[taken : taken + size]
            if not size:
                break
            self.buffer_updated(size)
            taken += size
        return taken

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Spare room to receive into: all of it, so one read may bring several records.

        Whole records are opened as soon as they arrive, so at most one partial record is left;
        it moves to the front (at most one record is copied) only when the room after it cannot
        take the rest of it and one more largest record. The buffer doubles, up to
        ``max_buffer_bytes``, only when a read filled all the room it was lent.

        Returns:
            A writable view; receive into it, then call buffer_updated() before anything else.
        """
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and (
            len(self._buffer) - self._end < self._rest_of_record() + _LARGEST_RECORD_BYTES
        ):
            # Little room left after a partial record: move it (at most one record) to the front.
            with memoryview(self._buffer) as view:
                view[: self._end - self._start] = view[self._start : self._end]
            self._end -= self._start
            self._start = 0
        if self._filled and len(self._buffer) < self._max_bytes:
            # The last read took all it was lent: the peer sends more than fits, worth more memory.
            grown = bytearray(min(2 * len(self._buffer), self._max_bytes))
            with memoryview(grown) as view:
                view[: self._end - self._start] = memoryview(self._buffer)[self._start : self._end]
            self._end -= self._start
            self._start = 0
            self._buffer = grown
        self._lent = len(self._buffer) - self._end
        return memoryview(self._buffer)[self._end :]

    def _rest_of_record(self) -> int:
        """Bytes still to come of the record at _start (a whole largest one if its length is unknown)."""
        if self._end - self._start < RECORD_PREFIX_BYTES:
            return MAX_RECORD_PLAINTEXT_BYTES + RECORD_OVERHEAD_BYTES - (self._end - self._start)
        start = self._start
        sealed_bytes = int.from_bytes(self._buffer[start : start + RECORD_PREFIX_BYTES], "big")
        return max(0, RECORD_PREFIX_BYTES + sealed_bytes - (self._end - start))

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` received into the view from get_buffer().

        Raises:
            ValueError: more bytes than the lent room (a caller bug).
        """
        if not 0 <= self._end + nbytes <= len(self._buffer):
            raise ValueError(f"{nbytes} bytes do not fit the lent buffer")
        self._end += nbytes
        self._filled = nbytes == self._lent

    def next_plaintext_bytes(self) -> int | None:
        """Plaintext size of the next record if it arrived whole, else None.

        Raises:
            RecordError: the record declares a size no peer of ours sends.
        """
        available = self._end - self._start
        if available < RECORD_PREFIX_BYTES:
            return None
        start = self._start
        sealed_bytes = int.from_bytes(self._buffer[start : start + RECORD_PREFIX_BYTES], "big")
        if not TAG_BYTES <= sealed_bytes <= MAX_RECORD_PLAINTEXT_BYTES + TAG_BYTES:
            raise RecordError(f"record of {sealed_bytes} bytes is outside the allowed sizes")
        if available < RECORD_PREFIX_BYTES + sealed_bytes:
            return None
        return sealed_bytes - TAG_BYTES

    def open_into(self, out: memoryview) -> int:
        """Check and decrypt the next record (next_plaintext_bytes() said it is whole) into ``out``.

        Returns:
            The plaintext size.

        Raises:
            RecordError: the record does not authenticate under this key and counter.
        """
        start = self._start
        sealed_bytes = int.from_bytes(self._buffer[start : start + RECORD_PREFIX_BYTES], "big")
        end = start + RECORD_PREFIX_BYTES + sealed_bytes
        with memoryview(self._buffer) as view:
            try:
                size = crypto.open_record_into(
                    self._key,
                    self.counter,
                    view[start + RECORD_PREFIX_BYTES : end],
                    view[start : start + RECORD_PREFIX_BYTES],
                    out,
                )
            except DecryptionFailed as exc:
                raise RecordError("a record does not authenticate") from exc
        self.counter += 1
        self._start = end
        return size
