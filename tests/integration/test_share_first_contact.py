"""share and check on first contact (issue 21): feasibility before storing, unknown countries, FIFOs, resuming.

Real in-process nodes on loopback: a DHT-only bootstrap node at 127.90.1.1 and storage peers at 127.C.1.1, with
test countries 91-94 mapped to DE, NZ, IS, CH by a geo table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from p2pmega.api import share_peers
from p2pmega.api.check import check
from p2pmega.api.common import NetSettings, client_node
from p2pmega.api.fetch import fetch
from p2pmega.api.share import share
from p2pmega.cli import files as cli_files
from p2pmega.core.chunking import ChunkId
from p2pmega.core.geo import parse_geo_table
from p2pmega.core.placement import Candidate, meets_rule
from p2pmega.errors import InputFileError, PlacementImpossible
from p2pmega.net.transfer_client import TransferClient
from p2pmega.node import Node, NodeSettings
from p2pmega.replicate.holder import holder_node
from p2pmega.replicate.peers import candidate_pool
from p2pmega.storage.share_state import load_state
from tests.conftest import peer_address

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STEP_S = 60.0
GEO = "127.91.0.0/16 DE\n127.92.0.0/16 NZ\n127.93.0.0/16 IS\n127.94.0.0/16 CH\n"
CHUNK = 64 * 1024


@dataclass
class Network:
    boot: Node
    seeds: list[Node]
    net: NetSettings  # a client's settings, with the geo table

    async def stored(self) -> list[list[ChunkId]]:
        """Every seed's stored chunk ids."""
        return [await asyncio.to_thread(s.store.ids) for s in self.seeds if s.store is not None]


@contextlib.asynccontextmanager
async def network(tmp_path: Path, countries: Sequence[int]) -> AsyncIterator[Network]:
    """A bootstrap node and one storage peer per test country, all stopped at exit."""
    async with contextlib.AsyncExitStack() as stack:
        boot = Node(
            NodeSettings(host=peer_address(90, 1), data_dir=tmp_path / "boot", rpc_timeout_s=1.0)
        )
        async with asyncio.timeout(STEP_S):
            await stack.enter_async_context(boot)
            seeds = [
                holder_node(
                    NodeSettings(
                        host=peer_address(c, 1),
                        data_dir=tmp_path / f"seed-{c}",
                        bootstrap=[boot.address],
                        holder=True,
                        rpc_timeout_s=1.0,
                    )
                )[0]
                for c in countries
            ]
            for seed in seeds:
                await stack.enter_async_context(seed)
        net = NetSettings(
            bootstrap=[boot.address],
            data_dir=tmp_path / "client",
            geo=parse_geo_table(GEO),
            host=peer_address(90, 2),
            rpc_timeout_s=1.0,
        )
        yield Network(boot, seeds, net)


async def interrupt_share(src: Path, net: NetSettings, *, after_bytes: int) -> None:
    """Start sharing ``src`` and cancel it (what Ctrl-C does to the CLI's asyncio.run) once
    ``after_bytes`` of it are placed."""
    enough = asyncio.Event()

    def progress(done: int, total: int) -> None:
        if done >= after_bytes:
            enough.set()

    first = asyncio.create_task(share(src, net=net, chunk_size=CHUNK, progress=progress))
    waiter = asyncio.create_task(enough.wait())
    await asyncio.wait([first, waiter], return_when=asyncio.FIRST_COMPLETED)
    assert not first.done(), "the share finished before it could be interrupted"
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    waiter.cancel()


@pytest.fixture
def store_calls(monkeypatch: pytest.MonkeyPatch) -> list[ChunkId]:
    """Every chunk id the share client asks a holder to store."""
    calls: list[ChunkId] = []
    real = TransferClient.store

    async def counting(
        self: TransferClient, addr: Any, chunk_id: ChunkId, *args: Any, **kwargs: Any
    ) -> bool:
        calls.append(chunk_id)
        return await real(self, addr, chunk_id, *args, **kwargs)

    monkeypatch.setattr(TransferClient, "store", counting)
    return calls


