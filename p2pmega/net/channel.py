"""ChannelLayer: the authenticated, encrypted channel as a layer of net.pump's stack.

It runs core.wire.handshake on the first bytes of a connection, then seals what the wire writes
into records and opens received records straight into the wire's buffer (one pass each way).
The protocol is core's; this module only lends buffers and writes (docs/PROTOCOL.md, "Channel").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from p2pmega.core import crypto
from p2pmega.core.wire import TransferConnection
from p2pmega.core.wire.events import Role
from p2pmega.core.wire.handshake import MAX_HANDSHAKE_FRAME_BYTES, Handshake, HandshakeFailed
from p2pmega.core.wire.records import (
    CLIENT_RECEIVE_BYTES,
    MAX_RECEIVE_BYTES,
    RecordError,
    RecordReader,
    RecordWriter,
)
from p2pmega.net.buffers import BufferPool
from p2pmega.net.pump import Layer, LayerStack

# Room lent to the socket during the handshake: a little more than its largest message, so a
# peer cannot make us hold more before it has proven anything.
_HANDSHAKE_ROOM_BYTES: Final = 2 * MAX_HANDSHAKE_FRAME_BYTES
# Writes up to this size (requests, small replies) are sealed into a fresh buffer; larger ones (chunks)
# into a buffer of the pool.
_SMALL_WRITE_BYTES: Final = 64 << 10


class ChannelLayer:
    """Handshake, then records: between the socket and the wire's TransferConnection.

    ``peer_public_key`` is the Ed25519 key the peer proved, once `ready`. A failed handshake or a
    record that does not open raises core's RemoteProtocolError from `buffer_updated` (the pump
    turns it into its ``channel_failed`` hook); bytes worth sending first (an Error an old peer
    understands) are written before it is raised.
    """

    def __init__(
        self, conn: TransferConnection, *, role: Role, signing_seed: bytes, pool: BufferPool
    ) -> None:
        self._conn = conn
        self._pool = pool
        self._sealed: bytearray | None = None  # the buffer of the last outgoing(), until sent()
        self._handshake: Handshake | None = Handshake(
            role=role,
            signing_seed=signing_seed,
            ephemeral_seed=crypto.random_bytes(crypto.KX_SEED_BYTES),
        )
        self._room = bytearray(_HANDSHAKE_ROOM_BYTES)
        self._reader: RecordReader | None = None
        self._writer: RecordWriter | None = None
        self._write: Callable[[bytes | bytearray | memoryview], None] | None = None
        self._queued: list[bytes | memoryview] = []
        self.ready = False
        self.peer_public_key: bytes | None = None
        self.copies = True  # records are new buffers: the wire's may be reused at once

    def opened(self, write: Callable[[bytes | bytearray | memoryview], None]) -> None:
        self._write = write
        handshake = self._handshake
        if handshake is not None and handshake.role is Role.CLIENT:
            write(handshake.start())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._reader is not None:
            return self._reader.get_buffer(sizehint)
        return memoryview(self._room)

    def buffer_updated(self, nbytes: int) -> None:
        reader = self._reader
        if reader is None:
            self._handshake_data(bytes(memoryview(self._room)[:nbytes]))
            return
        reader.buffer_updated(nbytes)
        self._open_records(reader)

    def _handshake_data(self, data: bytes) -> None:
        handshake = self._handshake
        assert handshake is not None  # noqa: S101 - before ready only
        assert self._write is not None  # noqa: S101 - opened() came first
        try:
            reply = handshake.receive_data(data)
        except HandshakeFailed as exc:
            if exc.reply:
                self._write(exc.reply)
            raise
        if reply:
            self._write(reply)
        if not handshake.done:
            return
        keys = handshake.keys
        assert keys is not None  # noqa: S101 - done means keys
        self._handshake = None
        self._room = bytearray()
        # A client reads chunks from holders it chose: a larger buffer lets a read bring several
        # records. A server keeps the smaller one (strangers connect to it).
        receive_bytes = CLIENT_RECEIVE_BYTES if handshake.role is Role.CLIENT else MAX_RECEIVE_BYTES
        self._reader = reader = RecordReader(keys.receive_key, max_buffer_bytes=receive_bytes)
        self._writer = RecordWriter(keys.send_key)
        self.peer_public_key = keys.peer_public_key
        self.ready = True
        if self._queued:
            queued, self._queued = self._queued, []
            self._write(bytes(self._writer.seal(queued)))
        rest = handshake.rest
        while rest:
            rest = rest[reader.receive_data(rest) :]
            self._open_records(reader)

    def _open_records(self, reader: RecordReader) -> None:
        conn = self._conn
        size = reader.next_plaintext_bytes()
        while size is not None:
            # The wire lends at least this record's room, mostly the rest of its frame: the records
            # that follow and fit are opened into the same room, with one call each way per room.
            opened = 0
            with conn.get_buffer(size) as room:
                while size is not None and opened + size <= len(room):
                    opened += reader.open_into(room[opened : opened + size])
                    size = reader.next_plaintext_bytes()
            conn.buffer_updated(opened)

    def eof_received(self) -> None:
        if self._handshake is not None:
            self._handshake.receive_data(b"")  # raises HandshakeFailed: closed before proving
        if self._reader is not None and self._reader.buffered_bytes:
            raise RecordError("the peer closed in the middle of a record")
        self._conn.receive_data(b"")

    def outgoing(
        self, buffers: list[bytes | memoryview]
    ) -> Sequence[bytes | bytearray | memoryview]:
        writer = self._writer
        if writer is None:
            # Nothing of the wire leaves before the peer is proven; flushed once ready.
            self._queued.extend(bytes(b) for b in buffers)
            return ()
        # Records go into a warm pool buffer (a fresh one per chunk costs a zero-fill and a page
        # fault per 4 KiB); sent() gives it back once the transport no longer refers to it.
        return (writer.seal(buffers, self._take),)

    def _take(self, size: int) -> bytearray:
        if size <= _SMALL_WRITE_BYTES:
            return bytearray(size)
        self._sealed = self._pool.take(size)
        return self._sealed

    def sent(self) -> None:
        buffer, self._sealed = self._sealed, None
        if buffer is not None:
            self._pool.give(buffer)  # kept only if no view of it is alive (the transport's)


def channel_layers(role: Role, signing_seed: bytes, pool: BufferPool) -> LayerStack:
    """A layer stack for TransferServer / TransferClient: the channel over the wire.

    Args:
        role: SERVER for a server's connections, CLIENT for a client's.
        signing_seed: The Ed25519 seed whose public key the peers will see proven.
        pool: Where large outgoing records are sealed into (the side's own BufferPool).

    Returns:
        A factory making one ChannelLayer per connection.
    """

    def stack(conn: TransferConnection) -> Layer:
        return ChannelLayer(conn, role=role, signing_seed=signing_seed, pool=pool)

    return stack
