"""Where a share's chunks may go: the live storage peers near a DHT key, found once per run of chunks.

A share places each run of ``PLACEMENT_BATCH_CHUNKS`` data chunks near the key of the run's first chunk
(replicate/peers.py): one crawl and one probe per run, whatever the network's size, where it once crawled for every
chunk (docs/SCALE.md). Only when the peers near a key cannot meet the rule is the wider pool searched (the routing
table and crawls towards random keys, as every share once did): a small network whose countries are skewed, or a
rule the closest peers alone cannot meet. Used by api/share.py only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from p2pmega.api.common import NetSettings
from p2pmega.api.share_peers import Probe, full_note, storage_peers
from p2pmega.core.ids import Address
from p2pmega.core.placement import Blocs, Candidate, meets_rule, summarize
from p2pmega.errors import NetworkError, PlacementImpossible
from p2pmega.node import Node
from p2pmega.replicate.peers import (
    PLACEMENT_BATCH_CHUNKS,
    RUN_PEERS,
    candidate_of,
    candidate_pool,
)
from p2pmega.replicate.shortfall import shortfall


@dataclass
class PoolFinder:
    """Finds a share's candidates near a key (a ``Placer.finder``); refuses a rule the peers found cannot meet."""

    node: Node
    net: NetSettings
    name: str
    rng: random.Random
    replicas: int
    min_countries: int
    min_blocs: int
    best: tuple[
        int, Blocs | None
    ]  # the best rule (Placer.rules()[0]): countries or blocs, and the blocs
    silent: set[
        Address
    ]  # the Placer's: peers that did not answer the probe are never asked to store
    chunk_bytes: int = 1  # one stored chunk: a peer with less room is full (api/share_peers.py)
    # The Placer's: peers that said they are full get nothing; the room each reported weighs it (core.capacity).
    full: set[Address] = field(default_factory=set)
    space: dict[Address, int] = field(default_factory=dict)
    searches: int = 0  # keys searched near, for tests and the bench
    _wide: list[Candidate] | None = field(default=None, repr=False)
    _full_seen: dict[Address, Candidate] = field(default_factory=dict, repr=False)

    async def __call__(self, key: bytes) -> list[Candidate]:
        """The storage peers near ``key`` that answered a probe; more (the wide pool) if they cannot meet the rule.

        Raises:
            PlacementImpossible: even every storage peer found cannot meet the rule (or span ``min_blocs`` blocs).
        """
        self.searches += 1
        try:
            near = await self.node.dht_node.find_peers(key)
        except NetworkError:
            near = []
        found = [candidate_of(p.node_id, (p.host, p.port), self.net.geo) for p in near]
        live = await self._probe(found[:RUN_PEERS])
        if len(found) > RUN_PEERS and not (self._meets_best(live) and self._roomy(live)):
            more = await self._probe(found[RUN_PEERS:])
            live = sorted([*live, *more], key=lambda c: c.node_id)
        if self._meets_best(live):
            return live
        if self.min_blocs <= 1 and meets_rule(
            live, replicas=self.replicas, min_countries=self.min_countries
        ):
            # Blocs are only preferred: the run stays among its closest peers, in countries enough. A copy on a
            # peer from the wide pool is found by no search near the run, only by its provider record, which
            # its holder announces 10-20 s after the share: a fetch right after it failed now and then at 200
            # seeds (where 20 closest peers lack a second bloc ~1 % of the time).
            return live
        if self._wide is None:
            pool = await candidate_pool(self.node, self.net.geo, self.rng)
            self._wide = await self._probe(pool)
        merged = {(c.host, c.port): c for c in [*live, *self._wide]}
        live = sorted(merged.values(), key=lambda c: c.node_id)
        self._refuse_unless_possible(live)
        return live

    def _roomy(self, peers: list[Candidate]) -> bool:
        """Whether ``peers`` said they have room for a full run's copies twice over, outside any one country too.

        Peers near full would fill up during the run, and the peers beyond RUN_PEERS are not asked then. With two
        countries a chunk, one copy of each goes outside the country with the most room: nine roomy peers in one
        country and one nearly full in another would fail the run half way. A peer that did not say (an older
        holder) counts as roomy alone.
        """
        run_copy = (
            2 * PLACEMENT_BATCH_CHUNKS * self.chunk_bytes
        )  # one copy of a full run, twice over
        by_country: dict[str | None, int] = {}
        for c in peers:
            free = self.space.get((c.host, c.port))
            room = self.replicas * run_copy if free is None or free < 0 else free
            by_country[c.country] = by_country.get(c.country, 0) + room
        total = sum(by_country.values())
        if total < self.replicas * run_copy:
            return False
        return self.min_countries < 2 or total - max(by_country.values(), default=0) >= run_copy

    def _meets_best(self, peers: list[Candidate]) -> bool:
        count, blocs = self.best
        return meets_rule(peers, replicas=self.replicas, min_countries=count, blocs=blocs)

    async def _probe(self, found: list[Candidate]) -> list[Candidate]:
        probe = await storage_peers(
            self.node, found, self.rng, enough=self._meets_best, chunk_bytes=self.chunk_bytes
        )
        self.silent.update((c.host, c.port) for c in probe.silent)
        self.full.update((c.host, c.port) for c in probe.full)
        self._full_seen.update(((c.host, c.port), c) for c in probe.full)
        self.space.update(probe.space)
        return probe.live

    def _full_note(self, live: list[Candidate]) -> str:
        seen = sorted(self._full_seen.values(), key=lambda c: c.node_id)
        return full_note(Probe(live=live, silent=[], full=seen), self.chunk_bytes)

    def _refuse_unless_possible(self, live: list[Candidate]) -> None:
        """Raises: PlacementImpossible: ``live`` cannot meet the rule, or span the blocs required."""
        net = self.net
        if not meets_rule(live, replicas=self.replicas, min_countries=self.min_countries):
            raise PlacementImpossible(
                f"cannot share {self.name!r}: "
                + shortfall(
                    summarize(live),
                    self.replicas,
                    self.min_countries,
                    geo_table=net.geo is not None,
                )
                + self._full_note(live)
            )
        if self.min_blocs > 1 and not self._meets_best(live):
            spanned = net.blocs.spanned(c.country for c in live)
            raise PlacementImpossible(
                f"cannot share {self.name!r}: --min-blocs {self.min_blocs} needs {self.replicas} holders in "
                f"{self.min_blocs} jurisdiction blocs, but the storage peers found span {len(spanned)}: "
                f"{', '.join(_bloc_label(b, live, net) for b in spanned) or 'none'}; add storage peers in "
                "other blocs or lower --min-blocs (the blocs table: --blocs FILE)"
                + self._full_note(live)
            )


def _bloc_label(bloc: str, live: list[Candidate], net: NetSettings) -> str:
    """``EU-EEA (DE, NZ)``, or ``CH`` for a country in no bloc."""
    members = sorted(
        {c.country for c in live if c.country and net.blocs.bloc_of(c.country) == bloc}
    )
    return bloc if members == [bloc] else f"{bloc} ({', '.join(members)})"
