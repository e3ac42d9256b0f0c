"""DHT provider records and the saved-contacts file: codecs, reply checks, a bounded table.

Pure: values in, values out; time is the ``now`` parameter. The networking lives in p2pmega.net.dht.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import json
import math
import sys
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

from p2pmega.core.ids import NODE_ID_BYTES as NODE_ID_BYTES
from p2pmega.core.node_id import network_of
from p2pmega.errors import RemoteProtocolError

PROVIDER_RECORD_VERSION = 1
"""First element of every provider record on the wire: [1, node_id, ip, port, expires_in]."""

FIND_PROVIDERS_REPLY_VERSION = 1
"""First element of a find_providers reply: [1, [record, ...], [[node_id, ip, port], ...]]."""

CONTACTS_FILE_VERSION = 1
"""The saved-contacts JSON file: {"version": 1, "contacts": [[host, port], ...]}."""

MAX_RECORD_TTL_S = 7 * 86400
"""A recorder never promises more than a week; a longer expires_in in a reply is garbage."""

MAX_CONTACTS_FILE_ENTRIES = 1000
"""A routing table holds a few hundred live contacts; more in the file means the file is bad."""


def is_node_id(value: object) -> TypeGuard[bytes]:
    """True for exactly 20 bytes."""
    return isinstance(value, bytes) and len(value) == NODE_ID_BYTES


def is_port(value: object) -> TypeGuard[int]:
    """True for an int in 1..65535 (bool is not a port)."""
    return type(value) is int and 1 <= value <= 65535


def is_peer_ip(value: object) -> TypeGuard[str]:
    """True for an IPv4/IPv6 literal a peer can live at: no host names, unspecified or multicast."""
    return isinstance(value, str) and len(value) <= 45 and _is_peer_ip_text(value)


@functools.lru_cache(maxsize=4096)
def _is_peer_ip_text(value: str) -> bool:
    # Every contact in every reply is checked, and ipaddress parsing was a fifth of a lookup's CPU
    # (bench/dht.py announce under cProfile); the addresses a node sees repeat, so cache them.
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return not (address.is_unspecified or address.is_multicast or str(address) != value)


@dataclass(frozen=True)
class ProviderRecord:
    """One "node_id holds the chunk, reachable at host:port" record as it travels on the wire."""

    node_id: bytes
    host: str
    port: int
    expires_in: int


def encode_provider_record(record: ProviderRecord) -> list[object]:
    """The wire form: [1, node_id, ip, port, expires_in]."""
    return [PROVIDER_RECORD_VERSION, record.node_id, record.host, record.port, record.expires_in]


def decode_provider_record(raw: object) -> ProviderRecord | None:
    """Decode one wire record; None for a record of a later version (skipped, not an error).

    Raises:
        RemoteProtocolError: the record is not a list, or a version-1 record has a bad field.
    """
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise RemoteProtocolError("provider record is not a versioned list")
    if raw[0] != PROVIDER_RECORD_VERSION:
        return None
    if len(raw) != 5:
        raise RemoteProtocolError("provider record v1 has the wrong length")
    _, node_id, host, port, expires_in = raw
    if not (is_node_id(node_id) and is_peer_ip(host) and is_port(port)):
        raise RemoteProtocolError("provider record v1 has a bad node id, address or port")
    if type(expires_in) is not int or not 0 < expires_in <= MAX_RECORD_TTL_S:
        raise RemoteProtocolError("provider record v1 has a bad expiry")
    return ProviderRecord(node_id, host, port, expires_in)


def decode_contacts(raw: object, *, max_contacts: int) -> list[tuple[bytes, str, int]]:
    """Decode a find_node-style contact list [[node_id, ip, port], ...].

    Raises:
        RemoteProtocolError: not a list, more than ``max_contacts``, or a bad triple.
    """
    if not isinstance(raw, list) or len(raw) > max_contacts:
        raise RemoteProtocolError("contact list is not a list of at most k entries")
    contacts = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3:
            raise RemoteProtocolError("contact is not a [node_id, ip, port] triple")
        node_id, host, port = item
        if not (is_node_id(node_id) and is_peer_ip(host) and is_port(port)):
            raise RemoteProtocolError("contact has a bad node id, address or port")
        contacts.append((node_id, host, port))
    return contacts


def decode_find_providers_reply(
    raw: object, *, max_contacts: int, max_providers: int
) -> tuple[list[ProviderRecord], list[tuple[bytes, str, int]]]:
    """Decode [1, [record, ...], [contact, ...]] into (records, contacts).

    Raises:
        RemoteProtocolError: wrong shape or version, too many entries, or a bad entry.
    """
    if not isinstance(raw, list) or len(raw) != 3 or raw[0] != FIND_PROVIDERS_REPLY_VERSION:
        raise RemoteProtocolError("find_providers reply is not [1, records, contacts]")
    if type(raw[0]) is not int or not isinstance(raw[1], list) or len(raw[1]) > max_providers:
        raise RemoteProtocolError("find_providers reply has too many records")
    records = [r for r in map(decode_provider_record, raw[1]) if r is not None]
    return records, decode_contacts(raw[2], max_contacts=max_contacts)


def format_contacts_file(
    contacts: list[tuple[str, int]], failed: Sequence[tuple[str, int, float]] = ()
) -> str:
    """The saved-contacts file text: {"version": 1, "contacts": [[host, port], ...], "failed": [[host, port,
    when], ...]}; ``failed`` (optional, ignored by readers that predate it) lists contacts whose last call timed
    out, with the Unix time it did."""
    body: dict[str, object] = {
        "version": CONTACTS_FILE_VERSION,
        "contacts": [[h, p] for h, p in contacts],
    }
    if failed:
        body["failed"] = [[h, p, round(at, 3)] for h, p, at in failed[:MAX_CONTACTS_FILE_ENTRIES]]
    return json.dumps(body, separators=(",", ":")) + "\n"


def parse_failed_contacts(text: str) -> list[tuple[str, int, float]]:
    """The ``failed`` entries of a saved-contacts file ([] if it has none); malformed entries are dropped.

    Raises:
        ValueError: not JSON or not version 1.
    """
    body = json.loads(text)
    if not isinstance(body, dict) or body.get("version") != CONTACTS_FILE_VERSION:
        raise ValueError("contacts file is not version 1")
    raw = body.get("failed", [])
    if not isinstance(raw, list):
        return []
    found = []
    for item in raw[:MAX_CONTACTS_FILE_ENTRIES]:
        if (
            isinstance(item, list)
            and len(item) == 3
            and is_peer_ip(item[0])
            and is_port(item[1])
            and isinstance(item[2], int | float)
            and not isinstance(item[2], bool)
            and math.isfinite(item[2])
        ):
            found.append((item[0], item[1], float(item[2])))
    return found


def parse_contacts_file(text: str) -> list[tuple[str, int]]:
    """Parse the saved-contacts file, dropping entries that are not an IP literal and a port.

    Raises:
        ValueError: not JSON, not version 1, or not a list of contacts.
    """
    body = json.loads(text)
    if not isinstance(body, dict) or body.get("version") != CONTACTS_FILE_VERSION:
        raise ValueError("contacts file is not version 1")
    raw = body.get("contacts")
    if not isinstance(raw, list) or len(raw) > MAX_CONTACTS_FILE_ENTRIES:
        raise ValueError("contacts file has no contact list")
    found = []
    for item in raw:
        if isinstance(item, list) and len(item) == 2 and is_peer_ip(item[0]) and is_port(item[1]):
            found.append((item[0], item[1]))
    return found


@dataclass(slots=True)
class _Entry:
    port: int
    expires_at: float
    network: bytes
    stamp: int
    """When the record was last announced, in adds to the table (orders records within a key)."""


@functools.lru_cache(maxsize=4096)
def _network(host: str) -> bytes:
    # Every record of a flood comes from a handful of addresses: parse each once.
    return network_of(host)


@dataclass(frozen=True)
class ProviderLimits:
    """Caps of a ProviderTable, counted per source network (IPv4 /24, IPv6 /48, core.node_id).

    The defaults bound the table to about 95 MB of Python objects (~940 bytes a record when every
    record has its own key, measured with tracemalloc) and one network to a tenth of it.
    """

    max_per_key: int = 64
    max_per_key_per_network: int = 4
    max_per_network: int = 10_000
    max_total: int = 100_000


Slot = tuple[bytes, bytes, str]
"""(key, node_id, host): one record's place in the table."""


