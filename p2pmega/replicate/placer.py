"""Placer: stores a chunk on holders chosen by the placement rule, retrying what may pass and replacing holders
that fail. A share places every chunk with it; repair places the copies a chunk lost (replicate/repair.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from p2pmega.core.capacity import capacity_weight, is_full
from p2pmega.core.chunking import ChunkId, dht_key_of, short_id
from p2pmega.core.geo import GeoTable
from p2pmega.core.placement import (
    Blocs,
    Candidate,
    meets_rule,
    plan_repair,
    summarize,
)
from p2pmega.core.words import counted
from p2pmega.errors import (
    NetworkError,
    P2PMegaError,
    PeerRefused,
    PlacementImpossible,
    QuotaExceeded,
)
from p2pmega.node import Node
from p2pmega.replicate.peers import SMALL_NETWORK_NODES, candidate_of
from p2pmega.replicate.pipeline import Pipeline
from p2pmega.replicate.shortfall import shortfall

log = logging.getLogger(__name__)

# How many placement rounds a chunk gets before we give up (each round replaces the holders that failed).
MAX_PLACEMENT_ROUNDS = 8
# A store that fails for a reason that may pass (no data moved for the transfer timeout, a dropped connection, a
# busy holder) is tried this many times on the same holder, waiting STORE_RETRY_DELAY_S, then twice that, between.
# The transfer timeout counts idle time, not size, so a holder that is merely slow never gets here.
STORE_ATTEMPTS = 3
STORE_RETRY_DELAY_S = 0.5
# A holder that failed this many chunks in a row (each after its attempts) is left out for the rest of the share;
# one that refuses connections (nothing listens) at once.
MAX_HOLDER_FAILURES = 2

# Chunks whose closest nodes a Placer remembers: a few per chunk placed at once, far fewer than a file's chunks.
CLOSEST_REMEMBERED = 256

RERUN_HINT = "the chunks stored so far are kept: rerun the same command to resume"

# The live storage peers near a DHT key, as a share finds them (api/share_pool.py).
Finder = Callable[[bytes], Awaitable[list[Candidate]]]


@dataclass
class Placer:
    """Stores chunks on holders chosen by the placement rule, replacing holders that fail."""

    node: Node
    pool: list[Candidate]
    geo: GeoTable | None
    replicas: int
    min_countries: int
    lease_s: float
    # Jurisdiction blocs (core.blocs): with them, holders in as many blocs as countries are preferred whenever
    # the peers allow it, and ``min_blocs`` > 1 requires that many blocs (then at least min_countries).
    blocs: Blocs | None = None
    min_blocs: int = 1
    dead: set[tuple[str, int]] = field(default_factory=set)
    full: set[tuple[str, int]] = field(default_factory=set)
    failures: Counter[tuple[str, int]] = field(default_factory=Counter)
    # Contacts that did not answer the storage-peer probe (DHT-only nodes, dead contacts): never asked to store.
    silent: set[tuple[str, int]] = field(default_factory=set)
    # The file's renewal public key (core.renewal), sent with every store so its keeper can renew the copies;
    # None stores chunks only their source network may renew (a repair of a chunk stored without one).
    renew_key: bytes | None = None
    # Repair asks a new holder whether it has the chunk already (another holder may have just copied it there,
    # before the announcement) rather than send the whole chunk again.
    ask_first: bool = False
    bytes_sent: int = 0
    # The free bytes each peer reported to a SPACE request (replicate.peers.ask_space): its placement weight
    # (core.capacity), and no chunk larger goes to it. A peer missing here (an older holder, or not asked)
    # weighs 1.0, as a fresh default seed does.
    space: dict[tuple[str, int], int] = field(default_factory=dict)
    # A share's replica pipeline (replicate/pipeline.py): each chunk uploaded once, its first holder forwarding the
    # second copy. None: every copy uploaded (repair, keep-alive, a share on loopback).
    pipeline: Pipeline | None = None
    # A share's way to find candidates (replicate.peers.PLACEMENT_BATCH_CHUNKS): the live storage peers near the
    # key a chunk is placed near, found once per key and shared by every chunk placed near it. None: ``pool``.
    finder: Finder | None = None
    # The closest nodes of the chunks placed lately (a copy made with dataclasses.replace shares it).
    _closest: OrderedDict[ChunkId, list[Candidate]] = field(default_factory=OrderedDict)
    _near: OrderedDict[bytes, asyncio.Task[list[Candidate]]] = field(default_factory=OrderedDict)

    @property
    def forwarded(self) -> int:
        """Copies the pipeline's first holders forwarded and their holders confirmed (0 without a pipeline)."""
        return self.pipeline.forwarded if self.pipeline is not None else 0

    async def candidates_for(self, chunk_id: ChunkId, near: bytes | None = None) -> list[Candidate]:
        """The peers ``chunk_id`` may go to, less those that failed, are full or never answered.

        With a ``finder`` (a share): the peers it finds near ``near`` (default: the chunk's own key), found
        once for every chunk placed near the same key. Otherwise, in a large network they are the nodes closest
        to the chunk's key: one crawl per chunk, remembered for the next placement round of the same chunk (and a
        repair's feasibility check before it); in a small one, the whole pool.

        Raises:
            PlacementImpossible: the finder found peers that cannot meet the rule.
        """
        if self.finder is not None:
            found = await self._found_near(dht_key_of(chunk_id) if near is None else near)
        elif len(self.pool) < SMALL_NETWORK_NODES:
            found = self.pool
        elif (known := self._closest.get(chunk_id)) is not None:
            found = known
        else:
            peers = await self.node.dht_node.find_peers(dht_key_of(chunk_id))
            found = [candidate_of(p.node_id, (p.host, p.port), self.geo) for p in peers]
            self._closest[chunk_id] = found
            while len(self._closest) > CLOSEST_REMEMBERED:
                self._closest.popitem(last=False)
        skip = self.dead | self.full | self.silent
        return [self._weighed(c) for c in found if (c.host, c.port) not in skip]

    def _weighed(self, cand: Candidate) -> Candidate:
        free = self.space.get((cand.host, cand.port))
        if free is None or cand.weight == (weight := capacity_weight(free)):
            return cand  # unknown space, or weighed already (a share's probe did)
        return dataclasses.replace(cand, weight=weight)

    async def _found_near(self, key: bytes) -> list[Candidate]:
        """The finder's peers near ``key``: one search, however many chunks ask for it at once."""
        assert self.finder is not None  # noqa: S101 - candidates_for checked it
        task = self._near.get(key)
        if task is None:
            task = self._near[key] = asyncio.ensure_future(self.finder(key))
            while len(self._near) > CLOSEST_REMEMBERED:
                _key, old = self._near.popitem(last=False)
                old.cancel()  # only a search nobody waits for any more: the latest are kept
        else:
            self._near.move_to_end(key)
        # Shielded: one placement cancelled (the share stopping) must not cancel the others' search.
        return list(await asyncio.shield(task))

    async def close(self) -> None:
        """Stop the searches still running (a share that failed or was cancelled)."""
        for task in self._near.values():
            task.cancel()
        await asyncio.gather(*self._near.values(), return_exceptions=True)

    async def place(
        self,
        chunk_id: ChunkId,
        data: bytes,
        holding: Sequence[Candidate] = (),
        near: bytes | None = None,
        uploaded: Callable[[], None] | None = None,
    ) -> list[Candidate]:
        """Store ``data`` until holders meeting the rule have confirmed it.

        Args:
            chunk_id: the chunk.
            data: its stored bytes.
            holding: live holders that already have it (a repair); only the copies the rule still lacks are made.
            near: the DHT key whose nearby peers the chunk goes to (``finder`` only; default: its own).
            uploaded: called when our upload is done and only a forward's confirmation is awaited (a share then
                starts the next chunk's upload meanwhile).

        Returns:
            Every holder, ``holding`` first.

        Raises:
            PlacementImpossible: the live peers can no longer meet the rule.
        """
        stored: list[Candidate] = list(holding)
        # Holders that failed this chunk: the next round replaces them where the rule allows.
        failed: set[tuple[str, int]] = set()
        for _round in range(MAX_PLACEMENT_ROUNDS):
            candidates = [
                c
                for c in await self.candidates_for(chunk_id, near)
                if c not in stored
                and not is_full(self.space.get((c.host, c.port), len(data)), len(data))
            ]
            wanted = self._plan(chunk_id, stored, candidates, failed)
            if not wanted:
                return stored
            outcomes = await self._store_all(wanted, chunk_id, data, uploaded)
            for cand, outcome in zip(wanted, outcomes, strict=True):
                if outcome is True:
                    stored.append(cand)
                elif isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome
                else:
                    failed.add((cand.host, cand.port))
            if self._done(stored, candidates):
                return stored
        raise PlacementImpossible(
            f"chunk {short_id(chunk_id)} could not be placed after {MAX_PLACEMENT_ROUNDS} rounds; "
            f"{counted(len(self.dead), 'peer')} failed; {RERUN_HINT}"
        )

    def rules(self) -> list[tuple[int, Blocs | None]]:
        """The rules to meet, best first, as (how many countries or blocs, blocs or None for countries).

        With blocs: as many blocs as the rule wants countries (or ``min_blocs`` if more), then, unless blocs
        are required, the plain country rule. Distinct blocs are distinct countries, so the first implies it.
        """
        if not self.blocs:
            return [(self.min_countries, None)]
        rules: list[tuple[int, Blocs | None]] = [
            (max(self.min_countries, self.min_blocs), self.blocs)
        ]
        if self.min_blocs <= 1:
            rules.append((self.min_countries, None))
        return rules

    def _done(self, stored: list[Candidate], candidates: list[Candidate]) -> bool:
        """``stored`` meets the best rule the peers can meet (a worse one only when the better is out of reach)."""
        for count, blocs in self.rules():
            if meets_rule(stored, replicas=self.replicas, min_countries=count, blocs=blocs):
                return True
            if meets_rule(
                [*stored, *candidates], replicas=self.replicas, min_countries=count, blocs=blocs
            ):
                return False
        return False

    def _plan(
        self,
        chunk_id: ChunkId,
        stored: list[Candidate],
        candidates: list[Candidate],
        failed: set[tuple[str, int]],
    ) -> list[Candidate]:
        """The holders to store on next: preferably ones that have not failed this chunk.

        Raises:
            PlacementImpossible: even the holders that failed this chunk cannot complete the rule.
        """
        others = [c for c in candidates if (c.host, c.port) not in failed]
        for count, blocs in self.rules():
            for pool in [others, candidates] if len(others) < len(candidates) else [candidates]:
                try:
                    return plan_repair(
                        chunk_id,
                        stored,
                        pool,
                        replicas=self.replicas,
                        min_countries=count,
                        blocs=blocs,
                    )
                except PlacementImpossible:
                    # Only holders that failed this chunk can complete it: try them again. One that keeps
                    # failing is dead after MAX_HOLDER_FAILURES chunks, and dead ones are no candidates.
                    continue
        # plan_repair words its error for a repair; a share says what it ran out of.
        raise self._ran_out(chunk_id, [*stored, *candidates])

    def _ran_out(self, chunk_id: ChunkId, left: list[Candidate]) -> PlacementImpossible:
        return PlacementImpossible(
            f"cannot store chunk {short_id(chunk_id)}: storage peers stopped answering ({len(self.dead)}) "
            f"or are full ({len(self.full)}); "
            + shortfall(
                summarize(left), self.replicas, self.min_countries, geo_table=self.geo is not None
            )
            + f"; {RERUN_HINT}"
        )

    async def _store_all(
        self,
        wanted: list[Candidate],
        chunk_id: ChunkId,
        data: bytes,
        uploaded: Callable[[], None] | None = None,
    ) -> list[bool | BaseException]:
        """Store on every holder of ``wanted``: the first two through the pipeline when it takes them."""
        pair, swapped = self.pipeline.pair(wanted) if self.pipeline is not None else ([], False)
        rest = [c for c in wanted if c not in pair]
        jobs: list[Awaitable[object]] = [self.store_one(c, chunk_id, data) for c in rest]
        if pair and self.pipeline is not None:
            done = uploaded if not rest else None  # other uploads still run: not done
            jobs.insert(0, self.pipeline.store_pair(pair[0], pair[1], chunk_id, data, done))
        results = cast(
            list[bool | tuple[bool, bool] | BaseException],
            await asyncio.gather(*jobs, return_exceptions=True),
        )
        outcomes: list[bool | BaseException] = []
        if pair:
            first = results.pop(0)
            both: list[bool | BaseException] = (
                list(first) if isinstance(first, tuple) else [first, first]
            )
            outcomes += both[::-1] if swapped else both
        outcomes += [r for r in results if not isinstance(r, tuple)]
        return outcomes

    async def _lease_holds(self, addr: tuple[str, int], chunk_id: ChunkId) -> bool:
        """Whether a copy ``addr`` already held will last: someone else may have stored it first, with a short
        lease (a re-store never extends one, docs/STORAGE.md), and then it is no copy to count on."""
        if self.lease_s <= 0:
            return True  # a repair of a chunk whose lease is unknown here: any live copy counts
        try:
            [left_s] = await self.node.client.leases(addr, [chunk_id])
        except P2PMegaError as exc:
            log.debug("holder %s did not say the lease of %s: %s", addr, short_id(chunk_id), exc)
            return True  # an older holder: as before the LEASES request existed
        if left_s < self.lease_s / 2:
            log.debug(
                "holder %s already had %s for %d s only; placing it elsewhere",
                addr,
                short_id(chunk_id),
                left_s,
            )
            return False
        return True

    async def store_one(
        self,
        cand: Candidate,
        chunk_id: ChunkId,
        data: bytes,
        *,
        forward_to: Candidate | None = None,
        forwarding: list[bool] | None = None,
    ) -> bool:
        """Store on one holder, retrying what may pass; True once the holder confirmed the chunk.

        With ``forward_to``, ask the holder to forward the chunk there (STORE_FORWARD); ``forwarding`` gets True
        appended if it will. A holder that does not know the request is stored on plainly from then on.
        """
        addr = (cand.host, cand.port)
        for attempt in range(STORE_ATTEMPTS):
            if addr in self.dead:
                return False  # given up on by another chunk's store meanwhile
            try:
                if self.ask_first and (await self.node.client.has(addr, [chunk_id]))[0]:
                    self.failures.pop(addr, None)
                    return await self._lease_holds(addr, chunk_id)
                self.bytes_sent += len(data)
                pipeline = self.pipeline
                if pipeline is not None:
                    pipeline.uploading()
                if pipeline is not None and forward_to is not None:
                    newly = await pipeline.upload(addr, chunk_id, data, forward_to, forwarding)
                else:
                    newly = await self.node.client.store(
                        addr, chunk_id, data, self.lease_s, renew_key=self.renew_key
                    )
                if pipeline is not None:
                    pipeline.uploaded(len(data))
                if not newly:
                    self.failures.pop(addr, None)
                    return await self._lease_holds(addr, chunk_id)
            except QuotaExceeded as exc:
                # Also SourceLimitExceeded: our network used its share of that holder (or its rate).
                log.debug("store on %s refused, holder full for us: %s", addr, exc)
                self.full.add(addr)
                return False
            except PeerRefused as exc:
                log.debug("store on %s refused, leaving the holder out: %s", addr, exc)
                self.dead.add(addr)
                return False
            except NetworkError as exc:
                log.debug("store on %s failed (attempt %d): %s", addr, attempt + 1, exc)
                if attempt + 1 < STORE_ATTEMPTS:
                    await asyncio.sleep(STORE_RETRY_DELAY_S * 2**attempt)
                    continue
            except P2PMegaError as exc:
                log.debug("store on %s failed: %s", addr, exc)  # not a network hiccup: no retry
            else:
                self.failures.pop(addr, None)
                return True
            break
        self.failures[addr] += 1
        if self.failures[addr] >= MAX_HOLDER_FAILURES:
            self.dead.add(addr)
        return False
