"""The transfer channel over asyncio streams, for tests that play a peer by hand (fake or hostile holders
and clients): the handshake and records of core.wire, with no pump and no limits."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence

from p2pmega.core.crypto import new_signing_seed
from p2pmega.core.wire.events import Role
from p2pmega.core.wire.handshake import Handshake
from p2pmega.core.wire.records import RecordReader, RecordWriter

STEP_S = 10.0


class SecureStream:
    """A stream whose bytes travel in channel records once `handshake` succeeded."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        role: Role,
        seed: bytes | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.handshake = Handshake(
            role=role,
            signing_seed=seed if seed is not None else new_signing_seed(),
            ephemeral_seed=os.urandom(32),
        )
        self._records: RecordReader | None = None
        self._sealer: RecordWriter | None = None
        self.peer_public_key = b""
        self._pending = b""

    async def run_handshake(self) -> None:
        """Complete the handshake (raises HandshakeFailed or TimeoutError)."""
        hs = self.handshake
        async with asyncio.timeout(STEP_S):
            if hs.role is Role.CLIENT:
                self.writer.write(hs.start())
            while not hs.done:
                out = hs.receive_data(await self.reader.read(4096))
                if out:
                    self.writer.write(out)
        assert hs.keys is not None
        self.peer_public_key = hs.keys.peer_public_key
        self._records = RecordReader(hs.keys.receive_key)
        self._sealer = RecordWriter(hs.keys.send_key)
        self._pending = hs.rest

    def sealed(self, buffers: Sequence[bytes | bytearray | memoryview]) -> bytes:
        """The records for ``buffers`` (to write whole or in part)."""
        assert self._sealer is not None
        return bytes(self._sealer.seal(buffers))

    def write(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        self.writer.write(self.sealed(buffers))

    async def read(self) -> bytes:
        """The plaintext of the records that arrive with the next read; b"" once the peer closed."""
        assert self._records is not None
        records = self._records
        out = bytearray()
        while True:
            while True:
                while (size := records.next_plaintext_bytes()) is not None:
                    room = bytearray(size)
                    records.open_into(memoryview(room))
                    out += room
                if not self._pending:
                    break
                self._pending = self._pending[records.receive_data(self._pending) :]
            if out:
                return bytes(out)
            self._pending = await self.reader.read(1 << 20)
            if not self._pending:
                return b""


async def open_secure(
    host: str, port: int, *, local: str, seed: bytes | None = None
) -> SecureStream:
    """Connect from ``local`` and run the client side of the handshake."""
    async with asyncio.timeout(STEP_S):
        reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0))
    stream = SecureStream(reader, writer, role=Role.CLIENT, seed=seed)
    try:
        await stream.run_handshake()
    except BaseException:
        writer.transport.abort()
        raise
    return stream


def handshake_blocking(sock: socket.socket) -> RecordWriter:
    """Run the client side of the handshake on a connected blocking socket; a sealer for what follows."""
    hs = Handshake(role=Role.CLIENT, signing_seed=new_signing_seed(), ephemeral_seed=os.urandom(32))
    sock.sendall(hs.start())
    while not hs.done:
        out = hs.receive_data(sock.recv(4096))
        if out:
            sock.sendall(out)
    assert hs.keys is not None
    return RecordWriter(hs.keys.send_key)
