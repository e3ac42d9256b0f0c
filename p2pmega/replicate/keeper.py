"""The keeper: a seed's duty of keeping chosen files alive (``seed --keep LINK``, ``--keep-mine``).

Every ``interval_s`` (jittered) it walks each kept file's manifest (once; the chunk list never changes), asks who
holds its chunks (manifest chunks too), renews their leases on every live holder in one batched ``renew`` per
holder, and repairs chunks that stayed below the placement rule for two rounds in a row: the holders repair what
they hold first (repair.py), a keeper steps in when no responsible holder did, fetching the chunk from a live
holder and placing it as a repairing holder would. It only ever holds keep-alive capabilities: it can list and
verify chunks, never decrypt them. Renewals are signed with the file's renewal credential, derived from the
keep-alive capability (core.renewal), for each holder's node id; repaired copies carry its public key.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pmega.core.chunking import ChunkId
from p2pmega.core.geo import GeoTable
from p2pmega.core.ids import Address, short_id
from p2pmega.core.magnet import KeepCap
from p2pmega.core.manifest import Manifest
from p2pmega.core.placement import Candidate, meets_rule, plan_repair
from p2pmega.core.renewal import RenewCredential
from p2pmega.core.words import counted
from p2pmega.defaults import LEASE_S
from p2pmega.errors import P2PMegaError, PlacementImpossible
from p2pmega.node import Node
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.manifest import walk_manifest
from p2pmega.replicate.peers import ask_space, batch_keys, candidate_of, candidate_pool
from p2pmega.replicate.placer import Placer
from p2pmega.replicate.repair import RepairPolicy, RoundReport, bounded_round, locate

log = logging.getLogger(__name__)


@dataclass
class KeptFile:
    """One kept file: its capability, its chunk list once known, and what the last rounds found."""

    cap: KeepCap
    credential: RenewCredential
    manifest: Manifest | None = None
    short: set[ChunkId] = field(default_factory=set)  # below the rule at the last round
    warned: bool = False  # "no holder has it" said once; repeats are DEBUG

    @property
    def label(self) -> str:
        return short_id(self.cap.root)


@dataclass(eq=False)
class Keeper:
    """Renews and repairs the kept files (see the module docstring)."""

    node: Node
    caps: list[KeepCap]
    geo: GeoTable | None
    lease_s: float = LEASE_S
    policy: RepairPolicy = field(default_factory=RepairPolicy)
    rng: random.Random = field(default_factory=random.Random)
    name: str = "keeper"
    clock: Callable[[], float] = time.time  # wall clock: renewals name an expiry in Unix seconds
    renewed: int = 0
    repaired: int = 0
    bytes_pushed: int = 0
    # The free bytes the pool's peers reported this round (asked at its first repair, for all its files).
    _space: dict[Address, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.files = [KeptFile(cap, RenewCredential.of(cap)) for cap in self.caps]

    async def run(self) -> None:
        # At once: a seed started to keep files alive should not wait an interval to renew them.
        while True:
            await bounded_round(self.round(), self.policy, "keep-alive")
            await asyncio.sleep(self.policy.wait_s(self.rng))

    async def close(self) -> None:
        return None

    def summary(self) -> str:
        return f"keeping {counted(len(self.files), 'file')} alive"

    async def round(self) -> list[RoundReport]:
        """Renew and check every kept file once; one report per file (empty while its manifest is not found)."""
        pool = await candidate_pool(self.node, self.geo, self.rng)
        self._space = None
        reports = []
        for kept in self.files:
            reports.append(await self._keep(kept, pool))
        return reports

    async def _keep(self, kept: KeptFile, pool: list[Candidate]) -> RoundReport:
        report = RoundReport()
        hints = kept.cap.peers
        if kept.manifest is None:
            locator = HolderLocator(self.node, hints=hints)
            try:
                kept.manifest = await walk_manifest(locator, kept.cap)
            except P2PMegaError as exc:
                level = logging.DEBUG if kept.warned else logging.WARNING
                log.log(level, "kept file %s: %s; trying again every round", kept.label, exc)
                kept.warned = True
                return report
        manifest = kept.manifest
        ids = [*manifest.manifest_ids, *manifest.chunk_ids]
        # A share placed each run of chunks near its first chunk's key, and the manifest with the first run.
        placed_near = batch_keys(manifest.chunk_ids)
        if manifest.chunk_ids:
            placed_near |= dict.fromkeys(manifest.manifest_ids, placed_near[manifest.chunk_ids[0]])
        p = self.policy

        def enough(chunk_id: ChunkId, holders: list[Address], ids: dict[Address, bytes]) -> bool:
            found = self._holders(holders, ids)
            return meets_rule(found, replicas=p.replicas, min_countries=p.min_countries)

        locator, report.gone = await locate(
            self.node,
            ids,
            pool,
            hints=hints,
            enough=enough,
            retry_delay_s=p.probe_retry_delay_s,
            placed_near=placed_near,
        )
        report.examined = len(ids)
        await self._renew(kept, locator, ids)
        mine = await self._renew_own(ids)
        me = candidate_of(self.node.dht_node.node_id, self.node.address, self.geo)
        short: set[ChunkId] = set()
        missing = attempts = 0
        for chunk_id in ids:
            holders = self._holders(locator.live_holders(chunk_id), locator.node_ids)
            if chunk_id in mine:
                holders.append(me)
            if meets_rule(holders, replicas=p.replicas, min_countries=p.min_countries):
                report.healthy += 1
                continue
            report.short += 1
            short.add(chunk_id)
            if not holders:
                missing += 1
            elif chunk_id in kept.short and attempts < p.max_repairs_per_round:
                attempts += (
                    1  # tries, not successes: a file that cannot be repaired costs a bounded round
                )
                await self._repair(kept, locator, pool, chunk_id, holders, report)
        if missing:
            level = logging.DEBUG if kept.warned else logging.WARNING
            log.log(
                level,
                "kept file %s: %s no live holder",
                kept.label,
                counted(missing, "chunk has", "chunks have"),
            )
            kept.warned = True
        kept.short = short
        self.repaired += report.repaired
        self.bytes_pushed += report.bytes_pushed
        return report

    def _holders(self, addrs: list[Address], node_ids: dict[Address, bytes]) -> list[Candidate]:
        return [candidate_of(node_ids[a], a, self.geo) for a in addrs if a in node_ids]

    async def _renew(self, kept: KeptFile, locator: HolderLocator, ids: list[ChunkId]) -> None:
        by_holder: dict[Address, list[ChunkId]] = {}
        for chunk_id in ids:
            for addr in locator.live_holders(chunk_id):
                by_holder.setdefault(addr, []).append(chunk_id)
        expiry_s = math.ceil(self.clock() + self.lease_s)

        async def renew(addr: Address, held: list[ChunkId]) -> int:
            holder_id = locator.node_ids.get(addr)
            if holder_id is None:
                # A renewal is signed for one holder's node id; one we only know by address is renewed once the
                # DHT names it.
                log.debug("holder %s of kept file %s has no known node id", addr, kept.label)
                return 0
            try:
                flags = await self.node.client.renew_signed(
                    addr,
                    held,
                    holder_id=holder_id,
                    expiry_s=expiry_s,
                    credential=kept.credential,
                )
            except P2PMegaError as exc:
                log.debug("holder %s did not renew kept file %s: %s", addr, kept.label, exc)
                return 0
            return sum(flags)

        self.renewed += sum(await asyncio.gather(*(renew(a, h) for a, h in by_holder.items())))

    async def _renew_own(self, ids: list[ChunkId]) -> set[ChunkId]:
        """Renew the chunks this seed holds itself (the locator never asks ourselves); returns them."""
        store = self.node.store
        if store is None:
            return set()
        flags = await asyncio.to_thread(store.renew, ids, lease_s=self.lease_s)
        self.renewed += sum(flags)
        return {c for c, held in zip(ids, flags, strict=True) if held}

    async def _repair(
        self,
        kept: KeptFile,
        locator: HolderLocator,
        pool: list[Candidate],
        chunk_id: ChunkId,
        holders: list[Candidate],
        report: RoundReport,
    ) -> None:
        p = self.policy
        live_pool = [c for c in pool if (c.host, c.port) not in locator.dead]
        placer = Placer(
            self.node, live_pool, self.geo, p.replicas, p.min_countries, self.lease_s, blocs=p.blocs
        )
        placer.renew_key = kept.credential.public_key
        placer.silent.update(locator.dead)
        # Weighted by free space as a share is (core.capacity): new copies go where there is room.
        if self._space is None:
            self._space = await ask_space(self.node, pool)
        placer.space = self._space
        try:
            # Whether the live peers can meet the rule at all, before downloading the chunk to find out.
            plan_repair(
                chunk_id,
                holders,
                [c for c in await placer.candidates_for(chunk_id) if c not in holders],
                replicas=p.replicas,
                min_countries=p.min_countries,
            )
        except PlacementImpossible as exc:
            report.unrepairable += 1
            log.debug("cannot repair kept chunk %s: %s", short_id(chunk_id), exc)
            return
        try:
            data = await locator.fetch(chunk_id)
        except P2PMegaError as exc:
            log.debug("cannot fetch kept chunk %s to repair it: %s", short_id(chunk_id), exc)
            return
        await report.repair(placer, chunk_id, bytes(data), holders)
