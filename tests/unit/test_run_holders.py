"""Repair and keep-alive find the holders of a share's runs without provider records (issue 19).

A share places each run of 64 chunks among the peers nearest the run's first chunk's key, not each chunk's own
(replicate.peers.batch_keys). Right after a share, before its holders announce (replicate.duties waits 10-20 s),
or once the records are lost, a search near a chunk's own key finds none of them. These tests run the real
locate/Keeper/Repairer code against a network of 200 nodes as one node sees it (no sockets): crawls find the true
nearest nodes, the node's routing table is a Kademlia table of its own, and provider records exist only once the
test says the holders announced.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from p2pmega.core.chunking import ChunkId
from p2pmega.core.geo import parse_geo_table
from p2pmega.core.ids import Address
from p2pmega.core.magnet import KeepCap
from p2pmega.core.manifest import Manifest
from p2pmega.errors import NetworkError
from p2pmega.net.crawl import Peer, Provider
from p2pmega.node import Node
from p2pmega.replicate.keeper import Keeper
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.peers import batch_keys
from p2pmega.replicate.repair import Repairer, RepairPolicy

GEO = parse_geo_table("127.41.0.0/16 DE\n127.42.0.0/16 NZ\n")
K = 20
NODES = 200


def _distance(key: bytes, node_id: bytes) -> int:
    return int.from_bytes(key, "big") ^ int.from_bytes(node_id, "big")


def nearest(peers: Iterable[Peer], key: bytes, count: int) -> list[Peer]:
    return heapq.nsmallest(count, peers, key=lambda p: _distance(key, p.node_id))


def kademlia_table(me: bytes, peers: Sequence[Peer]) -> list[Peer]:
    """A full routing table of ``me``: every node of a bucket with at most k, k of a larger one (the same each
    time for the same node)."""
    rng = random.Random(me)
    buckets: dict[int, list[Peer]] = {}
    for p in peers:
        if p.node_id != me:
            buckets.setdefault(_distance(me, p.node_id).bit_length(), []).append(p)
    return [p for b in buckets.values() for p in rng.sample(b, min(K, len(b)))]


@dataclass
class World:
    """The network: NODES nodes, each on its own /24, half in DE and half in NZ, and who holds what."""

    peers: list[Peer]
    holdings: dict[Address, set[ChunkId]] = field(default_factory=dict)

    @classmethod
    def make(cls, rng: random.Random) -> World:
        peers = [
            Peer(rng.randbytes(20), f"127.{41 + i % 2}.{i // 2}.1", 4000 + i) for i in range(NODES)
        ]
        return cls(peers)

    def by_address(self, addr: Address) -> Peer:
        return next(p for p in self.peers if (p.host, p.port) == addr)

    def place_runs(self, chunk_ids: Sequence[ChunkId], rng: random.Random) -> None:
        """Give each chunk one DE and one NZ holder among the k nearest its run's key, as a share does."""
        for chunk_id, key in batch_keys(chunk_ids).items():
            near = nearest(self.peers, key, K)
            for country in ("127.41.", "127.42."):
                holder = rng.choice([p for p in near if p.host.startswith(country)])
                self.holdings.setdefault((holder.host, holder.port), set()).add(chunk_id)

    def holders_of(self, chunk_id: ChunkId) -> set[Address]:
        return {a for a, held in self.holdings.items() if chunk_id in held}


class FakeDHT:
    """One node's DHT: crawls find the true nearest nodes; provider records once ``records`` is set."""

    def __init__(self, world: World, me: Peer) -> None:
        self.world, self.me = world, me
        self.records = False  # whether the holders have announced
        self.others = [p for p in world.peers if p != me]
        self.table = kademlia_table(me.node_id, world.peers)

    @property
    def node_id(self) -> bytes:
        return self.me.node_id

    def contacts(self) -> list[Peer]:
        return list(self.table)

    async def find_peers(self, key: bytes, count: int = K) -> list[Peer]:
        return nearest(self.others, key, min(count, K))

    async def find_providers(self, chunk_id: bytes) -> list[Provider]:
        if not self.records:
            return []
        holders = [self.world.by_address(a) for a in self.world.holders_of(ChunkId(chunk_id))]
        return [Provider(p.node_id, p.host, p.port, 0.0) for p in holders if p != self.me]

    async def node_id_at(self, host: str, port: int) -> bytes | None:
        return self.world.by_address((host, port)).node_id


@dataclass
class FakeClient:
    world: World
    renewed: dict[Address, set[ChunkId]] = field(default_factory=dict)

    async def has(self, addr: Address, ids: Sequence[ChunkId]) -> list[bool]:
        held = self.world.holdings.get(addr, set())
        return [c in held for c in ids]

    def proven_node_id(self, addr: Address) -> bytes | None:
        return self.world.by_address(addr).node_id

    async def renew_signed(
        self, addr: Address, ids: Sequence[ChunkId], **_signed: object
    ) -> list[bool]:
        held = self.world.holdings.get(addr, set())
        self.renewed.setdefault(addr, set()).update(c for c in ids if c in held)
        return [c in held for c in ids]

    async def space(self, addr: Address) -> object:
        raise NetworkError("no space answers in this world")


