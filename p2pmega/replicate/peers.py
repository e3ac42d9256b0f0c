"""Peers as replication sees them: placement candidates (``core.placement.Candidate``, the one peer type: real node
id, the address we connect to, its country), and the pool of peers a chunk may be placed on."""

from __future__ import annotations

import asyncio
import random

from p2pmega.core.geo import GeoTable, country_of
from p2pmega.core.ids import Address, NodeId
from p2pmega.core.placement import Candidate
from p2pmega.errors import NetworkError
from p2pmega.net.dht import Peer
from p2pmega.node import Node

# A network with fewer DHT nodes than this is small enough that every chunk is placed among all of them; above it,
# each chunk's candidates are the k closest nodes to its key, found by a crawl (twice kademlia's k of 20).
SMALL_NETWORK_NODES = 40


def candidate_of(node_id: NodeId | bytes, address: Address, geo: GeoTable | None) -> Candidate:
    return Candidate(
        node_id=node_id, host=address[0], port=address[1], country=country_of(address[0], geo)
    )


async def candidate_pool(node: Node, geo: GeoTable | None, rng: random.Random) -> list[Candidate]:
    """Every peer we can learn about cheaply: the routing table plus crawls towards a few random keys."""
    dht = node.dht_node
    keys = [dht.node_id] + [rng.randbytes(20) for _ in range(3)]

    async def near(key: bytes) -> list[Peer]:
        try:
            return await dht.find_peers(key)
        except NetworkError:
            return []

    found = await asyncio.gather(*(near(k) for k in keys))
    peers: dict[bytes, Candidate] = {}
    for batch in [dht.contacts(), *found]:
        for peer in batch:
            peers.setdefault(peer.node_id, candidate_of(peer.node_id, (peer.host, peer.port), geo))
    peers.pop(dht.node_id, None)
    return sorted(peers.values(), key=lambda c: c.node_id)
