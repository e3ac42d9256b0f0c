"""The hardened kademlia/rpcudp protocol: validated requests and replies, provider-record RPCs, id proofs.

Handles datagrams and RPCs only; lookups are p2pmega.net.crawl, the node API is p2pmega.net.dht.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from rpcudp.protocol import RPCProtocol

from p2pmega.core.id_proof import NONCE_BYTES, check_id_proof
from p2pmega.core.liveness import FAILED_TTL_S as FAILED_TTL_S
from p2pmega.core.liveness import Liveness
from p2pmega.core.node_id import prefix_matches
from p2pmega.core.rate_limit import NetworkRateLimit, TokenBucket
from p2pmega.core.record import (
    ProviderRecord,
    ProviderTable,
    decode_contacts,
    decode_find_providers_reply,
    is_node_id,
)
from p2pmega.core.rtt import RttTable
from p2pmega.errors import RemoteProtocolError
from p2pmega.net.dht_wire import (
    DHT_PROTOCOL_VERSION,
    MAX_DATAGRAM_BYTES,
    MAX_PROVING,
    MAX_REMEMBERED_ADDRESSES,
    MAX_REQUEST_BYTES,
    PADDED_REQUEST_BYTES,
    PADDED_RPCS,
    PROOF_RETRY_S,
    READ_ONLY_PREFIX,
    READ_ONLY_RPCS,
    DHTLimits,
    DHTStats,
    network_of,
)
from p2pmega.net.kademlia_serve import ServesRequests
from p2pmega.net.routing import BoundedStorage, HardenedRoutingTable

log = logging.getLogger(__name__)


_rng = random.SystemRandom()
"""Refresh targets need no reproducibility; SystemRandom also keeps ruff's S311 satisfied."""


@dataclass
class _Pending:
    future: asyncio.Future[tuple[bool, object]]
    timer: asyncio.TimerHandle
    address: tuple[str, int]
    sent_at: float
    deferred: bool = False


# A query unanswered this long stops holding up a lookup at the least (on loopback a round trip is ~0.3 ms; on the
# internet the measured RTO is far above this); at the most a quarter of the RPC timeout, as before measurements.
STALL_FLOOR_S = 0.05

# A timeout timer that fires this late means our own event loop was blocked (a GC pause, a descheduled process), not
# that the peer was slow: its reply may sit unread in the socket buffer, and asyncio reads one datagram per loop
# iteration, so every timer due at once would fire before most of the queued replies are read. Such a timer waits
# LATE_GRACE_S once more, which drains the buffer many times over. A peer that is really gone costs 0.1 s more.
LATE_TIMER_S = 0.05
LATE_GRACE_S = 0.1


