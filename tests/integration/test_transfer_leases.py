"""LEASES over real loopback sockets: a TransferServer reports the seconds left on its leases.

The holder's store runs on a clock the test sets, so the remaining seconds are exact.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from p2pmega import errors
from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.wire import (
    MAX_BATCH_IDS,
    PROTOCOL_VERSION,
    ErrorCode,
    Role,
)
from p2pmega.net.transfer_client import TransferClient
from tests.channel_helpers import SecureStream, open_secure
from tests.chunk_bytes import shaped
from tests.conftest import free_port, peer_address
from tests.integration.test_transfer import holder

pytestmark = pytest.mark.integration

STEP_S = 10.0
START = 1_000_000.0


class Clock:
    """A clock the test moves by hand (the store reads it from its worker threads)."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def chunk(size: int) -> tuple[ChunkId, bytes]:
    data = shaped(os.urandom(size))
    return chunk_id_of(data), data


async def test_leases_after_store_and_after_renew(tmp_path: Path) -> None:
    clock = Clock()
    host = peer_address(1, 1)
    async with holder(tmp_path, host, clock=clock) as (server, store):
        addr = (host, server.port)
        (kept, kept_data), (short, short_data) = chunk(100), chunk(200)
        unknown = ChunkId(os.urandom(32))
        async with TransferClient(local_host=peer_address(2, 1)) as client, asyncio.timeout(STEP_S):
            assert await client.store(addr, kept, kept_data, 3600)
            assert await client.store(addr, short, short_data, 10.2)  # rounded up to 11 s
            assert await client.leases(addr, [kept, unknown, short, kept]) == [3600, 0, 11, 3600]
            clock.now += 100.5
            # Rounded up: 3499.5 s left reads 3500, and a lease that ended reads 0.
            assert await client.leases(addr, [kept, short]) == [3500, 0]
            assert await client.renew(addr, [kept, short], 7200) == [True, False]
            assert await client.leases(addr, [kept, short]) == [7200, 0]
            assert store.leases([kept, short, unknown]) == [7200, 0, 0]
            clock.now += 7200
            assert await client.leases(addr, [kept]) == [0]
            assert await client.leases(addr, []) == []


async def test_leases_batches_larger_than_one_frame(tmp_path: Path) -> None:
    clock = Clock()
    host = peer_address(1, 2)
    async with holder(tmp_path, host, clock=clock) as (server, _):
        addr = (host, server.port)
        held = [chunk(64 + i) for i in range(3)]
        ids = [ChunkId(os.urandom(32)) for _ in range(MAX_BATCH_IDS + 100)]
        positions = [0, MAX_BATCH_IDS - 1, MAX_BATCH_IDS + 50]
        for position, (cid, _) in zip(positions, held, strict=True):
            ids[position] = cid
        async with TransferClient(local_host=peer_address(2, 2)) as client, asyncio.timeout(STEP_S):
            for lease_s, (cid, data) in enumerate(held, start=1):
                await client.store(addr, cid, data, 1000 * lease_s)
            remaining = await client.leases(addr, ids)
        expected = [0] * len(ids)
        for lease_s, position in enumerate(positions, start=1):
            expected[position] = 1000 * lease_s
        assert remaining == expected


async def test_a_type_the_holder_does_not_know_gets_a_typed_error_then_a_close(
    tmp_path: Path,
) -> None:
    """What a version-1 holder older than LEASES does with it (docs/PROTOCOL.md, "Versioning").

    0x0C is unknown to this holder as 0x05 (LEASES), 0x06/0x07 (STORE_KEYED, RENEW_SIGNED), 0x08 (SPACE) and
    0x09-0x0B (STORE_FORWARD, EXPECT, FORWARDED_STORE) were to the holders before them: the request is
    answered with BAD_REQUEST under its own id, and the connection is closed.
    """
    host = peer_address(1, 3)
    async with holder(tmp_path, host, clock=Clock()) as (server, _):
        stream = await open_secure(host, server.port, local=peer_address(2, 3))
        try:
            body = struct.pack(">H", 1) + bytes(32)
            stream.write([struct.pack(">IBBI", 6 + len(body), PROTOCOL_VERSION, 0x0C, 5) + body])
            received = b""
            async with asyncio.timeout(STEP_S):
                while data := await stream.read():  # until the holder closes
                    received += data
        finally:
            stream.writer.close()
        message = b"unknown message type 0x0c"
        error = struct.pack(
            ">IBBIB", 7 + len(message), PROTOCOL_VERSION, 0xFF, 5, ErrorCode.BAD_REQUEST
        )
        assert received == error + message


async def test_leases_from_an_old_holder_is_peer_unreachable(tmp_path: Path) -> None:
    """A holder that refuses LEASES as unknown: the client's caller sees why, in one line."""

    async def old_holder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = SecureStream(reader, writer, role=Role.SERVER)
        await stream.run_handshake()
        header = await stream.read()
        _, _, kind, request_id = struct.unpack_from(">IBBI", header)
        message = f"unknown message type 0x{kind:02x}".encode()
        reply = struct.pack(">IBBIB", 7 + len(message), PROTOCOL_VERSION, 0xFF, request_id, 6)
        stream.write([reply + message])
        await writer.drain()
        writer.close()

    host = peer_address(1, 4)
    listener = await asyncio.start_server(old_holder, host, free_port(host))
    try:
        addr = (host, listener.sockets[0].getsockname()[1])
        async with TransferClient(local_host=peer_address(2, 4)) as client, asyncio.timeout(STEP_S):
            with pytest.raises(
                errors.PeerUnreachable, match="BAD_REQUEST unknown message type 0x05"
            ):
                await client.leases(addr, [ChunkId(bytes(32))])
    finally:
        listener.close()
        await listener.wait_closed()
