"""Address to country: an operator's CIDR override table first, then the registry data of iptocc.

Pure lookups on strings and values: no sockets, no DNS, no files (the config layer reads the file).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

import iptocc

from p2pmega.errors import BadGeoTable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The marker a table line uses to force "unknown country" for a range (for example a VPN exit range
# registered in one country but operated from anywhere).
UNKNOWN_MARKER = "--"

# Registry codes that name no single jurisdiction: RIR delegation files use EU and AP for
# pan-European and Asia-Pacific blocks, and ZZ is ISO 3166's user-assigned "unknown". A holder
# placed under one of them proves nothing about where the data sits, so they count as unknown.
NON_COUNTRY_CODES = frozenset({"EU", "AP", "ZZ"})


def _is_country_code(code: str) -> bool:
    """True for exactly two upper-case ASCII letters (the ISO 3166-1 alpha-2 shape)."""
    return len(code) == 2 and code.isascii() and code.isalpha() and code.isupper()


@dataclass(frozen=True)
class GeoTable:
    """A parsed override table: networks mapped to a country code, or to None for "unknown".

    Attributes:
        entries: ``(network, country)`` pairs in file order; ``country`` is None for a ``--`` line.
    """

    entries: tuple[tuple[IPNetwork, str | None], ...] = ()
    # Longest-prefix index: IP version -> prefix lengths, longest first, and
    # (version, prefix length) -> {network address as int: country}. A lookup costs one dict probe
    # per distinct prefix length in the table instead of a scan over every line.
    _lengths: dict[int, tuple[int, ...]] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )
    _index: dict[tuple[int, int], dict[int, str | None]] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        index: dict[tuple[int, int], dict[int, str | None]] = {}
        for network, country in self.entries:
            index.setdefault((network.version, network.prefixlen), {})[
                int(network.network_address)
            ] = country
        lengths: dict[int, tuple[int, ...]] = {}
        for version in (4, 6):
            lengths[version] = tuple(
                sorted((plen for v, plen in index if v == version), reverse=True)
            )
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_lengths", lengths)

    def lookup(self, address: IPAddress) -> tuple[bool, str | None]:
        """The longest-prefix match for ``address``.

        Args:
            address: an already unwrapped address (IPv4-mapped IPv6 given as IPv4).

        Returns:
            ``(True, country)`` if a line covers the address (``country`` None for ``--``),
            ``(False, None)`` if none does.
        """
        value = int(address)
        bits = address.max_prefixlen
        for plen in self._lengths.get(address.version, ()):
            mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
            networks = self._index[(address.version, plen)]
            key = value & mask
            if key in networks:
                return True, networks[key]
        return False, None


def _parse_entry(cidr: str, code: str) -> tuple[IPNetwork, str | None]:
    """One table line's range and country.

    Raises:
        ValueError: what is wrong with the line, in words for the user.
    """
    if "%" in cidr:
        raise ValueError(f"zone id in {cidr!r}; ranges take no zone id, remove the %... part")
    try:
        network = ipaddress.ip_network(cidr)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(cidr, strict=False)
            raise ValueError(f"{cidr!r} has host bits set, did you mean {fixed}?") from None
        raise ValueError(f"{cidr!r} is not an IPv4 or IPv6 address or CIDR range") from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        raise ValueError(f"{cidr!r} is an IPv4-mapped range; write it as an IPv4 range")
    if code == UNKNOWN_MARKER:
        return network, None
    country = code.upper()
    if not _is_country_code(country):
        raise ValueError(f"{code!r} is not a two-letter country code or {UNKNOWN_MARKER!r}")
    if country in NON_COUNTRY_CODES:
        raise ValueError(f"{code!r} names no single country; use {UNKNOWN_MARKER!r} for unknown")
    return network, country


def parse_geo_table(text: str, source: str = "<table>") -> GeoTable:
    """Parse an override table: one ``CIDR CC`` per line, ``#`` starts a comment.

    ``CC`` is a two-letter country code (either case; stored upper-case) or ``--`` for "unknown
    country". A bare address means a single host (/32 or /128). When ranges nest, the longest prefix
    wins at lookup time. Lines are rejected rather than guessed at: host bits set, zone ids,
    IPv4-mapped IPv6 ranges (addresses are unwrapped to IPv4 before lookup, so such a line would
    never match), the non-country codes EU/AP/ZZ, and the same range listed twice.

    Args:
        text: the whole table.
        source: a name for messages, usually the file path.

    Returns:
        The parsed table.

    Raises:
        BadGeoTable: a line is malformed; the message reads ``source:line: what is wrong``.
    """
    entries: list[tuple[IPNetwork, str | None]] = []
    first_line: dict[IPNetwork, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        try:
            if not fields:
                continue
            if len(fields) == 1:
                raise ValueError(f"missing country code after {fields[0]!r} (write 'CIDR CC')")
            if len(fields) > 2:
                raise ValueError(f"expected 'CIDR CC', got {len(fields)} fields")
            network, country = _parse_entry(fields[0], fields[1])
            if network in first_line:
                raise ValueError(f"{network} is already listed on line {first_line[network]}")
        except ValueError as exc:
            raise BadGeoTable(f"{source}:{number}: {exc}; fix or remove the line") from None
        first_line[network] = number
        entries.append((network, country))
    return GeoTable(entries=tuple(entries))


# Cached: the same peers' addresses are judged again for every chunk and every crawl (share spent more time here
# than on its DHT crawls for a 1 KiB file).
@functools.lru_cache(maxsize=4096)
def parse_address(address: str) -> IPAddress | None:
    """The address a socket reported, with the zone id dropped and ``::ffff:a.b.c.d`` unwrapped.

    Args:
        address: an address as a socket gives it, e.g. ``fe80::1%eth0`` or ``::ffff:8.8.8.8``.

    Returns:
        The address, or None if ``address`` is not an IP address (a host name, garbage, empty).
    """
    bare = address.strip().split("%", 1)[0]
    try:
        parsed = ipaddress.ip_address(bare)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def _is_public(address: IPAddress) -> bool:
    """False for loopback, private, link-local, CGNAT, documentation, multicast, reserved space."""
    return address.is_global and not address.is_multicast and not address.is_reserved


def country_of(address: str, table: GeoTable | None = None) -> str | None:
    """The registry country of an address we actually connect to, or None if unknown.

    Order: the override ``table`` (longest prefix; a ``--`` line answers None); then any non-public
    address (loopback, private, link-local, CGNAT, multicast, reserved) is unknown; then iptocc's
    registry data, where ``EU``, ``AP``, ``ZZ`` and no answer are unknown.

    A string that is not an IP address (a host name, garbage) is unknown rather than an error: this
    function judges what a socket reported, and an unknown country never counts toward placement,
    which is the safe outcome. Resolve names before calling.

    Args:
        address: an IPv4 or IPv6 address, optionally with a zone id or in IPv4-mapped form.
        table: operator overrides, consulted first.

    Returns:
        An upper-case ISO 3166-1 alpha-2 code, or None.
    """
    parsed = parse_address(address)
    if parsed is None:
        return None
    if table is not None:
        found, country = table.lookup(parsed)
        if found:
            return country
    if not _is_public(parsed):
        return None
    code = iptocc.country_code(str(parsed))
    if code is None:
        return None
    code = code.upper()
    if not _is_country_code(code) or code in NON_COUNTRY_CODES:
        return None
    return code
