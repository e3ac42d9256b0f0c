"""Hedged fetch requests (api/fetch_schedule.py) against a real holder and a slow one, over real sockets.

The slow holder speaks the real protocol (channel and wire) but answers a fetch only when the test releases
that chunk, so "slow" needs no timing: the fast holder always delivers first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2pmega.api.fetch import _download
from p2pmega.api.fetch_schedule import FetchSchedule
from p2pmega.core.chunking import ChunkId
from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import FileEncoder
from p2pmega.core.wire import (
    NEED_DATA,
    ChunkData,
    FetchRequest,
    HasReply,
    HasRequest,
    ProtocolViolation,
    Role,
    TransferConnection,
)
from p2pmega.errors import RemoteProtocolError
from p2pmega.node import Node, NodeSettings
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.manifest import walk_manifest
from tests.channel_helpers import SecureStream
from tests.conftest import peer_address
from tests.integration.test_transfer import holder

pytestmark = pytest.mark.integration

STEP_S = 20.0
# Far longer than the test's own deadline: the old fetch waited this long for the slow holder.
SLOW_HOLDER_TIMEOUT_S = 120.0
CHUNK = 4096
CHUNKS = 40


@dataclass
class SlowHolder:
    """Holds every chunk of ``store``; answers a fetch only once the chunk is released."""

    store: dict[ChunkId, bytes]
    addr: tuple[str, int] = ("", 0)
    requested: set[ChunkId] = field(default_factory=set)
    released: dict[ChunkId, asyncio.Event] = field(default_factory=dict)
    sent: set[ChunkId] = field(default_factory=set)
    # Set once the client closed a connection while fetches on it were still unanswered (a cancel, or a timeout).
    closed_with_pending: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self, chunk_id: ChunkId) -> None:
        self.released.setdefault(chunk_id, asyncio.Event()).set()


@contextlib.asynccontextmanager
async def slow_holder(host: str, store: dict[ChunkId, bytes]) -> AsyncIterator[SlowHolder]:
    slow = SlowHolder(store)
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = TransferConnection(role=Role.SERVER)
        stream = SecureStream(reader, writer, role=Role.SERVER)
        pending: set[asyncio.Task[None]] = set()

        async def answer(request_id: int, chunk_id: ChunkId) -> None:
            await slow.released.setdefault(chunk_id, asyncio.Event()).wait()
            stream.write(conn.send(ChunkData(request_id, chunk_id, slow.store[chunk_id])))
            slow.sent.add(chunk_id)

        try:
            await stream.run_handshake()
            while data := await stream.read():
                conn.receive_data(data)
                while (event := conn.next_event()) is not NEED_DATA:
                    if isinstance(event, HasRequest):
                        flags = tuple(c in slow.store for c in event.ids)
                        stream.write(conn.send(HasReply(event.request_id, flags)))
                    elif isinstance(event, FetchRequest):
                        slow.requested.add(event.chunk_id)
                        task = asyncio.create_task(answer(event.request_id, event.chunk_id))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
        except (ConnectionError, ProtocolViolation, RemoteProtocolError, TimeoutError):
            pass
        finally:
            if pending:
                slow.closed_with_pending.set()
            for task in pending:
                task.cancel()
            writer.close()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handle(reader, writer)
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(tracked, host, 0)
    slow.addr = server.sockets[0].getsockname()[:2]
    try:
        yield slow
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def _encoded(
    seed: int,
) -> tuple[bytes, ReadCap, list[tuple[ChunkId, bytes]], list[tuple[ChunkId, bytes]]]:
    plaintext = os.urandom(CHUNK * CHUNKS - 100)
    encoder = FileEncoder(name=f"f{seed}.bin", size=len(plaintext), chunk_size=CHUNK)
    stored = [
        encoder.encode_chunk(i, plaintext[i * CHUNK : (i + 1) * CHUNK])
        for i in range(encoder.chunk_count)
    ]
    cap, manifest_chunks = encoder.finish()
    return plaintext, cap, stored, manifest_chunks


def _client(tmp_path: Path, host: str) -> Node:
    return Node(
        NodeSettings(
            host=host,
            data_dir=tmp_path / "client",
            persistent_identity=False,
            transfer_timeout_s=SLOW_HOLDER_TIMEOUT_S,
        )
    )


async def test_a_hedged_chunk_whose_late_copy_arrives_is_written_once(tmp_path: Path) -> None:
    """The slow holder's copy of a hedged chunk arrives while the fast copy is being written: it is dropped."""
    _, _, stored, _ = _encoded(1)
    data = dict(stored)
    ids = [c for c, _ in stored]
    fast_host = peer_address(73, 1)
    async with (
        holder(tmp_path, fast_host) as (server, store),
        slow_holder(peer_address(73, 2), data) as slow,
    ):
        for chunk_id, blob in stored:
            store.put(chunk_id, blob, lease_s=3600)
        fast = (fast_host, server.port)
        loop = asyncio.get_running_loop()
        late: dict[int, threading.Event] = {i: threading.Event() for i in range(len(ids))}
        writes: Counter[int] = Counter()
        out: dict[int, bytes] = {}
        lock = threading.Lock()
        raced: list[int] = []

        def consume(index: int, blob: bytes | memoryview) -> int:
            chunk_id = ids[index]
            with lock:
                # The first chunk the fast holder delivers while the slow one still has it under way: no request
                # was cancelled yet (that needs a hedged chunk written), so the slow copy can still arrive.
                race = not raced and chunk_id in slow.requested and chunk_id not in slow.sent
                if race:
                    raced.append(index)
            if race:
                # Let the slow copy go now, and finish writing only after the schedule received and dropped it.
                loop.call_soon_threadsafe(slow.release, chunk_id)
                assert late[index].wait(STEP_S), f"the slow copy of chunk {index} never arrived"
            with lock:
                writes[index] += 1
                out[index] = bytes(blob)
            return len(blob)

        async def on_done(index: int, written: int) -> None:
            del index, written

        async with _client(tmp_path, peer_address(73, 3)) as client, asyncio.timeout(STEP_S):
            locator = HolderLocator(client, hints=[slow.addr, fast])
            await locator.want(ids)
            schedule = FetchSchedule(
                locator,
                ids,
                range(len(ids)),
                [len(data[c]) for c in ids],
                consume,
                on_done,
                max_in_flight=8,
            )
            schedule.on_late = lambda index: late[index].set()
            await schedule.run()
    assert raced, "no chunk was under way at both holders: nothing was hedged"
    assert schedule.late >= 1, "no late copy arrived: the test did not exercise the race"
    assert writes == Counter(range(len(ids))), "every chunk written exactly once"
    assert all(out[i] == data[ids[i]] for i in range(len(ids))), "byte-identical"


