"""The repairer: a holder's duty of bringing the chunks it holds back to the placement rule after peers vanish.

Every ``interval_s`` (jittered) a holder asks who else holds each of its chunks (one batched ``has`` per peer, the
DHT for chunks that look short), and for each chunk below the rule (fewer than ``replicas`` live holders on
distinct networks, or fewer than ``min_countries`` countries) exactly one live holder acts: the one whose node id
is closest (XOR) to the chunk's DHT key. It copies the chunk to the holders ``core.placement.plan_repair`` picks,
through the same Placer a share uses, with the lease the chunk has left; the new holders announce what they
stored. Holders that see the same peers pick the same new holders, so two that both believe they are responsible
(after a partition heals) store on the same peers and the second copy is a no-op. docs/REPAIR.md has the
protocol and the reasoning.

Repair is bounded, so that a seizure of half the network does not melt the other half: at most
``max_repairs_per_round`` chunks a round, ``concurrency`` at a time, at most ``rate_bytes_s`` pushed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from p2pmega.core.geo import GeoTable
from p2pmega.core.ids import Address, ChunkId, dht_key_of, short_id
from p2pmega.core.placement import (
    DEFAULT_MIN_COUNTRIES,
    DEFAULT_REPLICAS,
    Candidate,
    meets_rule,
    plan_repair,
)
from p2pmega.core.words import counted
from p2pmega.defaults import REPAIR_INTERVAL_S
from p2pmega.errors import P2PMegaError, PlacementImpossible
from p2pmega.node import Node
from p2pmega.replicate.duties import (
    ANNOUNCE_BATCH,
    ANNOUNCE_CRAWLS_PER_S,
    ANNOUNCE_DELAY_S,
    ANNOUNCE_JITTER,
)
from p2pmega.replicate.locator import EXPAND_PEERS, HolderLocator
from p2pmega.replicate.peers import SMALL_NETWORK_NODES, ask_space, candidate_of, candidate_pool
from p2pmega.replicate.placer import Placer
from p2pmega.storage.sizes import format_size

log = logging.getLogger(__name__)

# A chunk with less lease than this left is not worth copying: it expires before anyone could need the copy.
MIN_REPAIR_LEASE_S = 60.0
# A chunk short of the rule this many rounds in a row is repaired by any live holder, not only the responsible one.
TAKEOVER_AFTER_ROUNDS = 3
# A round (lookups, probes, copies) that takes longer than this many intervals, and at least ROUND_MIN_LIMIT_S, is
# abandoned: one slow or hostile peer must not stop repair on this holder for good.
ROUND_LIMIT_INTERVALS = 3
ROUND_MIN_LIMIT_S = 120.0
# In a network too large for the pool to hold every peer, a chunk stored this recently that looks short is left
# for a later round: a share places a run of chunks near the run's key, not each chunk's own, so the holders the
# pool missed are found by their provider records, and they announce only after a quiet period (duties.py): a
# batch closes at most ANNOUNCE_DELAY_S x (1 + ANNOUNCE_JITTER) after its first chunk, and a full batch's crawls
# take ANNOUNCE_BATCH / ANNOUNCE_CRAWLS_PER_S at the announcer's pace. 120 + 205 s.
FRESH_S = ANNOUNCE_DELAY_S * (1 + ANNOUNCE_JITTER) + ANNOUNCE_BATCH / ANNOUNCE_CRAWLS_PER_S


@dataclass(frozen=True, kw_only=True)
class RepairPolicy:
    """How often and how hard a holder repairs; the defaults are for the internet, tests shorten the interval."""

    interval_s: float = REPAIR_INTERVAL_S
    # Each wait is interval_s x [1 - jitter, 1 + jitter]: seeds started together do not probe in step.
    jitter: float = 0.2
    replicas: int = DEFAULT_REPLICAS
    min_countries: int = DEFAULT_MIN_COUNTRIES
    # Jurisdiction blocs (core.blocs): new copies go to another bloc whenever the peers allow, as share's do.
    blocs: Mapping[str, str] | None = None
    # Chunks examined per round (a large store is walked over several rounds) and repaired per round at most.
    max_chunks_per_round: int = 20_000
    max_repairs_per_round: int = 512
    concurrency: int = 4
    rate_bytes_s: float = 32 * 1024 * 1024
    # A peer that does not answer its probe is asked once more after this long; twice silent is gone.
    probe_retry_delay_s: float = 0.5

    def wait_s(self, rng: random.Random) -> float:
        return self.interval_s * (1 + self.jitter * (2 * rng.random() - 1))


@dataclass
class RoundReport:
    """What one repair round saw and did."""

    examined: int = 0
    healthy: int = 0
    short: int = 0
    left_to_others: int = 0  # short, but another live holder is responsible
    # Looked short, but stored too lately for its holders to have announced it (FRESH_S): judged later.
    fresh: int = 0
    repaired: int = 0
    copies: int = 0
    bytes_pushed: int = 0
    unrepairable: int = 0  # short, and the live peers cannot meet the rule (or the copy failed)
    gone: list[Address] = field(default_factory=list)  # peers that failed their probes twice

    async def repair(
        self, placer: Placer, chunk_id: ChunkId, data: bytes, holders: list[Candidate]
    ) -> None:
        """Place ``data`` until the rule holds again, counting the copies made (or the chunk as unrepairable)."""
        placer = dataclasses.replace(placer, ask_first=True, bytes_sent=0)  # shares the peer sets
        try:
            after = await placer.place(chunk_id, data, holding=holders)
        except PlacementImpossible as exc:
            self.unrepairable += 1
            self.bytes_pushed += placer.bytes_sent
            log.debug("cannot repair chunk %s: %s", short_id(chunk_id), exc)
            return
        new = [c for c in after if c not in holders]
        self.repaired += 1
        self.copies += len(new)
        self.bytes_pushed += placer.bytes_sent
        log.debug("repaired chunk %s onto %s", short_id(chunk_id), [c.label() for c in new])


class RateLimit:
    """Spaces out pushes so that, over time, at most ``rate_bytes_s`` leave (a token bucket without burst)."""

    def __init__(self, rate_bytes_s: float, clock: Callable[[], float]) -> None:
        self.rate_bytes_s = rate_bytes_s
        self._clock = clock
        self._free_at = 0.0

    async def take(self, nbytes: int) -> None:
        now = self._clock()
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.rate_bytes_s
        if start > now:
            await asyncio.sleep(start - now)


def responsible(chunk_id: ChunkId, holders: Iterable[Candidate]) -> Candidate:
    """The one live holder that repairs ``chunk_id``: node id closest (XOR) to the chunk's DHT key.

    Ties cannot happen between distinct node ids; the address breaks them for one id seen at two addresses.
    """
    key = int.from_bytes(dht_key_of(chunk_id), "big")
    return min(holders, key=lambda c: (int.from_bytes(c.node_id, "big") ^ key, c.host, c.port))


async def locate(
    node: Node,
    ids: Sequence[ChunkId],
    pool: Sequence[Candidate],
    *,
    hints: Sequence[Address] = (),
    enough: Callable[[ChunkId, list[Address], dict[Address, bytes]], bool],
    retry_delay_s: float,
    placed_near: Mapping[ChunkId, bytes] | None = None,
) -> tuple[HolderLocator, list[Address]]:
    """Ask the pool (and the DHT for chunks not ``enough``) who holds ``ids``; a silent peer is asked twice.

    A share places each run of chunks among the peers nearest the run's first chunk's key, not the chunk's own
    (replicate.peers.batch_keys), so the DHT search near a chunk's own key finds its holders only through their
    provider records, which come late (replicate.duties). ``placed_near`` (a keeper: the runs of its file's
    manifest) searches near each run's key once and asks those peers about the run. A repairer knows no run
    keys (it holds chunks, not manifests), but it is one of the peers nearest each run's key it holds chunks
    of, and so are the other holders: its pool (its table, whose buckets near its own id hold every node there,
    and a crawl towards its id) finds them, and FRESH_S covers the time before the records exist.

    Returns:
        The locator (live holders per chunk, node ids seen), and the peers that failed both probes.
    """
    me = node.address
    # New peers found by one chunk's lookup are asked about that chunk only: about every id of a large store,
    # each round, it would be chunks x peers of `has` traffic.
    # Every copy near a run's key is asked about (run_holders_wanted): a keeper renews each one it finds, and a copy
    # it missed (a third one, beyond the run's RUN_PEERS closest) would lapse unseen.
    locator = HolderLocator(
        node, hints=hints, ask_new_peers_about_all=False, run_holders_wanted=EXPAND_PEERS
    )
    locator.peers.update((c.host, c.port) for c in pool)
    locator.peers.discard(me)
    locator.node_ids.update(((c.host, c.port), c.node_id) for c in pool)
    await locator.want(ids, placed_near=placed_near)
    await locator.settle()
    short = [c for c in ids if not enough(c, locator.live_holders(c), locator.node_ids)]
    await asyncio.gather(*(locator.discover(c) for c in short))
    locator.peers.discard(me)
    if locator.dead:
        # One missed answer is not a seizure: ask again once before a peer counts as gone.
        await asyncio.sleep(retry_delay_s)
        again = set(locator.dead)
        locator.dead.clear()
        for peer in again:
            locator.queried.pop(peer, None)
        await locator.confirm(ids, again)
    return locator, sorted(locator.dead)


async def bounded_round(work: Awaitable[object], policy: RepairPolicy, what: str) -> None:
    """Await one round, abandoning it (with a warning) past its time limit."""
    limit_s = max(ROUND_MIN_LIMIT_S, ROUND_LIMIT_INTERVALS * policy.interval_s)
    try:
        async with asyncio.timeout(limit_s):
            await work
    except TimeoutError:
        log.warning(
            "a %s round took over %.0f s and was abandoned; the next one starts over", what, limit_s
        )


@dataclass(eq=False)
class Repairer:
    """A holder's repair duty (see the module docstring)."""

    node: Node
    geo: GeoTable | None
    policy: RepairPolicy = field(default_factory=RepairPolicy)
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.time
    name: str = "repairer"
    rounds: int = 0
    repaired: int = 0
    bytes_pushed: int = 0
    last: RoundReport | None = None
    _cursor: int = 0
    _short_rounds: dict[ChunkId, int] = field(default_factory=dict)
    _stored_at: dict[ChunkId, float] = field(default_factory=dict)  # by ``clock``, for FRESH_S

    def __post_init__(self) -> None:
        self._rate = RateLimit(self.policy.rate_bytes_s, time.monotonic)
        self.node.stored_listeners.append(self._stored)

    def _stored(self, chunk_id: ChunkId) -> None:
        self._stored_at[chunk_id] = self.clock()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.wait_s(self.rng))
            await bounded_round(self.round(), self.policy, "repair")

    async def close(self) -> None:
        return None

    def summary(self) -> str:
        return (
            f"{counted(self.repaired, 'chunk')} repaired ({format_size(self.bytes_pushed)} copied)"
        )

    async def round(self) -> RoundReport:
        """Check the held chunks (a slice of them in a large store) and repair those this holder is responsible for."""
        report = RoundReport()
        store = self.node.store
        if store is None:
            return report
        ids = self._slice(await asyncio.to_thread(store.ids))
        if not ids:
            return report
        report.examined = len(ids)
        pool = await candidate_pool(self.node, self.geo, self.rng)
        p = self.policy
        me = candidate_of(self.node.dht_node.node_id, self.node.address, self.geo)

        def enough(chunk_id: ChunkId, others: list[Address], ids: dict[Address, bytes]) -> bool:
            holders = self._holders(me, others, ids)
            return meets_rule(holders, replicas=p.replicas, min_countries=p.min_countries)

        locator, report.gone = await locate(
            self.node, ids, pool, enough=enough, retry_delay_s=p.probe_retry_delay_s
        )
        now = self.clock()
        self._stored_at = {c: t for c, t in self._stored_at.items() if now - t < FRESH_S}
        # In a small network the pool is every peer, asked directly: no record is needed to find a holder.
        wait_for_records = len(pool) >= SMALL_NETWORK_NODES
        live_pool = [c for c in pool if (c.host, c.port) not in locator.dead]
        work: list[tuple[ChunkId, list[Candidate]]] = []
        short_rounds: dict[ChunkId, int] = {}
        for chunk_id in ids:
            holders = self._holders(me, locator.live_holders(chunk_id), locator.node_ids)
            if meets_rule(holders, replicas=p.replicas, min_countries=p.min_countries):
                report.healthy += 1
                continue
            if wait_for_records and chunk_id in self._stored_at:
                report.fresh += 1
                continue
            report.short += 1
            short_rounds[chunk_id] = self._short_rounds.get(chunk_id, 0) + 1
            # The responsible holder acts; if it has not managed to for a few rounds (its view of the pool, its
            # outgoing stores blocked, its cap), any live holder steps in.
            mine = self.acts_for(chunk_id, holders, me)
            if not mine and short_rounds[chunk_id] < TAKEOVER_AFTER_ROUNDS:
                report.left_to_others += 1
            elif len(work) < p.max_repairs_per_round:
                work.append((chunk_id, holders))
        self._short_rounds = short_rounds
        if work:
            # One Placer per chunk (each carries its chunk's lease), sharing what they learn about peers.
            shared = Placer(
                self.node, live_pool, self.geo, p.replicas, p.min_countries, 0.0, blocs=p.blocs
            )
            shared.silent.update(locator.dead)
            # Weighted by free space as a share is (core.capacity): new copies go where there is room.
            shared.space = await ask_space(self.node, live_pool)
            gate = asyncio.Semaphore(p.concurrency)
            await asyncio.gather(*(self._repair(shared, gate, c, h, report) for c, h in work))
        self.rounds += 1
        self.repaired += report.repaired
        self.bytes_pushed += report.bytes_pushed
        self._log(report)
        self.last = report
        return report

    def acts_for(self, chunk_id: ChunkId, holders: list[Candidate], me: Candidate) -> bool:
        """Whether this holder is the one to repair ``chunk_id`` (``holders``: the live ones, itself included)."""
        # By node id: behind NAT the same holder may also be seen at its public address.
        return responsible(chunk_id, holders).node_id == me.node_id

    def _slice(self, ids: list[ChunkId]) -> list[ChunkId]:
        limit = self.policy.max_chunks_per_round
        if len(ids) <= limit:
            return ids
        start = self._cursor % len(ids)
        self._cursor = start + limit
        return (ids[start:] + ids[:start])[:limit]

    def _holders(
        self, me: Candidate, others: Iterable[Address], node_ids: dict[Address, bytes]
    ) -> list[Candidate]:
        """This holder plus the others whose node id is known (the DHT named every peer the locator asked)."""
        holders = [me]
        for addr in others:
            node_id = node_ids.get(addr)
            if node_id is not None and addr != (me.host, me.port):
                holders.append(candidate_of(node_id, addr, self.geo))
        return holders

    async def _repair(
        self,
        shared: Placer,
        gate: asyncio.Semaphore,
        chunk_id: ChunkId,
        holders: list[Candidate],
        report: RoundReport,
    ) -> None:
        store = self.node.store
        if store is None:
            return
        expiry = await asyncio.to_thread(store.lease_expiry, chunk_id)
        lease_s = (expiry or 0.0) - self.clock()
        if lease_s < MIN_REPAIR_LEASE_S:
            return  # about to expire: garbage, not something to keep
        async with gate:
            try:
                data = await asyncio.to_thread(store.get, chunk_id)
                # The copies get the renewal key this copy was stored with, so the file's keeper renews them too.
                renew_key = await asyncio.to_thread(store.renew_key, chunk_id)
            except P2PMegaError as exc:
                log.debug("cannot read chunk %s to repair it: %s", short_id(chunk_id), exc)
                return
            try:
                plan = plan_repair(
                    chunk_id,
                    holders,
                    [c for c in await shared.candidates_for(chunk_id) if c not in holders],
                    replicas=self.policy.replicas,
                    min_countries=self.policy.min_countries,
                )
            except PlacementImpossible as exc:
                report.unrepairable += 1  # nothing pushed, no budget spent
                log.debug("cannot repair chunk %s: %s", short_id(chunk_id), exc)
                return
            await self._rate.take(len(data) * max(1, len(plan)))
            # replace() hands the same dead/full/silent sets to the copy: what one chunk learns, all skip.
            await report.repair(
                dataclasses.replace(shared, lease_s=lease_s, renew_key=renew_key),
                chunk_id,
                data,
                holders,
            )

    def _log(self, report: RoundReport) -> None:
        if report.repaired or report.unrepairable:
            log.info(
                "repair: %d of %s short of the rule; copied %s to new holders (%d bytes)%s",
                report.short,
                counted(report.examined, "chunk"),
                counted(report.repaired, "chunk"),
                report.bytes_pushed,
                f"; {report.unrepairable} cannot be repaired with the peers in reach"
                if report.unrepairable
                else "",
            )
