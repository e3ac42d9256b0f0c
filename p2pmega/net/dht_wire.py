"""The DHT's wire constants, limits and counters, and how a reply is cut to fit a budget (no I/O).

Shared by the protocol's two halves: p2pmega.net.kademlia_serve (requests we answer) and
p2pmega.net.kademlia_protocol (requests we make, and who enters the routing table).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import umsgpack

from p2pmega.core.liveness import FAILED_TTL_S as FAILED_TTL_S
from p2pmega.core.node_id import network_of as _network_of
from p2pmega.core.record import (
    ProviderLimits,
)
from p2pmega.defaults import REANNOUNCE_INTERVAL_S as DEFAULT_REANNOUNCE_INTERVAL_S
from p2pmega.defaults import RECORD_TTL_S, RPC_TIMEOUT_S
from p2pmega.errors import RemoteProtocolError

DEFAULT_RPC_TIMEOUT_S = RPC_TIMEOUT_S
DEFAULT_RECORD_TTL_S = RECORD_TTL_S
# Holders re-announce at half the record TTL, so one lost announce never makes a record lapse.
REANNOUNCE_INTERVAL_S = DEFAULT_REANNOUNCE_INTERVAL_S
MAX_MISSES = 3
"""Consecutive unanswered RPCs before a contact is evicted; one lost datagram must not evict."""
MAX_REQUEST_BYTES = 8192
"""rpcudp's own cap on an encoded request ("cannot exceed 8K"); requests above it are never sent."""
MAX_DATAGRAM_BYTES = 16384
"""Largest datagram decoded; a full find_providers reply (64 records, 20 contacts) is ~4 KiB."""
MAX_VALUE_BYTES = 1024
"""Generic kademlia values are small pointers; anything bigger cannot be republished under 8 KiB."""
MAX_KEYS_PER_BATCH = 256
"""Keys in one add_providers request: 256 x 22 bytes (msgpack bin8) is ~5.7 KiB, under the 8 KiB."""
DHT_PROTOCOL_VERSION = 3
"""First element of every request body: [3, name, args, padding] (docs/DHT.md, "Protocol 3")."""
REFLECTION_FACTOR = 3
"""A reply to an address that has not proven an id is at most this many times its request's
datagram (QUIC's anti-amplification limit, RFC 9000 section 8.1), so a spoofed source cannot turn
us into an amplifier."""
PADDED_REQUEST_BYTES = 512
"""Requests that ask for lists are padded to this many bytes, so even an unproven requester (a
read-only client always is) gets replies of up to 1.5 KiB: 20 contacts and a dozen records."""
PADDED_RPCS = frozenset(
    {
        "find_node",
        "find_value",
        "find_providers",
        "ro_find_node",
        "ro_find_value",
        "ro_find_providers",
    }
)
MAX_PROVING = 64
"""Id proofs in flight at once; more unknown senders wait for a later message of theirs."""
PROOF_RETRY_S = 600.0
"""An address whose proof was false (a bad signature, an id not of its key and network) is not
challenged again for this long; one that did not answer, for FAILED_TTL_S (a lost datagram)."""
MAX_REMEMBERED_ADDRESSES = 4096
"""Proven and failed addresses remembered (each an LRU of this size)."""
REQUEST_ARITY = {
    "id_proof": 2,
    "ping": 1,
    "store": 3,
    "find_node": 2,
    "find_value": 2,
    "add_provider": 3,
    "find_providers": 2,
    # Protocol 2 (docs/DHT.md): batched announcements, and the read-only requests, which carry no
    # node id at all, so a receiver has nothing it could add to its table or hand to others.
    "add_providers": 3,
    "ro_ping": 0,
    "ro_find_node": 1,
    "ro_find_value": 1,
    "ro_find_providers": 1,
}
NO_SENDER_ID = frozenset({"id_proof"})
"""Requests whose first argument is not the sender's node id (id_proof's is the challenger's, or b"")."""
READ_ONLY_PREFIX = "ro_"
"""A read-only node sends ``ro_<name>`` with the arguments of ``<name>`` minus the node id."""
READ_ONLY_RPCS = frozenset({"ping", "find_node", "find_value", "find_providers"})


@functools.lru_cache(maxsize=4096)
def network_of(ip: str) -> bytes:
    """core.node_id.network_of, cached: every reply and admission looks at the same few addresses."""
    return _network_of(ip)


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
    max_per_network_in_bucket: int = 2
    """Contacts of one /24 (/48) in one bucket: 40 sockets on one address fill at most 2 slots."""
    max_per_network_in_table: int = 8
    max_per_network_in_reply: int = 2
    """Contacts of one /24 (/48) in one find_node/find_providers reply."""
    requests_per_s: float = 500.0
    """Requests served per second per source /24 (/48); an add_providers costs 1 + keys/8."""
    request_burst: float = 1000.0
    id_proof_cost: float = 10.0
    """Tokens an id_proof request costs its /24: it makes us sign (Ed25519), ~10 ordinary requests' work."""
    proofs_per_s: float = 400.0
    """Id proofs signed per second over all requesters (~5 % of a core): many /24s cannot buy a busy node."""


@dataclass
class DHTStats:
    """Counters of one node's protocol; a lookup's cost is the difference of two snapshots."""

    requests_sent: int = 0
    replies_received: int = 0
    timeouts: int = 0
    bad_replies: int = 0
    dropped_datagrams: int = 0
    requests_served: int = 0
    old_protocol: int = 0
    rate_limited: int = 0
    proofs_sent: int = 0
    proofs_failed: int = 0
    bad_ids: int = 0
    """Ids refused by the cheap filter: not of the sender's network (core.node_id.prefix_matches)."""
    shrunk_replies: int = 0
    max_unproven_ratio: float = 0.0
    """The largest reply/request size ratio sent to an address that had not proven an id."""


def _entry_bytes(entry: object) -> int:
    """An upper bound of a contact's or record's packed size (msgpack, without packing it).

    Fields: ints of at most 5 bytes, a 20-byte id (22 packed), an address string (1 + length).
    """
    if not isinstance(entry, list):
        return 1 << 16
    return 1 + sum(len(f) + 3 if isinstance(f, bytes | str) else 5 for f in entry)


def _fit(entries: list[Any], budget: int) -> list[Any]:
    kept, used = [], 0
    for entry in entries:
        used += _entry_bytes(entry)
        if used > budget:
            break
        kept.append(entry)
    return kept


def shrink_reply(response: object, budget: int) -> bytes:
    """``response`` packed in at most ``budget`` bytes: contacts dropped first, then records.

    A value that does not fit becomes an empty contact list (the requester asks a proven peer or
    pads its request). Sizes are bounded from above without packing, so shrinking costs one pack.

    Raises:
        RemoteProtocolError: even the shortest form does not fit (the request is dropped).
    """
    headers = 12  # array headers of the reply and its lists, 3 bytes each at most
    if isinstance(response, dict):
        response = []
    if isinstance(response, list) and len(response) == 3 and type(response[0]) is int:
        version, records, contacts = response
        records = _fit(records, budget - headers)
        room = budget - headers - sum(_entry_bytes(r) for r in records)
        response = [version, records, _fit(contacts, room)]
    elif isinstance(response, list) and all(isinstance(c, list) for c in response):
        response = _fit(response, budget - headers)
    body: bytes = umsgpack.packb(response)
    if len(body) > budget:
        raise RemoteProtocolError("no reply fits the anti-amplification budget")
    return body
