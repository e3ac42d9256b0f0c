"""Repair at the replicate level, in one process: real holder nodes on loopback, repair rounds driven by the test.

Countries: 127.41.x DE, 127.42.x NZ, 127.43.x IS (each peer on its own /24).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.geo import GeoTable, parse_geo_table
from p2pmega.core.magnet import KeepCap
from p2pmega.core.placement import Candidate
from p2pmega.net.transfer_client import TransferClient
from p2pmega.node import Node, NodeSettings
from p2pmega.replicate.holder import HolderDuties, holder_node
from p2pmega.replicate.keeper import Keeper
from p2pmega.replicate.repair import Repairer, RepairPolicy
from tests.chunk_bytes import chunk_bytes

pytestmark = pytest.mark.integration

STEP_S = 30.0
GEO = "127.41.0.0/16 DE\n127.42.0.0/16 NZ\n127.43.0.0/16 IS\n"
# name -> address; two DE peers so that a chunk can sit in one country on two networks
PEERS = {"de1": "127.41.1.1", "de2": "127.41.2.1", "nz1": "127.42.1.1", "is1": "127.43.1.1"}
LEASE_S = 3600.0


@dataclass
class Net:
    geo: GeoTable
    boot: Node
    holders: dict[str, Node]
    repairers: dict[str, Repairer]

    async def store(
        self,
        data: bytes,
        *names: str,
        lease_s: float = LEASE_S,
        renew_key: bytes | None = None,
    ) -> ChunkId:
        chunk_id = chunk_id_of(data)
        async with TransferClient(local_host="127.40.9.1") as client:
            for name in names:
                address = self.holders[name].address
                assert await client.store(address, chunk_id, data, lease_s, renew_key=renew_key)
        return chunk_id

    def holding(self, chunk_id: ChunkId) -> set[str]:
        """Which running holders have the chunk on disk."""
        return {
            name
            for name, node in self.holders.items()
            if node.store is not None and node.store.has_many([chunk_id]) == [True]
        }

    async def rounds(self, *names: str) -> dict[str, int]:
        """One repair round on each named holder, all at once; the bytes each pushed."""
        reports = await asyncio.gather(*(self.repairers[n].round() for n in names))
        return {n: r.bytes_pushed for n, r in zip(names, reports, strict=True)}


@contextlib.asynccontextmanager
async def network(tmp_path: Path) -> AsyncIterator[Net]:
    geo = parse_geo_table(GEO)
    policy = RepairPolicy(interval_s=3600.0, probe_retry_delay_s=0.05)
    async with contextlib.AsyncExitStack() as stack, asyncio.timeout(STEP_S):
        boot = Node(NodeSettings(host="127.40.1.1", data_dir=tmp_path / "boot", rpc_timeout_s=1.0))
        await stack.enter_async_context(boot)
        holders: dict[str, Node] = {}
        for name, host in PEERS.items():
            settings = NodeSettings(
                host=host,
                data_dir=tmp_path / name,
                bootstrap=[boot.address],
                holder=True,
                rpc_timeout_s=1.0,
                geo=geo,
            )
            # The test drives repair itself: no repair duty runs in the background.
            node, _ = holder_node(settings, HolderDuties(geo=geo, repair=None))
            holders[name] = await stack.enter_async_context(node)
        repairers = {n: Repairer(node, geo, policy) for n, node in holders.items()}
        yield Net(geo, boot, holders, repairers)


async def test_a_lost_copy_is_made_again_in_another_country_with_the_remaining_lease(
    tmp_path: Path,
) -> None:
    renew_key = bytes(range(32))
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        chunk_id = await net.store(chunk_bytes(5000), "de1", "nz1", renew_key=renew_key)
        await net.holders["nz1"].stop()  # seized
        pushed = await net.rounds("de1", "de2", "is1")
        assert pushed == {"de1": 5000, "de2": 0, "is1": 0}, "de1 alone holds it, so de1 repairs"
        assert net.holding(chunk_id) == {"de1", "is1"}, "the copy must go to another country"
        de1, is1 = net.holders["de1"].store, net.holders["is1"].store
        assert de1 is not None
        assert is1 is not None
        original, copy = de1.lease_expiry(chunk_id), is1.lease_expiry(chunk_id)
        assert original is not None
        assert copy is not None
        assert abs(copy - original) < 10, (
            "the copy carries the chunk's remaining lease, not a new one"
        )
        # ...and the renewal key the original was stored with, so the file's keeper renews the copy too.
        assert is1.renew_key(chunk_id) == renew_key
        # The rule holds again: further rounds move nothing.
        assert await net.rounds("de1", "de2", "is1") == {"de1": 0, "de2": 0, "is1": 0}


async def test_exactly_one_live_holder_repairs(tmp_path: Path) -> None:
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        chunk_id = await net.store(chunk_bytes(3000), "de1", "de2")  # one country: below the rule
        reports = await asyncio.gather(net.repairers["de1"].round(), net.repairers["de2"].round())
        assert sorted(r.repaired for r in reports) == [0, 1]
        assert sorted(r.left_to_others for r in reports) == [0, 1]
        assert len(net.holding(chunk_id)) == 3
        assert net.holding(chunk_id) & {"nz1", "is1"}


async def test_two_holders_that_both_think_they_are_responsible_add_one_copy_not_two(
    tmp_path: Path,
) -> None:
    """After a partition heals both sides may act: they pick the same new holder, so the copies stay bounded."""
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        chunk_id = await net.store(chunk_bytes(3000), "de1", "de2")
        for name in ("de1", "de2"):

            def always(chunk: ChunkId, holders: list[Candidate], me: Candidate) -> bool:
                return True

            net.repairers[name].acts_for = always  # type: ignore[method-assign,assignment]
        reports = await asyncio.gather(net.repairers["de1"].round(), net.repairers["de2"].round())
        assert [r.repaired for r in reports] == [1, 1], "both acted"
        assert len(net.holding(chunk_id)) <= 3, "2 + 1 copies at most"
        assert await net.rounds("de1", "de2", "nz1", "is1") == dict.fromkeys(
            ("de1", "de2", "nz1", "is1"), 0
        )


async def test_repair_rounds_on_a_healthy_network_move_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        for _ in range(3):
            await net.store(chunk_bytes(2000), "de1", "nz1")
            await net.store(chunk_bytes(2000), "de2", "is1")
        lookups: list[bytes] = []
        for node in net.holders.values():
            real = node.dht_node.find_providers

            async def spy(chunk_id: bytes, real: Any = real) -> Any:
                lookups.append(chunk_id)
                return await real(chunk_id)

            monkeypatch.setattr(node.dht_node, "find_providers", spy)
        for _ in range(2):
            assert await net.rounds(*PEERS) == dict.fromkeys(PEERS, 0)
        # The batched `has` answers showed every chunk healthy: no chunk was looked up in the DHT.
        assert lookups == []
        assert all(r.last is not None and r.last.short == 0 for r in net.repairers.values())


async def test_a_chunk_about_to_expire_is_not_repaired(tmp_path: Path) -> None:
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        chunk_id = await net.store(chunk_bytes(1000), "de1", lease_s=30.0)
        assert await net.rounds("de1") == {"de1": 0}
        assert net.holding(chunk_id) == {"de1"}


async def test_a_kept_file_no_holder_has_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        cap = KeepCap(ChunkId(os.urandom(32)), os.urandom(32))
        keeper = Keeper(
            net.holders["de1"], [cap], net.geo, policy=RepairPolicy(probe_retry_delay_s=0.05)
        )
        with caplog.at_level(logging.DEBUG, logger="p2pmega.replicate.keeper"):
            for _ in range(3):
                await keeper.round()
    said = [r for r in caplog.records if "kept file" in r.getMessage()]
    assert len(said) == 3
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


async def test_a_restarted_holder_keeps_its_identity_chunks_and_leases_and_announces_at_once(
    tmp_path: Path,
) -> None:
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        old = net.holders["de1"]
        chunk_id = await net.store(chunk_bytes(4000), "de1", "nz1")
        assert old.store is not None
        assert old.dht is not None
        node_id, expiry = old.dht.node_id, old.store.lease_expiry(chunk_id)
        settings = old.settings
        await old.stop()
        # The record the first run announced lapses: only announcing again at start can bring it back.
        boot_providers = net.boot.dht_node
        for peer in (net.boot, *net.holders.values()):
            if peer.dht is not None:
                peer.dht.server.providers.expire(now=float("inf"))
        again, _ = holder_node(settings, HolderDuties(geo=net.geo, repair=None))
        async with again:
            assert again.dht_node.node_id == node_id
            assert again.store is not None
            assert again.store.lease_expiry(chunk_id) == expiry
            for _ in range(int(STEP_S / 0.1)):
                if again.port in {p.port for p in await boot_providers.find_providers(chunk_id)}:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the restarted holder did not announce its chunk")
            # And it takes part in repair: nz1 is seized, the restarted de1 is the only holder left.
            await net.holders["nz1"].stop()
            report = await Repairer(again, net.geo, RepairPolicy(probe_retry_delay_s=0.05)).round()
            assert report.repaired == 1