@dataclass
class FakeStore:
    held: list[ChunkId]

    def ids(self) -> list[ChunkId]:
        return list(self.held)

    def lease_expiry(self, chunk_id: ChunkId) -> float:
        return 0.0  # nothing is worth copying: a chunk seen short is counted, never pushed

    def renew(self, ids: Sequence[ChunkId], *, lease_s: float) -> list[bool]:
        return [c in self.held for c in ids]


@dataclass
class FakeNode:
    dht_node: FakeDHT
    client: FakeClient
    store: FakeStore | None = None
    stored_listeners: list[Callable[[ChunkId], None]] = field(default_factory=list)

    @property
    def address(self) -> Address:
        return (self.dht_node.me.host, self.dht_node.me.port)


def node_in(world: World, me: Peer, store: FakeStore | None = None) -> Node:
    return cast(Node, FakeNode(FakeDHT(world, me), FakeClient(world), store))


async def test_a_keeper_finds_and_renews_every_holder_of_runs_no_record_names_yet() -> None:
    rng = random.Random(19)
    world = World.make(rng)
    chunk_ids = [ChunkId(os.urandom(32)) for _ in range(130)]  # three runs: 64 + 64 + 2
    manifest_ids = (ChunkId(os.urandom(32)),)
    world.place_runs(chunk_ids, rng)
    # The manifest goes with the first run.
    for addr in world.holders_of(chunk_ids[0]):
        world.holdings[addr].add(manifest_ids[0])
    me = Peer(rng.randbytes(20), "127.41.250.1", 3999)
    node = node_in(world, me)
    keeper = Keeper(node, [KeepCap(manifest_ids[0], os.urandom(32))], GEO, rng=rng)
    keeper.files[0].manifest = Manifest(tuple(chunk_ids), manifest_ids, None, None, None)
    [report] = await keeper.round()
    client = cast(FakeClient, node.client)
    # Near their own keys (the old search) most chunks have no holder: the keeper counted them short, and did
    # not renew the copies it did not find, which would then have expired.
    assert report.short == 0
    assert report.healthy == len(chunk_ids) + 1
    assert client.renewed == world.holdings


async def test_a_repairer_leaves_a_chunk_stored_lately_for_when_its_records_exist() -> None:
    """A copy the holder's pool cannot see (placed away from the run's key, as a share does when the peers near it
    cannot meet the rule) is found by its provider record; before the records exist the chunk is not judged."""
    rng = random.Random(7)
    world = World.make(rng)
    run_key = rng.randbytes(20)
    me = next(p for p in nearest(world.peers, run_key, K) if p.host.startswith("127.41."))
    seen = {(p.host, p.port) for p in kademlia_table(me.node_id, world.peers)}
    seen |= {(p.host, p.port) for p in nearest(world.peers, me.node_id, K + 1)}
    far = [p for p in world.peers if p.host.startswith("127.42.") and (p.host, p.port) not in seen]
    held = [ChunkId(os.urandom(32)) for _ in range(64)]
    world.holdings[(me.host, me.port)] = set(held)
    for chunk_id in held:
        other = rng.choice(far)
        world.holdings.setdefault((other.host, other.port), set()).add(chunk_id)
    now = [1000.0]
    node = node_in(world, me, FakeStore(held))
    repairer = Repairer(
        node, GEO, RepairPolicy(probe_retry_delay_s=0.0), rng=rng, clock=lambda: now[0]
    )
    for chunk_id in held:  # as the transfer server reports each store
        for listener in cast(FakeNode, node).stored_listeners:
            listener(chunk_id)

    now[0] += 30.0  # the holders have not announced yet
    early = await repairer.round()
    # The old repairer counted the chunks whose other copy its pool missed as short, and being their only
    # holder it would have copied them (its first few rounds after a share: before the records exist).
    assert early.short == 0
    assert early.fresh + early.healthy == len(held)
    assert early.fresh > 0

    now[0] += 3600.0  # well past repair.FRESH_S
    cast(FakeDHT, node.dht_node).records = True  # the holders announced meanwhile
    later = await repairer.round()
    assert later.healthy == len(held)
    assert later.fresh == later.short == 0