async def test_replicas_beyond_the_storage_peers_stores_nothing_and_names_replicas(
    tmp_path: Path, store_calls: list[ChunkId]
) -> None:
    src = tmp_path / "five.bin"
    src.write_bytes(os.urandom(4 * CHUNK))
    async with network(tmp_path, [91, 92, 93, 94]) as n, asyncio.timeout(STEP_S):
        with pytest.raises(PlacementImpossible) as caught:
            await share(src, net=n.net, replicas=5, chunk_size=CHUNK)
        message = str(caught.value)
        # The bootstrap node (a fifth DHT node, holding nothing) is not counted as a candidate.
        assert "found 4 storage peers in CH, DE, IS, NZ" in message
        assert "lower --replicas to 4" in message
        assert "--min-countries" not in message
        assert "repair" not in message
        assert store_calls == []
        assert await n.stored() == [[], [], [], []]


async def test_without_a_geo_table_share_points_to_it_and_stores_nothing(
    tmp_path: Path, store_calls: list[ChunkId]
) -> None:
    src = tmp_path / "nowhere.bin"
    src.write_bytes(os.urandom(3 * CHUNK))
    async with network(tmp_path, [91, 92, 93, 94]) as n, asyncio.timeout(STEP_S):
        with pytest.raises(PlacementImpossible) as caught:
            await share(src, net=replace(n.net, geo=None), chunk_size=CHUNK)
        message = str(caught.value)
        assert "found 4 storage peers, all of unknown country" in message
        assert "--geo-table" in message
        assert "--min-countries" not in message
        assert store_calls == []
        assert await n.stored() == [[], [], [], []]


async def test_check_without_a_geo_table_says_the_countries_are_unknown(tmp_path: Path) -> None:
    src = tmp_path / "checked.bin"
    src.write_bytes(os.urandom(3 * CHUNK + 5))
    async with network(tmp_path, [91, 92, 93, 94]) as n, asyncio.timeout(STEP_S):
        shared = await share(src, net=n.net, chunk_size=CHUNK)
        known = await check(shared.read_link, net=n.net)
        assert known.healthy
        assert known.countries_unknown == 0

        result = await check(shared.read_link, net=replace(n.net, geo=None))
        assert not result.healthy  # unknown never counts as a country
        assert result.below == 0
        assert result.countries_unknown == len(result.chunks) == len(shared.chunks)
        line = cli_files._below_rule(result)
        assert line.startswith("countries unknown: ")
        assert "--geo-table" in line
        assert "below" not in line

        # A real shortage still reads as one, with the unknown-country chunks counted apart.
        strict = await check(shared.read_link, net=replace(n.net, geo=None), replicas=3)
        assert strict.below == len(strict.chunks)
        assert cli_files._below_rule(strict).startswith(
            f"{len(strict.chunks)} of {len(strict.chunks)}"
        )


async def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    net = NetSettings(data_dir=tmp_path / "client", bootstrap=[("127.90.9.1", 9)])
    try:
        async with asyncio.timeout(10):
            with pytest.raises(
                InputFileError, match=r"is a FIFO \(named pipe\), not a regular file"
            ):
                await share(fifo, net=net)
    finally:
        # Were the open blocked in a worker thread (waiting for a writer), this lets it return.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_an_interrupted_share_resumes_and_a_finished_one_gives_the_same_link(
    tmp_path: Path, store_calls: list[ChunkId]
) -> None:
    chunks = 24
    data = os.urandom(chunks * CHUNK - 100)
    src = tmp_path / "resumable.bin"
    src.write_bytes(data)
    async with network(tmp_path, [91, 92, 93, 94]) as n, asyncio.timeout(STEP_S):
        await interrupt_share(src, n.net, after_bytes=6 * CHUNK)

        [state] = list((n.net.data_dir / "shares").iterdir())
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
        first_stores = len(store_calls)
        store_calls.clear()

        resumed = await share(src, net=n.net, chunk_size=CHUNK)
        assert resumed.status == "resumed"
        assert resumed.chunks_resumed >= 6
        # Only the chunks not placed before are stored (two copies each), then the manifest.
        manifest_chunks = len(resumed.chunks) - chunks
        assert len(store_calls) == 2 * (chunks - resumed.chunks_resumed + manifest_chunks)
        assert first_stores >= 2 * resumed.chunks_resumed
        fetched = await fetch(resumed.read_link, net=n.net, output=tmp_path / "out.bin")
        assert fetched.path.read_bytes() == data

        store_calls.clear()
        again = await share(src, net=n.net, chunk_size=CHUNK)
        assert again.status == "unchanged"
        assert again.read_link == resumed.read_link
        assert again.keep_link == resumed.keep_link
        assert [c.chunk_id for c in again.chunks] == [c.chunk_id for c in resumed.chunks]
        assert store_calls == []

        fresh = await share(src, net=n.net, chunk_size=CHUNK, new=True)
        assert fresh.status == "new"
        assert fresh.read_link != resumed.read_link
        assert len(store_calls) >= 2 * chunks

        # A changed file is a new share, whatever was recorded for its path.
        src.write_bytes(data[::-1])
        changed = await share(src, net=n.net, chunk_size=CHUNK)
        assert changed.status == "new"
        assert changed.read_link not in (fresh.read_link, resumed.read_link)


