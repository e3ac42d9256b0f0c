"""The Kademlia DHT of p2pmega: a hardened kademlia/rpcudp node, provider records, saved contacts.

The only module importing kademlia, rpcudp and umsgpack. Chunks never travel here (docs/DHT.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import umsgpack
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.storage import ForgetfulStorage
from kademlia.utils import digest
from rpcudp.protocol import RPCProtocol

from p2pmega.core.record import (
    FIND_PROVIDERS_REPLY_VERSION,
    ProviderLimits,
    ProviderRecord,
    ProviderTable,
    decode_contacts,
    decode_find_providers_reply,
    dht_key,
    encode_provider_record,
    format_contacts_file,
    is_node_id,
    is_peer_ip,
    is_port,
    parse_contacts_file,
)
from p2pmega.errors import BootstrapFailed, NetworkError, RemoteProtocolError

log = logging.getLogger(__name__)

DEFAULT_RPC_TIMEOUT_S = 2.0
DEFAULT_RECORD_TTL_S = 86400.0
REANNOUNCE_INTERVAL_S = 43200.0
"""Holders re-announce at half the record TTL, so one lost announce never makes a record lapse."""
MAX_MISSES = 3
"""Consecutive unanswered RPCs before a contact is evicted; one lost datagram must not evict."""
MAX_REQUEST_BYTES = 8192
"""rpcudp's own cap on an encoded request ("cannot exceed 8K"); requests above it are never sent."""
MAX_DATAGRAM_BYTES = 16384
"""Largest datagram decoded; a full find_providers reply (64 records, 20 contacts) is ~4 KiB."""
MAX_VALUE_BYTES = 1024
"""Generic kademlia values are small pointers; anything bigger cannot be republished under 8 KiB."""
_rng = random.SystemRandom()
"""Refresh targets need no reproducibility; SystemRandom also keeps ruff's S311 satisfied."""
_REQUEST_ARITY = {
    "ping": 1,
    "store": 3,
    "find_node": 2,
    "find_value": 2,
    "add_provider": 3,
    "find_providers": 2,
}


@dataclass(frozen=True)
class Peer:
    """A DHT contact; ``host`` is always the address we observed, never one the peer claimed."""

    node_id: bytes
    host: str
    port: int


@dataclass(frozen=True)
class Provider:
    """A node that holds a chunk: ``port`` is its transfer port, ``expires_at`` is wall-clock."""

    node_id: bytes
    host: str
    port: int
    expires_at: float


@dataclass(frozen=True)
class DHTLimits:
    """Every bound of a node, in one place so tests can shrink them."""

    providers: ProviderLimits = field(default_factory=ProviderLimits)
    max_values: int = 10_000
    max_value_bytes: int = MAX_VALUE_BYTES
    value_ttl_s: float = 86400.0
    max_misses: int = MAX_MISSES
    refresh_interval_s: float = 3600.0
    save_interval_s: float = 600.0


@dataclass
class DHTStats:
    """Counters of one node's protocol; a lookup's cost is the difference of two snapshots."""

    requests_sent: int = 0
    replies_received: int = 0
    timeouts: int = 0
    bad_replies: int = 0
    dropped_datagrams: int = 0
    requests_served: int = 0


@dataclass(frozen=True)
class LookupResult:
    """What one crawl found and cost: ``messages`` requests sent, ``round_trips`` longest chain."""

    peers: list[Peer]
    providers: list[Provider]
    messages: int
    round_trips: int
    value: bytes | str | None = None


@dataclass
class _Pending:
    future: asyncio.Future[tuple[bool, object]]
    timer: asyncio.TimerHandle
    address: tuple[str, int]