async def test_a_fetch_finishes_without_waiting_for_a_holder_that_never_answers(
    tmp_path: Path,
) -> None:
    """Before: every chunk asked of the slow holder first waited for it (its transfer timeout: 120 s here)."""
    plaintext, cap, stored, manifest_chunks = _encoded(2)
    everything = dict([*stored, *manifest_chunks])
    fast_host = peer_address(73, 4)
    async with (
        holder(tmp_path, fast_host) as (server, store),
        slow_holder(peer_address(73, 5), everything) as slow,
    ):
        for chunk_id, _ in manifest_chunks:
            slow.release(
                chunk_id
            )  # slow for the file's data only: the manifest walk is not what is tested
        for chunk_id, blob in everything.items():
            store.put(chunk_id, blob, lease_s=3600)
        fast = (fast_host, server.port)
        target = tmp_path / "out.bin"
        async with _client(tmp_path, peer_address(73, 6)) as client, asyncio.timeout(STEP_S):
            locator = HolderLocator(client, hints=[slow.addr, fast])
            manifest = await walk_manifest(locator, cap)
            await _download(locator, cap, manifest, target, None)
            # The cancelled requests closed their connections: the slow holder sees them go while unanswered.
            await slow.closed_with_pending.wait()
        assert target.read_bytes() == plaintext
        data_ids = {c for c, _ in stored}
        assert slow.requested & data_ids, (
            "it was asked for data (at first it is not known to be slow)"
        )
        assert not slow.sent & data_ids, "yet no data chunk waited for it"
