"""net.transfer over real loopback sockets: each peer on its own 127.C.N.1, real ChunkStores."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from p2pmega import errors
from p2pmega.core.chunking import (
    MAX_SEALED_CHUNK_BYTES,
    MIN_SEALED_CHUNK_BYTES,
    ChunkId,
    chunk_id_of,
)
from p2pmega.core.wire import (
    MAX_BATCH_IDS,
    NEED_DATA,
    ChunkData,
    FetchRequest,
    Role,
    StoreRequest,
    TransferConnection,
)
from p2pmega.net import buffers, transfer_client, transfer_server
from p2pmega.net.transfer_client import TransferClient
from p2pmega.net.transfer_server import ServerLimits, TransferServer
from p2pmega.storage import ChunkStore
from p2pmega.storage.sources import SourceLimits
from tests.channel_helpers import SecureStream, open_secure
from tests.chunk_bytes import shaped
from tests.conftest import free_port, peer_address

pytestmark = pytest.mark.integration

STEP_S = 10.0
DEFAULT_LIMITS = SourceLimits()


@contextlib.asynccontextmanager
async def holder(
    tmp_path: Path,
    host: str,
    *,
    quota_bytes: int = 64 << 20,
    on_stored=None,
    clock: Callable[[], float] = time.time,
    limits: SourceLimits = DEFAULT_LIMITS,
    node_id: bytes | None = None,
) -> AsyncIterator[tuple[TransferServer, ChunkStore]]:
    store = ChunkStore(tmp_path / host, quota_bytes=quota_bytes, clock=clock, limits=limits)
    server = TransferServer(
        store, host=host, port=free_port(host), on_stored=on_stored, node_id=node_id
    )
    try:
        async with asyncio.timeout(STEP_S):
            await server.start()
        yield server, store
    finally:
        async with asyncio.timeout(STEP_S):
            await server.stop()
        store.close()


@contextlib.asynccontextmanager
async def fake_holder(host: str, answer: str) -> AsyncIterator[int]:
    """A lying (``answer="lie"``) or silent (``answer="mute"``) holder built on core.wire."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        conn = TransferConnection(role=Role.SERVER)
        stream = SecureStream(reader, writer, role=Role.SERVER)
        await stream.run_handshake()
        while data := await stream.read():
            conn.receive_data(data)
            while (event := conn.next_event()) is not NEED_DATA:
                if answer == "lie" and isinstance(event, FetchRequest):
                    stream.write(conn.send(ChunkData(event.request_id, event.chunk_id, b"forged")))

    server = await asyncio.start_server(serve, host=host, port=0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


def random_chunk(size: int) -> tuple[ChunkId, bytes]:
    data = shaped(os.urandom(size))
    return chunk_id_of(data), data


@pytest.mark.parametrize(
    "size",
    [
        MIN_SEALED_CHUNK_BYTES,
        MIN_SEALED_CHUNK_BYTES + 1,
        4095,
        65537,
        1 << 20,
        MAX_SEALED_CHUNK_BYTES,
    ],
)
async def test_store_and_fetch_every_size(tmp_path: Path, size: int) -> None:
    stored: list[ChunkId] = []
    host = peer_address(1, 1)
    async with holder(tmp_path, host, on_stored=stored.append) as (server, _):
        addr = (host, server.port)
        cid, data = random_chunk(size)
        async with TransferClient(local_host=peer_address(2, 1)) as client, asyncio.timeout(STEP_S):
            assert await client.store(addr, cid, data, 3600) is True
            assert await client.store(addr, cid, data, 3600) is False
            assert await client.fetch(addr, cid) == data
            # The holder sees the client's own address, not 127.0.0.1.
            assert server.peer_hosts() == [peer_address(2, 1)]
    assert stored == [cid]


async def test_pipelined_requests_reuse_pooled_connections(tmp_path: Path) -> None:
    host = peer_address(1, 1)
    async with holder(tmp_path, host) as (server, _):
        addr = (host, server.port)
        chunks = [random_chunk(100_000 + i) for i in range(24)]
        async with TransferClient(
            local_host=peer_address(2, 1), max_connections_per_peer=3
        ) as client:
            async with asyncio.timeout(STEP_S):
                await asyncio.gather(*(client.store(addr, c, d, 60) for c, d in chunks))
                got = await asyncio.gather(*(client.fetch(addr, c) for c, _ in chunks))
            assert got == [d for _, d in chunks]
            assert 1 <= server.connections <= 3


async def wait_until(condition: Callable[[], bool], timeout_s: float = STEP_S) -> None:
    """Poll ``condition`` until it holds (TimeoutError after ``timeout_s``): a server's connection
    count has no event to wait on, and it drops only after the loop has seen the peer's EOF."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the count itself
            await asyncio.sleep(0.005)


async def test_pooled_connection_dropped_by_idle_holder_is_replaced(tmp_path: Path) -> None:
    host = peer_address(1, 1)
    store = ChunkStore(tmp_path / "store", quota_bytes=1 << 20)
    server = TransferServer(
        store, host=host, port=free_port(host), limits=ServerLimits(idle_timeout_s=0.2)
    )
    cid, data = random_chunk(1000)
    try:
        async with asyncio.timeout(STEP_S):
            await server.start()
            async with TransferClient(local_host=peer_address(2, 1)) as client:
                addr = (host, server.port)
                await client.store(addr, cid, data, 60)
                await wait_until(lambda: server.connections == 0)  # the holder dropped it
                assert await client.fetch(addr, cid) == data
    finally:
        async with asyncio.timeout(STEP_S):
            await server.stop()
        store.close()


async def test_client_drops_its_idle_pooled_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer_client, "_POOL_IDLE_S", 5.0)
    monkeypatch.setattr(transfer_client, "_POOL_SWEEP_INTERVAL_S", 0.0)
    host_a, host_b = peer_address(1, 1), peer_address(2, 1)
    async with holder(tmp_path, host_a) as (a, _), holder(tmp_path, host_b) as (b, _):
        cid, data = random_chunk(100)
        async with TransferClient(local_host=peer_address(3, 1)) as client:
            async with asyncio.timeout(STEP_S):
                await client.store((host_a, a.port), cid, data, 60)
                await client.store((host_b, b.port), cid, data, 60)
                assert (a.connections, b.connections) == (1, 1)
                [b_conn] = client._pool[(host_b, b.port)]
                # a's connection was last used 10 s ago (no sleeping through the idle time).
                for peer_conn in client._pool[(host_a, a.port)]:
                    peer_conn.last_used -= 10.0
                assert await client.fetch((host_b, b.port), cid) == data  # this use sweeps
                await wait_until(lambda: a.connections == 0)
            # The sweep dropped only the idle one: b's, just used, is still the pooled one, open.
            assert (host_a, a.port) not in client._pool
            assert client._pool[(host_b, b.port)] == [b_conn]
            assert not b_conn.closed
            assert b.connections == 1


async def test_quota_refusal_is_quota_exceeded(tmp_path: Path) -> None:
    host = peer_address(1, 1)
    # One network may fill the whole quota here: this is the quota's refusal, not the per-network share's.
    async with holder(
        tmp_path, host, quota_bytes=10_000, limits=SourceLimits(network_share=1.0)
    ) as (server, store):
        addr = (host, server.port)
        async with TransferClient(local_host=peer_address(2, 1)) as client, asyncio.timeout(STEP_S):
            small_id, small = random_chunk(6_000)
            assert await client.store(addr, small_id, small, 60)
            big_id, big = random_chunk(6_000)
            with pytest.raises(errors.QuotaExceeded, match="quota is full"):
                await client.store(addr, big_id, big, 60)
            # The connection survives a refusal.
            assert await client.fetch(addr, small_id) == small
        assert store.has_many([big_id]) == [False]


async def test_bad_hash_store_is_refused(tmp_path: Path) -> None:
    host = peer_address(1, 1)
    async with holder(tmp_path, host) as (server, store):
        addr = (host, server.port)
        cid, _ = random_chunk(500)
        async with TransferClient(local_host=peer_address(2, 1)) as client, asyncio.timeout(STEP_S):
            with pytest.raises(errors.ChunkHashMismatch, match="do not match"):
                await client.store(addr, cid, shaped(b"not the chunk" * 4), 60)
            with pytest.raises(errors.ChunkNotStored):
                await client.fetch(addr, cid)
        assert store.ids() == []


async def test_has_and_renew_batches_larger_than_one_frame(tmp_path: Path) -> None:
    host = peer_address(1, 1)
    async with holder(tmp_path, host) as (server, store):
        addr = (host, server.port)
        held = [random_chunk(64 + i) for i in range(3)]
        ids = [ChunkId(os.urandom(32)) for _ in range(MAX_BATCH_IDS + 100)]
        positions = [0, MAX_BATCH_IDS - 1, MAX_BATCH_IDS + 50]
        for position, (cid, _) in zip(positions, held, strict=True):
            ids[position] = cid
        expected = [i in positions for i in range(len(ids))]
        async with TransferClient(local_host=peer_address(2, 1)) as client, asyncio.timeout(STEP_S):
            for cid, data in held:
                await client.store(addr, cid, data, 60)
            assert await client.has(addr, ids) == expected
            before = time.time()
            assert await client.renew(addr, ids, 7200.5) == expected
            assert await client.has(addr, []) == []
        for cid, _ in held:
            expiry = store.lease_expiry(cid)
            assert expiry is not None
            assert expiry >= before + 7200


async def test_corrupt_chunk_is_not_served_and_fetch_any_fails_over(tmp_path: Path) -> None:
    host_a, host_b = peer_address(1, 1), peer_address(2, 1)
    async with holder(tmp_path, host_a) as (a, _), holder(tmp_path, host_b) as (b, _):
        addrs = [(host_a, a.port), (host_b, b.port)]
        cid, data = random_chunk(300_000)
        async with TransferClient(local_host=peer_address(3, 1)) as client, asyncio.timeout(STEP_S):
            for addr in addrs:
                await client.store(addr, cid, data, 60)
            path = next((tmp_path / host_a).rglob(cid.hex()))
            rotten = bytearray(path.read_bytes())
            rotten[1000] ^= 0x01
            path.write_bytes(bytes(rotten))
            got, source = await client.fetch_any(addrs, cid)
            assert (got, source) == (data, addrs[1])
            # The holder dropped the rotten copy, so it now says not found.
            with pytest.raises(errors.ChunkNotStored):
                await client.fetch(addrs[0], cid)


async def test_fetch_any_fails_over_past_dead_lying_and_mute_holders(tmp_path: Path) -> None:
    good_host = peer_address(4, 1)
    dead = (peer_address(1, 1), free_port(peer_address(1, 1)))
    async with (
        fake_holder(peer_address(2, 1), "lie") as liar_port,
        fake_holder(peer_address(3, 1), "mute") as mute_port,
        holder(tmp_path, good_host) as (good, _),
    ):
        liar = (peer_address(2, 1), liar_port)
        mute = (peer_address(3, 1), mute_port)
        cid, data = random_chunk(2048)
        async with TransferClient(local_host=peer_address(5, 1), timeout_s=0.5) as client:
            async with asyncio.timeout(STEP_S):
                await client.store((good_host, good.port), cid, data, 60)
                with pytest.raises(errors.PeerUnreachable, match="cannot connect"):
                    await client.fetch(dead, cid)
                with pytest.raises(errors.ChunkHashMismatch):
                    await client.fetch(liar, cid)
                with pytest.raises(errors.TransferTimeout, match="did not answer"):
                    await client.fetch(mute, cid)
                got, source = await client.fetch_any(
                    [dead, liar, mute, (good_host, good.port)], cid
                )
                assert (got, source) == (data, (good_host, good.port))
                with pytest.raises(errors.ChunkUnavailable, match=r"tried 3 holders: 1 bad hash"):
                    await client.fetch_any([dead, liar, mute], cid)
                with pytest.raises(errors.ChunkUnavailable, match="tried 0 holders"):
                    await client.fetch_any([], cid)


async def test_fetch_into_hands_only_verified_bytes_to_consume(tmp_path: Path) -> None:
    """consume runs in the hashing thread on bytes that matched the id, never on a liar's bytes."""
    good_host = peer_address(4, 1)
    async with (
        fake_holder(peer_address(2, 1), "lie") as liar_port,
        holder(tmp_path, good_host) as (good, _),
    ):
        liar = (peer_address(2, 1), liar_port)
        cid, data = random_chunk(300_000)
        seen: list[bytes] = []

        def consume(got: bytes | memoryview) -> int:
            seen.append(bytes(got))
            return len(got)

        async with TransferClient(local_host=peer_address(5, 1)) as client:
            async with asyncio.timeout(STEP_S):
                await client.store((good_host, good.port), cid, data, 60)
                with pytest.raises(errors.ChunkHashMismatch):
                    await client.fetch_into(liar, cid, consume)
                assert seen == []
                got, source = await client.fetch_any_into(
                    [liar, (good_host, good.port)], cid, consume
                )
                assert (got, source) == (len(data), (good_host, good.port))
                assert seen == [data]

                def refuse(got: bytes | memoryview) -> int:
                    raise OSError("disk full")

                # What consume raises is not a bad holder: it propagates, no other holder is tried.
                with pytest.raises(OSError, match="disk full"):
                    await client.fetch_any_into([(good_host, good.port), liar], cid, refuse)


async def test_stop_keeps_acknowledged_chunks(tmp_path: Path) -> None:
    host = peer_address(1, 1)
    chunks = [random_chunk(200_000 + i) for i in range(8)]
    acknowledged: list[ChunkId] = []
    async with holder(tmp_path, host) as (server, _):
        addr = (host, server.port)
        # A store whose connection the stop closes is retried once on a fresh connection; made while the
        # listener is still closing, that connect is accepted by the kernel and never served, so it must give up
        # well within STEP_S (a fresh-clone CI run waited out the default 10 s there).
        async with TransferClient(local_host=peer_address(2, 1), connect_timeout_s=2.0) as client:
            first_ack = asyncio.Event()

            async def store_one(cid: ChunkId, data: bytes) -> None:
                if await client.store(addr, cid, data, 60):
                    acknowledged.append(cid)
                    first_ack.set()

            tasks = [asyncio.create_task(store_one(c, d)) for c, d in chunks]
            # Stop as soon as the first store is acknowledged, with the others still in flight
            # (a fixed sleep was too short on a busy or cold machine).
            async with asyncio.timeout(STEP_S):
                await first_ack.wait()
            async with asyncio.timeout(STEP_S):
                await server.stop()
                await asyncio.gather(*tasks, return_exceptions=True)
    assert acknowledged, "stop() came before any store finished; the test proves nothing"
    reopened = ChunkStore(tmp_path / host, quota_bytes=64 << 20)
    try:
        assert all(reopened.has_many(acknowledged))
    finally:
        reopened.close()


async def test_start_on_a_taken_port_raises_oserror(tmp_path: Path) -> None:
    host = peer_address(1, 1)
    async with holder(tmp_path, host) as (server, _):
        store = ChunkStore(tmp_path / "second", quota_bytes=1 << 20)
        twin = TransferServer(store, host=host, port=server.port)
        try:
            with pytest.raises(OSError, match="in use"):
                await twin.start()
        finally:
            await twin.stop()
            store.close()


async def test_a_newcomer_takes_the_slot_of_an_idle_connection_of_its_network(
    tmp_path: Path,
) -> None:
    # Before issue 16 the second client got BUSY: first come, first served, for as long as the
    # first one kept its idle connection.
    host = peer_address(1, 1)
    store = ChunkStore(tmp_path / "store", quota_bytes=1 << 20)
    server = TransferServer(
        store, host=host, port=0, limits=ServerLimits(max_connections_per_network=1)
    )
    cid, data = random_chunk(100)
    try:
        async with asyncio.timeout(STEP_S):
            await server.start()
            addr = (host, server.port)
            async with (
                TransferClient(local_host=peer_address(2, 1)) as first,
                TransferClient(local_host=peer_address(2, 1)) as second,
                TransferClient(local_host=peer_address(3, 1)) as other,
            ):
                await first.store(addr, cid, data, 60)
                assert await second.fetch(addr, cid) == data
                assert server.evicted == 1
                assert await other.fetch(addr, cid) == data
                assert server.evicted == 1  # another /24 has its own room
                assert await first.fetch(addr, cid) == data  # reconnects in place of second
                assert server.evicted == 2
    finally:
        async with asyncio.timeout(STEP_S):
            await server.stop()
        store.close()


def record_pool_takes(
    monkeypatch: pytest.MonkeyPatch, pool: Callable[[], buffers.BufferPool]
) -> list[bytearray]:
    """From now on, every buffer ``pool()`` lends is appended to the returned list (the pools of the
    other side, and what the channel seals records into, are left out)."""
    lent: list[bytearray] = []
    take = buffers.BufferPool.take

    def spy(self: buffers.BufferPool, size: int) -> bytearray:
        buffer = take(self, size)
        if self is pool():
            lent.append(buffer)
        return buffer

    monkeypatch.setattr(buffers.BufferPool, "take", spy)
    return lent


async def test_holder_reuses_its_receive_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks stored one after another arrive in recycled buffers, not in a fresh (zero-filled,
    faulted-in) buffer per chunk."""
    host = peer_address(1, 1)
    chunks = [random_chunk(300_000 + i) for i in range(10)]
    async with holder(tmp_path, host) as (server, store):
        lent = record_pool_takes(monkeypatch, lambda: server.buffers)
        addr = (host, server.port)
        async with TransferClient(local_host=peer_address(2, 1)) as client, asyncio.timeout(STEP_S):
            for cid, data in chunks:
                assert await client.store(addr, cid, data, 60)
        assert [store.get(cid) for cid, _ in chunks] == [data for _, data in chunks]
    # The first frame's buffer grows with what arrived (issue 16), in a step or two; every later
    # chunk takes the one recycled buffer.
    assert len(lent) <= len(chunks) + 3
    assert len({id(buffer) for buffer in lent[-(len(chunks) - 1) :]}) == 1


def test_a_request_finishing_after_the_loop_closed_ends_quietly() -> None:
    """A server never stopped, its loop closed while a worker still writes: no thread error."""
    in_put, release = threading.Event(), threading.Event()

    class SlowStore:
        def put(self, chunk_id: ChunkId, data: object, *, lease_s: float, **_: object) -> bool:
            in_put.set()
            release.wait(STEP_S)
            return True

    failures: list[BaseException | None] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    host = peer_address(1, 1)
    cid, data = random_chunk(1000)

    async def store_without_waiting() -> TransferServer:
        server = TransferServer(SlowStore(), host=host, port=0)  # type: ignore[arg-type]
        await server.start()
        stream = await open_secure(host, server.port, local=host)
        stream.write(TransferConnection(role=Role.CLIENT).send(StoreRequest(1, cid, 60, data)))
        assert await asyncio.to_thread(in_put.wait, STEP_S)
        stream.writer.transport.abort()
        # Close the sockets, as a process tearing down would, but do not stop() the server.
        assert server._server is not None
        server._server.close()
        for connection in list(server._connections):
            connection.abort()
        await asyncio.sleep(0.05)
        return server

    loop = asyncio.new_event_loop()
    try:
        server = loop.run_until_complete(store_without_waiting())
    finally:
        loop.close()
        release.set()
    try:
        workers = server._workers
        assert workers is not None
        workers.shutdown()
        for thread in workers._threads:
            thread.join(STEP_S)
    finally:
        threading.excepthook = hook
    assert failures == []


async def test_client_reuses_its_receive_buffers_through_fetch_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks fetched one after another with fetch_into arrive in one recycled buffer; fetch() hands
    its view to the caller, so that buffer is never lent again."""
    host = peer_address(1, 1)
    chunks = [random_chunk(300_000 + i) for i in range(6)]
    async with holder(tmp_path, host) as (server, _):
        addr = (host, server.port)
        async with TransferClient(local_host=peer_address(2, 1)) as client, asyncio.timeout(STEP_S):
            lent = record_pool_takes(monkeypatch, lambda: client._buffers)
            for cid, data in chunks:
                await client.store(addr, cid, data, 60)
            del lent[:]
            got = [await client.fetch_into(addr, cid, bytes) for cid, _ in chunks]
            assert got == [data for _, data in chunks]
            assert len(lent) == len(chunks)
            assert len({id(buffer) for buffer in lent}) == 1
            kept = await client.fetch(addr, chunks[0][0])
            again = await client.fetch_into(addr, chunks[1][0], bytes)
            assert kept == chunks[0][1]  # the view fetch() returned is intact
            assert again == chunks[1][1]


def test_buffer_pool_keeps_no_buffer_that_is_still_viewed() -> None:
    """A pooled buffer is lent to one user at a time: never one a view still reads, never twice."""
    pool = buffers.BufferPool()
    viewed = pool.take(1000)
    view = memoryview(viewed)[10:20]  # a slice, as a transport or a traceback may keep
    pool.give(viewed)
    assert pool.take(1000) is not viewed
    view.release()
    free = pool.take(1000)
    pool.give(free)
    pool.give(free)
    assert pool.take(1000) is free
    assert pool.take(1000) is not free
    # A small buffer on top does not hide a large one below it.
    large, small = pool.take(300_000), pool.take(1000)
    assert len(small) < 300_000
    pool.give(large)
    pool.give(small)
    assert pool.take(300_000) is large


async def test_a_reply_that_fails_to_send_frees_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If sending a reply raises, the connection is dropped and its request's slot comes back."""
    finished = transfer_server._Connection.finished
    failures = 0

    def failing_once(self: transfer_server._Connection, *args: object) -> None:
        nonlocal failures
        if not failures:
            failures += 1
            raise RuntimeError("injected")
        finished(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(transfer_server._Connection, "finished", failing_once)
    host = peer_address(1, 1)
    cid, data = random_chunk(200_000)
    limits = ServerLimits(max_inflight_total=1)
    store = ChunkStore(tmp_path / "store", quota_bytes=1 << 20)
    store.put(cid, data, lease_s=60)
    server = TransferServer(store, host=host, port=0, limits=limits)
    try:
        async with asyncio.timeout(STEP_S):
            await server.start()
            addr = (host, server.port)
            async with TransferClient(local_host=peer_address(2, 1), timeout_s=2) as client:
                with pytest.raises(errors.NetworkError):
                    await client.fetch(addr, cid)
            # With the one server-wide slot leaked, this fetch would wait for its timeout.
            async with TransferClient(local_host=peer_address(2, 1), timeout_s=5) as client:
                assert await client.fetch(addr, cid) == data
    finally:
        await server.stop()
        store.close()
    assert failures == 1


@pytest.mark.parametrize("turns", range(5))
def test_stop_closes_connections_accepted_just_before_it(tmp_path: Path, turns: int) -> None:
    """CI saw a server-side socket left open: asyncio makes an accepted connection's transport a loop turn later, and
    once the server is closed that fails and leaks the socket. Clients connect, the loop turns ``turns`` times (2:
    accepted, no transport yet), stop(), and the loop closes at once, as a process tearing down does."""
    host = peer_address(1, 1)
    store = ChunkStore(tmp_path / "store", quota_bytes=1 << 20)
    clients: list[socket.socket] = []

    async def connect_then_stop() -> None:
        server = TransferServer(store, host=host, port=0)
        await server.start()
        for _ in range(20):
            clients.append(
                socket.create_connection(
                    (host, server.port), timeout=STEP_S, source_address=(peer_address(2, 1), 0)
                )
            )
        for _ in range(turns):
            await asyncio.sleep(0)
        await asyncio.wait_for(server.stop(), STEP_S)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            asyncio.run(connect_then_stop())
            gc.collect()
    finally:
        for client in clients:
            client.close()
        store.close()
    assert [str(w.message) for w in caught if "unclosed transport" in str(w.message)] == []
