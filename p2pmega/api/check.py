"""``check``: who holds each chunk of a link right now, and does the file meet the placement rule."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from p2pmega.api.common import NetSettings, check_min_blocs, client_node
from p2pmega.core.blocs import DEFAULT_BLOCS, BlocTable
from p2pmega.core.chunking import ChunkId
from p2pmega.core.geo import GeoTable
from p2pmega.core.ids import Address
from p2pmega.core.magnet import KeepCap, ReadCap, parse_link
from p2pmega.core.placement import (
    Candidate,
    meets_rule,
    summarize,
    survives_loss_of_any_country,
)
from p2pmega.errors import P2PMegaError
from p2pmega.node import Node
from p2pmega.replicate.locator import EXPAND_PEERS, HolderLocator
from p2pmega.replicate.manifest import walk_manifest
from p2pmega.replicate.peers import batch_keys


@dataclass(frozen=True)
class ChunkHealth:
    """One chunk's live holders. ``countries_unknown``: below the rule only for want of known countries.

    That is, it has enough holders on distinct networks, but some of them are of unknown country (which never
    counts), so the countries the rule asks for cannot be confirmed: a geo table would tell.
    """

    chunk_id: ChunkId
    kind: str  # "data" or "manifest"
    index: int
    holders: tuple[Candidate, ...]
    meets_rule: bool
    countries_unknown: bool = False
    # Seconds left on the chunk's lease at each holder, in ``holders`` order; None where the holder did not say
    # (a holder older than the LEASES request).
    leases_s: tuple[int | None, ...] = ()
    # The jurisdiction blocs (core.blocs) its known-country holders span, sorted.
    blocs: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckResult:
    root: ChunkId
    chunks: tuple[ChunkHealth, ...]
    replicas: int
    min_countries: int
    geo_table: bool = False  # whether a geo table was given
    min_blocs: int = 1

    @property
    def below(self) -> int:
        """Chunks below the rule with holders missing, not just countries unknown (live holders or not)."""
        return sum(1 for c in self.chunks if not c.meets_rule and not c.countries_unknown)

    @property
    def countries_unknown(self) -> int:
        """Chunks with enough holders whose countries are unknown, so the rule cannot be confirmed."""
        return sum(1 for c in self.chunks if c.countries_unknown)

    @property
    def healthy(self) -> bool:
        """Every chunk meets the placement rule."""
        return all(c.meets_rule for c in self.chunks)

    @property
    def survives_country_loss(self) -> bool:
        """The file stays whole if every peer of any one country disappears."""
        return all(survives_loss_of_any_country(c.holders) for c in self.chunks)

    @property
    def missing(self) -> int:
        """How many chunks have no live holder at all."""
        return sum(1 for c in self.chunks if not c.holders)


async def _leases(node: Node, chunks: list[ChunkHealth]) -> dict[tuple[ChunkId, Address], int]:
    """Seconds left on each (chunk, holder) lease: one batched LEASES request per holder, all at once."""
    by_holder: dict[Address, list[ChunkId]] = {}
    for c in chunks:
        for h in c.holders:
            by_holder.setdefault(h.address, []).append(c.chunk_id)

    async def ask(addr: Address, ids: list[ChunkId]) -> list[tuple[tuple[ChunkId, Address], int]]:
        try:
            left = await node.client.leases(addr, ids)
        except P2PMegaError:
            return []  # an older holder, or one gone since it answered `has`: its leases stay unknown
        return [((c, addr), s) for c, s in zip(ids, left, strict=True)]

    answers = await asyncio.gather(*(ask(a, ids) for a, ids in by_holder.items()))
    return dict(pair for answer in answers for pair in answer)


async def check(
    link: str, *, net: NetSettings, replicas: int = 2, min_countries: int = 2, min_blocs: int = 1
) -> CheckResult:
    """Find and confirm the live holders of every chunk (manifest included) of a read or keep-alive link.

    Every holder is asked directly (a batched ``has``); DHT records alone are never taken as proof. With
    ``min_blocs`` > 1 a chunk meets the rule only if its holders also span that many jurisdiction blocs.

    Raises:
        BadLink: the link is malformed.
        ManifestNotFound: no holder has the manifest, so the chunk list cannot be known.
    """
    check_min_blocs(replicas, min_countries, min_blocs)
    cap = parse_link(link)
    async with client_node(net, hints=cap.peers) as node:
        return await check_on(
            node,
            cap,
            geo=net.geo,
            replicas=replicas,
            min_countries=min_countries,
            bloc_table=net.blocs,
            min_blocs=min_blocs,
        )


async def check_on(
    node: Node,
    cap: ReadCap | KeepCap,
    *,
    geo: GeoTable | None,
    replicas: int = 2,
    min_countries: int = 2,
    bloc_table: BlocTable = DEFAULT_BLOCS,
    min_blocs: int = 1,
) -> CheckResult:
    """``check`` on a node already joined, so one node can check many files (``ls``, the web app).

    Raises:
        ManifestNotFound: no holder has the manifest, so the chunk list cannot be known.
        IntegrityError: the manifest found does not authenticate under the link.
    """
    locator = HolderLocator(node, hints=cap.peers, run_holders_wanted=EXPAND_PEERS)  # every copy
    blocs = bloc_table.mapping()
    try:
        manifest = await walk_manifest(locator, cap)
        entries: list[tuple[ChunkId, str, int]] = [
            (c, "manifest", i) for i, c in enumerate(manifest.manifest_ids)
        ] + [(c, "data", i) for i, c in enumerate(manifest.chunk_ids)]
        ids = [e[0] for e in entries]

        def health() -> list[ChunkHealth]:
            out = []
            for chunk_id, kind, index in entries:
                cands = locator.candidates(chunk_id, geo)
                holders = tuple(cands)
                ok = meets_rule(cands, replicas=replicas, min_countries=min_countries) and (
                    min_blocs <= 1
                    or meets_rule(
                        cands,
                        replicas=replicas,
                        min_countries=max(min_blocs, min_countries),
                        blocs=blocs,
                    )
                )
                summary = summarize(cands)
                unknown = (
                    not ok
                    and summary.unknown > 0
                    and not summary.short_of_holders(replicas)
                    and summary.short_of_countries(min_countries)
                )
                spanned = tuple(bloc_table.spanned(c.country for c in cands))
                out.append(ChunkHealth(chunk_id, kind, index, holders, ok, unknown, blocs=spanned))
            return out

        # One batched question to every peer known so far; then the DHT only for chunks still short of the
        # rule, and one more batched question to the peers that turned up.
        # A share placed the manifest with the first run of data chunks (replicate.peers.batch_keys).
        placed_near = batch_keys(manifest.chunk_ids)
        if manifest.chunk_ids:
            placed_near |= dict.fromkeys(manifest.manifest_ids, placed_near[manifest.chunk_ids[0]])
        await locator.want(ids, near=cap.root, placed_near=placed_near)
        await locator.settle()
        await locator.identify(a for c in ids for a in locator.live_holders(c))
        short = [c.chunk_id for c in health() if not c.meets_rule]
        await asyncio.gather(*(locator.discover(c) for c in short))
        await locator.confirm(ids)
        await locator.identify(a for c in ids for a in locator.live_holders(c))
        chunks = health()
        left = await _leases(node, chunks)
        chunks = [
            dataclasses.replace(
                c, leases_s=tuple(left.get((c.chunk_id, h.address)) for h in c.holders)
            )
            for c in chunks
        ]
        return CheckResult(
            cap.root, tuple(chunks), replicas, min_countries, geo is not None, min_blocs
        )
    finally:
        # A shared node outlives this check: stop the locator's search near the root if it still runs.
        await locator.close()
