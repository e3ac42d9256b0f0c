"""What share, fetch and check have in common: the client node, peer candidates, and finding chunk holders."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from p2pmega.config import local_address_towards
from p2pmega.core.chunking import ChunkId, dht_key_of, short_id
from p2pmega.core.geo import GeoTable, country_of
from p2pmega.core.ids import Address
from p2pmega.core.placement import Candidate
from p2pmega.core.words import counted
from p2pmega.errors import (
    BootstrapFailed,
    ChunkHashMismatch,
    ChunkNotStored,
    ChunkUnavailable,
    NetworkError,
    P2PMegaError,
)
from p2pmega.net.dht import Peer, load_contacts
from p2pmega.node import Node, NodeSettings

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# A network with fewer DHT nodes than this is small enough that every chunk is placed among all of them; above it,
# each chunk's candidates are the k closest nodes to its key, found by a crawl (twice kademlia's k of 20).
SMALL_NETWORK_NODES = 40
# Parallel DHT lookups while locating holders; each is a crawl of a few round trips.
LOOKUP_CONCURRENCY = 16
# Peers asked up front about every chunk of a file (one batched `has` each); more would cost more than lookups.
EXPAND_PEERS = 32


@dataclass(frozen=True, kw_only=True)
class NetSettings:
    """How a short-lived command (share, fetch, check) joins the network."""

    bootstrap: Sequence[Address] = ()
    data_dir: Path
    geo: GeoTable | None = None
    host: str | None = None
    rpc_timeout_s: float = 2.0
    transfer_timeout_s: float = 10.0  # idle time: a transfer fails when no data moved for this long
    lan: bool = False


@dataclass(frozen=True)
class Holder:
    """A peer that holds (or is asked to hold) a chunk, with the country of the address we connect to."""

    host: str
    port: int
    country: str | None

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def client_host(net: NetSettings) -> str:
    """The address a client binds: ``--host``, else the local address that routes to the first bootstrap node."""
    if net.host:
        return net.host
    if net.bootstrap:
        return local_address_towards(net.bootstrap[0])
    return "127.0.0.1"


@contextlib.asynccontextmanager
async def client_node(net: NetSettings, *, hints: Sequence[Address] = ()) -> AsyncIterator[Node]:
    """A DHT-only node with a throwaway identity, joined to the network, stopped on exit.

    With no bootstrap node given, it joins through ``hints`` (a link's peer hints: holders, whose DHT port is
    their transfer port), then the saved contacts, so a link alone is enough to fetch or check a file even
    when the data dir remembers another network.

    Raises:
        BootstrapFailed: no bootstrap node, hint, saved contact or LAN peer answered (the join names them).
    """
    entry = tuple(net.bootstrap) or tuple(hints)
    if not entry and not await asyncio.to_thread(load_contacts, net.data_dir / "contacts.json"):
        raise BootstrapFailed(
            "no bootstrap node given; pass --bootstrap HOST:PORT or set P2PMEGA_BOOTSTRAP"
        )
    net = dataclasses.replace(net, bootstrap=entry)
    await asyncio.to_thread(net.data_dir.mkdir, parents=True, exist_ok=True)
    settings = NodeSettings(
        host=client_host(net),
        data_dir=net.data_dir,
        bootstrap=entry,
        holder=False,
        persistent_identity=False,
        lan=net.lan,
        rpc_timeout_s=net.rpc_timeout_s,
        transfer_timeout_s=net.transfer_timeout_s,
    )
    async with Node(settings) as node:
        yield node


def synthetic_node_id(address: Address) -> bytes:
    """A stable stand-in node id for a peer known only by address (a link's peer hint)."""
    return hashlib.blake2b(f"{address[0]}:{address[1]}".encode(), digest_size=20).digest()


def holder_of(address: Address, geo: GeoTable | None) -> Holder:
    return Holder(address[0], address[1], country_of(address[0], geo))


def candidate_of(node_id: bytes, address: Address, geo: GeoTable | None) -> Candidate:
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


@dataclass
class HolderLocator:
    """Finds which peers hold which chunks: link hints, DHT provider records, and batched ``has`` queries.

    Every answer is confirmed with the holder itself before it is trusted: a provider record only says where to
    ask, and a stale one (a seized or departed holder) costs one failed request, after which that peer is skipped.
    """

    node: Node
    hints: Sequence[Address] = ()
    holders: dict[ChunkId, list[Address]] = field(default_factory=dict)
    peers: set[Address] = field(default_factory=set)
    dead: set[Address] = field(default_factory=set)
    queried: dict[Address, set[ChunkId]] = field(default_factory=dict)
    wanted: list[ChunkId] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.peers.update(self.hints)
        self._lookups = asyncio.Semaphore(LOOKUP_CONCURRENCY)

    async def want(self, ids: Sequence[ChunkId], near: ChunkId | None = None) -> None:
        """Say which chunks will be needed, and ask the peers likely to hold them in one batch each.

        Those peers are the known ones plus the nodes closest to ``near`` (in a small network, nearly everyone);
        peers found later by :meth:`discover` are asked about all of ``ids`` at once too, so the DHT is consulted
        about once per holder rather than once per chunk.
        """
        self.wanted = list(ids)
        if near is not None:
            try:
                closest = await self.node.dht_node.find_peers(dht_key_of(near))
            except NetworkError:
                closest = []
            self.peers.update((p.host, p.port) for p in closest[:EXPAND_PEERS])
        await self.confirm(self.wanted)

    async def confirm(self, ids: Sequence[ChunkId], peers: Iterable[Address] | None = None) -> None:
        """Ask each peer (default: every known live peer) which of ``ids`` it holds, in one batch per peer."""
        targets = [p for p in (self.peers if peers is None else peers) if p not in self.dead]

        async def ask(peer: Address) -> None:
            asked = self.queried.setdefault(peer, set())
            todo = [c for c in ids if c not in asked]
            if not todo:
                return
            try:
                flags = await self.node.client.has(peer, todo)
            except P2PMegaError as exc:
                log.debug("holder %s did not answer has(): %s", peer, exc)
                self.dead.add(peer)
                return
            asked.update(todo)
            for chunk_id, held in zip(todo, flags, strict=True):
                if held:
                    where = self.holders.setdefault(chunk_id, [])
                    if peer not in where:
                        where.append(peer)

        await asyncio.gather(*(ask(p) for p in targets))

    async def discover(self, chunk_id: ChunkId) -> None:
        """Look the chunk up in the DHT (provider records, then the closest nodes) and confirm with them."""
        dht = self.node.dht_node
        async with self._lookups:
            try:
                providers = await dht.find_providers(chunk_id)
            except NetworkError as exc:
                log.debug("provider lookup failed: %s", exc)
                providers = []
            found = {(p.host, p.port) for p in providers}
            if not found - self.dead:
                # No record yet (holders announce right after storing) or only stale ones: by the placement rule
                # the holders are among the nodes closest to the chunk's key, so ask those directly.
                try:
                    closest = await dht.find_peers(dht_key_of(chunk_id))
                except NetworkError:
                    closest = []
                found |= {(p.host, p.port) for p in closest}
        new = found - self.peers
        self.peers.update(found)
        await self.confirm([chunk_id], found | set(self.hints))
        if new and self.wanted:
            await self.confirm(self.wanted, new)

    def live_holders(self, chunk_id: ChunkId) -> list[Address]:
        return [a for a in self.holders.get(chunk_id, []) if a not in self.dead]

    async def fetch(self, chunk_id: ChunkId, *, spread: int = 0) -> bytes | memoryview:
        """Fetch and hash-check one chunk, failing over between holders; ``spread`` rotates the holder order.

        Raises:
            ChunkUnavailable: no reachable holder returned the chunk.
        """
        return await self.fetch_into(chunk_id, _as_is, spread=spread)

    async def fetch_into(
        self, chunk_id: ChunkId, consume: Callable[[bytes | memoryview], _T], *, spread: int = 0
    ) -> _T:
        """`fetch`, handing the verified bytes to ``consume`` in the thread that hash-checked them.

        Raises:
            ChunkUnavailable: no reachable holder returned the chunk.
            Whatever ``consume`` raises (TransferClient.fetch_any_into).
        """
        for attempt in range(2):
            addrs = self.live_holders(chunk_id)
            if not addrs and attempt == 0 and self.hints:
                # The link names the root's holders: ask them before searching the DHT.
                await self.confirm([chunk_id], self.hints)
                addrs = self.live_holders(chunk_id)
            if not addrs:
                await self.discover(chunk_id)
                addrs = self.live_holders(chunk_id)
            if addrs:
                k = spread % len(addrs)
                order = addrs[k:] + addrs[:k]
                try:
                    result, _addr = await self.node.client.fetch_any_into(order, chunk_id, consume)
                except (ChunkUnavailable, ChunkNotStored, ChunkHashMismatch, NetworkError):
                    # Everyone we knew failed: forget them for this chunk and look again once.
                    self.holders.pop(chunk_id, None)
                    for addr in order:
                        self.queried.get(addr, set()).discard(chunk_id)
                    if attempt == 0:
                        continue
                else:
                    return result
        raise ChunkUnavailable(
            f"no reachable holder has chunk {short_id(chunk_id)} (asked {counted(len(self.peers), 'peer')}); "
            "retry later or check --bootstrap"
        )


def _as_is(data: bytes | memoryview) -> bytes | memoryview:
    return data