class HardenedRoutingTable(RoutingTable):  # type: ignore[misc]
    """RoutingTable with inclusive bucket ranges and an neighbour search (kademlia #28)."""

    def get_bucket_for(self, node: Node) -> int:
        for index, bucket in enumerate(self.buckets):
            if bucket.has_in_range(node):
                return index
        raise ValueError("node id outside the 160-bit space")

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        # At most 160 buckets of k contacts: scanning all is cheap and, unlike TableTraverser, never
        # stops early when an empty bucket sits next to the target's bucket.
        candidates = (
            n
            for bucket in self.buckets
            for n in bucket.get_nodes()
            if n.id != node.id and (exclude is None or not n.same_home_as(exclude))
        )
        return heapq.nsmallest(k or self.ksize, candidates, key=node.distance_to)

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        # Per section 4.2 of the paper: split a full bucket that covers our own id (or whose depth
        # is not 0 mod 5); else ping its least recently seen contact, evicted if it keeps missing.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.spawn(self.protocol.call_ping(bucket.head()))

    def all_contacts(self) -> list[Node]:
        return [n for bucket in self.buckets for n in bucket.get_nodes()]


class BoundedStorage(ForgetfulStorage):  # type: ignore[misc]
    """ForgetfulStorage that refuses big or non-string values; keeps at most ``max_values``."""

    def __init__(self, *, ttl_s: float, max_values: int, max_value_bytes: int) -> None:
        super().__init__(ttl=ttl_s)
        self.max_values = max_values
        self.max_value_bytes = max_value_bytes

    def accepts(self, value: object) -> bool:
        return isinstance(value, bytes | str) and len(value) <= self.max_value_bytes

    def __setitem__(self, key: bytes, value: object) -> None:
        if not self.accepts(value):
            raise ValueError("value is not bytes/str within the size cap")
        super().__setitem__(key, value)
        while len(self.data) > self.max_values:
            self.data.popitem(last=False)


