"""The DHT node of p2pmega: join, announce and find chunk holders, find placement candidates.

Callers import from here; the kademlia/rpcudp machinery lives in routing, kademlia_protocol, crawl
and kademlia_server (the only importers of kademlia, rpcudp and umsgpack), batching in announce.
Chunks never travel here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from kademlia.node import Node

from p2pmega.core.crypto import new_signing_seed, public_key_of
from p2pmega.core.ids import dht_key_of
from p2pmega.core.node_id import node_id_for
from p2pmega.core.record import is_node_id, is_peer_ip, is_port
from p2pmega.errors import BadOption, BootstrapFailed, NetworkError
from p2pmega.net.announce import AnnouncePlan, CrawlPace, send_plan
from p2pmega.net.crawl import LookupResult, Peer, Provider, dedupe_providers
from p2pmega.net.dht_wire import (
    DEFAULT_RECORD_TTL_S,
    DEFAULT_RPC_TIMEOUT_S,
    FAILED_TTL_S,
    MAX_KEYS_PER_BATCH,
    REANNOUNCE_INTERVAL_S,
    DHTLimits,
    DHTStats,
)
from p2pmega.net.kademlia_server import (
    HardenedServer,
    load_contacts,
    load_failed_contacts,
    save_contacts,
)
from p2pmega.net.routing import HardenedRoutingTable
from p2pmega.net.service import Service

__all__ = [
    "DEFAULT_RECORD_TTL_S",
    "DEFAULT_RPC_TIMEOUT_S",
    "MAX_KEYS_PER_BATCH",
    "REANNOUNCE_INTERVAL_S",
    "DHTLimits",
    "DHTNode",
    "DHTStats",
    "HardenedRoutingTable",
    "HardenedServer",
    "LookupResult",
    "Peer",
    "Provider",
    "load_contacts",
    "save_contacts",
]

log = logging.getLogger(__name__)


class DHTNode(Service):
    """A p2pmega DHT node: join, announce and find chunk holders, find placement candidates.

    Use ``async with DHTNode(host=..., seed=...) as node:`` or call start() and stop(). The node
    id is ``core.node_id.node_id_for(public key of seed, host)``: ``host`` must be the address
    peers reach it at, or no peer admits it to its table (docs/DHT.md, "Protocol 3"); an unspecified
    address (0.0.0.0, ::) or a name is refused with BadOption.
    ``read_only=True`` is for short-lived clients (BEP 43 style): their requests carry no node id,
    so no node adds them to its table or hands them out; they serve no requests and cannot
    announce. It needs peers that speak protocol 2 (docs/DHT.md).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int = 0,
        seed: bytes | None = None,
        ksize: int = 20,
        alpha: int = 3,
        rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
        record_ttl_s: float = DEFAULT_RECORD_TTL_S,
        contacts_path: Path | None = None,
        limits: DHTLimits | None = None,
        read_only: bool = False,
    ) -> None:
        if not is_peer_ip(host):
            # Not 0.0.0.0 either: the node id is bound to the address peers reach us at (docs/DHT.md,
            # "Protocol 3"), so the node must know it.
            raise BadOption(
                f"cannot bind the DHT to {host!r}: --host must be the IP address peers reach this "
                "node at (not 0.0.0.0, :: or a name)"
            )
        self.host = host
        self.port = port
        self.contacts_path = contacts_path
        self.reannounce_interval_s = record_ttl_s / 2
        # A holder's announcer paces the crawls of announce_many (net/announce.py); None: 8 at once, unpaced.
        self.announce_pace: CrawlPace | None = None
        self.announce_crawls = 0  # crawls announce_many ran, over this node's life
        self._joining: asyncio.Task[int] | None = None
        seed = new_signing_seed() if seed is None else seed
        self.server = HardenedServer(
            ksize,
            alpha,
            node_id_for(public_key_of(seed), host),
            seed=seed,
            rpc_timeout_s=rpc_timeout_s,
            record_ttl_s=record_ttl_s,
            limits=limits,
            read_only=read_only,
        )

    @property
    def read_only(self) -> bool:
        return self.server.read_only

    @property
    def node_id(self) -> bytes:
        return bytes(self.server.node.id)

    @property
    def stats(self) -> DHTStats:
        """The live protocol counters (requests sent, replies, timeouts, bad replies, drops)."""
        return self.server._proto().stats

    async def start(self) -> None:
        """Bind the UDP socket and start table maintenance.

        Raises:
            NetworkError: the address cannot be bound.
        """
        try:
            await self.server.listen(self.port, self.host)
        except OSError as exc:
            raise NetworkError(
                f"cannot bind the DHT to {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        sockname = self.server.transport.get_extra_info("sockname")
        self.port = int(sockname[1])
        if self.contacts_path is not None:
            # Contacts that timed out in an earlier run are not waited on again for a while (issue 15): a
            # bootstrap node keeps handing out dead nodes until its own calls to them miss.
            proto, wall = self.server._proto(), time.time()
            for host, port, failed_at in await asyncio.to_thread(
                load_failed_contacts, self.contacts_path
            ):
                if 0 <= wall - failed_at < FAILED_TTL_S:
                    proto.remember_failed((host, port), wall - failed_at)
            proto.spawn(self._save_regularly(self.server.limits.save_interval_s))

    async def stop(self) -> None:
        """Save contacts (if a path is set), close the socket and end every task."""
        if self.server.protocol is None:
            return
        if self.contacts_path is not None and (
            self.contacts() or self.server._proto().failed_contacts(time.time())
        ):
            await self._save_in_thread(self.contacts_path)
        self.server.stop()
        await self.server.protocol.close()

    async def _save_regularly(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self.contacts_path is not None and self.contacts():
                await self._save_in_thread(self.contacts_path)

    async def _save_in_thread(self, path: Path) -> None:
        # Snapshot on the loop's thread: the routing table must not be read while datagrams
        # change it; only the file write runs in a worker thread.
        snapshot = self.contacts()
        failed = self.server._proto().failed_contacts(time.time())
        try:
            await asyncio.to_thread(save_contacts, path, snapshot, failed)
        except OSError:
            log.warning("could not save DHT contacts")

    async def join(self, bootstrap: Sequence[tuple[str, int]]) -> int:
        """Join through ``bootstrap``, falling back to the saved contacts; returns contacts known.

        Raises:
            BootstrapFailed: no bootstrap node and no saved contact answered.
        """
        tried = [(h, int(p)) for h, p in bootstrap]
        if tried:
            await self.server.bootstrap(tried)
        if not self.contacts() and self.contacts_path is not None:
            saved = await asyncio.to_thread(load_contacts, self.contacts_path)
            saved = [c for c in saved if c not in tried and c != (self.host, self.port)]
            tried += saved
            if saved:
                await self.server.bootstrap(saved)
        if not self.contacts():
            shown = ", ".join(f"{h}:{p}" for h, p in tried[:3]) + (
                ", ..." if len(tried) > 3 else ""
            )
            raise BootstrapFailed(
                f"no DHT node answered (tried {len(tried)}: {shown or 'nothing'}); "
                "check --bootstrap"
            )
        return len(self.contacts())

    def join_in_background(self, bootstrap: Sequence[tuple[str, int]]) -> None:
        """Start :meth:`join` without waiting for it; every lookup waits for it first (:meth:`joined`).

        A fetch whose link names live holders can then be served by them while the join is still under way.
        """
        self._joining = self.server._proto().spawn(self.join(bootstrap))

    def rejoin_in_background(self, bootstrap: Sequence[tuple[str, int]]) -> bool:
        """Start :meth:`join_in_background` again if no join is under way and no contact is known; True if so.

        For a client that lives long (the web app's): a join that failed when the network was down, or a routing
        table emptied since, does not leave it unable to look anything up for the rest of its run.
        """
        if self.contacts() or (self._joining is not None and not self._joining.done()):
            return False
        self.join_in_background(bootstrap)
        return True

    async def joined(self) -> None:
        """Wait for a join started in the background, if any.

        Raises:
            BootstrapFailed: that join found no node.
        """
        if self._joining is not None:
            await asyncio.shield(self._joining)

    def keep_learning(self) -> None:
        """Keep admitting the contacts lookups meet, after the join too (a long-lived client: the web app's).

        A read-only client otherwise stops after its join: a share or fetch makes a few lookups and exits, and
        proving every node they meet cost ~0.6 requests a chunk of a 64 MiB share at 200 seeds.
        """
        self.server.keep_learning = True
        self.server._proto().admitting = True

    async def refresh(self) -> None:
        """Look up a random id in every bucket far from our own id (join does this once).

        The hourly maintenance refreshes buckets too; this is for callers that want it now.
        """
        await self.server.refresh_far_buckets()

    async def add_contact(self, host: str, port: int) -> bool:
        """Ping ``host``:``port`` and add it to the routing table if it answers (LAN discovery)."""
        return await self.node_id_at(host, port) is not None

    async def node_id_at(self, host: str, port: int) -> bytes | None:
        """The node id of the DHT node answering a ping at ``host``:``port`` (added to the routing table), or None.

        The reply is taken only from the address asked, so the id is that of whoever answers there.
        """
        if not (is_peer_ip(host) and is_port(port)) or (host, port) == (self.host, self.port):
            return None
        node = await self.server._proto().ping_address((host, port))
        return None if node is None else bytes(node.id)

    def contacts(self) -> list[Peer]:
        """A snapshot of the routing table."""
        if self.server.protocol is None:
            return []
        return [Peer(n.id, n.ip, n.port) for n in self.server.protocol.router.all_contacts()]

    def _seeds(self, key: bytes) -> list[Node]:
        seeds: list[Node] = self.server._proto().router.find_neighbors(Node(key))
        if not seeds:
            raise NetworkError("no DHT contact is known; join the network first")
        return seeds

    async def find_peers(self, key: bytes, count: int = 20) -> list[Peer]:
        """The ``count`` closest nodes to the 20-byte ``key`` that answered a crawl just now.

        Raises:
            NetworkError: no contact is known.
        """
        if not is_node_id(key):
            raise ValueError("a DHT key is exactly 20 bytes")
        await self.joined()
        result = await self.server.crawl(key, "node", self._seeds(key))
        return result.peers[:count]

    async def announce_many(self, chunk_ids: Sequence[bytes], transfer_port: int) -> int:
        """Announce every chunk of ``chunk_ids`` with as few crawls and datagrams as is correct.

        When the first key's crawl saw the whole network (fewer than k contacts everywhere), no
        other key is crawled; otherwise each key is (net/announce.py), at the pace of ``announce_pace`` if
        set. Each node then gets its keys
        in add_providers requests of up to MAX_KEYS_PER_BATCH keys (a single key as add_provider).
        Any number of
        ids may be passed at once; a duplicate is announced once.

        Returns:
            How many (chunk, node) records were confirmed, summed over the chunks.

        Raises:
            NetworkError: no contact is known.
            ValueError: a bad port or chunk id, or this node is read-only.
        """
        keys = [dht_key_of(c) for c in chunk_ids]
        if not is_port(transfer_port):
            raise ValueError("transfer_port must be 1-65535")
        if self.read_only:
            raise ValueError("a read-only DHT node cannot announce")
        if not keys:
            return 0
        plan = AnnouncePlan(
            ksize=self.server.ksize, crawl=self._crawl_nodes, pace=self.announce_pace
        )
        try:
            targets = await plan.run(keys)
        finally:
            self.announce_crawls += plan.crawls

        async def send(peer: Peer, batch: list[bytes]) -> int:
            return await self._record_at(peer, batch, transfer_port)

        return await send_plan(targets, send, batch_keys=MAX_KEYS_PER_BATCH)

    async def _crawl_nodes(self, key: bytes) -> LookupResult:
        await self.joined()
        return await self.server.crawl(key, "node", self._seeds(key))

    async def _record_at(self, peer: Peer, keys: list[bytes], port: int) -> int:
        """Ask ``peer`` to record us for ``keys``; returns how many it confirmed.

        Every protocol-3 node answers add_providers; an unanswered request (a dead node, or one
        whose per-/24 rate limit dropped it) is not retried key by key, which would only cost more.
        """
        proto = self.server._proto()
        node = Node(peer.node_id, peer.host, peer.port)
        if len(keys) == 1:
            ok, stored = await proto.call_add_provider(node, keys[0], port)
            return int(ok and stored)
        ok, answers = await proto.call_add_providers(node, keys, port)
        return sum(answers) if ok else 0

    async def lookup_providers(self, chunk_id: bytes) -> LookupResult:
        """find_providers with its cost (messages, round trips); used by bench/dht.py.

        Raises:
            NetworkError: no contact is known and no record is held locally.
        """
        key = dht_key_of(chunk_id)
        now, wall = time.monotonic(), time.time()
        local = [
            Provider(r.node_id, r.host, r.port, wall + r.expires_in)
            for r in self.server.providers.get(key, now=now)
        ]
        seeds = self.server._proto().router.find_neighbors(Node(key))
        if not seeds and local:
            return LookupResult([], dedupe_providers(local), 0, 0)
        await self.joined()
        result = await self.server.crawl(key, "providers", self._seeds(key))
        return LookupResult(
            result.peers,
            dedupe_providers(local + result.providers),
            result.messages,
            result.round_trips,
        )

    async def find_providers(self, chunk_id: bytes) -> list[Provider]:
        """Live, unexpired holders of ``chunk_id``, one per node id.

        Raises:
            NetworkError: no contact is known and no record is held locally.
        """
        return (await self.lookup_providers(chunk_id)).providers

    def save_contacts(self, path: Path | None = None) -> None:
        """Write the routing table's contacts to ``path`` (default contacts_path) atomically.

        Raises:
            ValueError: no path given and no contacts_path set.
            OSError: the file cannot be written.
        """
        target = path or self.contacts_path
        if target is None:
            raise ValueError("no contacts path set")
        save_contacts(target, self.contacts())