class ProviderTable:
    """Provider records a node keeps for others: bounded per key, per source network and in total.

    A record is keyed by (key, node_id, host): host is the address the recorder observed, so a peer
    claiming another node's id from its own address cannot overwrite that node's record.

    Full never means "refuse everything new" (issue 16: a flood from 3 addresses filled every
    table): a network at its cap, or a key at its per-network cap, makes room by dropping that
    network's own least recently announced record; a full table drops the oldest record of the
    network that holds the most; a full key drops the oldest record, under that key, of the
    network that holds the most of it. Only a newcomer whose network already holds the most
    records of a full key is refused.
    """

    def __init__(self, *, ttl_s: float, limits: ProviderLimits | None = None) -> None:
        self.ttl_s = ttl_s
        self.limits = limits or ProviderLimits()
        self._by_key: dict[bytes, dict[tuple[bytes, str], _Entry]] = {}
        # Each network's records, least recently announced first (the eviction order).
        self._by_network: dict[bytes, OrderedDict[Slot, None]] = {}
        # Lazy max-heap of (-records, network): an item is current only if its count still holds.
        self._largest: list[tuple[int, bytes]] = []
        self._expiry: list[tuple[float, bytes, bytes, str]] = []
        self._total = 0
        self._stamp = 0
        self.evicted = 0
        """Records dropped to make room (not counting expiry)."""

    def __len__(self) -> int:
        return self._total

    def network_count(self, host: str) -> int:
        """How many records the network of ``host`` holds."""
        return len(self._by_network.get(_network(host), ()))

    def add(self, key: bytes, node_id: bytes, host: str, port: int, *, now: float) -> bool:
        """Record or refresh that ``node_id`` at ``host``:``port`` holds ``key``.

        Returns:
            True if recorded (maybe in place of an older record, see the class docstring);
            False only if ``key`` is full and ``host``'s network already holds the most of it.
        """
        self.expire(now=now)
        records = self._by_key.get(key, {})
        entry = records.get((node_id, host))
        expires_at = now + self.ttl_s
        self._stamp += 1
        if entry is None:
            network = _network(host)
            if not self._make_room(key, records, network):
                return False
            host = sys.intern(host)  # a flood repeats a few addresses: one string each
            entry = _Entry(port, expires_at, network, self._stamp)
            self._by_key.setdefault(key, records)[(node_id, host)] = entry
            self._by_network.setdefault(network, OrderedDict())[(key, node_id, host)] = None
            self._total += 1
            self._note_count(network)
        else:
            self._by_network[entry.network].move_to_end((key, node_id, host))
        entry.port, entry.expires_at, entry.stamp = port, expires_at, self._stamp
        heapq.heappush(self._expiry, (expires_at, key, node_id, host))
        if len(self._expiry) > 2 * self._total + 1024:
            self._rebuild_expiry()
        return True

    def _make_room(
        self, key: bytes, records: dict[tuple[bytes, str], _Entry], network: bytes
    ) -> bool:
        limits = self.limits
        # A key has at most max_per_key records: counting them is cheaper than an index of its own.
        mine_here = sum(1 for e in records.values() if e.network == network)
        if mine_here >= limits.max_per_key_per_network:
            self._drop_oldest_in_key(key, records, network)
        elif len(records) >= limits.max_per_key:
            per_network = Counter(e.network for e in records.values())
            biggest, most = per_network.most_common(1)[0]
            if most <= mine_here:
                return False
            self._drop_oldest_in_key(key, records, biggest)
        mine = self._by_network.get(network)
        if mine is not None and len(mine) >= limits.max_per_network:
            self._drop(*next(iter(mine)))
            self.evicted += 1
        elif self._total >= limits.max_total:
            self._drop(*next(iter(self._by_network[self._largest_network()])))
            self.evicted += 1
        return True

    def _drop_oldest_in_key(
        self, key: bytes, records: dict[tuple[bytes, str], _Entry], network: bytes
    ) -> None:
        # At most max_per_key records to scan.
        mine = [(e.stamp, n, h) for (n, h), e in records.items() if e.network == network]
        _, node_id, host = min(mine)
        self._drop(key, node_id, host)
        self.evicted += 1

    def _largest_network(self) -> bytes:
        while True:
            count, network = self._largest[0]
            if len(self._by_network.get(network, ())) == -count:
                return network
            heapq.heappop(self._largest)

    def _note_count(self, network: bytes) -> None:
        heapq.heappush(self._largest, (-len(self._by_network.get(network, ())), network))
        if len(self._largest) > 2 * len(self._by_network) + 1024:
            self._largest = [(-len(o), n) for n, o in self._by_network.items()]
            heapq.heapify(self._largest)

    def _drop(self, key: bytes, node_id: bytes, host: str) -> None:
        records = self._by_key[key]
        entry = records.pop((node_id, host))
        if not records:
            del self._by_key[key]
        order = self._by_network[entry.network]
        del order[(key, node_id, host)]
        if not order:
            del self._by_network[entry.network]
        self._total -= 1
        self._note_count(entry.network)

    def get(self, key: bytes, *, now: float) -> list[ProviderRecord]:
        """The unexpired records of ``key``, each with its remaining lifetime (at least 1 s)."""
        return [
            ProviderRecord(node_id, host, e.port, max(1, int(e.expires_at - now)))
            for (node_id, host), e in self._by_key.get(key, {}).items()
            if e.expires_at > now
        ]

    def expire(self, *, now: float) -> int:
        """Drop every record whose expiry is at or before ``now``; returns how many were dropped."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, key, node_id, host = heapq.heappop(self._expiry)
            records = self._by_key.get(key)
            entry = records.get((node_id, host)) if records else None
            if entry is None or entry.expires_at != expires_at:
                continue  # refreshed later (a newer heap item stands for it) or evicted
            self._drop(key, node_id, host)
            dropped += 1
        return dropped

    def _rebuild_expiry(self) -> None:
        self._expiry = [
            (e.expires_at, key, node_id, host)
            for key, records in self._by_key.items()
            for (node_id, host), e in records.items()
        ]
        heapq.heapify(self._expiry)