class HardenedProtocol(KademliaProtocol):  # type: ignore[misc]
    """KademliaProtocol/RPCProtocol with validated requests and replies and no dangling tasks.

    Requests are handled synchronously inside datagram_received, so garbage can never become an
    unhandled task exception; replies count only from the address asked and only if well formed.
    """

    def __init__(
        self,
        source_node: Node,
        storage: BoundedStorage,
        ksize: int,
        *,
        rpc_timeout_s: float,
        limits: DHTLimits,
        providers: ProviderTable,
    ) -> None:
        RPCProtocol.__init__(self, wait_timeout=rpc_timeout_s)
        self.router = HardenedRoutingTable(self, ksize, source_node)
        self.storage = storage
        self.source_node = source_node
        self.ksize = ksize
        self.limits = limits
        self.providers = providers
        self.stats = DHTStats()
        self._outstanding: dict[bytes, _Pending] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._misses: dict[bytes, int] = {}

    def __getattr__(self, name: str) -> Any:
        # rpcudp makes every unknown attribute a remote call; a typo must stay an AttributeError.
        raise AttributeError(name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that is referenced until done and whose exception is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("background DHT task failed: %s", type(task.exception()).__name__)

    async def close(self) -> None:
        """Cancel outstanding calls and background tasks and wait for the tasks to end."""
        for pending in list(self._outstanding.values()):
            pending.future.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- datagrams -------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._handle_datagram(data, addr)
        except Exception as exc:  # garbage from the network must never escape: drop the datagram
            self.stats.dropped_datagrams += 1
            log.debug("dropped a malformed datagram: %s", type(exc).__name__)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", type(exc).__name__)

    def _handle_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if not 22 <= len(data) <= MAX_DATAGRAM_BYTES:
            raise RemoteProtocolError("datagram size out of range")
        kind, msg_id = data[:1], data[1:21]
        if kind == b"\x01":
            pending = self._outstanding.get(msg_id)
            if pending is None or pending.address != (addr[0], addr[1]):
                raise RemoteProtocolError("reply to no request of ours from that address")
            payload = umsgpack.unpackb(data[21:])
            self.stats.replies_received += 1
            if not pending.future.done():
                pending.future.set_result((True, payload))
        elif kind == b"\x00":
            request = umsgpack.unpackb(data[21:])
            if not (
                isinstance(request, list) and len(request) == 2 and isinstance(request[1], list)
            ):
                raise RemoteProtocolError("request is not [name, args]")
            name, args = request
            if _REQUEST_ARITY.get(name) != len(args) or not is_node_id(args[0]):
                raise RemoteProtocolError("unknown RPC or wrong arguments")
            response = getattr(self, f"rpc_{name}")(addr, *args)
            if response is None:
                raise RemoteProtocolError("request refused")
            self.stats.requests_served += 1
            if self.transport is not None:
                self.transport.sendto(b"\x01" + msg_id + umsgpack.packb(response), addr)
        else:
            raise RemoteProtocolError("unknown datagram kind")

    # --- outgoing calls --------------------------------------------------------------------------

    def request(
        self, address: tuple[str, int], name: str, args: list[object]
    ) -> Awaitable[tuple[bool, object]]:
        """Send one RPC; the awaitable gives (True, reply) or (False, None) on timeout or refusal.

        Cancelling the awaiting task cancels the call and frees its state at once.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, object]] = loop.create_future()
        data = umsgpack.packb([name, args])
        if len(data) > MAX_REQUEST_BYTES or self.transport is None or self.transport.is_closing():
            future.set_result((False, None))
            return future
        msg_id = os.urandom(20)
        timer = loop.call_later(self._wait_timeout, self._expire, msg_id)
        self._outstanding[msg_id] = _Pending(future, timer, (address[0], address[1]))
        future.add_done_callback(lambda _f: self._forget(msg_id))
        self.transport.sendto(b"\x00" + msg_id + data, address)
        self.stats.requests_sent += 1
        return future

    def _forget(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None:
            pending.timer.cancel()

    def _expire(self, msg_id: bytes) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is not None and not pending.future.done():
            self.stats.timeouts += 1
            pending.future.set_result((False, None))

    async def _call(
        self, node: Node, name: str, args: list[object], check: Callable[[object], Any]
    ) -> tuple[bool, Any]:
        """Call ``name`` on ``node``; a malformed reply counts as no reply (and as a miss)."""
        ok, raw = await self.request((node.ip, node.port), name, [self.source_node.id, *args])
        if ok:
            try:
                return True, self._note_reply(node, check(raw))
            except RemoteProtocolError:
                self.stats.bad_replies += 1
                log.debug("malformed %s reply", name)
        self._note_miss(node)
        return False, None

    def _note_reply(self, node: Node, checked: object) -> object:
        self._misses.pop(node.id, None)
        self.welcome_if_new(node)
        return checked

    def _note_miss(self, node: Node) -> None:
        if self.router.is_new_node(node):
            return
        misses = self._misses.get(node.id, 0) + 1
        if misses < self.limits.max_misses:
            self._misses[node.id] = misses
            return
        self._misses.pop(node.id, None)
        self.router.remove_contact(node)

    def _contacts(self, raw: object) -> list[Node]:
        return [Node(*c) for c in decode_contacts(raw, max_contacts=self.ksize)]

    async def ping_address(self, address: tuple[str, int]) -> Node | None:
        """Ping ``address`` and add it to the routing table if it answers with a valid node id."""
        ok, raw = await self.request(address, "ping", [self.source_node.id])
        if not ok or not is_node_id(raw) or raw == self.source_node.id:
            self.stats.bad_replies += ok
            return None
        node = Node(raw, address[0], address[1])
        self._note_reply(node, raw)
        return node

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "ping", [], _check_ping(node_to_ask))

    async def call_store(self, node_to_ask: Node, key: bytes, value: object) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "store", [key, value], _check_bool)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "find_node", [node_to_find.id], self._contacts)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        def check(raw: object) -> object:
            if isinstance(raw, dict):
                if set(raw) != {"value"} or not self.storage.accepts(raw["value"]):
                    raise RemoteProtocolError("find_value reply has a bad value")
                return raw
            return self._contacts(raw)

        return await self._call(node_to_ask, "find_value", [node_to_find.id], check)

    async def call_add_provider(self, node_to_ask: Node, key: bytes, port: int) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "add_provider", [key, port], _check_bool)

    async def call_find_providers(self, node_to_ask: Node, key: bytes) -> tuple[bool, Any]:
        def check(raw: object) -> tuple[list[ProviderRecord], list[Node]]:
            limit = self.providers.limits.max_per_key
            records, contacts = decode_find_providers_reply(
                raw, max_contacts=self.ksize, max_providers=limit
            )
            return records, [Node(*c) for c in contacts]

        return await self._call(node_to_ask, "find_providers", [key], check)

    # --- served RPCs (arguments already counted; node ids checked) -----------------------------

    def get_refresh_ids(self) -> list[bytes]:
        # kademlia draws from the closed range [lo, 2**160] of the last bucket, and 2**160 does not
        # fit in 20 bytes (OverflowError, which would end the refresh loop for good).
        ids = []
        for bucket in self.router.lonely_buckets():
            low, high = bucket.range
            ids.append(_rng.randint(low, min(high, 2**160 - 1)).to_bytes(20, "big"))
        return ids

    def welcome_if_new(self, node: Node) -> None:
        # No hand-off scan of the whole storage per new node (kademlia digests every key again and
        # crawls the table for each): provider records are re-announced and values republished.
        if node.id == self.source_node.id:
            return
        known = self.router.buckets[self.router.get_bucket_for(node)][node.id]
        if known is not None and not known.same_home_as(node):
            return  # keep the live contact; a second address claiming its id is not trusted
        if known is None and any(n.same_home_as(node) for n in self.router.all_contacts()):
            return  # one id per address: a flood of fresh ids from one socket cannot fill the table
        self.router.add_contact(node)

    def _welcome(self, sender: tuple[str, int], nodeid: bytes) -> None:
        if is_peer_ip(sender[0]) and is_port(sender[1]):
            self.welcome_if_new(Node(nodeid, sender[0], sender[1]))

    def _neighbours(self, sender: tuple[str, int], key: bytes) -> list[list[object]]:
        # Contacts that missed their last call come last: they are probably gone, and handing them
        # out would crowd live nodes out of the k contacts a reply may carry.
        exclude = Node(key, sender[0], sender[1])
        near = self.router.find_neighbors(Node(key), k=2 * self.ksize, exclude=exclude)
        near.sort(key=lambda n: n.id in self._misses)  # stable: distance order within each group
        return [[n.id, n.ip, n.port] for n in near[: self.ksize]]

    def rpc_ping(self, sender: tuple[str, int], nodeid: bytes) -> bytes:
        self._welcome(sender, nodeid)
        return bytes(self.source_node.id)

    def rpc_store(
        self, sender: tuple[str, int], nodeid: bytes, key: object, value: object
    ) -> bool | None:
        if not is_node_id(key):
            return None
        self._welcome(sender, nodeid)
        if not self.storage.accepts(value):
            return False  # well formed but refused: say so rather than let the caller time out
        self.storage[key] = value
        return True

    def rpc_find_node(self, sender: tuple[str, int], nodeid: bytes, key: object) -> object:
        if not is_node_id(key):
            return None
        self._welcome(sender, nodeid)
        return self._neighbours(sender, key)

    def rpc_find_value(self, sender: tuple[str, int], nodeid: bytes, key: object) -> object:
        if not is_node_id(key):
            return None
        self._welcome(sender, nodeid)
        value = self.storage.get(key, None)
        return self._neighbours(sender, key) if value is None else {"value": value}

    def rpc_add_provider(
        self, sender: tuple[str, int], nodeid: bytes, key: object, port: object
    ) -> bool | None:
        if not is_node_id(key) or not is_port(port) or not is_peer_ip(sender[0]):
            return None
        self._welcome(sender, nodeid)
        return self.providers.add(key, nodeid, sender[0], port, now=time.monotonic())

    def rpc_find_providers(self, sender: tuple[str, int], nodeid: bytes, key: object) -> object:
        if not is_node_id(key):
            return None
        self._welcome(sender, nodeid)
        records = self.providers.get(key, now=time.monotonic())
        wire = [encode_provider_record(r) for r in records]
        return [FIND_PROVIDERS_REPLY_VERSION, wire, self._neighbours(sender, key)]


def _check_bool(raw: object) -> bool:
    if not isinstance(raw, bool):
        raise RemoteProtocolError("expected a boolean reply")
    return raw


def _check_ping(node: Node) -> Callable[[object], bytes]:
    def check(raw: object) -> bytes:
        if not is_node_id(raw) or (node.id is not None and raw != node.id):
            raise RemoteProtocolError("ping reply is not the expected node id")
        return raw

    return check


class _Crawl:
    """One iterative lookup (section 2.3 of the paper) that never waits on a dead node in series.

    kademlia's SpiderCrawl sends alpha queries and waits for all of them, so each round with a dead
    node costs a full timeout. Here alpha queries are kept in flight; a query unanswered after a
    quarter of the timeout is "stalled": it stops counting against alpha and its node stops counting
    among the k closest (so the next candidate is asked at once), though a late answer is still used
    while the crawl runs. The crawl ends when the k closest nodes neither failed nor stalled have
    answered, or after 1.75 timeouts. Unfinished queries run out in the background, so a dead node
    still gets its miss recorded and is evicted after MAX_MISSES.
    """

    def __init__(
        self, protocol: HardenedProtocol, key: bytes, seeds: list[Node], *, alpha: int, mode: str
    ) -> None:
        self.protocol = protocol
        self.target = Node(key)
        self.alpha = alpha
        self.mode = mode  # "node", "value" or "providers"
        self.stall_s = protocol._wait_timeout / 4
        self.nodes: dict[bytes, Node] = {}
        self.depth: dict[bytes, int] = {}
        self.state: dict[bytes, str] = {}  # new, pending, done, failed
        self.started: dict[bytes, float] = {}
        self.records: dict[tuple[bytes, str], ProviderRecord] = {}
        self.value: bytes | str | None = None
        self.messages = 0
        self.round_trips = 0
        self._learn(seeds, 0)

    def _learn(self, nodes: list[Node], depth: int) -> None:
        for node in nodes:
            if node.id != self.protocol.source_node.id and node.id not in self.nodes:
                self.nodes[node.id] = node
                self.depth[node.id] = depth
                self.state[node.id] = "new"

    def _counts(self, node_id: bytes, now: float) -> bool:
        state = self.state[node_id]
        return state in ("new", "done") or (
            state == "pending" and now - self.started[node_id] < self.stall_s
        )

    def _closest(self, now: float) -> list[Node]:
        alive = (n for i, n in self.nodes.items() if self._counts(i, now))
        return heapq.nsmallest(self.protocol.ksize, alive, key=self.target.distance_to)

    def _query(self, node: Node) -> Coroutine[Any, Any, tuple[bool, Any]]:
        if self.mode == "providers":
            return self.protocol.call_find_providers(node, self.target.id)
        if self.mode == "value":
            return self.protocol.call_find_value(node, self.target)
        return self.protocol.call_find_node(node, self.target)

    def _absorb(self, node_id: bytes, ok: bool, reply: Any) -> None:
        self.state[node_id] = "done" if ok else "failed"
        if not ok:
            return
        self.round_trips = max(self.round_trips, self.depth[node_id] + 1)
        if self.mode == "providers":
            records, contacts = reply
            for r in records:
                self.records[(r.node_id, r.host)] = r
        elif isinstance(reply, dict):
            self.value = reply["value"]
            return
        else:
            contacts = reply
        self._learn(contacts, self.depth[node_id] + 1)

    async def run(self) -> LookupResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.75 * self.protocol._wait_timeout
        pending: dict[asyncio.Task[tuple[bool, Any]], bytes] = {}
        while self.value is None and not self.records and loop.time() < deadline:
            now = loop.time()
            closest = self._closest(now)
            if all(self.state[n.id] == "done" for n in closest):
                break
            active = [i for i in pending.values() if now - self.started[i] < self.stall_s]
            for node in closest:
                if len(active) >= self.alpha:
                    break
                if self.state[node.id] == "new":
                    self.state[node.id], self.started[node.id] = "pending", now
                    pending[self.protocol.spawn(self._query(node))] = node.id
                    self.messages += 1
                    active.append(node.id)
            if not pending:
                break
            wake = min([self.started[i] + self.stall_s for i in active] + [deadline])
            done, _ = await asyncio.wait(
                pending, timeout=max(wake - now, 0.001), return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                ok, reply = task.result()
                self._absorb(pending.pop(task), ok, reply)
        return self._result()

    def _result(self) -> LookupResult:
        answered = [n for i, n in self.nodes.items() if self.state[i] == "done"]
        closest = heapq.nsmallest(self.protocol.ksize, answered, key=self.target.distance_to)
        wall = time.time()
        providers = [
            Provider(r.node_id, r.host, r.port, wall + r.expires_in) for r in self.records.values()
        ]
        return LookupResult(
            peers=[Peer(n.id, n.ip, n.port) for n in closest],
            providers=providers,
            messages=self.messages,
            round_trips=self.round_trips,
            value=self.value,
        )


def _dedupe(providers: list[Provider]) -> list[Provider]:
    """One provider per node id: the record that lives longest (the most recent announce)."""
    best: dict[bytes, Provider] = {}
    for p in providers:
        if p.node_id not in best or p.expires_at > best[p.node_id].expires_at:
            best[p.node_id] = p
    return sorted(best.values(), key=lambda p: p.node_id)


class HardenedServer(Server):  # type: ignore[misc]
    """kademlia's Server: checked ids, explicit binding, counted stores, JSON state, no pickle."""

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
    ) -> None:
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
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=storage)
        self.rpc_timeout_s = rpc_timeout_s
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
        )

    def _proto(self) -> HardenedProtocol:
        if self.protocol is None:
            raise NetworkError("the DHT node is not started; call start() first")
        return self.protocol

    async def listen(self, port: int, interface: str) -> None:
        """Bind UDP ``interface``:``port``; no default interface (kademlia's is 0.0.0.0)."""
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
        return await _Crawl(proto, key, nearest, alpha=self.alpha, mode=mode).run()

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        return await self._proto().ping_address((addr[0], addr[1]))

    async def bootstrap(self, addrs: Sequence[tuple[str, int]]) -> list[Node]:
        """Ping every address in parallel, look up our own id, then refresh the far buckets.

        Returns the nodes closest to our id. Per section 2.3 of the paper a joining node "refreshes
        all k-buckets further away than its closest neighbor"; kademlia skips this, which leaves
        tables so sparse that at 1000 nodes some lookups end in a region knowing nothing closer.
        """
        found = await asyncio.gather(*(self.bootstrap_node(a) for a in addrs))
        nodes = [n for n in found if n is not None]
        if not nodes:
            return []
        result = await self.crawl(self.node.id, "node", nodes)
        await self.refresh_far_buckets()
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
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
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