async def test_a_resumed_share_places_again_what_a_lost_holder_had(tmp_path: Path) -> None:
    chunks = 16
    data = os.urandom(chunks * CHUNK)
    src = tmp_path / "lost.bin"
    src.write_bytes(data)
    async with network(tmp_path, [91, 92, 93, 94]) as n, asyncio.timeout(STEP_S):
        await interrupt_share(src, n.net, after_bytes=8 * CHUNK)

        [path] = list((n.net.data_dir / "shares").iterdir())
        recorded = load_state(path)
        assert recorded is not None
        lost = n.seeds[0]
        on_lost = [
            i
            for i, p in recorded.chunks.items()
            if any(h.address == lost.address for h in p.holders)
        ]
        lost_address = lost.address
        await lost.stop()
        resumed = await share(src, net=n.net, chunk_size=CHUNK)
        # The chunks the stopped holder had were placed again; the others were kept.
        assert resumed.chunks_resumed == len(recorded.chunks) - len(on_lost)
        assert all(h.address != lost_address for c in resumed.chunks for h in c.holders)
        fetched = await fetch(resumed.read_link, net=n.net, output=tmp_path / "out.bin")
        assert fetched.path.read_bytes() == data
        assert (await check(resumed.read_link, net=n.net)).healthy


async def test_the_probe_keeps_storage_peers_and_stops_waiting_once_they_suffice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A contact that accepts connections and never answers (a firewall, a hung peer), and a probe timeout far
    # longer than the test's own: the probe must stop waiting for it once the storage peers meet the rule.
    monkeypatch.setattr(share_peers, "PROBE_TIMEOUT_S", 3600.0)
    hung: list[asyncio.StreamWriter] = []

    async def never_answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    server = await asyncio.start_server(never_answer, host=peer_address(95, 1), port=0)
    mute = Candidate(
        node_id=os.urandom(20),
        host=peer_address(95, 1),
        port=server.sockets[0].getsockname()[1],
        country=None,
    )
    try:
        async with (
            network(tmp_path, [91, 92, 93]) as n,
            asyncio.timeout(STEP_S),
            client_node(n.net) as node,
        ):
            pool = await candidate_pool(node, n.net.geo, random.Random(1))
            probe = await share_peers.storage_peers(
                node,
                [*pool, mute],
                random.Random(2),
                enough=lambda peers: meets_rule(peers, replicas=2, min_countries=2),
            )
        assert {c.host for c in probe.live} == {s.settings.host for s in n.seeds}
        assert {c.host for c in probe.silent} == {n.boot.settings.host, mute.host}
    finally:
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_peers_lost_mid_share_keep_what_was_stored_for_a_rerun(tmp_path: Path) -> None:
    chunks = 16
    data = os.urandom(chunks * CHUNK)
    src = tmp_path / "dropped.bin"
    src.write_bytes(data)
    async with network(tmp_path, [91, 92, 93]) as n, asyncio.timeout(STEP_S):
        some = asyncio.Event()

        def progress(done: int, total: int) -> None:
            if done >= 4 * CHUNK:
                some.set()

        task = asyncio.create_task(
            share(src, net=n.net, replicas=3, chunk_size=CHUNK, progress=progress)
        )
        waiter = asyncio.create_task(some.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        assert not task.done(), "the share finished before a peer could be lost"
        await n.seeds[0].stop()
        with pytest.raises(PlacementImpossible) as caught:
            await task
        waiter.cancel()
        message = str(caught.value)
        assert message.startswith("cannot store chunk ")
        assert "lower --replicas to 2" in message
        assert "repair" not in message
        assert message.endswith("rerun the same command to resume")

        resumed = await share(src, net=n.net, replicas=2, chunk_size=CHUNK)
        assert resumed.status == "resumed"
        assert resumed.chunks_resumed >= 4
        fetched = await fetch(resumed.read_link, net=n.net, output=tmp_path / "out.bin")
        assert fetched.path.read_bytes() == data