class HardenedProtocol(ServesRequests, KademliaProtocol):  # type: ignore[misc]
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
        seed: bytes,
        read_only: bool = False,
    ) -> None:
        RPCProtocol.__init__(self, wait_timeout=rpc_timeout_s)
        self.read_only = read_only
        # Whether contacts that answer are challenged and admitted; a read-only client stops after its join
        # (kademlia_server.bootstrap): its few lookups start from that table, and the id proofs of every node
        # they meet (one request each, ~0.6 a chunk of a 64 MiB share at 200 seeds) would fill a table that
        # dies with the command.
        self.admitting = True
        self._seed = seed
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
        self.rtt = RttTable(floor_s=STALL_FLOOR_S, ceiling_s=max(STALL_FLOOR_S, rpc_timeout_s / 4))
        self.liveness = Liveness(self.rtt)
        self.rate_limit = NetworkRateLimit(
            rate_per_s=limits.requests_per_s, burst=limits.request_burst
        )
        self.proof_budget = TokenBucket(rate_per_s=limits.proofs_per_s, burst=limits.proofs_per_s)
        # Addresses that proved an id (address -> id), proofs in flight, and failed proofs.
        self._proven: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._proving: dict[tuple[str, int], asyncio.Task[bytes | None]] = {}
        self._proof_failed: OrderedDict[tuple[str, int], float] = OrderedDict()

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
            self.rtt.sample(pending.address, asyncio.get_running_loop().time() - pending.sent_at)
            if not pending.future.done():
                pending.future.set_result((True, payload))
        elif kind == b"\x00":
            self._serve(data, addr)
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
        data = umsgpack.packb([DHT_PROTOCOL_VERSION, name, args, b""])
        if name in PADDED_RPCS and len(data) + 21 < PADDED_REQUEST_BYTES:
            # bin8/bin16 headers take 2-3 bytes; a byte more or less does not matter here.
            pad = b"\x00" * max(0, PADDED_REQUEST_BYTES - 21 - len(data) - 2)
            data = umsgpack.packb([DHT_PROTOCOL_VERSION, name, args, pad])
        if len(data) > MAX_REQUEST_BYTES or self.transport is None or self.transport.is_closing():
            future.set_result((False, None))
            return future
        msg_id = os.urandom(20)
        timer = loop.call_later(self._wait_timeout, self._expire, msg_id)
        self._outstanding[msg_id] = _Pending(future, timer, (address[0], address[1]), loop.time())
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
        if pending is None or pending.future.done():
            return
        loop = asyncio.get_running_loop()
        if (
            not pending.deferred
            and loop.time() - pending.sent_at - self._wait_timeout > LATE_TIMER_S
        ):
            pending.deferred = True
            pending.timer = loop.call_later(LATE_GRACE_S, self._expire, msg_id)
            return
        self.stats.timeouts += 1
        pending.future.set_result((False, None))

    async def _call(
        self, node: Node, name: str, args: list[object], check: Callable[[object], Any]
    ) -> tuple[bool, Any]:
        """Call ``name`` on ``node``; a malformed reply counts as no reply (and as a miss)."""
        self.liveness.sent(node.id, (node.ip, node.port), asyncio.get_running_loop().time())
        try:
            ok, raw = await self.request((node.ip, node.port), *self._wire(name, args))
        except asyncio.CancelledError:
            # Our own caller gave up (a timeout, a stop): says nothing about the node.
            self.liveness.forget(node.id)
            raise
        if ok:
            try:
                return True, self._note_reply(node, check(raw))
            except RemoteProtocolError:
                self.stats.bad_replies += 1
                log.debug("malformed %s reply", name)
        self._note_miss(node)
        return False, None

    def suspect(self, node: Node, now: float) -> bool:
        """Whether a lookup should not wait on ``node`` (core/liveness.py)."""
        return self.liveness.suspect(node.id, (node.ip, node.port), now)

    def _wire(self, name: str, args: list[object]) -> tuple[str, list[object]]:
        """The request as sent: ``[node_id, *args]``, or for a read-only node ``ro_<name>`` ``args``.

        Raises:
            ValueError: a read-only node would send a request that stores something.
        """
        if not self.read_only:
            return name, [self.source_node.id, *args]
        if name not in READ_ONLY_RPCS:
            raise ValueError(f"a read-only DHT node cannot send {name}")
        return READ_ONLY_PREFIX + name, args

    def _note_reply(self, node: Node, checked: object) -> object:
        self._misses.pop(node.id, None)
        self.liveness.answered(node.id, (node.ip, node.port))
        self.welcome_if_new(node)
        return checked

    def _note_miss(self, node: Node) -> None:
        self.liveness.missed(node.id, (node.ip, node.port), asyncio.get_running_loop().time())
        if self.router.is_new_node(node):
            return
        misses = self._misses.get(node.id, 0) + 1
        if misses < self.limits.max_misses:
            self._misses[node.id] = misses
            return
        self._misses.pop(node.id, None)
        self.router.remove_contact(node)

    def remember_failed(self, address: tuple[str, int], age_s: float) -> None:
        """Note that a call to ``address`` timed out ``age_s`` seconds ago (the saved-contacts file says so)."""
        self.liveness.remember_failed(address, asyncio.get_running_loop().time() - age_s)

    def failed_contacts(self, wall_now: float) -> list[tuple[str, int, float]]:
        """What the saved-contacts file keeps: contacts failed or silent lately, with the Unix time of it."""
        now = asyncio.get_running_loop().time()
        found = self.liveness.failed_contacts(now)
        return [
            (h, p, wall_now - (now - at))
            for (h, p), at in sorted(found.items(), key=lambda i: i[1])
        ]

    def _contacts(self, raw: object) -> list[Node]:
        return [Node(*c) for c in decode_contacts(raw, max_contacts=self.ksize)]

    async def ping_address(self, address: tuple[str, int]) -> Node | None:
        """Ask ``address`` to prove its node id; add it to the routing table if it does.

        One id_proof round trip does what a ping did and proves the id too (bootstrap, LAN).
        """
        node_id = await self.prove(address)
        if node_id is None or node_id == self.source_node.id:
            return None
        node = Node(node_id, address[0], address[1])
        self._note_reply(node, node_id)
        return node

    async def prove(self, address: tuple[str, int]) -> bytes | None:
        """Challenge ``address`` to prove its node id; the id, or None if it did not.

        A proven address is remembered (and answered in full, see REFLECTION_FACTOR). A false proof
        evicts any contact at that address at once and is not challenged again for PROOF_RETRY_S.
        """
        address = (address[0], address[1])
        nonce = os.urandom(NONCE_BYTES)
        challenger = b"" if self.read_only else bytes(self.source_node.id)
        self.stats.proofs_sent += 1
        ok, raw = await self.request(address, "id_proof", [challenger, nonce])
        now = asyncio.get_running_loop().time()
        if not ok:
            self.stats.proofs_failed += 1
            # Silence may be a lost datagram: try again after FAILED_TTL_S, evict nobody.
            self._remember(self._proof_failed, address, now - PROOF_RETRY_S + FAILED_TTL_S)
            return None
        try:
            proven = check_id_proof(raw, nonce=nonce, challenger_id=challenger, ip=address[0])
        except RemoteProtocolError:
            # A false proof: whoever is at this address is not who our table says. Evict at once.
            self.stats.proofs_failed += 1
            self.stats.bad_replies += 1
            self._remember(self._proof_failed, address, now)
            for contact in self.router.all_contacts():
                if (contact.ip, contact.port) == address:
                    self.router.remove_contact(contact)
            return None
        self._remember(self._proven, address, proven.node_id)
        self._proof_failed.pop(address, None)
        return proven.node_id

    @staticmethod
    def _remember(
        table: OrderedDict[tuple[str, int], Any], key: tuple[str, int], value: Any
    ) -> None:
        table.pop(key, None)
        table[key] = value
        while len(table) > MAX_REMEMBERED_ADDRESSES:
            table.popitem(last=False)

    def _prove_then_admit(self, node: Node) -> None:
        address = (node.ip, node.port)
        if address in self._proving or len(self._proving) >= MAX_PROVING:
            return
        failed_at = self._proof_failed.get(address)
        if failed_at is not None and asyncio.get_running_loop().time() - failed_at < PROOF_RETRY_S:
            return

        async def run() -> bytes | None:
            try:
                node_id = await self.prove(address)
            finally:
                self._proving.pop(address, None)
            if node_id is not None:
                self._admit(Node(node_id, node.ip, node.port))
            return node_id

        self._proving[address] = self.spawn(run())

    async def settle_proofs(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the id proofs in flight, so their contacts are in the table."""
        tasks = list(self._proving.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

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

    async def call_add_providers(
        self, node_to_ask: Node, keys: list[bytes], port: int
    ) -> tuple[bool, Any]:
        """Ask ``node_to_ask`` to record us for each of ``keys`` (at most MAX_KEYS_PER_BATCH).

        The reply is one boolean per key, in order: recorded, or refused by a cap.
        """

        def check(raw: object) -> list[bool]:
            if not (isinstance(raw, list) and len(raw) == len(keys)):
                raise RemoteProtocolError("add_providers reply is not one answer per key")
            return [_check_bool(r) for r in raw]

        return await self._call(node_to_ask, "add_providers", [keys, port], check)

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
        """Admit ``node`` to the routing table once it has proven its id (issue 16, docs/DHT.md).

        An id not of the node's network is dropped at once (the cheap filter); a contact already in
        the table is refreshed; any other is challenged (id_proof) and admitted when it answers.
        """
        # No hand-off scan of the whole storage per new node (kademlia digests every key again and
        # crawls the table for each): provider records are re-announced and values republished.
        if node.id == self.source_node.id or not self.admitting:
            return
        if not prefix_matches(node.id, node.ip):
            self.stats.bad_ids += 1
            return
        known = self.router.buckets[self.router.get_bucket_for(node)][node.id]
        if known is not None:
            if known.same_home_as(node):
                self.router.add_contact(node)  # a live contact moves to its bucket's tail
            return  # keep the live contact; a second address claiming its id is not trusted
        if self._proven.get((node.ip, node.port)) == node.id:
            self._admit(node)
        else:
            self._prove_then_admit(node)

    def _admit(self, node: Node) -> None:
        """Add a proven contact, within the per-network caps of its bucket and of the table."""
        if any(n.same_home_as(node) for n in self.router.all_contacts()):
            return  # one id per address: a flood of fresh ids from one socket cannot fill the table
        network = network_of(node.ip)
        limits = self.limits
        bucket = self.router.buckets[self.router.get_bucket_for(node)]
        in_bucket = sum(1 for n in bucket.get_nodes() if network_of(n.ip) == network)
        in_table = sum(1 for n in self.router.all_contacts() if network_of(n.ip) == network)
        if (
            in_bucket >= limits.max_per_network_in_bucket
            or in_table >= limits.max_per_network_in_table
        ):
            return
        self.router.add_contact(node)


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
