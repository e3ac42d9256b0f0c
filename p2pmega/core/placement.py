"""Country-diverse placement of chunk copies: which peers hold a chunk, what to add after a loss.

Pure: candidates (countries already resolved by core.geo) in, holders out. No network, no clock.

The order: weighted rendezvous (highest-random-weight) hashing. Each candidate scores
``weight / -ln(u)`` with ``u`` a uniform hash of the chunk's DHT key and its node id; the rule below
takes the first valid set in descending score. Every peer gets its weight's share of the chunks
(XOR closeness gave the busiest of 200 peers 2.6-3.5x the mean load, bench/placement.py), and when a
peer leaves or joins only the chunks it held, or now wins, move.

The rule: ``replicas`` holders on pairwise distinct networks (an IPv4 /24 or an IPv6 /48, so one
hosting provider's rack or one household cannot hold two copies) spanning at least ``min_countries``
distinct known countries. Unknown-country holders may hold copies but never count toward countries.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from p2pmega.core.ids import CHUNK_ID_BYTES, NODE_ID_BYTES, dht_key_of, short_id
from p2pmega.core.words import counted
from p2pmega.errors import BadOption, PlacementImpossible

# New holders considered by the exhaustive part of plan_repair. Repairs are small (usually one or two
# copies), and 16 candidates keep the search to a few hundred placement walks.
REPAIR_SEARCH_CANDIDATES = 16

DEFAULT_REPLICAS = 2
DEFAULT_MIN_COUNTRIES = 2
# Prefix lengths that approximate "one operator": /24 (IPv4) and /48 (IPv6) are the longest prefixes
# generally accepted in the global BGP table, so one site or small customer sits inside one of each.
IPV4_NETWORK_PREFIX = 24
IPV6_NETWORK_PREFIX = 48


@dataclass(frozen=True)
class Candidate:
    """A peer that could hold a chunk.

    Attributes:
        node_id: the peer's 20-byte DHT node id.
        host: the IP address we actually connect to (as observed, never as claimed).
        port: its chunk-transfer port.
        country: its upper-case ISO country code from core.geo.country_of, or None if unknown.
        weight: its share of new chunks relative to others (free capacity); 1.0 unless known.

    Raises:
        ValueError: a field is malformed; that is a bug in the caller, not a user error.
    """

    node_id: bytes
    host: str
    port: int
    country: str | None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if len(self.node_id) != NODE_ID_BYTES:
            raise ValueError(f"node id has {len(self.node_id)} bytes, expected {NODE_ID_BYTES}")
        _network_of(self.host)
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} of {self.host} is not in 1..65535")
        country = self.country
        if country is not None and not (
            len(country) == 2 and country.isascii() and country.isalpha() and country.isupper()
        ):
            raise ValueError(f"country {country!r} of {self.host} is not an upper-case ISO code")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight {self.weight!r} of {self.host} is not a positive number")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def label(self) -> str:
        """``host:port`` as people read it (``[v6]:port`` for IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# Cached: share places every chunk, and parsing the same few hosts again for each one was a fifth of the
# share command's CPU (py-spy, 256 MiB to 8 seeds).
@functools.lru_cache(maxsize=4096)
def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``host`` without a zone id and with ``::ffff:a.b.c.d`` unwrapped, as core.geo reads it."""
    try:
        parsed = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ValueError(f"host {host!r} is not an IP address; pass the observed address") from None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def _network_of(host: str) -> IPNetwork:
    """The /24 or /48 that ``host`` lives in: two holders may never share one."""
    address = _address(host)
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv4Network((address, IPV4_NETWORK_PREFIX), strict=False)
    return ipaddress.IPv6Network((address, IPV6_NETWORK_PREFIX), strict=False)


@functools.lru_cache(maxsize=4096)
def _canonical_host(host: str) -> str:
    return str(_address(host))


def _endpoint(candidate: Candidate) -> tuple[str, int]:
    return _canonical_host(candidate.host), candidate.port


def _check_rule(replicas: int, min_countries: int) -> None:
    if replicas < 1:
        raise BadOption(f"replicas must be at least 1, got {replicas}; pass --replicas 1 or more")
    if not 1 <= min_countries <= replicas:
        raise BadOption(
            f"min countries must be between 1 and replicas ({replicas}), got {min_countries};"
            " lower --min-countries or raise --replicas"
        )


_SCORE_PERSON = b"p2pmega-hrw"


def rendezvous_score(chunk_id: bytes, node_id: bytes, weight: float = 1.0) -> float:
    """A peer's weighted rendezvous score for a chunk: higher is chosen first.

    ``weight / -ln(u)``, ``u`` in (0, 1) from BLAKE2b of the chunk's DHT key XOR the node id: the
    logarithmic method of weighted rendezvous hashing, under which each peer is first for a share of
    keys proportional to its weight.

    Args:
        chunk_id: the 32-byte chunk id (only its DHT key, the first 20 bytes, counts).
        node_id: the peer's 20-byte node id.
        weight: the peer's positive weight.

    Returns:
        The score, a positive float.
    """
    return _score(int.from_bytes(dht_key_of(chunk_id), "big"), node_id, weight)


def _score(key: int, node_id: bytes, weight: float) -> float:
    mixed = (key ^ int.from_bytes(node_id, "big")).to_bytes(NODE_ID_BYTES, "big")
    digest = hashlib.blake2b(mixed, digest_size=8, person=_SCORE_PERSON).digest()
    return weight / -math.log((int.from_bytes(digest, "big") + 1) / (2**64 + 1))


def _in_order(chunk_id: bytes, candidates: Iterable[Candidate]) -> list[Candidate]:
    """Candidates in placement order (highest rendezvous score first), duplicates collapsed, total.

    Ties (same node id and weight, hence same score) break on host, port and country, so the result
    does not depend on the input order. A candidate whose node id or host:port was already seen
    earlier is dropped: one peer is one holder however many times the DHT reported it.
    """
    key = int.from_bytes(dht_key_of(chunk_id), "big")

    def sort_key(c: Candidate) -> tuple[float, str, int, str]:
        return (
            -_score(key, c.node_id, c.weight),
            _endpoint(c)[0],
            c.port,
            c.country or "",
        )

    unique: list[Candidate] = []
    seen_ids: set[bytes] = set()
    seen_endpoints: set[tuple[str, int]] = set()
    for candidate in sorted(set(candidates), key=sort_key):
        endpoint = _endpoint(candidate)
        if candidate.node_id in seen_ids or endpoint in seen_endpoints:
            continue
        seen_ids.add(candidate.node_id)
        seen_endpoints.add(endpoint)
        unique.append(candidate)
    return unique


def _unique(holders: Iterable[Candidate]) -> list[Candidate]:
    """Holders with duplicates (same node id or host:port) collapsed, in a canonical order."""
    return _in_order(bytes(CHUNK_ID_BYTES), holders)


def _max_country_matching(pool: Iterable[Candidate], *, limit: int) -> int:
    """How many pool members (up to ``limit``) can have distinct known countries and networks.

    A maximum bipartite matching between countries and networks (Kuhn's augmenting paths); each
    known-country candidate is an edge. Stops once ``limit`` is reached: callers only need to know
    whether enough countries can be covered.
    """
    edges: dict[str, list[IPNetwork]] = {}
    for c in pool:
        if c.country is not None:
            networks = edges.setdefault(c.country, [])
            network = _network_of(c.host)
            if network not in networks:
                networks.append(network)
    owner: dict[IPNetwork, str] = {}

    def augment(country: str, visited: set[IPNetwork]) -> bool:
        for network in edges[country]:
            if network in visited:
                continue
            visited.add(network)
            if network not in owner or augment(owner[network], visited):
                owner[network] = country
                return True
        return False

    size = 0
    for country in sorted(edges):
        if size >= limit:
            break
        if augment(country, set()):
            size += 1
    return size


def _extendable(
    chosen: Sequence[Candidate], rest: Sequence[Candidate], replicas: int, min_countries: int
) -> bool:
    """Can ``chosen`` (on distinct networks) grow, using only ``rest``, into a valid placement?

    It can exactly when (a) ``rest`` has enough members on networks ``chosen`` does not use to
    reach ``replicas`` holders, and (b) the countries still missing can be covered by members of
    ``rest`` with distinct new countries on distinct free networks (a matching), and there is room
    for them. Sufficiency: take the matched members, then fill up from the other free networks.
    """
    need = replicas - len(chosen)
    if need < 0:
        return False
    taken = {_network_of(c.host) for c in chosen}
    countries = {c.country for c in chosen if c.country is not None}
    missing = max(0, min_countries - len(countries))
    if missing > need:
        return False
    free = [c for c in rest if _network_of(c.host) not in taken]
    if len({_network_of(c.host) for c in free}) < need:
        return False
    if missing == 0:
        return True
    new_country = [c for c in free if c.country is not None and c.country not in countries]
    return _max_country_matching(new_country, limit=missing) >= missing


def _greedy(
    ordered: Sequence[Candidate], replicas: int, min_countries: int
) -> list[Candidate] | None:
    """The first valid placement in ``ordered`` order, lexicographically, or None if there is none.

    Walks ``ordered`` and keeps a member whenever the kept set can still be completed from the
    members after it (``_extendable``). Why this never misses a valid placement: the empty set is
    extendable iff one exists; each step keeps the invariant "kept is extendable from what follows";
    and a member that was skipped can never be part of a completion later, because a superset of a
    non-extendable set is not extendable either. So the walk ends with ``replicas`` members, and
    it is the valid set whose members come earliest in the order.
    """
    if not _extendable([], ordered, replicas, min_countries):
        return None
    chosen: list[Candidate] = []
    networks: set[IPNetwork] = set()
    countries: set[str] = set()
    for index, candidate in enumerate(ordered):
        if len(chosen) == replicas:
            break
        network = _network_of(candidate.host)
        if network in networks:
            continue
        # Once enough countries are in, any member on a free network keeps the set extendable:
        # removing one network from the free ones still leaves enough for the smaller remainder.
        if len(countries) < min_countries and not _extendable(
            [*chosen, candidate], ordered[index + 1 :], replicas, min_countries
        ):
            continue
        chosen.append(candidate)
        networks.add(network)
        if candidate.country is not None:
            countries.add(candidate.country)
    return chosen


def _impossible(
    chunk_id: bytes, pool: Sequence[Candidate], replicas: int, min_countries: int, what: str
) -> PlacementImpossible:
    countries = sorted({c.country for c in pool if c.country is not None})
    unknown = sum(1 for c in pool if c.country is None)
    networks = len({_network_of(c.host) for c in pool})
    listed = ", ".join(countries) if countries else "none"
    return PlacementImpossible(
        f"cannot {what} chunk {short_id(chunk_id)}: need {counted(replicas, 'holder')} on distinct /24 or"
        f" /48 networks in {counted(min_countries, 'country', 'countries')}, but"
        f" {counted(len(pool), 'peer')} span countries {listed} ({unknown} unknown) on"
        f" {counted(networks, 'network')}; add peers in other countries or lower --min-countries"
    )


@dataclass(frozen=True)
class PoolSummary:
    """What a set of peers offers towards the rule, so a caller can say what is missing in its own words.

    Attributes:
        peers: distinct peers (same node id or host:port counts once).
        networks: distinct /24 (IPv4) or /48 (IPv6) networks among them: the most holders one chunk can have.
        countries: the distinct known countries, sorted.
        unknown: peers whose country is unknown (they never count as a country).
        max_countries: the most known countries one placement can span (each holder on its own network).
    """

    peers: int
    networks: int
    countries: tuple[str, ...]
    unknown: int
    max_countries: int

    def short_of_holders(self, replicas: int) -> bool:
        """Too few distinct networks for ``replicas`` holders: lowering --replicas (or more peers) helps."""
        return self.networks < replicas

    def short_of_countries(self, min_countries: int) -> bool:
        """Too few known countries on distinct networks: lowering --min-countries (or a geo table) helps."""
        return self.max_countries < min_countries


def summarize(peers: Iterable[Candidate]) -> PoolSummary:
    """Count what ``peers`` offer towards the rule: networks, known countries, unknown ones.

    Args:
        peers: candidates or holders; duplicates (same node id or host:port) count once.

    Returns:
        The counts; ``meets_rule`` decides, this only explains.
    """
    unique = _unique(peers)
    countries = tuple(sorted({c.country for c in unique if c.country is not None}))
    return PoolSummary(
        peers=len(unique),
        networks=len({_network_of(c.host) for c in unique}),
        countries=countries,
        unknown=sum(1 for c in unique if c.country is None),
        max_countries=_max_country_matching(unique, limit=len(countries)),
    )


Blocs = Mapping[str, str]
"""Country code -> the name of its jurisdiction bloc (core.blocs.BlocTable.mapping); unlisted countries are
their own bloc. Given to the functions below, the rule counts blocs where it counted countries."""


class _InBlocs:
    """Candidates relabelled so that countries of one bloc share one code (the bloc's first member), and back."""

    def __init__(self, blocs: Blocs | None) -> None:
        self.code: dict[str, str] = {}
        if blocs:
            first: dict[str, str] = {}
            for country, bloc in blocs.items():
                first[bloc] = min(first.get(bloc, country), country)
            self.code = {country: first[bloc] for country, bloc in blocs.items()}
        self.original: dict[Candidate, Candidate] = {}

    def __call__(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        if not self.code:
            return list(candidates)
        out = []
        for c in candidates:
            twin = c
            if c.country is not None and self.code.get(c.country, c.country) != c.country:
                twin = dataclasses.replace(c, country=self.code[c.country])
            self.original.setdefault(twin, c)
            out.append(twin)
        return out

    def back(self, holders: Iterable[Candidate]) -> list[Candidate]:
        return [self.original.get(h, h) for h in holders]


def choose_holders(
    chunk_id: bytes,
    candidates: Sequence[Candidate],
    *,
    replicas: int = DEFAULT_REPLICAS,
    min_countries: int = DEFAULT_MIN_COUNTRIES,
    blocs: Blocs | None = None,
) -> list[Candidate]:
    """Pick the holders of a chunk: the first peers in rendezvous order that meet the rule.

    The order is ``rendezvous_score`` of the chunk's DHT key (``chunk_id[:20]``) and each node id,
    weighted. The result is the valid set whose members come first (lexicographically in that
    order), found whenever any valid set exists; it is the same for the same candidates in any order.

    Args:
        chunk_id: the 32-byte chunk id.
        candidates: peers to choose from; duplicates (same node id or host:port) count once.
        replicas: how many holders to return.
        min_countries: how many distinct known countries (with ``blocs``: blocs) they must span.
        blocs: count jurisdiction blocs instead of countries.

    Returns:
        Exactly ``replicas`` holders, first in placement order first, on pairwise distinct /24 or /48
        networks.

    Raises:
        BadOption: ``replicas`` < 1 or ``min_countries`` not in 1..replicas.
        PlacementImpossible: no subset of the candidates meets the rule; the message lists the
            countries that were available.
    """
    _check_rule(replicas, min_countries)
    relabel = _InBlocs(blocs)
    ordered = _in_order(chunk_id, relabel(candidates))
    chosen = _greedy(ordered, replicas, min_countries)
    if chosen is None:
        raise _impossible(chunk_id, relabel.back(ordered), replicas, min_countries, "place")
    return relabel.back(chosen)


def meets_rule(
    holders: Iterable[Candidate],
    *,
    replicas: int = DEFAULT_REPLICAS,
    min_countries: int = DEFAULT_MIN_COUNTRIES,
    blocs: Blocs | None = None,
) -> bool:
    """Whether some of ``holders`` form a valid placement.

    Extra copies never hurt: a chunk held by three peers, two of them in one /24, meets the rule if
    ``replicas`` of them on distinct networks span ``min_countries`` known countries.

    Args:
        holders: the peers that hold the chunk; duplicates count once.
        replicas: how many holders on distinct networks are needed.
        min_countries: how many distinct known countries (with ``blocs``: blocs) they must span.
        blocs: count jurisdiction blocs instead of countries.

    Returns:
        True if the rule is met.

    Raises:
        BadOption: ``replicas`` < 1 or ``min_countries`` not in 1..replicas.
    """
    _check_rule(replicas, min_countries)
    return _extendable([], _unique(_InBlocs(blocs)(holders)), replicas, min_countries)


def plan_repair(
    chunk_id: bytes,
    live_holders: Sequence[Candidate],
    candidates: Sequence[Candidate],
    *,
    replicas: int = DEFAULT_REPLICAS,
    min_countries: int = DEFAULT_MIN_COUNTRIES,
    blocs: Blocs | None = None,
) -> list[Candidate]:
    """New holders to add so that the live holders plus them meet the rule again.

    Adds the fewest new holders possible, and among repairs of that size the first in placement
    order. The walk of ``choose_holders`` over the live holders first, then the other candidates,
    finds a repair whenever one exists (the argument in ``_greedy``) but not always the smallest:
    live holders that share a network can crowd out a live holder of another country (a case
    hypothesis found). So that walk only gives the upper bound; smaller sets of new holders are then
    tried exhaustively, in placement order, among the first ``REPAIR_SEARCH_CANDIDATES`` (see
    ``_smallest_repair``).

    Args:
        chunk_id: the 32-byte chunk id.
        live_holders: peers that still answer for the chunk.
        candidates: peers that could take a copy; live holders among them are ignored.
        replicas: the rule's number of holders.
        min_countries: the rule's number of distinct known countries (with ``blocs``: blocs).
        blocs: count jurisdiction blocs instead of countries.

    Returns:
        New holders to copy the chunk to, in placement order; ``[]`` if the live holders meet the rule.

    Raises:
        BadOption: ``replicas`` < 1 or ``min_countries`` not in 1..replicas.
        PlacementImpossible: live holders and candidates together cannot meet the rule.
    """
    _check_rule(replicas, min_countries)
    relabel = _InBlocs(blocs)
    live = _in_order(chunk_id, relabel(live_holders))
    if _extendable([], live, replicas, min_countries):
        return []
    live_ids = {c.node_id for c in live}
    live_endpoints = {_endpoint(c) for c in live}
    fresh = [
        c
        for c in _in_order(chunk_id, relabel(candidates))
        if c.node_id not in live_ids and _endpoint(c) not in live_endpoints
    ]
    chosen = _greedy([*live, *fresh], replicas, min_countries)
    if chosen is None:
        raise _impossible(
            chunk_id, relabel.back([*live, *fresh]), replicas, min_countries, "repair"
        )
    added = [c for c in chosen if c.node_id not in live_ids]
    return relabel.back(_smallest_repair(live, fresh, len(added), replicas, min_countries) or added)


def _smallest_repair(
    live: Sequence[Candidate],
    fresh: Sequence[Candidate],
    upper: int,
    replicas: int,
    min_countries: int,
) -> list[Candidate] | None:
    """The first set of fewer than ``upper`` new holders that completes a valid placement, or None.

    Sizes are tried from 0 up and sets of one size in lexicographic placement order, so the answer is
    the smallest repair and, among those, the first. ``_greedy`` decides each set exactly. The
    search is bounded: only the first REPAIR_SEARCH_CANDIDATES fresh peers take part, which keeps
    it to at most C(16, replicas - 1) placement walks for the usual replicas of 2 or 3.
    """
    pool = fresh[:REPAIR_SEARCH_CANDIDATES]
    for size in range(upper):
        for extra in itertools.combinations(pool, size):
            chosen = _greedy([*live, *extra], replicas, min_countries)
            if chosen is not None and all(c in chosen for c in extra):
                return list(extra)
    return None


def survives_loss_of_any_country(holders: Iterable[Candidate], *, min_copies: int = 1) -> bool:
    """Whether at least ``min_copies`` copies remain after every holder in any one country is lost.

    Unknown-country holders never count toward survival: we cannot tell which jurisdiction they
    are in, so the safe assumption is that they fall together with whichever country is lost.
    With no known-country holder, or only one country, the answer is False.

    Args:
        holders: the peers that hold the chunk; duplicates count once.
        min_copies: copies that must remain.

    Returns:
        True if every single-country loss leaves at least ``min_copies`` known-country holders.

    Raises:
        BadOption: ``min_copies`` < 1.
    """
    if min_copies < 1:
        raise BadOption(f"min copies must be at least 1, got {min_copies}")
    per_country: dict[str, int] = {}
    for holder in _unique(holders):
        if holder.country is not None:
            per_country[holder.country] = per_country.get(holder.country, 0) + 1
    total = sum(per_country.values())
    if not per_country:
        return False
    return all(total - lost >= min_copies for lost in per_country.values())
