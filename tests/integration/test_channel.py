"""The transfer channel over loopback sockets: proven keys and node ids, old-version peers, the handshake
deadline and fair admission (issue 16, items 1 and 3)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2pmega import errors
from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.crypto import new_signing_seed, public_key_of
from p2pmega.core.node_id import node_id_for
from p2pmega.core.wire import (
    PROTOCOL_VERSION,
    ErrorCode,
    FetchRequest,
    MessageType,
    Role,
    TransferConnection,
)
from p2pmega.net.transfer_client import TransferClient
from p2pmega.net.transfer_server import ServerLimits, TransferServer
from p2pmega.storage import ChunkStore
from tests.channel_helpers import open_secure
from tests.chunk_bytes import shaped
from tests.conftest import free_port, peer_address

pytestmark = pytest.mark.integration

STEP_S = 10.0
HOLDER = peer_address(1, 1)
DATA = shaped(bytes(range(256)) * 40)
CID = chunk_id_of(DATA)


@contextlib.asynccontextmanager
async def holder(
    tmp_path: Path, *, seed: bytes, limits: ServerLimits | None = None
) -> AsyncIterator[TransferServer]:
    store = ChunkStore(tmp_path / "store", quota_bytes=1 << 24)
    store.put(CID, DATA, lease_s=3600)
    server = TransferServer(
        store,
        host=HOLDER,
        port=free_port(HOLDER),
        identity_seed=seed,
        limits=limits or ServerLimits(),
    )
    try:
        async with asyncio.timeout(STEP_S):
            await server.start()
        yield server
    finally:
        async with asyncio.timeout(STEP_S):
            await server.stop()
        store.close()


async def test_the_client_sees_the_holders_proven_key_and_node_id(tmp_path: Path) -> None:
    seed = new_signing_seed()
    expected = node_id_for(public_key_of(seed), HOLDER)
    async with (
        holder(tmp_path, seed=seed) as server,
        TransferClient(local_host=peer_address(2, 1)) as client,
    ):
        addr = (HOLDER, server.port)
        client.expect_node_id(addr, expected)
        async with asyncio.timeout(STEP_S):
            assert await client.fetch(addr, CID) == DATA
        [conn] = client._pool[addr]
        assert conn.peer_public_key == public_key_of(seed)
        assert conn.node_id == expected


async def test_a_holder_whose_key_does_not_match_the_expected_node_id_is_refused(
    tmp_path: Path,
) -> None:
    # Before the channel nothing was proven: any process at the address was served as the node.
    seed = new_signing_seed()
    impostor_id = node_id_for(public_key_of(new_signing_seed()), HOLDER)
    elsewhere_id = node_id_for(public_key_of(seed), peer_address(3, 1))  # right key, other /24
    async with holder(tmp_path, seed=seed) as server:
        addr = (HOLDER, server.port)
        for wrong in (impostor_id, elsewhere_id):
            async with TransferClient(local_host=peer_address(2, 1)) as client:
                client.expect_node_id(addr, wrong)
                async with asyncio.timeout(STEP_S):
                    with pytest.raises(errors.PeerNotAuthentic, match="proved another key"):
                        await client.fetch(addr, CID)
                    failed: set[tuple[str, int]] = set()
                    with pytest.raises(errors.ChunkUnavailable, match="1 wrong key"):
                        await client.fetch_any_into([addr], CID, bytes, failed=failed)
                    assert failed == {addr}


async def test_an_old_holder_is_refused_cleanly(tmp_path: Path) -> None:
    """A version-1 holder answers our hello with a version-1 Error and closes: PeerIncompatible."""

    async def old_holder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)
        body = bytes([ErrorCode.UNSUPPORTED_VERSION]) + b"unsupported protocol version 2"
        writer.write(struct.pack(">IBBI", 6 + len(body), 1, MessageType.ERROR, 0) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(old_holder, host=HOLDER, port=0)
    try:
        port = int(server.sockets[0].getsockname()[1])
        async with TransferClient(local_host=peer_address(2, 1)) as client:
            async with asyncio.timeout(STEP_S):
                with pytest.raises(errors.PeerIncompatible, match="version 1, this p2pmega 2"):
                    await client.fetch((HOLDER, port), CID)
    finally:
        server.close()
        await server.wait_closed()


async def test_an_old_client_gets_an_error_it_understands(tmp_path: Path) -> None:
    async with holder(tmp_path, seed=new_signing_seed()) as server:
        async with asyncio.timeout(STEP_S):
            reader, writer = await asyncio.open_connection(
                HOLDER, server.port, local_addr=(peer_address(2, 1), 0)
            )
            old = b"".join(TransferConnection(role=Role.CLIENT).send(FetchRequest(1, CID)))
            writer.write(old[:4] + bytes([PROTOCOL_VERSION - 1]) + old[5:])
            reply = await reader.read()  # until the holder closes
        writer.close()
        length, version, kind, request_id = struct.unpack_from(">IBBI", reply)
        assert (version, kind, request_id) == (PROTOCOL_VERSION - 1, MessageType.ERROR, 0)
        assert reply[10] == ErrorCode.UNSUPPORTED_VERSION
        assert len(reply) == 4 + length


async def test_a_connection_that_never_finishes_the_handshake_is_dropped(tmp_path: Path) -> None:
    limits = ServerLimits(handshake_timeout_s=0.3)
    async with holder(tmp_path, seed=new_signing_seed(), limits=limits) as server:
        async with asyncio.timeout(STEP_S):
            reader, writer = await asyncio.open_connection(
                HOLDER, server.port, local_addr=(peer_address(2, 1), 0)
            )
            assert await reader.read() == b""  # the holder hung up on its own
        writer.close()
        assert server.connections == 0


async def test_when_full_the_most_crowded_networks_idle_connection_makes_room(
    tmp_path: Path,
) -> None:
    limits = ServerLimits(max_connections=4, max_connections_per_network=3)
    async with holder(tmp_path, seed=new_signing_seed(), limits=limits) as server:
        crowd = [await open_secure(HOLDER, server.port, local=peer_address(5, 1)) for _ in range(3)]
        lone = await open_secure(HOLDER, server.port, local=peer_address(6, 1))
        try:
            async with TransferClient(local_host=peer_address(7, 1)) as client:
                async with asyncio.timeout(STEP_S):
                    assert await client.fetch((HOLDER, server.port), CID) == DATA
            assert server.evicted == 1
            async with asyncio.timeout(STEP_S):
                assert await crowd[0].reader.read() == b""  # the oldest of the crowded /24
            assert not lone.reader.at_eof()
        finally:
            for stream in [*crowd, lone]:
                stream.writer.transport.abort()
