"""A holder Node announces the chunks it stores: in batches after a delay, and what is left at stop."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.errors import StorageError
from p2pmega.net.dht import DHTNode
from p2pmega.net.transfer_client import TransferClient
from p2pmega.node import Node, NodeSettings
from p2pmega.replicate.holder import Duties, HolderDuties, holder_node
from tests.chunk_bytes import shaped
from tests.conftest import peer_address

pytestmark = pytest.mark.integration

STEP_S = 20.0


@asynccontextmanager
async def recorder() -> AsyncIterator[DHTNode]:
    """The DHT node the holder joins through; with only the two of them, it records everything."""
    node = DHTNode(host=peer_address(71, 1), rpc_timeout_s=1.0)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def holder(
    tmp_path: Path,
    dht: DHTNode,
    *,
    announce_delay_s: float,
    announce_quiet_s: float,
    gc_interval_s: float = 600.0,
    restart_delay_s: float = 1.0,
) -> tuple[Node, Duties]:
    """A holder with the production duties but these intervals (no repair: nothing here is short)."""
    settings = NodeSettings(
        host=peer_address(71, 2),
        data_dir=tmp_path / "holder",
        bootstrap=[(dht.host, dht.port)],
        holder=True,
        rpc_timeout_s=1.0,
        restart_delay_s=restart_delay_s,
    )
    config = HolderDuties(
        repair=None,
        gc_interval_s=gc_interval_s,
        announce_delay_s=announce_delay_s,
        announce_quiet_s=announce_quiet_s,
    )
    return holder_node(settings, config)


def announced(duties: Duties) -> int:
    assert duties.announcer is not None, "the node has not started"
    return duties.announcer.announced


async def store_chunks(node: Node, count: int) -> list[ChunkId]:
    """Store ``count`` small chunks on ``node`` one after the other, each acknowledged."""
    ids = []
    async with TransferClient(local_host=peer_address(71, 3)) as client:
        for _ in range(count):
            data = shaped(os.urandom(1000))
            chunk_id = chunk_id_of(data)
            assert await client.store(node.address, chunk_id, data, lease_s=3600)
            ids.append(chunk_id)
    return ids


async def providers_of(dht: DHTNode, ids: Sequence[ChunkId]) -> list[set[int]]:
    return [{p.port for p in await dht.find_providers(chunk_id)} for chunk_id in ids]


async def test_chunks_stored_within_the_delay_share_one_announcement_flushed_at_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with asyncio.timeout(STEP_S), recorder() as dht:
        node, duties = holder(tmp_path, dht, announce_delay_s=3600.0, announce_quiet_s=3600.0)
        calls: list[list[bytes]] = []
        await node.start()
        try:
            announce_many = node.dht_node.announce_many

            async def spy(chunk_ids: Sequence[bytes], transfer_port: int) -> int:
                calls.append(list(chunk_ids))
                return await announce_many(chunk_ids, transfer_port)

            monkeypatch.setattr(node.dht_node, "announce_many", spy)
            ids = await store_chunks(node, 3)
            port = node.port
            # An hour of delay and of quiet: nothing goes out while the node runs ...
            assert calls == []
            assert await providers_of(dht, ids) == [set(), set(), set()]
        finally:
            await node.stop()
        # ... and stop() announces all three in one batch.
        assert calls == [ids]
        assert announced(duties) == 3
        assert await providers_of(dht, ids) == [{port}, {port}, {port}]


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the announce worker has no event to wait on); STEP_S bounds the test."""
    for _ in range(int(STEP_S / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition still false after {STEP_S} s")


@pytest.mark.parametrize(
    ("delay_s", "quiet_s"),
    [(0.2, 3600.0), (3600.0, 0.2)],
    ids=["delay-since-first-chunk", "quiet-since-last-chunk"],
)
async def test_stored_chunks_are_announced_after(
    tmp_path: Path, delay_s: float, quiet_s: float
) -> None:
    """Either rule alone closes a batch (the other set to an hour)."""
    async with asyncio.timeout(STEP_S), recorder() as dht:
        node, duties = holder(tmp_path, dht, announce_delay_s=delay_s, announce_quiet_s=quiet_s)
        async with node:
            ids = await store_chunks(node, 4)
            await wait_for(lambda: announced(duties) == len(ids))
            assert await providers_of(dht, ids) == [{node.port}] * len(ids)


async def test_chunks_queued_again_are_announced_without_waiting_for_quiet(tmp_path: Path) -> None:
    """The re-announcer's chunks (the whole store, at start and every 12 h) come all at once: no batching to wait
    for, while stored chunks wait for their batch to close (an hour here)."""
    async with asyncio.timeout(STEP_S), recorder() as dht:
        node, duties = holder(tmp_path, dht, announce_delay_s=3600.0, announce_quiet_s=3600.0)
        async with node:
            announcer = duties.announcer
            assert announcer is not None
            ids = [chunk_id_of(shaped(os.urandom(1000))) for _ in range(3)]
            announcer.requeue(ids)
            await wait_for(lambda: announced(duties) == len(ids))
            assert await providers_of(dht, ids) == [{node.port}] * len(ids)
            # A network one crawl sees whole: one crawl for all three, counted in the summary line.
            assert announcer.crawls == 1
            assert "3 announcements (1 crawl)" in duties.line()


async def test_garbage_collection_survives_a_failed_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One StorageError in GC used to end the holder's maintenance loop for good (issue 21, bug 3)."""
    calls: list[int] = []
    collected_again = asyncio.Event()
    async with asyncio.timeout(STEP_S), recorder() as dht:
        node, _duties = holder(
            tmp_path,
            dht,
            announce_delay_s=0.1,
            announce_quiet_s=0.05,
            gc_interval_s=0.05,
            restart_delay_s=0.01,
        )
        async with node:
            assert node.store is not None
            real = node.store.collect_garbage

            def flaky() -> int:
                calls.append(1)
                if len(calls) <= 2:
                    raise StorageError("index locked")
                collected_again.set()
                return real()

            monkeypatch.setattr(node.store, "collect_garbage", flaky)
            with caplog.at_level(logging.DEBUG, logger="p2pmega.net.supervise"):
                await collected_again.wait()
    assert len(calls) >= 3
    warnings = _warnings_about("garbage collector", caplog)
    assert len(warnings) == 1, "the same failure twice is one warning"
    assert "StorageError: index locked" in warnings[0].getMessage()
    assert not warnings[0].exc_info, "our own errors need no traceback"


async def test_announcing_survives_an_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in announcing used to end the announce worker: no stored chunk was announced again (bug 3)."""
    failures = 2
    calls: list[list[bytes]] = []
    async with asyncio.timeout(STEP_S), recorder() as dht:
        node, duties = holder(
            tmp_path, dht, announce_delay_s=0.1, announce_quiet_s=0.05, restart_delay_s=0.01
        )
        async with node:
            announce_many = node.dht_node.announce_many

            async def flaky(chunk_ids: Sequence[bytes], transfer_port: int) -> int:
                nonlocal failures
                calls.append(list(chunk_ids))
                if failures:
                    failures -= 1
                    raise RuntimeError("unexpected")
                return await announce_many(chunk_ids, transfer_port)

            monkeypatch.setattr(node.dht_node, "announce_many", flaky)
            with caplog.at_level(logging.DEBUG, logger="p2pmega.net.supervise"):
                # Two batches fail (the worker dies twice and is restarted), the third is announced.
                await store_chunks(node, 2)
                await wait_for(lambda: len(calls) == 1)
                await store_chunks(node, 2)
                await wait_for(lambda: len(calls) == 2)
                ids = await store_chunks(node, 2)
                await wait_for(lambda: announced(duties) == len(ids))
            assert await providers_of(dht, ids) == [{node.port}] * len(ids)
    warnings = _warnings_about("announcer", caplog)
    assert len(warnings) == 1, "the same failure twice is one warning"
    assert "RuntimeError: unexpected" in warnings[0].getMessage()
    assert warnings[0].exc_info, "a bug's warning carries its traceback"


def _warnings_about(duty: str, caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"{duty} failed")
    ]
