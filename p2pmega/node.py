"""A p2pmega peer: DHT node, and for a holder the chunk store, transfer server and announce/GC loops.

Used as ``async with Node(...) as node:``; it does not decide what to store or fetch (that is api.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pmega.core.chunking import ChunkId
from p2pmega.core.crypto import new_signing_seed, node_id_of, public_key_of
from p2pmega.core.geo import GeoTable, country_of
from p2pmega.core.ids import Address
from p2pmega.core.words import counted
from p2pmega.errors import NetworkError, P2PMegaError
from p2pmega.identity import load_or_create_identity
from p2pmega.net.dht import DHTNode, load_contacts
from p2pmega.net.service import Service
from p2pmega.net.supervise import BASE_DELAY_S, supervise
from p2pmega.net.transfer_client import TransferClient
from p2pmega.storage import DEFAULT_QUOTA_BYTES
from p2pmega.storage.sizes import format_size

if TYPE_CHECKING:
    # A holder's parts load when a holder starts: share, fetch and check never need them.
    from p2pmega.net.lan import LANDiscovery
    from p2pmega.net.transfer_server import TransferServer
    from p2pmega.storage.store import ChunkStore

log = logging.getLogger(__name__)


# Chunk ids announced in one announce_many call at most (it splits them into datagrams itself).
ANNOUNCE_BATCH = 1024
# Stored chunks are announced in batches (docs/DHT.md): a share stores a chunk every few
# milliseconds on each holder, and each announce_many costs a crawl plus requests to the k closest
# nodes, on the announcer and on every recorder. A batch closes once no chunk was stored for
# ANNOUNCE_QUIET_S, or ANNOUNCE_DELAY_S after its first chunk, or at ANNOUNCE_BATCH ids.
ANNOUNCE_QUIET_S = 0.5
ANNOUNCE_DELAY_S = 5.0
# At stop, what is still waiting to be announced gets this long (fetchers can also find holders
# without the record, by asking the nodes closest to the chunk).
ANNOUNCE_FLUSH_TIMEOUT_S = 3.0
# A summary line at most this often (the brief: "at most a one-line summary a minute").
SUMMARY_INTERVAL_S = 60.0


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    """How a node runs; the defaults are the production values, tests shorten the intervals."""

    host: str
    port: int = 0
    data_dir: Path
    bootstrap: Sequence[Address] = ()
    holder: bool = False
    persistent_identity: bool = True
    quota_bytes: int = DEFAULT_QUOTA_BYTES
    lan: bool = False
    rpc_timeout_s: float = 2.0
    record_ttl_s: float = 24 * 3600.0
    reannounce_s: float = 12 * 3600.0
    gc_interval_s: float = 600.0
    # The first wait before a failed duty starts again; it doubles with each failure in a row (net/supervise.py).
    restart_delay_s: float = BASE_DELAY_S
    announce_quiet_s: float = ANNOUNCE_QUIET_S
    announce_delay_s: float = ANNOUNCE_DELAY_S
    transfer_timeout_s: float = 10.0
    geo: GeoTable | None = None


class Node(Service):
    """One peer. A holder (``holder=True``) also stores chunks for others and serves them over TCP."""

    def __init__(
        self, settings: NodeSettings, *, report: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self._report = report or (lambda line: log.info("%s", line))
        self.dht: DHTNode | None = None
        self.store: ChunkStore | None = None
        self.server: TransferServer | None = None
        self.client = TransferClient(
            local_host=settings.host, timeout_s=settings.transfer_timeout_s
        )
        self._lan: LANDiscovery | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._announce_queue: asyncio.Queue[ChunkId] = asyncio.Queue()
        self._announcing: list[ChunkId] = []  # the batch the worker holds, until it is announced
        self.announced = 0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The UDP (DHT) port, which is also the TCP (transfer) port of a holder."""
        return self.dht_node.port

    @property
    def address(self) -> Address:
        return (self.settings.host, self.port)

    async def start(self) -> None:
        """Bind the DHT (and for a holder the transfer server on the same port number), then join.

        Raises:
            NetworkError: the address cannot be bound, or no bootstrap/saved/LAN contact answered.
        """
        s = self.settings
        node_id = await asyncio.to_thread(self._node_id)
        if s.holder:
            from p2pmega.storage.store import ChunkStore

            self.store = await asyncio.to_thread(
                ChunkStore, s.data_dir / "store", quota_bytes=s.quota_bytes
            )
        await self._bind(node_id)
        if s.lan:
            from p2pmega.net.lan import LANDiscovery

            self._lan = LANDiscovery(
                node_id=node_id, host=s.host, dht_port=self.port, on_peer=self._lan_peer
            )
            await self._lan.start()
        saved = await asyncio.to_thread(load_contacts, self._contacts_path())
        if s.bootstrap or saved:
            try:
                await self.dht_node.join(list(s.bootstrap))
            except NetworkError as exc:
                # A client, or a peer told explicitly where to join, cannot work alone. A long-running peer
                # with only stale saved contacts (say a bootstrap node after a restart) waits to be contacted.
                if s.bootstrap or not s.persistent_identity:
                    raise
                log.warning("could not rejoin from saved contacts (%s); waiting for peers", exc)
        if s.holder:
            # Each duty is supervised on its own (net/supervise.py): one that fails is logged, backed off and
            # restarted, and never takes the others down with it.
            self._spawn("announcer", self._announce_worker)
            self._spawn("garbage collector", lambda: self._every(s.gc_interval_s, self._collect))
            self._spawn("re-announcer", lambda: self._every(s.reannounce_s, self._reannounce))
            self._spawn("summary", lambda: self._every(SUMMARY_INTERVAL_S, self._summarize))

    async def _bind(self, node_id: bytes) -> None:
        s = self.settings
        store = self.store
        # The DHT (UDP) and transfer (TCP) ports share one number; with port 0 the UDP side picks it and the TCP
        # side may find it taken, so try a few times.
        for _attempt in range(20):
            dht = DHTNode(
                host=s.host,
                port=s.port,
                node_id=node_id,
                rpc_timeout_s=s.rpc_timeout_s,
                record_ttl_s=s.record_ttl_s,
                contacts_path=self._contacts_path(),
                # A short-lived client must not end up in others' routing tables: once it exits,
                # every crawl that meets it would stall on it (BEP 43's read-only nodes).
                read_only=store is None and not s.persistent_identity,
            )
            await dht.start()  # raises NetworkError naming the address when it cannot bind
            if store is None:
                self.dht = dht
                return
            from p2pmega.net.transfer_server import TransferServer

            server = TransferServer(store, host=s.host, port=dht.port, on_stored=self._on_stored)
            try:
                await server.start()
            except OSError as exc:
                await dht.stop()
                if s.port != 0:
                    raise NetworkError(
                        f"cannot bind TCP {s.host}:{s.port}: {exc.strerror}; pick another --port"
                    ) from exc
                continue
            self.dht, self.server = dht, server
            return
        raise NetworkError(f"no port on {s.host} is free for both UDP and TCP; pass --port")

    def _node_id(self) -> bytes:
        if self.settings.persistent_identity:
            return load_or_create_identity(self.settings.data_dir).node_id
        # Short-lived clients (share, fetch, check) use a throwaway identity so two of them can run at once.
        return node_id_of(public_key_of(new_signing_seed()))

    def _contacts_path(self) -> Path:
        return self.settings.data_dir / "contacts.json"

    @property
    def dht_node(self) -> DHTNode:
        if self.dht is None:
            raise RuntimeError("node not started")
        return self.dht

    async def stop(self) -> None:
        """Stop every task and socket; acknowledged chunks are already durable (fsynced before the reply).

        Chunks stored but not announced yet (the announce delay) are announced first, within
        ANNOUNCE_FLUSH_TIMEOUT_S.
        """
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.server is not None:
            # No store is acknowledged after this, so no announcement can be queued after the flush.
            await self.server.stop()
            self.server = None
        await self._flush_announcements()
        if self._lan is not None:
            await self._lan.stop()
            self._lan = None
        await self.client.close()
        if self.dht is not None:
            await self.dht.stop()  # saves the contacts (and every few minutes while running)
            self.dht = None
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    def _spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(
            supervise(name, factory, base_delay_s=self.settings.restart_delay_s)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- holder duties ---------------------------------------------------------------------------
    def _on_stored(self, chunk_id: ChunkId) -> None:
        self._announce_queue.put_nowait(chunk_id)

    async def _lan_peer(self, host: str, port: int) -> None:
        await self.dht_node.add_contact(host, port)

    async def _announce_worker(self) -> None:
        # Chunks stored in a burst (a share stores hundreds) are announced together: announce_many
        # batches the records per recording node instead of one crawl and k requests per chunk.
        queue = self._announce_queue
        loop = asyncio.get_running_loop()
        quiet_s, delay_s = self.settings.announce_quiet_s, self.settings.announce_delay_s
        while True:
            batch = self._announcing = [await queue.get()]
            deadline = loop.time() + delay_s
            while len(batch) < ANNOUNCE_BATCH:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                wait_s = min(quiet_s, deadline - loop.time())
                if wait_s <= 0:
                    break
                try:
                    async with asyncio.timeout(wait_s):
                        batch.append(await queue.get())
                except TimeoutError:
                    break
            await self._announce(batch)
            self._announcing = []

    async def _announce(self, ids: list[ChunkId]) -> None:
        try:
            await self.dht_node.announce_many(ids, self.port)
            self.announced += len(ids)
        except P2PMegaError as exc:
            log.debug("announcing %d chunks failed: %s", len(ids), exc)

    async def _flush_announcements(self) -> None:
        """Announce what the stopped worker held or had queued, within ANNOUNCE_FLUSH_TIMEOUT_S."""
        ids, self._announcing = self._announcing, []
        while not self._announce_queue.empty():
            ids.append(self._announce_queue.get_nowait())
        if not ids or self.dht is None:
            return
        try:
            async with asyncio.timeout(ANNOUNCE_FLUSH_TIMEOUT_S):
                await self._announce(ids)
        except TimeoutError:
            log.debug("announcing %d chunks at stop timed out", len(ids))

    @staticmethod
    async def _every(interval_s: float, duty: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``duty`` every ``interval_s`` seconds, the first time one interval from now."""
        while True:
            await asyncio.sleep(interval_s)
            await duty()

    async def _collect(self) -> None:
        if self.store is not None:
            removed = await asyncio.to_thread(self.store.collect_garbage)
            if removed:
                log.info("garbage collector removed %d expired chunks", removed)

    async def _reannounce(self) -> None:
        if self.store is not None:
            for chunk_id in await asyncio.to_thread(self.store.ids):
                self._announce_queue.put_nowait(chunk_id)

    async def _summarize(self) -> None:
        self._report(self.summary())

    def summary(self) -> str:
        """One line about this node's state, for the per-minute log of long-running commands."""
        peers = self.dht.contacts() if self.dht is not None else []
        countries = {country_of(p.host, self.settings.geo) for p in peers} - {None}
        contacts = f"{counted(len(peers), 'contact')} in {counted(len(countries), 'known country', 'known countries')}"
        if self.store is None:
            return contacts
        used = format_size(self.store.used_bytes)
        quota = format_size(self.store.quota_bytes)
        return (
            f"holding {counted(self.store.chunk_count, 'chunk')} ({used} of {quota}), "
            f"{contacts}, {counted(self.announced, 'announcement')}"
        )