def save_contacts(path: Path, contacts: Sequence[Peer]) -> None:
    """Write ``contacts`` to ``path`` as the versioned JSON file (tmp + fsync + rename)."""
    _write_atomic(path, format_contacts_file([(p.host, p.port) for p in contacts]))


class DHTNode:
    """A p2pmega DHT node: join, announce and find chunk holders, find placement candidates.

    Use ``async with DHTNode(host=..., node_id=...) as node:`` or call start() and stop().
    """

    def __init__(
        self,
        *,
        host: str,
        port: int = 0,
        node_id: bytes,
        ksize: int = 20,
        alpha: int = 3,
        rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
        record_ttl_s: float = DEFAULT_RECORD_TTL_S,
        contacts_path: Path | None = None,
        limits: DHTLimits | None = None,
    ) -> None:
        if not is_peer_ip(host):
            raise ValueError("host must be an IP literal to bind, not 0.0.0.0 or a name")
        self.host = host
        self.port = port
        self.contacts_path = contacts_path
        self.reannounce_interval_s = record_ttl_s / 2
        self.server = HardenedServer(
            ksize,
            alpha,
            node_id,
            rpc_timeout_s=rpc_timeout_s,
            record_ttl_s=record_ttl_s,
            limits=limits,
        )

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
            self.server._proto().spawn(self._save_regularly(self.server.limits.save_interval_s))

    async def stop(self) -> None:
        """Save contacts (if a path is set), close the socket and end every task."""
        if self.server.protocol is None:
            return
        if self.contacts_path is not None and self.contacts():
            await self._save_in_thread(self.contacts_path)
        self.server.stop()
        await self.server.protocol.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _save_regularly(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self.contacts_path is not None and self.contacts():
                await self._save_in_thread(self.contacts_path)

    async def _save_in_thread(self, path: Path) -> None:
        # Snapshot on the loop's thread: the routing table must not be read while datagrams
        # change it; only the file write runs in a worker thread.
        snapshot = self.contacts()
        try:
            await asyncio.to_thread(save_contacts, path, snapshot)
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

    async def refresh(self) -> None:
        """Look up a random id in every bucket far from our own id (join does this once).

        The hourly maintenance refreshes buckets too; this is for callers that want it now.
        """
        await self.server.refresh_far_buckets()

    async def add_contact(self, host: str, port: int) -> bool:
        """Ping ``host``:``port`` and add it to the routing table if it answers (LAN discovery)."""
        if not (is_peer_ip(host) and is_port(port)) or (host, port) == (self.host, self.port):
            return False
        return await self.server._proto().ping_address((host, port)) is not None

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
        result = await self.server.crawl(key, "node", self._seeds(key))
        return result.peers[:count]

    async def announce(self, chunk_id: bytes, transfer_port: int) -> int:
        """Ask the k closest nodes to ``chunk_id[:20]`` to record that we hold the chunk.

        Returns:
            How many nodes confirmed storing the record (0 is possible, never an error).

        Raises:
            NetworkError: no contact is known.
        """
        key = dht_key(chunk_id)
        if not is_port(transfer_port):
            raise ValueError("transfer_port must be 1-65535")
        proto = self.server._proto()
        peers = (await self.server.crawl(key, "node", self._seeds(key))).peers
        results = await asyncio.gather(
            *(
                proto.call_add_provider(Node(p.node_id, p.host, p.port), key, transfer_port)
                for p in peers
            )
        )
        return sum(1 for ok, stored in results if ok and stored)

    async def lookup_providers(self, chunk_id: bytes) -> LookupResult:
        """find_providers with its cost (messages, round trips); used by bench/dht.py.

        Raises:
            NetworkError: no contact is known and no record is held locally.
        """
        key = dht_key(chunk_id)
        now, wall = time.monotonic(), time.time()
        local = [
            Provider(r.node_id, r.host, r.port, wall + r.expires_in)
            for r in self.server.providers.get(key, now=now)
        ]
        seeds = self.server._proto().router.find_neighbors(Node(key))
        if not seeds and local:
            return LookupResult([], _dedupe(local), 0, 0)
        result = await self.server.crawl(key, "providers", self._seeds(key))
        return LookupResult(
            result.peers, _dedupe(local + result.providers), result.messages, result.round_trips
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
