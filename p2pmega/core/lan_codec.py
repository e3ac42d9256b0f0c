"""The LAN announcement datagram and its rate limiter, as pure values and functions.

No sockets, clock or tasks here: net/lan.py does the I/O and passes time in as ``now``.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from p2pmega.core.ids import NODE_ID_BYTES
from p2pmega.errors import RemoteProtocolError

# Byte layout, version 1 (docs/LAN.md has the table):
#   0..10  magic b"P2PMEGA-LSD"    11 bytes; other traffic on the port is dropped at once
#   11     version                 1 byte; a receiver drops versions it does not know
#   12..31 node id                 20 bytes, informative only: it is not authenticated
#   32..33 DHT UDP port            u16 big-endian, 1..65535
#   34..41 cookie                  8 random bytes per LANDiscovery, so a node ignores its own echo
LSD_MAGIC = b"P2PMEGA-LSD"
LSD_VERSION = 1
COOKIE_BYTES = 8
_BODY = struct.Struct(f">{NODE_ID_BYTES}sH{COOKIE_BYTES}s")
ANNOUNCEMENT_BYTES = len(LSD_MAGIC) + 1 + _BODY.size

_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True)
class Announcement:
    """One decoded LAN announcement; the host is never in it, receivers use the source address."""

    node_id: bytes
    dht_port: int
    cookie: bytes

    def __post_init__(self) -> None:
        if len(self.node_id) != NODE_ID_BYTES:
            raise ValueError(f"node id must be {NODE_ID_BYTES} bytes, got {len(self.node_id)}")
        if not 1 <= self.dht_port <= 0xFFFF:
            raise ValueError(f"DHT port must be in 1..65535, got {self.dht_port}")
        if len(self.cookie) != COOKIE_BYTES:
            raise ValueError(f"cookie must be {COOKIE_BYTES} bytes, got {len(self.cookie)}")


def encode_announcement(announcement: Announcement) -> bytes:
    """Encode ``announcement`` as the version-1 datagram (always ``ANNOUNCEMENT_BYTES`` long)."""
    body = _BODY.pack(announcement.node_id, announcement.dht_port, announcement.cookie)
    return LSD_MAGIC + bytes([LSD_VERSION]) + body


def decode_announcement(data: bytes) -> Announcement:
    """Decode a datagram received on the LAN discovery port.

    Args:
        data: the whole datagram, untrusted.

    Returns:
        The announcement.

    Raises:
        RemoteProtocolError: wrong magic, unknown version, wrong length or port 0.
    """
    if not data.startswith(LSD_MAGIC):
        raise RemoteProtocolError("LAN datagram without the P2PMEGA-LSD magic")
    if len(data) <= len(LSD_MAGIC):
        raise RemoteProtocolError("LAN datagram truncated before its version byte")
    version = data[len(LSD_MAGIC)]
    if version != LSD_VERSION:
        raise RemoteProtocolError(f"LAN datagram has unknown version {version}")
    if len(data) != ANNOUNCEMENT_BYTES:
        raise RemoteProtocolError(
            f"LAN datagram is {len(data)} bytes, version 1 is {ANNOUNCEMENT_BYTES}"
        )
    node_id, dht_port, cookie = _BODY.unpack_from(data, len(LSD_MAGIC) + 1)
    if dht_port == 0:
        raise RemoteProtocolError("LAN datagram announces DHT port 0")
    return Announcement(node_id=node_id, dht_port=dht_port, cookie=cookie)


def check_source_host(host: str) -> None:
    """Check that a datagram's source address can be a peer: a unicast IPv4 address.

    Raises:
        RemoteProtocolError: not IPv4, or unspecified, multicast or broadcast.
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise RemoteProtocolError(f"LAN datagram from non-IPv4 source {host!r}") from None
    if address.is_unspecified or address.is_multicast or host == "255.255.255.255":
        raise RemoteProtocolError(f"LAN datagram from non-unicast source {host}")


class Verdict(enum.Enum):
    """What to do with an announcement that decoded fine."""

    REPORT = "report"  # a peer not reported in the current window: hand it to on_peer
    DUPLICATE = "duplicate"  # this (host, port) was reported less than a window ago
    RATE_LIMITED = "rate-limited"  # its source sent more than max_per_source in this window
    FULL = "full"  # the limiter's tables are full of live entries: drop it


class AnnouncementLimiter:
    """Per-source and per-peer rate limits for received announcements; memory is bounded.

    A window is ``window_s`` long. A source host gets at most ``max_per_source`` announcements per
    window (the rest are RATE_LIMITED), and each (host, port) is REPORTed at most once per window.
    Each table holds at most ``max_entries`` hosts or peers; expired entries are purged when full.
    """

    def __init__(self, *, window_s: float, max_per_source: int, max_entries: int) -> None:
        if window_s <= 0 or max_per_source < 1 or max_entries < 1:
            raise ValueError("window_s, max_per_source and max_entries must be positive")
        self._window_s = window_s
        self._max_per_source = max_per_source
        self._max_entries = max_entries
        self._sources: dict[str, tuple[float, int]] = {}  # host -> (window start, count)
        self._reported: dict[tuple[str, int], float] = {}  # (host, port) -> reported at

    def admit(self, host: str, port: int, *, now: float) -> Verdict:
        """Count one announcement from ``host`` announcing ``port`` at loop time ``now``."""
        started_count = self._sources.get(host)
        if started_count is None or now - started_count[0] >= self._window_s:
            if started_count is None and not self._make_room(self._sources, now, _source_start):
                return Verdict.FULL
            started_count = (now, 0)
        started, count = started_count
        self._sources[host] = (started, count + 1)
        if count + 1 > self._max_per_source:
            return Verdict.RATE_LIMITED
        peer = (host, port)
        reported_at = self._reported.get(peer)
        if reported_at is not None and now - reported_at < self._window_s:
            return Verdict.DUPLICATE
        if reported_at is None and not self._make_room(self._reported, now, _reported_at):
            return Verdict.FULL
        self._reported[peer] = now
        return Verdict.REPORT

    def forget(self, host: str, port: int) -> None:
        """Undo a REPORT that could not be delivered, so the next announcement is reported again."""
        self._reported.pop((host, port), None)

    def _make_room(self, table: dict[_K, _V], now: float, since: Callable[[_V], float]) -> bool:
        """Purge entries older than a window if ``table`` is full; True if there is room now."""
        if len(table) < self._max_entries:
            return True
        for stale in [k for k, v in table.items() if now - since(v) >= self._window_s]:
            del table[stale]
        return len(table) < self._max_entries


def _source_start(value: tuple[float, int]) -> float:
    return value[0]


def _reported_at(value: float) -> float:
    return value
