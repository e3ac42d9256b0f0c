"""A hostile peer against a real TransferServer: the holder refuses or hangs up, keeps serving honest
peers, and keeps its memory bounded.

These speak raw frames to the wire, so the holders here stack net.pump.PlainLayer: they test the
wire's own defences, which sit behind the channel. The channel's are in test_channel_hostile.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    FetchRequest,
    MessageType,
    Role,
    StoreOK,
    StoreRequest,
    TransferConnection,
)
from p2pmega.net.pump import PlainLayer
from p2pmega.net.transfer_client import TransferClient
from p2pmega.net.transfer_server import ServerLimits, TransferServer
from p2pmega.storage import ChunkStore
from tests.chunk_bytes import shaped
from tests.conftest import free_port, peer_address

pytestmark = pytest.mark.integration

STEP_S = 10.0
LIMITS = ServerLimits(
    max_connections=64,
    max_connections_per_network=16,
    max_inflight_per_connection=4,
    max_inflight_total=16,
    idle_timeout_s=1.0,
    stall_timeout_s=1.0,
)
HOLDER = peer_address(1, 1)
HONEST = peer_address(2, 1)
HOSTILE = peer_address(9, 1)
MiB = 1 << 20


class Holder:
    """A TransferServer with one known chunk and an honest client to check it still serves."""

    def __init__(
        self, server: TransferServer, client: TransferClient, chunk: tuple[ChunkId, bytes]
    ):
        self.server = server
        self.client = client
        self.chunk_id, self.data = chunk

    @property
    def addr(self) -> tuple[str, int]:
        return (HOLDER, self.server.port)

    async def assert_serves_honest_peer(self) -> None:
        async with asyncio.timeout(STEP_S):
            assert await self.client.fetch(self.addr, self.chunk_id) == self.data


@pytest.fixture
async def holder(tmp_path: Path) -> AsyncIterator[Holder]:
    store = ChunkStore(tmp_path / "store", quota_bytes=64 * MiB)
    data = shaped(os.urandom(MiB))
    chunk_id = chunk_id_of(data)
    store.put(chunk_id, data, lease_s=3600)
    server = TransferServer(
        store, host=HOLDER, port=free_port(HOLDER), limits=LIMITS, layers=PlainLayer
    )
    client = TransferClient(local_host=HONEST, timeout_s=5.0, layers=PlainLayer)
    try:
        async with asyncio.timeout(STEP_S):
            await server.start()
        yield Holder(server, client, (chunk_id, data))
    finally:
        async with asyncio.timeout(STEP_S):
            await client.close()
            await server.stop()
        store.close()


@contextlib.asynccontextmanager
async def raw_connection(
    port: int, local: str = HOSTILE
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(STEP_S):
        reader, writer = await asyncio.open_connection(HOLDER, port, local_addr=(local, 0))
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def read_until_closed(reader: asyncio.StreamReader) -> list[tuple[int, int, bytes]]:
    """Every frame the holder sends before it closes, as (type, request id, body)."""
    async with asyncio.timeout(STEP_S):
        data = await reader.read()
    frames = []
    while data:
        length, version, kind, request_id = struct.unpack_from(">IBBI", data)
        assert version == PROTOCOL_VERSION
        frames.append((kind, request_id, data[10 : 4 + length]))
        data = data[4 + length :]
    return frames


async def wait_for(condition: Callable[[], bool], timeout_s: float = 6.0) -> None:
    """Poll ``condition`` (server internals have no event to wait on) until true or fail."""
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition still false after {timeout_s}s")


def frame(version: int, kind: int, request_id: int, body: bytes) -> bytes:
    return struct.pack(">IBBI", 6 + len(body), version, kind, request_id) + body


def assert_one_error(frames: list[tuple[int, int, bytes]], code: ErrorCode) -> str:
    assert len(frames) == 1, frames
    kind, _, body = frames[0]
    assert kind == MessageType.ERROR
    assert body[0] == code, (ErrorCode(body[0]), body[1:])
    return body[1:].decode()


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: holder\r\n\r\n", ErrorCode.TOO_LARGE),  # "GET " is ~1.2 GB
        (b"\x00\x00\x00\x10\x02\x77" + os.urandom(14), ErrorCode.BAD_REQUEST),  # unknown type
        (b"\x00\x00\x00\x01\x02", ErrorCode.BAD_REQUEST),  # shorter than a header
    ],
)
async def test_garbage_is_refused_and_closed(
    holder: Holder, garbage: bytes, code: ErrorCode
) -> None:
    async with raw_connection(holder.server.port) as (reader, writer):
        writer.write(garbage)
        assert_one_error(await read_until_closed(reader), code)
    await holder.assert_serves_honest_peer()


async def test_four_gib_length_prefix_is_refused_without_buffering(holder: Holder) -> None:
    async with raw_connection(holder.server.port) as (reader, writer):
        writer.write(b"\xff\xff\xff\xff" + b"\x01" * 1000)
        message = assert_one_error(await read_until_closed(reader), ErrorCode.TOO_LARGE)
        assert "4294967299 bytes" in message
    assert holder.server.buffered_bytes == 0
    await holder.assert_serves_honest_peer()


async def test_unknown_version_gets_unsupported_version_then_close(holder: Holder) -> None:
    async with raw_connection(holder.server.port) as (reader, writer):
        writer.write(frame(PROTOCOL_VERSION + 1, MessageType.FETCH, 1, holder.chunk_id))
        message = assert_one_error(await read_until_closed(reader), ErrorCode.UNSUPPORTED_VERSION)
        assert f"version {PROTOCOL_VERSION + 1}" in message
    await holder.assert_serves_honest_peer()


async def test_frame_cut_then_eof_is_closed(holder: Holder) -> None:
    whole = frame(PROTOCOL_VERSION, MessageType.STORE, 1, holder.chunk_id + bytes(4) + bytes(5000))
    async with raw_connection(holder.server.port) as (reader, writer):
        writer.write(whole[: len(whole) // 2])
        writer.write_eof()
        assert_one_error(await read_until_closed(reader), ErrorCode.BAD_REQUEST)
    await holder.assert_serves_honest_peer()


async def test_frame_cut_then_stall_is_closed_after_request_timeout(holder: Holder) -> None:
    whole = frame(PROTOCOL_VERSION, MessageType.FETCH, 1, holder.chunk_id)
    loop = asyncio.get_running_loop()
    async with raw_connection(holder.server.port) as (reader, writer):
        writer.write(whole[:20])
        started = loop.time()
        await holder.assert_serves_honest_peer()  # during the stall
        assert await read_until_closed(reader) == []
        assert LIMITS.stall_timeout_s * 0.9 <= loop.time() - started <= LIMITS.stall_timeout_s + 2
    await holder.assert_serves_honest_peer()


async def test_each_frame_gets_its_own_deadline_on_a_busy_connection(tmp_path: Path) -> None:
    """Frames sent back to back, each split across sends: the buffer never empties between them,
    yet every frame arrives within the request timeout, so the connection must live."""
    timeout_s = 3.0
    store = ChunkStore(tmp_path / "busy", quota_bytes=MiB)
    server = TransferServer(
        store,
        host=HOLDER,
        port=0,
        limits=ServerLimits(stall_timeout_s=timeout_s),
        layers=PlainLayer,
    )
    conn = TransferConnection(role=Role.CLIENT)
    chunks = [shaped(os.urandom(1000)) for _ in range(4)]
    wire = b"".join(
        b"".join(conn.send(StoreRequest(i + 1, chunk_id_of(data), 60, data)))
        for i, data in enumerate(chunks)
    )
    # Cut in the middle of frames 2, 3 and 4: a partial frame is buffered for 3 x 1.2 s in all,
    # longer than the timeout, but each frame is complete within 1.2 s of its first byte.
    frame_bytes = len(wire) // len(chunks)
    cuts = [frame_bytes * i + frame_bytes // 2 for i in (1, 2, 3)]
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    try:
        await server.start()
        async with raw_connection(server.port) as (reader, writer):
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(1.2)
                writer.write(piece)
            replies: list[object] = []
            async with asyncio.timeout(STEP_S):
                while len(replies) < len(chunks):
                    data = await reader.read(65536)
                    assert data, f"the holder closed after {len(replies)} replies"
                    conn.receive_data(data)
                    while (event := conn.next_event()) is not NEED_DATA:
                        replies.append(event)
        assert sorted(replies, key=lambda r: r.request_id) == [  # type: ignore[attr-defined]
            StoreOK(i + 1, True) for i in range(len(chunks))
        ]
    finally:
        await server.stop()
        store.close()


async def test_chunk_not_matching_its_id_gets_bad_hash_and_connection_lives(holder: Holder) -> None:
    conn = TransferConnection(role=Role.CLIENT)
    forged_id = chunk_id_of(b"the real chunk")
    async with raw_connection(holder.server.port) as (reader, writer):
        writer.writelines(conn.send(StoreRequest(1, forged_id, 60, shaped(b"something else" * 4))))
        writer.writelines(conn.send(FetchRequest(2, forged_id)))
        replies: list[Error] = []
        async with asyncio.timeout(STEP_S):
            while len(replies) < 2:
                conn.receive_data(await reader.read(65536))
                while (event := conn.next_event()) is not NEED_DATA:
                    assert isinstance(event, Error)
                    replies.append(event)
        assert sorted(replies, key=lambda e: e.request_id) == [
            Error(1, ErrorCode.BAD_HASH, "data does not hash to the chunk id"),
            Error(2, ErrorCode.NOT_FOUND, "chunk not stored here"),
        ]
    await holder.assert_serves_honest_peer()


async def open_idle_sockets(count: int, hosts: list[str], port: int) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    sockets = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.setblocking(False)
        sock.bind((hosts[i % len(hosts)], 0))
        await loop.sock_connect(sock, (HOLDER, port))
    return sockets


async def test_two_thousand_silent_connections(holder: Holder) -> None:
    count = 2000

    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft_limit > count + LIMITS.max_connections + 200, "raise ulimit -n for this test"
    flood_hosts = [peer_address(9, 1), peer_address(9, 2)]
    gc.collect()
    tracemalloc.start()
    sockets: list[socket.socket] = []
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        async with asyncio.timeout(30):
            sockets = await open_idle_sockets(count, flood_hosts, holder.server.port)
        await asyncio.sleep(0.2)  # let the holder accept and refuse the backlog
        # Each flooding address holds at most its share; the rest were refused with BUSY.
        assert holder.server.connections <= len(flood_hosts) * LIMITS.max_connections_per_network
        await holder.assert_serves_honest_peer()  # during the flood
        _, peak = tracemalloc.get_traced_memory()
        # The honest fetch moves a 1 MiB chunk through this process twice (server and client);
        # 2,000 sockets and their refusals must fit in the rest.
        assert peak - baseline < 12 * MiB, f"peak grew by {(peak - baseline) / MiB:.1f} MiB"
        # The silent connections that were admitted are dropped after the idle timeout.
        await wait_for(lambda: not set(holder.server.peer_hosts()) & set(flood_hosts))
    finally:
        tracemalloc.stop()
        for sock in sockets:
            sock.close()
    await holder.assert_serves_honest_peer()


async def test_slow_reader_cannot_make_the_holder_buffer(holder: Holder) -> None:
    """128 pipelined 1 MiB fetches never read: the holder stops reading, then hangs up."""
    requests = 128
    conn = TransferConnection(role=Role.CLIENT)
    gc.collect()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        async with raw_connection(holder.server.port) as (_, writer):
            for request_id in range(1, requests + 1):
                writer.writelines(conn.send(FetchRequest(request_id, holder.chunk_id)))
            await asyncio.sleep(0.3)
            await holder.assert_serves_honest_peer()  # while the slow reader stalls
            _, peak = tracemalloc.get_traced_memory()
            # Unbounded, this would be 128 MiB. The bound is max_inflight_per_connection replies
            # (each held once as bytes and once in the transport buffer) plus the honest fetch.
            assert peak - baseline < (2 * LIMITS.max_inflight_per_connection + 6) * MiB, (
                f"peak grew by {(peak - baseline) / MiB:.1f} MiB"
            )
            # Replies not taken within the request timeout get the connection dropped.
            await wait_for(lambda: HOSTILE not in holder.server.peer_hosts())
    finally:
        tracemalloc.stop()
    await holder.assert_serves_honest_peer()
