"""A p2pmega peer's lifecycle: identity, store, DHT and transfer endpoints, LAN discovery, and its duties.

Used as ``async with Node(...) as node:``. It decides nothing about what to store or fetch (``api``) nor what a
holder does over time (the duties of ``replicate``, handed in by whoever starts the node): it starts things, runs
each duty under ``net.supervise``, and stops everything in the right order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from p2pmega.core.crypto import new_signing_seed
from p2pmega.core.geo import GeoTable
from p2pmega.core.ids import Address, ChunkId
from p2pmega.defaults import RECORD_TTL_S, RPC_TIMEOUT_S, TRANSFER_TIMEOUT_S
from p2pmega.errors import NetworkError
from p2pmega.identity import Identity, load_or_create_identity
from p2pmega.net.dht import DHTNode, load_contacts
from p2pmega.net.endpoints import bind_endpoints
from p2pmega.net.service import Service
from p2pmega.net.supervise import BASE_DELAY_S, supervise
from p2pmega.net.transfer_client import TransferClient
from p2pmega.storage import DEFAULT_QUOTA_BYTES

if TYPE_CHECKING:
    # A holder's parts load when a holder starts: share, fetch and check never need them.
    from p2pmega.net.lan import LANDiscovery
    from p2pmega.net.transfer_server import Forward, TransferServer
    from p2pmega.storage.sources import SourceLimits
    from p2pmega.storage.store import ChunkStore

log = logging.getLogger(__name__)


class Duty(Protocol):
    """Something a node does for as long as it runs (replicate/duties.py has the holder's)."""

    name: str

    async def run(self) -> None:
        """Do the duty until cancelled (``net.supervise`` restarts it after a failure)."""

    async def close(self) -> None:
        """Finish up once the node has stopped taking work (say, announce what is still queued)."""


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    """How a node runs; the defaults are the production values, tests shorten them."""

    host: str
    port: int = 0
    data_dir: Path
    bootstrap: Sequence[Address] = ()
    holder: bool = False
    persistent_identity: bool = True
    quota_bytes: int = DEFAULT_QUOTA_BYTES
    # What one source network may hold of the quota and how fast it may store (None: storage.sources' defaults).
    source_limits: SourceLimits | None = None
    lan: bool = False
    rpc_timeout_s: float = RPC_TIMEOUT_S
    record_ttl_s: float = RECORD_TTL_S
    # The first wait before a failed duty starts again; it doubles with each failure in a row (net/supervise.py).
    restart_delay_s: float = BASE_DELAY_S
    transfer_timeout_s: float = TRANSFER_TIMEOUT_S
    geo: GeoTable | None = None
    # A client that can start without the DHT (a fetch whose link names holders) joins while it works.
    join_in_background: bool = False


@dataclass(eq=False)
class Node(Service):
    """One peer. A holder (``holder=True``) also stores chunks for others and serves them over TCP.

    ``duties`` makes the duties once the parts exist (before the node joins, so none of its events is missed).
    """

    settings: NodeSettings
    duties: Callable[[Node], Sequence[Duty]] = lambda _node: ()
    dht: DHTNode | None = None
    store: ChunkStore | None = None
    server: TransferServer | None = None
    # Called with each chunk the transfer server stored (the announcer listens).
    stored_listeners: list[Callable[[ChunkId], None]] = field(default_factory=list)
    # Takes the chunks sharers ask this holder to forward (replicate/forward.py); None: it forwards none.
    forwarder: Forward | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self.client = TransferClient(local_host=s.host, timeout_s=s.transfer_timeout_s)
        self._lan: LANDiscovery | None = None
        self._running: list[Duty] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The UDP (DHT) port, which is also the TCP (transfer) port of a holder."""
        return self.dht_node.port

    @property
    def address(self) -> Address:
        return (self.settings.host, self.port)

    @property
    def dht_node(self) -> DHTNode:
        if self.dht is None:
            raise RuntimeError("node not started")
        return self.dht

    async def start(self) -> None:
        """Bind the DHT (and for a holder the transfer server on the same port number), join, start the duties.

        Raises:
            NetworkError: the address cannot be bound, or no bootstrap/saved/LAN contact answered.
        """
        s = self.settings
        identity = await asyncio.to_thread(self._identity)
        # The DHT id is derived from this key and the bound address (core.node_id, docs/DHT.md); the transfer
        # channel proves the same key (docs/PROTOCOL.md, "Channel"), so clients check one against the other.
        seed = identity.seed
        self.client.identity_seed = seed
        if s.holder:
            from p2pmega.storage.store import DEFAULT_LIMITS, ChunkStore

            self.store = await asyncio.to_thread(
                functools.partial(
                    ChunkStore,
                    s.data_dir / "store",
                    quota_bytes=s.quota_bytes,
                    limits=s.source_limits or DEFAULT_LIMITS,
                )
            )
        self._running = list(self.duties(self))
        self.dht, self.server = await bind_endpoints(
            host=s.host,
            port=s.port,
            seed=seed,
            rpc_timeout_s=s.rpc_timeout_s,
            record_ttl_s=s.record_ttl_s,
            contacts_path=self._contacts_path(),
            # A short-lived client must not end up in others' routing tables: once it exits, every crawl that
            # meets it would stall on it (BEP 43's read-only nodes).
            read_only=self.store is None and not s.persistent_identity,
            store=self.store,
            on_stored=self._stored,
            on_forward=self.forwarder,
            identity_seed=identity.seed,
        )
        if s.lan:
            from p2pmega.net.lan import LANDiscovery

            self._lan = LANDiscovery(
                node_id=self.dht.node_id,
                host=s.host,
                dht_port=self.port,
                on_peer=self.dht.add_contact,
            )
            await self._lan.start()
        if s.join_in_background:
            self.dht.join_in_background(list(s.bootstrap))
        elif s.bootstrap or await asyncio.to_thread(load_contacts, self._contacts_path()):
            try:
                await self.dht.join(list(s.bootstrap))
            except NetworkError as exc:
                # A client, or a peer told explicitly where to join, cannot work alone. A long-running peer
                # with only stale saved contacts (say a bootstrap node after a restart) waits to be contacted.
                if s.bootstrap or not s.persistent_identity:
                    raise
                log.warning("could not rejoin from saved contacts (%s); waiting for peers", exc)
        for duty in self._running:
            # Each duty fails, backs off and restarts on its own, never taking the others down with it.
            task = asyncio.create_task(
                supervise(duty.name, duty.run, base_delay_s=s.restart_delay_s)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _stored(self, chunk_id: ChunkId) -> None:
        for listener in self.stored_listeners:
            listener(chunk_id)

    def _identity(self) -> Identity:
        if self.settings.persistent_identity:
            return load_or_create_identity(self.settings.data_dir)
        # Short-lived clients (share, fetch, check) use a throwaway identity so two of them can run at once.
        return Identity.from_seed(new_signing_seed())

    def _contacts_path(self) -> Path:
        return self.settings.data_dir / "contacts.json"

    async def stop(self) -> None:
        """Stop the duties, then the sockets; acknowledged chunks are already durable (fsynced before the reply)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.server is not None:
            await (
                self.server.stop()
            )  # nothing is stored after this, so closing duties see all there is
            self.server = None
        for duty in self._running:
            await duty.close()
        self._running = []
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
