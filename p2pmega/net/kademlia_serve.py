"""The requests a DHT node answers: checks, per-/24 rate limits, the anti-amplification budget, and the RPCs.

A mixin of p2pmega.net.kademlia_protocol.HardenedProtocol (rpcudp dispatches ``rpc_<name>`` on the protocol
object); the attributes it reads are set up there.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from typing import Any

import umsgpack
from kademlia.node import Node

from p2pmega.core.id_proof import make_id_proof
from p2pmega.core.liveness import FAILED_TTL_S as FAILED_TTL_S
from p2pmega.core.node_id import prefix_matches
from p2pmega.core.rate_limit import NetworkRateLimit, TokenBucket
from p2pmega.core.record import (
    FIND_PROVIDERS_REPLY_VERSION,
    ProviderTable,
    encode_provider_record,
    is_node_id,
    is_peer_ip,
    is_port,
)
from p2pmega.errors import RemoteProtocolError
from p2pmega.net.dht_wire import (
    DHT_PROTOCOL_VERSION,
    MAX_KEYS_PER_BATCH,
    NO_SENDER_ID,
    READ_ONLY_PREFIX,
    REFLECTION_FACTOR,
    REQUEST_ARITY,
    DHTLimits,
    DHTStats,
    network_of,
    shrink_reply,
)
from p2pmega.net.routing import BoundedStorage, HardenedRoutingTable


class ServesRequests:
    """Answering side of HardenedProtocol: every request is checked, rate limited and answered small."""

    source_node: Node
    storage: BoundedStorage
    providers: ProviderTable
    router: HardenedRoutingTable
    ksize: int
    limits: DHTLimits
    stats: DHTStats
    read_only: bool
    rate_limit: NetworkRateLimit
    proof_budget: TokenBucket
    transport: Any
    _seed: bytes
    _misses: dict[bytes, int]
    _proven: OrderedDict[tuple[str, int], bytes]

    def welcome_if_new(self, node: Node) -> None:
        raise NotImplementedError

    def _serve(self, data: bytes, addr: tuple[str, int]) -> None:
        request = umsgpack.unpackb(data[21:])
        if isinstance(request, list) and len(request) == 2:
            # [name, args]: protocols 1 and 2, whose ids are not bound to keys. Dropped: the old node
            # sees a timeout, as from any node that does not speak its protocol (docs/DHT.md).
            self.stats.old_protocol += 1
            raise RemoteProtocolError("request of protocol 1 or 2")
        if not (
            isinstance(request, list)
            and len(request) == 4
            and request[0] == DHT_PROTOCOL_VERSION
            and isinstance(request[2], list)
            and isinstance(request[3], bytes)
        ):
            raise RemoteProtocolError("request is not [3, name, args, padding]")
        _, name, args, _padding = request
        if REQUEST_ARITY.get(name) != len(args) or not (
            name.startswith(READ_ONLY_PREFIX) or name in NO_SENDER_ID or is_node_id(args[0])
        ):
            raise RemoteProtocolError("unknown RPC or wrong arguments")
        if self.read_only:
            raise RemoteProtocolError("a read-only node serves no requests")
        cost = self.limits.id_proof_cost if name == "id_proof" else 1.0
        if name == "add_providers" and isinstance(args[1], list):
            # Recording costs 60-100 us a key (core/record.py, measured): a full batch of 256 costs 33
            # tokens, so one /24 can make a node record ~3,900 keys a second, not 25,000.
            cost += len(args[1]) / 8
        if not self.rate_limit.allow(addr[0], cost, now=asyncio.get_running_loop().time()):
            self.stats.rate_limited += 1
            raise RemoteProtocolError("rate limited")
        response = getattr(self, f"rpc_{name}")(addr, *args)
        if response is None:
            raise RemoteProtocolError("request refused")
        body = umsgpack.packb(response)
        if (addr[0], addr[1]) not in self._proven:
            budget = REFLECTION_FACTOR * len(data) - 21
            if len(body) > budget:
                self.stats.shrunk_replies += 1
                body = shrink_reply(response, budget)
            self.stats.max_unproven_ratio = max(
                self.stats.max_unproven_ratio, (21 + len(body)) / len(data)
            )
        self.stats.requests_served += 1
        if self.transport is not None:
            self.transport.sendto(b"\x01" + data[1:21] + body, addr)

    def _welcome(self, sender: tuple[str, int], nodeid: bytes) -> None:
        if is_peer_ip(sender[0]) and is_port(sender[1]):
            self.welcome_if_new(Node(nodeid, sender[0], sender[1]))

    def _neighbours(self, sender: tuple[str, int], key: bytes) -> list[list[object]]:
        # Contacts that missed their last call come last: they are probably gone, and handing them
        # out would crowd live nodes out of the k contacts a reply may carry.
        exclude = Node(key, sender[0], sender[1])
        near = self.router.find_neighbors(Node(key), k=2 * self.ksize, exclude=exclude)
        near.sort(key=lambda n: n.id in self._misses)  # stable: distance order within each group
        per_network: Counter[bytes] = Counter()
        chosen = []
        for n in near:
            network = network_of(n.ip)
            if per_network[network] < self.limits.max_per_network_in_reply:
                per_network[network] += 1
                chosen.append([n.id, n.ip, n.port])
        return chosen[: self.ksize]

    # Each read-only handler serves its full counterpart without the sender's id, so the sender is
    # never welcomed: it never enters the table, is never handed out, and never stores anything.

    def rpc_id_proof(
        self, sender: tuple[str, int], challenger: object, nonce: object
    ) -> list[object] | None:
        # Never welcomes the challenger: a proof is given, not asked for, by this request.
        if not (isinstance(challenger, bytes) and isinstance(nonce, bytes)):
            return None
        if not self.proof_budget.allow(1.0, now=asyncio.get_running_loop().time()):
            self.stats.rate_limited += 1
            return None
        try:
            return make_id_proof(self._seed, bytes(self.source_node.id), nonce, challenger)
        except ValueError:
            return None  # a nonce or challenger id of the wrong length

    def rpc_ro_ping(self, sender: tuple[str, int]) -> bytes:
        return bytes(self.source_node.id)

    def rpc_ping(self, sender: tuple[str, int], nodeid: bytes) -> bytes:
        self._welcome(sender, nodeid)
        return self.rpc_ro_ping(sender)

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

    def rpc_ro_find_node(self, sender: tuple[str, int], key: object) -> object:
        return self._neighbours(sender, key) if is_node_id(key) else None

    def rpc_find_node(self, sender: tuple[str, int], nodeid: bytes, key: object) -> object:
        return self._welcomed(sender, nodeid, self.rpc_ro_find_node(sender, key))

    def rpc_ro_find_value(self, sender: tuple[str, int], key: object) -> object:
        if not is_node_id(key):
            return None
        value = self.storage.get(key, None)
        return self._neighbours(sender, key) if value is None else {"value": value}

    def rpc_find_value(self, sender: tuple[str, int], nodeid: bytes, key: object) -> object:
        return self._welcomed(sender, nodeid, self.rpc_ro_find_value(sender, key))

    def rpc_add_provider(
        self, sender: tuple[str, int], nodeid: bytes, key: object, port: object
    ) -> bool | None:
        if not is_node_id(key) or not is_port(port) or not is_peer_ip(sender[0]):
            return None
        self._welcome(sender, nodeid)
        if not prefix_matches(nodeid, sender[0]):
            return False  # an id that cannot be the sender's: never handed out as a holder
        return self.providers.add(key, nodeid, sender[0], port, now=time.monotonic())

    def rpc_add_providers(
        self, sender: tuple[str, int], nodeid: bytes, keys: object, port: object
    ) -> list[bool] | None:
        # The same checks and per-key, per-source and total caps as add_provider, key by key.
        if not (
            isinstance(keys, list)
            and 1 <= len(keys) <= MAX_KEYS_PER_BATCH
            and all(is_node_id(k) for k in keys)
            and is_port(port)
            and is_peer_ip(sender[0])
        ):
            return None
        self._welcome(sender, nodeid)
        if not prefix_matches(nodeid, sender[0]):
            return [False] * len(keys)
        now = time.monotonic()
        return [self.providers.add(k, nodeid, sender[0], port, now=now) for k in keys]

    def rpc_ro_find_providers(self, sender: tuple[str, int], key: object) -> object:
        if not is_node_id(key):
            return None
        records = self.providers.get(key, now=time.monotonic())
        wire = [encode_provider_record(r) for r in records]
        return [FIND_PROVIDERS_REPLY_VERSION, wire, self._neighbours(sender, key)]

    def rpc_find_providers(self, sender: tuple[str, int], nodeid: bytes, key: object) -> object:
        return self._welcomed(sender, nodeid, self.rpc_ro_find_providers(sender, key))

    def _welcomed(self, sender: tuple[str, int], nodeid: bytes, reply: object) -> object:
        """``reply``, after welcoming the sender of a well-formed (non-None) request."""
        if reply is not None:
            self._welcome(sender, nodeid)
        return reply
