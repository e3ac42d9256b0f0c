"""Hedged and moved fetch requests (api/fetch_schedule.py) against real holders and slow ones, over real sockets.

The slow holder speaks the real protocol (channel and wire) but finishes a reply only when the test releases
that chunk, so "slow" needs no timing: the fast holder always delivers first. A trickling one sends most of each
reply a little at a time first, so the client can measure it as slow while its replies are still arriving.
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
# A trickling holder sends this much of a reply at a time, this often (~5 KB/s: a 4 KiB chunk takes ~0.8 s),
# and holds back the last TRICKLE_HELD_BYTES until the chunk is released.
TRICKLE_PIECE_BYTES = 128
TRICKLE_EVERY_S = 0.025
TRICKLE_HELD_BYTES = 64


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
    trickle: bool = False
    # Set whenever a fetch request arrives.
    asked: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self, chunk_id: ChunkId) -> None:
        self.released.setdefault(chunk_id, asyncio.Event()).set()


@contextlib.asynccontextmanager
async def slow_holder(
    host: str, store: dict[ChunkId, bytes], *, trickle: bool = False
) -> AsyncIterator[SlowHolder]:
    slow = SlowHolder(store, trickle=trickle)
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = TransferConnection(role=Role.SERVER)
        stream = SecureStream(reader, writer, role=Role.SERVER)
        pending: set[asyncio.Task[None]] = set()

        # Replies go out whole, one after another: records must reach the client in the order they were sealed.
        replying = asyncio.Lock()

        async def answer(request_id: int, chunk_id: ChunkId) -> None:
            released = slow.released.setdefault(chunk_id, asyncio.Event())
            async with replying:
                if not slow.trickle:
                    await released.wait()
                    stream.write(conn.send(ChunkData(request_id, chunk_id, slow.store[chunk_id])))
                    slow.sent.add(chunk_id)
                    return
                sealed = stream.sealed(
                    conn.send(ChunkData(request_id, chunk_id, slow.store[chunk_id]))
                )
                at = 0
                while at < len(sealed) - TRICKLE_HELD_BYTES and not released.is_set():
                    stream.writer.write(sealed[at : at + TRICKLE_PIECE_BYTES])
                    at += TRICKLE_PIECE_BYTES
                    await asyncio.sleep(TRICKLE_EVERY_S)
                await released.wait()
                stream.writer.write(sealed[at:])
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
                        slow.asked.set()
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


async def test_a_slow_holder_is_moved_off_a_chunk_the_fast_one_holds_to_one_only_slow_holders_hold(
    tmp_path: Path,
) -> None:
    """Two trickling holders and a fast one: chunks 0-3 on the fast one and the first slow one, 4-5 only on the two
    slow ones. The first slow holder starts on a chunk the fast one also holds; once its rate shows it is slow,
    that chunk goes to the fast holder and the slow one is asked for a chunk only the slow ones hold, so both
    slow holders send those at once. Before: it kept sending its first chunk (here until released, which the test
    does only once both slow-only chunks were asked for) and chunk 5 waited behind it.
    """
    _, _, stored, _ = _encoded(3)
    stored = stored[:6]
    data = dict(stored)
    ids = [c for c, _ in stored]
    shared, only_slow = set(ids[:4]), set(ids[4:])
    fast_host = peer_address(74, 1)
    async with (
        holder(tmp_path, fast_host) as (server, store),
        slow_holder(peer_address(74, 2), data, trickle=True) as slow1,
        slow_holder(peer_address(74, 3), {c: data[c] for c in only_slow}, trickle=True) as slow2,
    ):
        for chunk_id in shared:
            store.put(chunk_id, data[chunk_id], lease_s=3600)
        fast = (fast_host, server.port)
        writes: Counter[int] = Counter()
        out: dict[int, bytes] = {}
        lock = threading.Lock()

        def consume(index: int, blob: bytes | memoryview) -> int:
            with lock:
                writes[index] += 1
                out[index] = bytes(blob)
            return len(blob)

        async def on_done(index: int, written: int) -> None:
            del index, written

        async with _client(tmp_path, peer_address(74, 4)) as client, asyncio.timeout(STEP_S):
            locator = HolderLocator(client, hints=[slow1.addr, slow2.addr, fast])
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
            run = asyncio.create_task(schedule.run())
            try:
                while True:
                    slow1.asked.clear()
                    slow2.asked.clear()
                    if (
                        slow1.requested & only_slow
                        and slow2.requested & only_slow
                        and only_slow <= slow1.requested | slow2.requested
                    ):
                        break
                    asked = [asyncio.create_task(e.wait()) for e in (slow1.asked, slow2.asked)]
                    try:
                        await asyncio.wait([run, *asked], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in asked:
                            task.cancel()
                    assert not run.done(), "the fetch ended before both slow-only chunks were asked"
                for chunk_id in ids:
                    slow1.release(chunk_id)
                    slow2.release(chunk_id)
                await run
            finally:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
    assert slow1.requested & shared, "the first slow holder started on a chunk the fast one holds"
    assert schedule.moved >= 1
    assert not slow1.sent & shared, "that chunk came from the fast holder"
    assert writes == Counter(range(len(ids))), "every chunk written exactly once"
    assert all(out[i] == data[ids[i]] for i in range(len(ids))), "byte-identical"
