"""Peers as replication sees them: placement candidates (``core.placement.Candidate``, the one peer type: real node
id, the address we connect to, its country), and the pool of peers a chunk may be placed on."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from p2pmega.core.geo import GeoTable, country_of
from p2pmega.core.ids import Address, ChunkId, NodeId, dht_key_of
from p2pmega.core.placement import Candidate
from p2pmega.errors import NetworkError, P2PMegaError
from p2pmega.net.dht import Peer
from p2pmega.node import Node

log = logging.getLogger(__name__)

# A SPACE request is one round trip; a peer silent this long keeps the weight of a peer whose space is unknown.
SPACE_TIMEOUT_S = 3.0

# A network with fewer DHT nodes than this is small enough that every chunk is placed among all of them; above it,
# each chunk's candidates are the k closest nodes to its key, found by a crawl (twice kademlia's k of 20).
SMALL_NETWORK_NODES = 40
# A share places each run of this many data chunks (128 MiB of 2 MiB chunks), and a file's manifest chunks with the
# first run, among the storage peers closest to the DHT key of the run's first chunk: one crawl per run, not per
# chunk, and a fetcher that knows the chunk ids (the manifest) finds every holder of a run with one crawl and one
# batched `has` per peer. Weighted rendezvous hashing (core.placement) balances a run's chunks over its peers; the
# runs of all files, keyed by random chunk ids, balance over the network (docs/SCALE.md).
PLACEMENT_BATCH_CHUNKS = 64
# A run's chunks go to the storage peers among the RUN_PEERS closest to its key (more only when those cannot meet
# the rule or are nearly full, api/share_pool.py): every holder costs a share a connection and a handshake on both
# ends (docs/SCALE.md, "Fan-out"). A full run, 64 chunks of 2 MiB in two copies, is ~26 MiB a holder. Runs are keyed
# by random chunk ids, so over many files every peer still gets its share of runs.
RUN_PEERS = 10


def batch_keys(chunk_ids: Sequence[ChunkId]) -> dict[ChunkId, bytes]:
    """The DHT key each data chunk of a file was placed near: its run's first chunk's (PLACEMENT_BATCH_CHUNKS)."""
    return {
        chunk_id: dht_key_of(chunk_ids[i - i % PLACEMENT_BATCH_CHUNKS])
        for i, chunk_id in enumerate(chunk_ids)
    }


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


async def ask_space(
    node: Node, peers: list[Candidate], *, timeout_s: float = SPACE_TIMEOUT_S
) -> dict[Address, int]:
    """The free bytes each of ``peers`` reports for this node's network (a SPACE request each, in parallel).

    What a Placer weighs its candidates by (``Placer.space``). A peer that does not answer within ``timeout_s``
    (dead, a DHT-only node, older than the SPACE message) is left out: it keeps the weight of unknown space.

    Returns:
        address -> reported free bytes, untrusted (core.capacity bounds what it is worth).
    """

    async def one(cand: Candidate) -> tuple[Address, int] | None:
        addr = (cand.host, cand.port)
        try:
            async with asyncio.timeout(timeout_s):
                reply = await node.client.space(addr)
        except (P2PMegaError, TimeoutError) as exc:
            log.debug("%s:%d did not say its free space: %s", cand.host, cand.port, exc)
            return None
        return addr, reply.free_bytes

    answers = await asyncio.gather(*(one(c) for c in peers))
    return dict(a for a in answers if a is not None)
