"""Transfer timeouts measure progress, not size (issue 21): slow links are served, stalls are not.

Links are slowed in-process: a peer that reads its socket a little at a time, with a small receive
buffer, so TCP's window makes the other side wait. tests/integration/test_slow_uplink.py does the
same end to end with a shaped uplink.

The holders and clients here stack net.pump.PlainLayer: the tests play raw frames against the wire's
deadlines, which work the same behind the channel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2pmega import errors
from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.wire import (
    NEED_DATA,
    ChunkData,
    FetchRequest,
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

STEP_S = 20.0
MiB = 1 << 20
SMALL_WINDOW_BYTES = 32 << 10
HOLDER = peer_address(1, 1)
CLIENT = peer_address(2, 1)


def random_chunk(size: int) -> tuple[ChunkId, bytes]:
    data = shaped(os.urandom(size))
    return chunk_id_of(data), data


@contextlib.asynccontextmanager
async def slow_holder(read_bytes: int, pause_s: float) -> AsyncIterator[int]:
    """A holder that reads ``read_bytes`` every ``pause_s`` (forever silent if ``read_bytes`` is 0)
    and answers every Store with StoreOK: a holder behind a slow link."""
    tasks: list[asyncio.Task[None]] = []

    async def serve(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn = TransferConnection(role=Role.SERVER)
        with sock:
            while read_bytes:
                data = await loop.sock_recv(sock, read_bytes)
                if not data:
                    return
                conn.receive_data(data)
                while (event := conn.next_event()) is not NEED_DATA:
                    assert isinstance(event, StoreRequest)
                    for part in conn.send(StoreOK(event.request_id, True)):
                        await loop.sock_sendall(sock, part)
                await asyncio.sleep(pause_s)
            await asyncio.sleep(STEP_S)

    listener = socket.socket()
    # A small receive window, inherited by accepted sockets: the sender's kernel cannot take in
    # the whole chunk at once, so it waits for this holder as it would for a slow link.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_WINDOW_BYTES)
    listener.bind((HOLDER, 0))
    listener.listen()
    listener.setblocking(False)

    async def accept() -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            tasks.append(asyncio.create_task(serve(sock)))

    acceptor = asyncio.create_task(accept())
    try:
        yield int(listener.getsockname()[1])
    finally:
        for task in [acceptor, *tasks]:
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        listener.close()


async def test_store_to_a_slow_holder_outlasts_the_timeout() -> None:
    # 1 MiB at 16 KiB per 20 ms (~800 KiB/s) takes over a second: longer than the 0.3 s timeout,
    # which a request may take only as idle time.
    cid, data = random_chunk(MiB)
    async with (
        slow_holder(16 << 10, 0.02) as port,
        TransferClient(local_host=CLIENT, timeout_s=0.3, layers=PlainLayer) as client,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(STEP_S):
            assert await client.store((HOLDER, port), cid, data, 60) is True
        assert loop.time() - started > client.timeout_s  # the link really was slow


async def test_store_to_a_holder_that_stops_reading_times_out() -> None:
    cid, data = random_chunk(4 * MiB)
    async with (
        slow_holder(0, 0) as port,
        TransferClient(local_host=CLIENT, timeout_s=0.5, layers=PlainLayer) as client,
    ):
        async with asyncio.timeout(STEP_S):
            with pytest.raises(errors.TransferTimeout, match=r"no data moved for 0\.5s"):
                await client.store((HOLDER, port), cid, data, 60)


@contextlib.asynccontextmanager
async def holder(tmp_path: Path, limits: ServerLimits) -> AsyncIterator[TransferServer]:
    store = ChunkStore(tmp_path / "store", quota_bytes=64 * MiB)
    server = TransferServer(
        store, host=HOLDER, port=free_port(HOLDER), limits=limits, layers=PlainLayer
    )
    try:
        async with asyncio.timeout(STEP_S):
            await server.start()
        yield server
    finally:
        async with asyncio.timeout(STEP_S):
            await server.stop()
        store.close()


async def connect(port: int, *, receive_window: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_window is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_window)
    sock.bind((CLIENT, 0))
    sock.setblocking(False)
    async with asyncio.timeout(STEP_S):
        await asyncio.get_running_loop().sock_connect(sock, (HOLDER, port))
    return sock


async def read_events(sock: socket.socket, conn: TransferConnection, count: int) -> list[object]:
    loop = asyncio.get_running_loop()
    events: list[object] = []
    while len(events) < count:
        data = await loop.sock_recv(sock, 1 << 16)
        assert data, f"the holder closed after {len(events)} replies"
        conn.receive_data(data)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


async def test_holder_takes_a_frame_that_comes_slowly_but_steadily(tmp_path: Path) -> None:
    """A 256 KiB store sent 8 KiB per 40 ms (200 KiB/s): 1.3 s for the frame, past the 0.5 s
    stall timeout, but bytes keep coming above the rate floor."""
    limits = ServerLimits(stall_timeout_s=0.5, min_rate_bytes_s=64 << 10)
    cid, data = random_chunk(256 << 10)
    conn = TransferConnection(role=Role.CLIENT)
    frame = b"".join(conn.send(StoreRequest(1, cid, 60, data)))
    loop = asyncio.get_running_loop()
    async with holder(tmp_path, limits) as server:
        sock = await connect(server.port)
        with sock:
            async with asyncio.timeout(STEP_S):
                for start in range(0, len(frame), 8 << 10):
                    await loop.sock_sendall(sock, frame[start : start + (8 << 10)])
                    await asyncio.sleep(0.04)
                assert await read_events(sock, conn, 1) == [StoreOK(1, True)]


async def test_holder_drops_a_frame_trickled_below_the_rate_floor(tmp_path: Path) -> None:
    """1 KiB every 0.1 s never stalls for the 0.5 s timeout, but is far below 64 KiB/s: slowloris."""
    limits = ServerLimits(stall_timeout_s=0.5, min_rate_bytes_s=64 << 10)
    cid, data = random_chunk(256 << 10)
    frame = b"".join(TransferConnection(role=Role.CLIENT).send(StoreRequest(1, cid, 60, data)))
    loop = asyncio.get_running_loop()
    async with holder(tmp_path, limits) as server:
        sock = await connect(server.port)
        with sock:
            dropped = False
            async with asyncio.timeout(STEP_S):
                for start in range(0, len(frame), 1024):
                    try:
                        await loop.sock_sendall(sock, frame[start : start + 1024])
                    except (BrokenPipeError, ConnectionResetError):
                        dropped = True
                        break
                    await asyncio.sleep(0.1)
                    if not server.connections:
                        dropped = True
                        break
            assert dropped, "the holder took a whole frame trickled at 10 KiB/s"


async def test_holder_serves_a_reader_on_a_slow_link(tmp_path: Path) -> None:
    """8 pipelined fetches of 1 MiB read at ~1.6 MiB/s: 5 s of replies, 10 times the stall
    timeout, while the socket keeps taking bytes."""
    limits = ServerLimits(stall_timeout_s=0.5, min_rate_bytes_s=64 << 10)
    cid, data = random_chunk(MiB)
    conn = TransferConnection(role=Role.CLIENT)
    loop = asyncio.get_running_loop()
    async with holder(tmp_path, limits) as server:
        async with (
            TransferClient(local_host=CLIENT, layers=PlainLayer) as client,
            asyncio.timeout(STEP_S),
        ):
            await client.store((HOLDER, server.port), cid, data, 60)
        sock = await connect(server.port, receive_window=SMALL_WINDOW_BYTES)
        with sock:
            for request_id in range(1, 9):
                await loop.sock_sendall(sock, b"".join(conn.send(FetchRequest(request_id, cid))))
            replies: list[object] = []
            async with asyncio.timeout(STEP_S):
                while len(replies) < 8:
                    received = await loop.sock_recv(sock, 16 << 10)
                    assert received, f"the holder closed after {len(replies)} replies"
                    conn.receive_data(received)
                    while (event := conn.next_event()) is not NEED_DATA:
                        replies.append(event)
                    await asyncio.sleep(0.01)
    assert all(isinstance(r, ChunkData) and bytes(r.data) == data for r in replies)
