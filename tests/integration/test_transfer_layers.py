"""The pump's layer stack over real loopback sockets: a layer that transforms bytes both ways.

Any stack works, not only the channel (net.channel): every byte is XORed on the way out and back on
the way in, so store, fetch and has only work if both ends stack the same layer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from p2pmega import errors
from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.wire import TransferConnection
from p2pmega.net.pump import Layer, LayerStack, PlainLayer
from p2pmega.net.transfer_client import TransferClient
from p2pmega.net.transfer_server import TransferServer
from p2pmega.storage import ChunkStore
from tests.chunk_bytes import shaped
from tests.conftest import free_port, peer_address

pytestmark = pytest.mark.integration

STEP_S = 10.0
KEY = 0x5A


def xor(data: bytes | bytearray | memoryview) -> bytes:
    return bytes(b ^ KEY for b in bytes(data))


class XorLayer:
    """Receives into its own buffer, hands the decoded bytes to the layer above, encodes writes."""

    ready = True
    peer_public_key: bytes | None = None
    copies = True

    def __init__(self, above: Layer) -> None:
        self.above = above
        self._room = bytearray(64 << 10)
        self.seen_in = 0
        self.seen_out = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._room)

    def buffer_updated(self, nbytes: int) -> None:
        self.seen_in += nbytes
        plain = xor(memoryview(self._room)[:nbytes])
        while plain:
            with self.above.get_buffer(len(plain)) as room:
                size = min(len(room), len(plain))
                room[:size] = plain[:size]
            self.above.buffer_updated(size)
            plain = plain[size:]

    def opened(self, write: Callable[[bytes | bytearray | memoryview], None]) -> None:
        self.above.opened(write)

    def eof_received(self) -> None:
        self.above.eof_received()

    def sent(self) -> None:
        self.above.sent()

    def outgoing(
        self, buffers: list[bytes | memoryview]
    ) -> Sequence[bytes | bytearray | memoryview]:
        out = [xor(buffer) for buffer in buffers]
        self.seen_out += sum(map(len, out))
        return out


def stack(made: list[XorLayer]) -> LayerStack:
    def layers(conn: TransferConnection) -> Layer:
        made.append(XorLayer(PlainLayer(conn)))
        return made[-1]

    return layers


async def test_a_transforming_layer_carries_every_request(tmp_path: Path) -> None:
    host = peer_address(1, 1)
    server_layers: list[XorLayer] = []
    client_layers: list[XorLayer] = []
    store = ChunkStore(tmp_path / "store", quota_bytes=64 << 20)
    server = TransferServer(store, host=host, port=free_port(host), layers=stack(server_layers))
    data = shaped(os.urandom(300_000))  # larger than the layer's 64 KiB reads
    chunk_id = chunk_id_of(data)
    try:
        async with asyncio.timeout(STEP_S):
            await server.start()
        addr = (host, server.port)
        async with (
            TransferClient(local_host=peer_address(2, 1), layers=stack(client_layers)) as client,
            asyncio.timeout(STEP_S),
        ):
            assert await client.store(addr, chunk_id, data, 60) is True
            assert bytes(await client.fetch(addr, chunk_id)) == data
            assert await client.has(addr, [chunk_id]) == [True]
            assert await client.leases(addr, [chunk_id]) == [60]
        async with TransferClient(local_host=peer_address(2, 2), timeout_s=2) as channel_client:
            with pytest.raises(errors.NetworkError):
                async with asyncio.timeout(STEP_S):
                    await channel_client.has(addr, [chunk_id])
    finally:
        async with asyncio.timeout(STEP_S):
            await server.stop()
        store.close()
    # Every byte went through the layers, both ways, on both ends.
    assert client_layers[0].seen_out == server_layers[0].seen_in > len(data)
    assert server_layers[0].seen_out == client_layers[0].seen_in > len(data)
