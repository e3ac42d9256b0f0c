"""kademlia's Server, hardened: explicit binding, counted stores, crawls that never stall, JSON state.

Also the saved-contacts file (never pickle). The node API on top is p2pmega.net.dht.
It rewrites each method of ``kademlia.network.Server`` it keeps and no longer derives from it: importing that
module cost every command about 10 ms (it imports pickle, for a save_state we must never use).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kademlia.node import Node
from kademlia.utils import digest

from p2pmega.core.crypto import new_signing_seed, public_key_of
from p2pmega.core.node_id import node_id_for
from p2pmega.core.record import (
    ProviderTable,
    format_contacts_file,
    is_node_id,
    parse_contacts_file,
    parse_failed_contacts,
)
from p2pmega.errors import NetworkError
from p2pmega.net.crawl import Crawl, LookupResult, Peer
from p2pmega.net.dht_wire import DEFAULT_RECORD_TTL_S, DEFAULT_RPC_TIMEOUT_S, DHTLimits
from p2pmega.net.kademlia_protocol import HardenedProtocol, _rng
from p2pmega.net.routing import BoundedStorage

log = logging.getLogger(__name__)


class HardenedServer:
    """kademlia's Server: checked ids, explicit binding, counted stores, JSON state, no pickle.

    The attributes of ``kademlia.network.Server`` (ksize, alpha, storage, node, transport, protocol) and its
    methods, rewritten here, minus the pickle-based ``save_state_regularly`` and the unused
    ``bootstrappable_neighbors``.
    """

    protocol_class = HardenedProtocol

    def __init__(
        self,
        ksize: int = 20,
        alpha: int = 3,
        node_id: bytes | None = None,
        storage: BoundedStorage | None = None,
        *,
        rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
        record_ttl_s: float = DEFAULT_RECORD_TTL_S,
        limits: DHTLimits | None = None,
        read_only: bool = False,
        seed: bytes | None = None,
    ) -> None:
        # The Ed25519 seed signs id proofs; the id is that of its key at the bound address (set by
        # listen() unless given: a given id that is not the key's is refused by every peer).
        self.seed = new_signing_seed() if seed is None else seed
        self._derive_id = node_id is None
        node_id = os.urandom(20) if node_id is None else node_id
        if not is_node_id(node_id):
            raise ValueError("a node id is exactly 20 bytes")
        if not (ksize >= 1 and alpha >= 1 and rpc_timeout_s > 0 and record_ttl_s > 0):
            raise ValueError("ksize, alpha, rpc_timeout_s and record_ttl_s must be positive")
        self.limits = limits or DHTLimits()
        storage = storage or BoundedStorage(
            ttl_s=self.limits.value_ttl_s,
            max_values=self.limits.max_values,
            max_value_bytes=self.limits.max_value_bytes,
        )
        self.ksize = ksize
        self.alpha = alpha
        self.storage = storage
        self.node = Node(node_id)
        # Any, as kademlia's Server left it: callers read it only after listen() has set it.
        self.transport: Any = None
        self.rpc_timeout_s = rpc_timeout_s
        self.read_only = read_only
        self.keep_learning = (
            False  # a read-only node admits contacts after its join too (DHTNode.keep_learning)
        )
        self.providers = ProviderTable(ttl_s=record_ttl_s, limits=self.limits.providers)
        self.protocol: HardenedProtocol | None = None

    def _create_protocol(self) -> HardenedProtocol:
        return HardenedProtocol(
            self.node,
            self.storage,
            self.ksize,
            rpc_timeout_s=self.rpc_timeout_s,
            limits=self.limits,
            providers=self.providers,
            seed=self.seed,
            read_only=self.read_only,
        )

    def _proto(self) -> HardenedProtocol:
        if self.protocol is None:
            raise NetworkError("the DHT node is not started; call start() first")
        return self.protocol

    async def listen(self, port: int, interface: str) -> None:
        """Bind UDP ``interface``:``port``; no default interface (kademlia's is 0.0.0.0)."""
        if self._derive_id:
            self.node = Node(node_id_for(public_key_of(self.seed), interface))
        loop = asyncio.get_running_loop()
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            self._create_protocol, local_addr=(interface, port)
        )
        self.refresh_table(self.limits.refresh_interval_s)

    def refresh_table(self, interval: float = 3600.0) -> None:
        proto = self._proto()
        proto.spawn(self._maintain(interval))

    async def _maintain(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(NetworkError):
                await self._refresh_table()

    async def _refresh_table(self) -> None:
        """Refresh lonely buckets, drop expired records, then republish values one by one."""
        proto = self._proto()
        self.providers.expire(now=time.monotonic())
        for node_id in proto.get_refresh_ids():
            await self.crawl(node_id, "node")
        for dkey, value in self.storage.iter_older_than(self.limits.refresh_interval_s):
            try:
                await self.set_digest(dkey, value)
            except (NetworkError, ValueError):
                log.debug("republishing one value failed; continuing with the next")

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.protocol is not None:
            for task in list(self.protocol._tasks):
                task.cancel()

    async def crawl(self, key: bytes, mode: str, seeds: list[Node] | None = None) -> LookupResult:
        proto = self._proto()
        target = Node(key)
        nearest = seeds if seeds is not None else proto.router.find_neighbors(target)
        return await Crawl(proto, key, nearest, alpha=self.alpha, mode=mode).run()

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        return await self._proto().ping_address((addr[0], addr[1]))

    async def bootstrap(self, addrs: Sequence[tuple[str, int]]) -> list[Node]:
        """Ping every address in parallel, look up our own id, then refresh the far buckets.

        Returns the nodes closest to our id. Per section 2.3 of the paper a joining node "refreshes
        all k-buckets further away than its closest neighbor"; kademlia skips this, which leaves
        tables so sparse that at 1000 nodes some lookups end in a region knowing nothing closer.
        A read-only client skips it: nobody routes through its table, it makes a few lookups and
        exits, and the refresh (a crawl per far bucket, ~log2(N/k) of them, and an id proof to each
        node met) cost more than those lookups: at 200 nodes it doubled a 1 KiB share's messages.
        Its lookups start from the nodes near its own id and take a hop or two more instead.
        """
        found = await asyncio.gather(*(self.bootstrap_node(a) for a in addrs))
        nodes = [n for n in found if n is not None]
        if not nodes:
            return []
        proto = self._proto()
        result = await self.crawl(self.node.id, "node", nodes)
        # Contacts enter the table once they proved their ids: wait for the proofs the crawl
        # started, so the buckets exist to refresh and the join returns a filled table.
        await proto.settle_proofs(self.rpc_timeout_s)
        if not self.read_only:
            await self.refresh_far_buckets()
            await proto.settle_proofs(self.rpc_timeout_s)
        elif proto.router.all_contacts() and not self.keep_learning:
            proto.admitting = (
                False  # its table is made: the lookups that follow prove no more contacts
            )
        return [Node(p.node_id, p.host, p.port) for p in result.peers]

    async def refresh_far_buckets(self) -> None:
        """Look up a random id in every bucket that does not cover our own id, in parallel."""
        far = [b.range for b in self._proto().router.buckets if not b.has_in_range(self.node)]
        ids = [_rng.randint(low, min(high, 2**160 - 1)).to_bytes(20, "big") for low, high in far]
        await asyncio.gather(*(self.crawl(i, "node") for i in ids))

    async def get(self, key: object) -> bytes | str | None:
        dkey = digest(key)
        local = self.storage.get(dkey)
        if local is not None:
            return local  # type: ignore[no-any-return]
        if not self._proto().router.find_neighbors(Node(dkey)):
            return None
        return (await self.crawl(dkey, "value")).value

    async def set(self, key: object, value: object) -> int:
        """Store ``value`` on the k closest nodes; returns how many confirmed (0 if none did).

        Raises:
            NetworkError: no node is known, or none of the known ones answered.
            ValueError: ``value`` is not bytes/str within the size cap.
        """
        return await self.set_digest(digest(key), value)

    async def set_digest(self, dkey: bytes, value: object) -> int:
        if not self.storage.accepts(value):
            raise ValueError("value is not bytes/str within the size cap")
        proto = self._proto()
        if not proto.router.find_neighbors(Node(dkey)):
            raise NetworkError("no DHT contact is known; join the network first")
        nodes = (await self.crawl(dkey, "node")).peers
        if not nodes:
            raise NetworkError("no DHT contact answered; check the network")
        target = Node(dkey)
        if self.node.distance_to(target) < max(target.distance_to(Node(p.node_id)) for p in nodes):
            self.storage[dkey] = value
        results = await asyncio.gather(
            *(proto.call_store(Node(p.node_id, p.host, p.port), dkey, value) for p in nodes)
        )
        return sum(1 for ok, stored in results if ok and stored)

    def save_state(self, fname: str | os.PathLike[str]) -> None:
        """Write the known contacts as the versioned JSON contacts file (never pickle)."""
        contacts = [(n.ip, n.port) for n in self._proto().router.all_contacts()]
        _write_atomic(Path(fname), format_contacts_file(contacts))

    @classmethod
    async def load_state(
        cls, fname: str | os.PathLike[str], port: int, interface: str
    ) -> HardenedServer:
        """Start a server on ``interface``:``port`` and bootstrap from a JSON contacts file."""
        server = cls()
        await server.listen(port, interface)
        await server.bootstrap(load_contacts(Path(fname)))
        return server


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole (tmp + rename), without fsync: the contacts file is a cache.

    After a crash it may be old or empty, and load_contacts then falls back to the bootstrap
    nodes; an fsync (a journal commit, 4-35 ms on this VM's disk) at the end of every short
    command buys nothing.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_contacts(path: Path) -> list[tuple[str, int]]:
    """The contacts saved at ``path``; [] if it is missing or unreadable (a cache, not a must)."""
    try:
        return parse_contacts_file(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, UnicodeDecodeError):
        log.warning("ignoring an unreadable saved-contacts file")
        return []


def save_contacts(
    path: Path, contacts: Sequence[Peer], failed: Sequence[tuple[str, int, float]] = ()
) -> None:
    """Write ``contacts`` (and the contacts that just ``failed``, with when) to ``path`` as the versioned JSON file
    (tmp + rename; a cache, no fsync)."""
    _write_atomic(path, format_contacts_file([(p.host, p.port) for p in contacts], failed))


def load_failed_contacts(path: Path) -> list[tuple[str, int, float]]:
    """The contacts whose calls timed out, with the Unix time they did; [] if none or unreadable."""
    try:
        return parse_failed_contacts(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return []
