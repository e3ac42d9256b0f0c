"""Protocol 2 of net.dht: read-only clients leave no trace; announce_many batches announcements."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import asyncio_dgram
import pytest

from p2pmega.core.record import ProviderLimits
from p2pmega.net.announce import AnnouncePlan
from p2pmega.net.crawl import LookupResult, Peer
from p2pmega.net.dht import MAX_KEYS_PER_BATCH, DHTLimits, DHTNode
from tests.conftest import peer_address
from tests.integration.dht_helpers import parse_request, swarm

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
"""A crawl query unanswered this long is stalled: what a dead contact costs a lookup."""


def closest_ids(nodes: list[DHTNode], key: bytes, count: int) -> list[bytes]:
    """The ids of the ``count`` nodes closest to ``key``, closest first."""
    target = int.from_bytes(key, "big")
    ordered = sorted(nodes, key=lambda n: int.from_bytes(n.node_id, "big") ^ target)
    return [n.node_id for n in ordered[:count]]


def holders_of(nodes: list[DHTNode], key: bytes) -> set[bytes]:
    """The ids of the nodes holding a provider record for ``key``."""
    return {n.node_id for n in nodes if n.server.providers.get(key, now=time.monotonic())}


@pytest.mark.parametrize("read_only", [False, True])
async def test_clients_that_left_never_slow_a_later_join_or_lookup(read_only: bool) -> None:
    rng = random.Random(5)
    async with swarm(41 + read_only, 10, rpc_timeout_s=TIMEOUT_S) as nodes:
        chunk_id = os.urandom(32)
        assert await nodes[3].announce_many([chunk_id], 9000) >= 9
        clients = []
        async with asyncio.timeout(30):
            for i in range(4):
                client = DHTNode(
                    host=peer_address(41 + read_only, 100 + i),
                    rpc_timeout_s=TIMEOUT_S,
                    read_only=read_only,
                )
                await client.start()
                entry = nodes[rng.randrange(10)]
                await client.join([(entry.host, entry.port)])
                found_peers = await client.find_peers(os.urandom(20))
                assert {p.node_id for p in found_peers} == {n.node_id for n in nodes}
                found = await client.find_providers(chunk_id)
                assert [p.node_id for p in found] == [nodes[3].node_id]
                clients.append((client.node_id, client.host))
                await client.stop()

        gone_ids = {i for i, _ in clients}
        gone_hosts = {h for _, h in clients}
        seen = {p.node_id for n in nodes for p in n.contacts()}
        if read_only:
            assert not gone_ids & seen
            assert not gone_hosts & {p.host for n in nodes for p in n.contacts()}
            records = sum(len(n.server.providers) for n in nodes)
            assert records == len(holders_of(nodes, chunk_id[:20])) == 9
        else:
            # The defect this protects against: every swarm node now lists the dead clients.
            assert gone_ids <= seen

        fresh = DHTNode(host=peer_address(41 + read_only, 200), rpc_timeout_s=TIMEOUT_S)
        await fresh.start()
        try:
            asked: list[str] = []
            proto = fresh.server._proto()
            real_request = proto.request

            def spy(address: tuple[str, int], name: str, args: list[object]) -> Any:
                asked.append(address[0])
                return real_request(address, name, args)

            proto.request = spy  # type: ignore[method-assign]
            async with asyncio.timeout(10):
                await fresh.join([(nodes[5].host, nodes[5].port)])
                during_join = set(asked)
                asked.clear()
                peers = await fresh.find_peers(os.urandom(20))
            assert {p.node_id for p in peers} == {n.node_id for n in nodes}
            if not read_only:
                # The swarm hands out the dead clients and the join's crawl asks them; the lookup after it
                # neither asks nor waits on them again (never wait on the dead twice).
                assert gone_hosts & during_join
                assert not gone_hosts & set(asked)
                return
            assert {p.node_id for p in fresh.contacts()} == {n.node_id for n in nodes}
            assert fresh.stats.timeouts == 0
            assert not gone_hosts & (during_join | set(asked)), (
                "read-only clients are never handed out"
            )
        finally:
            await fresh.stop()


async def test_a_read_only_node_sends_no_node_id_serves_nothing_and_cannot_announce() -> None:
    sock = await asyncio_dgram.bind((peer_address(43, 1), 0))
    client = DHTNode(host=peer_address(43, 2), rpc_timeout_s=0.3, read_only=True)
    full = DHTNode(host=peer_address(43, 3), rpc_timeout_s=0.3)
    await client.start()
    await full.start()
    try:
        async with asyncio.timeout(5):
            ping = asyncio.ensure_future(client.add_contact(*sock.sockname[:2]))
            data, _ = await sock.recv()
            # Its one request is an id_proof challenge whose challenger id is empty.
            name, args = parse_request(data)
            assert (name, args[0]) == ("id_proof", b"")
            await ping
            assert await client.add_contact(full.host, full.port)
            assert full.contacts() == []
            assert not await full.add_contact(client.host, client.port)
            assert client.stats.requests_served == 0
            assert client.stats.dropped_datagrams == 1
        with pytest.raises(ValueError, match="read-only"):
            await client.announce_many([os.urandom(32)], 9000)
        with pytest.raises(ValueError, match="read-only"):
            await client.server.set(b"k", b"v")
    finally:
        sock.close()
        await client.stop()
        await full.stop()


async def test_announce_many_in_a_small_network_crawls_once_and_batches() -> None:
    async with swarm(44, 9, rpc_timeout_s=TIMEOUT_S) as nodes:
        holder = nodes[4]
        chunk_ids = [os.urandom(32) for _ in range(300)]
        before = holder.stats.requests_sent
        async with asyncio.timeout(20):
            assert await holder.announce_many(chunk_ids, 9100) == 300 * 8
        # One crawl (8 find_node) plus 2 add_providers per node (300 keys > 256 per request).
        assert holder.stats.requests_sent - before <= 8 + 2 * 8
        for chunk_id in random.Random(1).sample(chunk_ids, 10):
            found = await nodes[0].find_providers(chunk_id)
            assert [(p.node_id, p.port) for p in found] == [(holder.node_id, 9100)]
        assert await holder.announce_many([], 9100) == 0


async def test_announce_many_in_a_big_network_reaches_the_k_closest_of_every_key() -> None:
    # ksize 4 among 24 nodes: no crawl sees the whole network, so keys need their own crawls.
    async with swarm(45, 24, rpc_timeout_s=TIMEOUT_S, ksize=4) as nodes:
        for node in nodes:
            await node.refresh()
        holder = nodes[7]
        # Half the keys share 18 bytes, so that some can reuse another key's crawl.
        base = os.urandom(18)
        chunk_ids = [os.urandom(32) for _ in range(20)] + [base + os.urandom(14) for _ in range(20)]
        async with asyncio.timeout(30):
            confirmed = await holder.announce_many(chunk_ids, 9200)
        assert confirmed == 40 * 4
        for chunk_id in chunk_ids:
            key = chunk_id[:20]
            closest = {p.node_id for p in await holder.find_peers(key)}
            assert holders_of(nodes, key) == closest


async def test_add_providers_is_checked_and_capped_per_source_network_and_rate_limited() -> None:
    limits = DHTLimits(providers=ProviderLimits(max_per_network=5))
    async with swarm(46, 3, rpc_timeout_s=0.3, limits=limits) as nodes:
        sender, receiver, other = nodes
        keys = [os.urandom(20) for _ in range(8)]
        # A network at its cap makes room by dropping its own oldest records (issue 16): all 8
        # are confirmed, 5 are kept.
        assert await sender.announce_many([k + b"chunk-tail-1" for k in keys], 9300) == 8 + 8
        assert len(receiver.server.providers) == 5
        assert len(other.server.providers) == 5
        assert receiver.stats.dropped_datagrams == 0
        # Over its /24's request budget a batch is dropped, and not retried key by key.
        other.server._proto().rate_limit.burst = 1.0
        assert await sender.announce_many([os.urandom(32) for _ in range(3)], 9300) == 3
        assert other.stats.rate_limited >= 1

        proto = receiver.server._proto()
        peer = (sender.host, sender.port)
        for bad in (
            [],
            [os.urandom(20)] * (MAX_KEYS_PER_BATCH + 1),
            [os.urandom(19)],
            os.urandom(20),
        ):
            assert proto.rpc_add_providers(peer, sender.node_id, bad, 9300) is None
        assert proto.rpc_add_providers(peer, sender.node_id, keys[:1], 0) is None
        assert proto.rpc_add_providers(("0.0.0.0", 5), sender.node_id, keys[:1], 9300) is None


@pytest.mark.parametrize("network", [6, 2000])
async def test_announce_plan_crawls_once_in_a_network_seen_whole_and_per_key_otherwise(
    network: int,
) -> None:
    """Against a model network whose crawls are exact: the plan equals the per-key k closest."""
    rng = random.Random(network)
    k = 8
    everyone = [Peer(rng.randbytes(20), "127.0.0.1", 1000 + i) for i in range(network)]

    def closest(key: bytes) -> list[Peer]:
        def distance(p: Peer) -> int:
            return int.from_bytes(p.node_id, "big") ^ int.from_bytes(key, "big")

        return sorted(everyone, key=distance)

    async def crawl(key: bytes) -> LookupResult:
        # Fewer nodes than k: every reply is a whole table, the crawl reports it saw them all.
        peers = closest(key)
        small = network < k
        return LookupResult(peers[:k], [], k, 1, closed=small, answered=peers if small else [])

    keys = [rng.randbytes(20) for _ in range(50)]
    plan = AnnouncePlan(ksize=k, crawl=crawl)
    result = await plan.run(keys + keys[:5])
    assert {key: [p.node_id for p in peers] for key, peers in result.items()} == {
        key: [p.node_id for p in closest(key)[:k]] for key in keys
    }
    assert plan.crawls == (1 if network < k else 50)


async def test_a_read_only_client_joins_without_refreshing_far_buckets() -> None:
    """A share or fetch joins, looks a few keys up and exits: the refresh (a crawl per far bucket) costs more.

    Its lookups still find the closest nodes from the table of its own id's neighbourhood.
    """
    # ksize 4 among 24 nodes: the table has several far buckets, as a real network's has.
    async with swarm(47, 24, rpc_timeout_s=TIMEOUT_S, ksize=4) as nodes, asyncio.timeout(60):
        for node in nodes:
            await node.refresh()
        refreshes: dict[bool, int] = {}
        for read_only in (False, True):
            client = DHTNode(
                host=peer_address(48, 1 + read_only),
                rpc_timeout_s=TIMEOUT_S,
                read_only=read_only,
                ksize=4,
            )
            await client.start()
            refresh = client.server.refresh_far_buckets
            refreshes[read_only] = 0

            async def counted(read_only: bool = read_only, refresh: Any = refresh) -> None:
                refreshes[read_only] += 1
                await refresh()

            client.server.refresh_far_buckets = counted  # type: ignore[method-assign]
            try:
                await client.join([(nodes[0].host, nodes[0].port)])
                key = os.urandom(20)
                found = await client.find_peers(key)
                assert [p.node_id for p in found] == closest_ids(nodes, key, 4)
            finally:
                await client.stop()
        assert refreshes == {False: 1, True: 0}


@pytest.mark.parametrize("keep_learning", [False, True])
async def test_a_read_only_client_proves_no_contacts_after_its_join(keep_learning: bool) -> None:
    """Its table is made at the join: the lookups of a share or fetch then cost no id proofs (issue 19).

    A long-lived client (the web app's) keeps learning, as any node does.
    """
    async with swarm(49, 24, rpc_timeout_s=TIMEOUT_S, ksize=4) as nodes, asyncio.timeout(60):
        for node in nodes:
            await node.refresh()
        client = DHTNode(
            host=peer_address(50, 1 + keep_learning),
            rpc_timeout_s=TIMEOUT_S,
            read_only=True,
            ksize=4,
        )
        await client.start()
        try:
            if keep_learning:
                client.keep_learning()
            await client.join([(nodes[0].host, nodes[0].port)])
            proofs, known = client.stats.proofs_sent, len(client.contacts())
            for _ in range(4):
                key = os.urandom(20)
                found = await client.find_peers(key)
                assert [p.node_id for p in found] == closest_ids(nodes, key, 4)
            await client.server._proto().settle_proofs(TIMEOUT_S)
            if keep_learning:
                assert client.stats.proofs_sent > proofs
                assert len(client.contacts()) > known
            else:
                assert (client.stats.proofs_sent, len(client.contacts())) == (proofs, known)
        finally:
            await client.stop()
