"""HolderLocator: which peers hold which chunks (link hints, DHT provider records, batched ``has``), and
fetching a chunk from them with failover."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from p2pmega.core.chunking import ChunkId, dht_key_of, short_id
from p2pmega.core.geo import GeoTable
from p2pmega.core.ids import Address
from p2pmega.core.placement import Candidate
from p2pmega.core.words import counted
from p2pmega.errors import (
    ChunkHashMismatch,
    ChunkNotStored,
    ChunkUnavailable,
    NetworkError,
    P2PMegaError,
)
from p2pmega.net.dht import Peer, Provider
from p2pmega.node import Node
from p2pmega.replicate.peers import RUN_PEERS, candidate_of

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Parallel DHT lookups while locating holders; each is a crawl of a few round trips.
LOOKUP_CONCURRENCY = 16
# Peers asked up front about every chunk of a file (one batched `has` each); more would cost more than lookups.
EXPAND_PEERS = 32
# Peers asked about a chunk that neither a provider record nor the closest nodes led to (issue 16: with records
# flooded away and Sybils answering lookups, a fetch gave up after the closest nodes while every seed held it).
WIDEN_PEERS = 64


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
    # The node id of each peer the DHT told us about (hints have none until the DHT names them).
    node_ids: dict[Address, bytes] = field(default_factory=dict)
    # Whether a peer found while discovering one chunk is asked about every wanted chunk (a fetch: its holders
    # hold many of them) or only that one (repair: a store's chunks are spread over the whole network).
    ask_new_peers_about_all: bool = True
    # A run's peers beyond its RUN_PEERS closest are asked only about the chunks with fewer live holders than this:
    # a fetch needs two to choose from; check counts every copy and a keeper renews every copy, so they ask all.
    run_holders_wanted: int = 2

    def __post_init__(self) -> None:
        self._proven: set[Address] = set()
        self.peers.update(self.hints)
        self._lookups = asyncio.Semaphore(LOOKUP_CONCURRENCY)
        self._expanding: asyncio.Task[None] | None = None
        # The search near each key a share placed a run of chunks near (replicate.peers.batch_keys), and the key
        # of each wanted chunk: a chunk with no holder known yet waits for its run's search before the DHT.
        self._runs: dict[bytes, asyncio.Task[None]] = {}
        self._run_of: dict[ChunkId, bytes] = {}
        self._learn_ids(self.node.dht_node.contacts())

    def _learn_ids(self, peers: Iterable[Peer | Provider]) -> None:
        """Remember the node id the DHT names for each peer, as a hint only.

        Provider records and crawl replies carry ids nobody proved (anyone can name a victim's address under an
        id of its own): such an id never makes a holder refused, and is replaced by the id the transfer channel
        proves (``_prove``) as soon as we talk to the holder. Renewals, placement and repair use the proven one.
        """
        for p in peers:
            addr = (p.host, p.port)
            if addr not in self._proven:
                self.node_ids[addr] = p.node_id

    def _prove(self, addr: Address) -> None:
        """Take the node id the channel handshake proved at ``addr`` (core.node_id: its key at that address)."""
        proven = self.node.client.proven_node_id(addr)
        if proven is not None:
            self.node_ids[addr] = proven
            self._proven.add(addr)

    async def want(
        self,
        ids: Sequence[ChunkId],
        near: ChunkId | None = None,
        placed_near: Mapping[ChunkId, bytes] | None = None,
    ) -> None:
        """Say which chunks will be needed, and ask the peers likely to hold them in one batch each.

        The known peers (a link's hints) are asked at once. The nodes closest to ``near`` (in a small network,
        nearly everyone) are looked up meanwhile and asked too once found, so a fetch from hinted holders never
        waits on the DHT; :meth:`settle` waits for them. ``placed_near`` maps chunks to the key their share
        placed them near (replicate.peers.batch_keys): the nodes closest to each such key are looked up once and
        asked about that key's chunks. Peers found later by :meth:`discover` are asked about all of ``ids`` at
        once too, so the DHT is consulted about once per holder rather than once per chunk.
        """
        self.wanted = list(ids)
        if near is not None and self._expanding is None:
            self._expanding = asyncio.create_task(self._expand(near))
        runs: dict[bytes, list[ChunkId]] = {}
        for chunk_id in self.wanted:
            if placed_near is not None and chunk_id in placed_near:
                runs.setdefault(placed_near[chunk_id], []).append(chunk_id)
        for key, run in runs.items():
            self._run_of.update(dict.fromkeys(run, key))
            if key not in self._runs:
                self._runs[key] = asyncio.create_task(self._expand_run(key, run))
        await self.confirm(self.wanted)

    async def settle(self) -> None:
        """Wait until the peers near the ``want`` keys have been found and asked."""
        searches = [t for t in [self._expanding, *self._runs.values()] if t is not None]
        if searches:
            await asyncio.gather(*searches)

    async def close(self) -> None:
        """Stop the searches near the ``want`` keys still running (a fetch its hints served)."""
        searches = [t for t in [self._expanding, *self._runs.values()] if t is not None]
        for task in searches:
            task.cancel()
        await asyncio.gather(*searches, return_exceptions=True)

    async def _expand_run(self, key: bytes, run: list[ChunkId]) -> None:
        """Ask the nodes closest to ``key`` about the chunks placed near it, in one batch each.

        A file of many runs (128 MiB each) starts all its searches at once; LOOKUP_CONCURRENCY run, in the order
        the runs were wanted (the semaphore is fair), so the first chunks' holders are found first.
        """
        try:
            async with self._lookups:
                closest = await self.node.dht_node.find_peers(key)
        except NetworkError:
            return
        self._learn_ids(closest)
        # A share put the run on the storage peers among the RUN_PEERS closest (replicate.peers): ask those first,
        # and the rest only about the chunks they do not hold often enough (a run placed wider, an older share).
        first = [(p.host, p.port) for p in closest[:RUN_PEERS]]
        rest = [(p.host, p.port) for p in closest[RUN_PEERS:EXPAND_PEERS]]
        self.peers.update(first)
        await self.confirm(run, first)
        short = [c for c in run if len(self.live_holders(c)) < self.run_holders_wanted]
        if short and rest:
            self.peers.update(rest)
            await self.confirm(short, rest)

    async def _run_searched(self, chunk_id: ChunkId) -> None:
        """Wait for the search near the key ``chunk_id`` was placed near, if one runs (never cancelling it)."""
        task = self._runs.get(self._run_of.get(chunk_id, b""))
        if task is not None and not task.done():
            await asyncio.wait([task])

    async def _expand(self, near: ChunkId) -> None:
        try:
            closest = await self.node.dht_node.find_peers(dht_key_of(near))
        except NetworkError:
            return
        self._learn_ids(closest)
        found = {(p.host, p.port) for p in closest[:EXPAND_PEERS]}
        self.peers.update(found)
        await self.confirm(self.wanted, found)

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
            self._prove(peer)
            for chunk_id, held in zip(todo, flags, strict=True):
                if held:
                    where = self.holders.setdefault(chunk_id, [])
                    if peer not in where:
                        where.append(peer)

        await asyncio.gather(*(ask(p) for p in targets))

    async def discover(self, chunk_id: ChunkId) -> None:
        """Look the chunk up in the DHT (provider records, then the closest nodes) and confirm with them.

        It does not wait for ``want``'s search near the root: a provider lookup ends in a few hops, the search
        for the closest nodes takes many more (docs/DHT.md, "A simulated internet"). It does wait for the search
        near the chunk's run's key, if one runs, and stops there if that search found the chunk's first holder:
        that search is where a share placed it, and provider records come only 10-20 s after a share
        (replicate.duties), so a lookup of its own right after a share would miss and cost a crawl or two.
        """
        dht = self.node.dht_node
        unknown = not self.live_holders(chunk_id)
        await self._run_searched(chunk_id)
        if unknown and self.live_holders(chunk_id):
            return
        async with self._lookups:
            try:
                providers = await dht.find_providers(chunk_id)
            except NetworkError as exc:
                log.debug("provider lookup failed: %s", exc)
                providers = []
            found = {(p.host, p.port) for p in providers}
            self._learn_ids(providers)
            if not found - self.dead:
                # No record yet (holders announce right after storing) or only stale ones: by the placement rule
                # the holders are among the nodes closest to the chunk's key, so ask those directly.
                try:
                    closest = await dht.find_peers(dht_key_of(chunk_id))
                except NetworkError:
                    closest = []
                found |= {(p.host, p.port) for p in closest}
                self._learn_ids(closest)
        new = found - self.peers
        self.peers.update(found)
        await self.confirm([chunk_id], found | set(self.hints))
        if not self.live_holders(chunk_id):
            new |= await self._widen(chunk_id)
        if new and self.wanted and self.ask_new_peers_about_all:
            await self.confirm(self.wanted, new)

    async def _widen(self, chunk_id: ChunkId) -> set[Address]:
        """Ask more peers about a chunk the lookup did not place: our own table's contacts (each proved its id
        before it got there), nearest the key first, then every peer met so far; returns the ones new to us."""
        key = int.from_bytes(dht_key_of(chunk_id), "big")
        contacts = sorted(
            self.node.dht_node.contacts(), key=lambda p: int.from_bytes(p.node_id, "big") ^ key
        )
        self._learn_ids(contacts)
        order = [(p.host, p.port) for p in contacts] + sorted(self.peers)
        fresh = [
            a
            for a in dict.fromkeys(order)
            if a not in self.dead and chunk_id not in self.queried.get(a, ())
        ][:WIDEN_PEERS]
        new = set(fresh) - self.peers
        self.peers.update(fresh)
        await self.confirm([chunk_id], fresh)
        return new

    def live_holders(self, chunk_id: ChunkId) -> list[Address]:
        return [a for a in self.holders.get(chunk_id, []) if a not in self.dead]

    async def identify(self, addrs: Iterable[Address]) -> None:
        """Learn the node id of each address not seen in the DHT yet (a link's hint): a DHT ping, in parallel.

        A holder's DHT port is its transfer port. One that does not answer stays unidentified; it still holds
        what it said it holds, but the placement rule, which counts peers by node id, cannot count it.
        """
        unknown = sorted({a for a in addrs if a not in self.node_ids})
        dht = self.node.dht_node

        async def ping(addr: Address) -> None:
            try:
                node_id = await dht.node_id_at(*addr)
            except NetworkError:
                return
            if node_id is not None:
                self._learn_ids([Peer(node_id, *addr)])

        await asyncio.gather(*(ping(a) for a in unknown))

    def candidates(self, chunk_id: ChunkId, geo: GeoTable | None) -> list[Candidate]:
        """The identified live holders of ``chunk_id``, as placement candidates (call :meth:`identify` first)."""
        return [
            candidate_of(self.node_ids[a], a, geo)
            for a in self.live_holders(chunk_id)
            if a in self.node_ids
        ]

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
            if not addrs and attempt == 0:
                # The search near the chunk's run asks its likely holders about every chunk of the run at once.
                await self._run_searched(chunk_id)
                addrs = self.live_holders(chunk_id)
            if not addrs:
                await self.discover(chunk_id)
                addrs = self.live_holders(chunk_id)
            if addrs:
                k = spread % len(addrs)
                order = addrs[k:] + addrs[:k]
                try:
                    # A holder that times out, stalls or sends bad bytes is left out for the rest of this
                    # fetch (self.dead): one staller must not cost every chunk a timeout.
                    result, _addr = await self.node.client.fetch_any_into(
                        order, chunk_id, consume, failed=self.dead
                    )
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