async def test_a_discover_waits_for_the_search_near_its_run_before_any_lookup_of_its_own() -> None:
    """A fetch's scheduler asks the locator to discover chunks no holder is known of yet; right after a share
    (no records) a lookup of their own cost a provider crawl and a crawl near the chunk's own key each."""
    rng = random.Random(5)
    world = World.make(rng)
    chunk_ids = [ChunkId(os.urandom(32)) for _ in range(10)]
    world.place_runs(chunk_ids, rng)
    me = Peer(rng.randbytes(20), "127.41.250.1", 3999)
    node = node_in(world, me)
    lookups: list[bytes] = []
    dht = cast(FakeDHT, node.dht_node)
    real = dht.find_providers

    async def spy(chunk_id: bytes) -> list[Provider]:
        lookups.append(chunk_id)
        return await real(chunk_id)

    dht.find_providers = spy  # type: ignore[method-assign]
    locator = HolderLocator(node)
    await locator.want(chunk_ids, placed_near=batch_keys(chunk_ids))
    await asyncio.gather(*(locator.discover(c) for c in chunk_ids))
    assert lookups == []
    assert all(set(locator.live_holders(c)) == world.holders_of(c) for c in chunk_ids)


class CountingClient(FakeClient):
    asked: dict[Address, int]

    async def has(self, addr: Address, ids: Sequence[ChunkId]) -> list[bool]:
        self.asked = getattr(self, "asked", {})
        self.asked[addr] = self.asked.get(addr, 0) + len(ids)
        return await super().has(addr, ids)


def locator_in(
    world: World, rng: random.Random, wanted: int = 2
) -> tuple[HolderLocator, CountingClient]:
    me = Peer(rng.randbytes(20), "127.41.251.1", 3998)
    client = CountingClient(world)
    node = cast(Node, FakeNode(FakeDHT(world, me), client))
    return HolderLocator(node, run_holders_wanted=wanted), client


async def test_a_fetch_asks_a_run_s_ten_closest_peers_when_they_hold_every_copy() -> None:
    rng = random.Random(11)
    world = World.make(rng)
    chunk_ids = [ChunkId(os.urandom(32)) for _ in range(64)]
    [key] = set(batch_keys(chunk_ids).values())
    closest = nearest(world.peers, key, 10)
    for chunk_id in chunk_ids:  # as a share with RUN_PEERS = 10 places them: one DE and one NZ copy
        for country in ("127.41.", "127.42."):
            holder = rng.choice([p for p in closest if p.host.startswith(country)])
            world.holdings.setdefault((holder.host, holder.port), set()).add(chunk_id)
    locator, client = locator_in(world, rng)
    await locator.want(chunk_ids, placed_near=batch_keys(chunk_ids))
    await locator.settle()
    assert set(client.asked) == {(p.host, p.port) for p in closest}
    assert all(set(locator.holders[c]) == world.holders_of(c) for c in chunk_ids)


async def test_a_fetch_finds_copies_placed_among_the_twenty_closest_and_check_counts_them_all() -> (
    None
):
    rng = random.Random(12)
    world = World.make(rng)
    chunk_ids = [ChunkId(os.urandom(32)) for _ in range(64)]
    world.place_runs(chunk_ids, rng)  # among the k = 20 nearest, as shares before RUN_PEERS did
    for chunk_id in chunk_ids[:8]:  # and a third copy of some, as a repair makes
        extra = next(
            p
            for p in nearest(world.peers, batch_keys(chunk_ids)[chunk_id], K)[10:]
            if (p.host, p.port) not in world.holders_of(chunk_id)
        )
        world.holdings.setdefault((extra.host, extra.port), set()).add(chunk_id)
    fetch, _ = locator_in(world, rng)
    check, _ = locator_in(world, rng, wanted=32)
    for locator in (fetch, check):
        await locator.want(chunk_ids, placed_near=batch_keys(chunk_ids))
        await locator.settle()
    assert all(len(fetch.holders[c]) >= 2 for c in chunk_ids)
    assert all(set(check.holders[c]) == world.holders_of(c) for c in chunk_ids)


async def test_a_keeper_renews_a_third_copy_beyond_a_run_s_ten_closest() -> None:
    """A fetch stops at two holders a chunk; a renewal must reach every copy, or the third one lapses unseen."""
    rng = random.Random(100)
    world = World.make(rng)
    chunk_ids = [ChunkId(os.urandom(32)) for _ in range(64)]
    manifest_ids = (ChunkId(os.urandom(32)),)
    [key] = set(batch_keys(chunk_ids).values())
    closest = nearest(world.peers, key, K)
    for chunk_id in [*chunk_ids, *manifest_ids]:
        for country in ("127.41.", "127.42."):
            holder = rng.choice([p for p in closest[:10] if p.host.startswith(country)])
            world.holdings.setdefault((holder.host, holder.port), set()).add(chunk_id)
        third = rng.choice(closest[10:])  # a --replicas 3 share, or a copy a repair made
        world.holdings.setdefault((third.host, third.port), set()).add(chunk_id)
    me = Peer(rng.randbytes(20), "127.41.252.1", 3997)
    node = node_in(world, me)
    keeper = Keeper(node, [KeepCap(manifest_ids[0], os.urandom(32))], GEO, rng=rng)
    keeper.files[0].manifest = Manifest(tuple(chunk_ids), manifest_ids, None, None, None)
    await keeper.round()
    assert cast(FakeClient, node.client).renewed == world.holdings
