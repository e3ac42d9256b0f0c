"""``share``: encrypt a file, place every chunk on holders in enough countries, return the links."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from p2pmega.api.common import (
    SMALL_NETWORK_NODES,
    Holder,
    NetSettings,
    candidate_of,
    candidate_pool,
    client_node,
)
from p2pmega.core.chunking import DEFAULT_CHUNK_SIZE, ChunkId, dht_key_of
from p2pmega.core.geo import GeoTable
from p2pmega.core.magnet import format_link
from p2pmega.core.manifest import FileEncoder
from p2pmega.core.placement import Candidate, choose_holders, meets_rule, plan_repair
from p2pmega.errors import (
    BadOption,
    InputFileError,
    NetworkError,
    P2PMegaError,
    PeerRefused,
    PlacementImpossible,
    QuotaExceeded,
)
from p2pmega.node import Node

log = logging.getLogger(__name__)

# Chunks being encrypted or uploaded at once: enough to keep both cores and every holder busy, few enough that
# memory stays at a few MiB per chunk whatever the file size. Measured with 256 MiB to 8 seeds, 2 MiB chunks:
# 3 -> 1.65-2.02 s, 4 -> 1.26-1.32 s, 6 -> 1.23-1.52 s (with 1 MiB chunks 6 was best, 10 and 16 slower).
SHARE_CONCURRENCY = 4
DEFAULT_LEASE_S = 30 * 24 * 3600.0
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

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ChunkPlacement:
    chunk_id: ChunkId
    kind: str  # "data" or "manifest"
    index: int
    holders: tuple[Holder, ...]


@dataclass(frozen=True)
class ShareResult:
    read_link: str
    keep_link: str
    size: int
    chunk_count: int
    chunks: tuple[ChunkPlacement, ...]


@dataclass
class Placer:
    """Stores chunks on holders chosen by the placement rule, replacing holders that fail."""

    node: Node
    pool: list[Candidate]
    geo: GeoTable | None
    replicas: int
    min_countries: int
    lease_s: float
    dead: set[tuple[str, int]] = field(default_factory=set)
    full: set[tuple[str, int]] = field(default_factory=set)
    failures: Counter[tuple[str, int]] = field(default_factory=Counter)

    async def candidates_for(self, chunk_id: ChunkId) -> list[Candidate]:
        if len(self.pool) < SMALL_NETWORK_NODES:
            found = self.pool
        else:
            peers = await self.node.dht_node.find_peers(dht_key_of(chunk_id))
            found = [candidate_of(p.node_id, (p.host, p.port), self.geo) for p in peers]
        return [c for c in found if (c.host, c.port) not in self.dead | self.full]

    async def place(self, chunk_id: ChunkId, data: bytes) -> list[Candidate]:
        """Store ``data`` until holders meeting the rule have confirmed it.

        Raises:
            PlacementImpossible: the live peers can no longer meet the rule.
        """
        stored: list[Candidate] = []
        # Holders that failed this chunk: the next round replaces them where the rule allows.
        failed: set[tuple[str, int]] = set()
        for _round in range(MAX_PLACEMENT_ROUNDS):
            candidates = [c for c in await self.candidates_for(chunk_id) if c not in stored]
            others = [c for c in candidates if (c.host, c.port) not in failed]
            try:
                wanted = plan_repair(
                    chunk_id,
                    stored,
                    others,
                    replicas=self.replicas,
                    min_countries=self.min_countries,
                )
            except PlacementImpossible:
                if len(others) == len(candidates):
                    raise
                # Only holders that failed this chunk can complete it: try them again. One that keeps
                # failing is dead after MAX_HOLDER_FAILURES chunks, and dead ones are no candidates.
                wanted = plan_repair(
                    chunk_id,
                    stored,
                    candidates,
                    replicas=self.replicas,
                    min_countries=self.min_countries,
                )
            if not wanted:
                return stored
            outcomes = await asyncio.gather(
                *(self._store_one(c, chunk_id, data) for c in wanted), return_exceptions=True
            )
            for cand, outcome in zip(wanted, outcomes, strict=True):
                if outcome is True:
                    stored.append(cand)
                elif isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome
                else:
                    failed.add((cand.host, cand.port))
            if meets_rule(stored, replicas=self.replicas, min_countries=self.min_countries):
                return stored
        raise PlacementImpossible(
            f"chunk {chunk_id.hex()[:16]}… could not be placed after {MAX_PLACEMENT_ROUNDS} rounds; "
            f"{len(self.dead)} peers failed"
        )

    async def _store_one(self, cand: Candidate, chunk_id: ChunkId, data: bytes) -> bool:
        """Store on one holder, retrying what may pass; True once the holder confirmed the chunk."""
        addr = (cand.host, cand.port)
        for attempt in range(STORE_ATTEMPTS):
            if addr in self.dead:
                return False  # given up on by another chunk's store meanwhile
            try:
                await self.node.client.store(addr, chunk_id, data, self.lease_s)
            except QuotaExceeded:
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


def _holders(cands: list[Candidate]) -> tuple[Holder, ...]:
    return tuple(Holder(c.host, c.port, c.country) for c in cands)


async def share(
    path: Path,
    *,
    net: NetSettings,
    replicas: int = 2,
    min_countries: int = 2,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lease_s: float = DEFAULT_LEASE_S,
    progress: Progress | None = None,
    rng: random.Random | None = None,
) -> ShareResult:
    """Encrypt ``path``, store each chunk and the manifest on holders meeting the rule, return the links.

    Raises:
        InputFileError: the file is missing or unreadable.
        BadOption: replicas / min_countries out of range.
        BootstrapFailed: no way into the network.
        PlacementImpossible: the reachable peers cannot meet the rule (nothing more is stored).
    """
    if replicas < 1 or not 1 <= min_countries <= replicas:
        raise BadOption(
            f"--replicas {replicas} --min-countries {min_countries}: need replicas >= 1 and "
            "1 <= min-countries <= replicas"
        )
    rng = rng or random.Random()  # noqa: S311 - only spreads DHT probes, nothing secret
    try:
        handle = await asyncio.to_thread(path.open, "rb")
    except OSError as exc:
        raise InputFileError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    try:
        info = await asyncio.to_thread(os.fstat, handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputFileError(f"{str(path)!r} is not a regular file")
        size = info.st_size
        encoder = FileEncoder(name=path.name, size=size, chunk_size=chunk_size)
        async with client_node(net) as node:
            pool = await candidate_pool(node, net.geo, rng)
            # Refuse before storing anything if even the whole pool cannot meet the rule.
            choose_holders(rng.randbytes(32), pool, replicas=replicas, min_countries=min_countries)
            placer = Placer(node, pool, net.geo, replicas, min_countries, lease_s)
            placements = await _upload(encoder, handle, size, chunk_size, placer, progress)
            cap, manifest_chunks = encoder.finish()
            for i, (chunk_id, data) in enumerate(manifest_chunks):
                stored = await placer.place(chunk_id, data)
                placements.append(ChunkPlacement(chunk_id, "manifest", i, _holders(stored)))
    finally:
        handle.close()
    root_holders = next(p.holders for p in placements if p.chunk_id == cap.root)
    # The root's holders travel in the link as hints, so a fetch can start before any DHT lookup.
    cap = dataclasses.replace(cap, peers=tuple(h.address for h in root_holders))
    return ShareResult(
        read_link=format_link(cap),
        keep_link=format_link(cap.keep_cap()),
        size=size,
        chunk_count=encoder.chunk_count,
        chunks=tuple(placements),
    )


async def _upload(
    encoder: FileEncoder,
    handle: BinaryIO,
    size: int,
    chunk_size: int,
    placer: Placer,
    progress: Progress | None,
) -> list[ChunkPlacement]:
    """Read, encrypt and place every data chunk, at most SHARE_CONCURRENCY at a time.

    Raises:
        InputFileError: the file changed size while it was read.
        PlacementImpossible: a chunk could not be placed (the first failure stops the upload).
    """
    results: dict[int, ChunkPlacement] = {}
    done_bytes = 0
    sem = asyncio.Semaphore(SHARE_CONCURRENCY)
    tasks: list[asyncio.Task[None]] = []

    fd = handle.fileno()

    async def one(index: int) -> None:
        nonlocal done_bytes
        try:
            # One worker-thread hop reads and seals the chunk (chunks are read with pread, in any order).
            chunk_id, sealed, length = await asyncio.to_thread(
                _read_and_seal, encoder, fd, index, chunk_size, size
            )
            stored = await placer.place(chunk_id, sealed)
            results[index] = ChunkPlacement(chunk_id, "data", index, _holders(stored))
            done_bytes += length
            if progress is not None:
                progress(done_bytes, size)
        finally:
            sem.release()

    try:
        for index in range(encoder.chunk_count):
            await sem.acquire()
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                sem.release()
                break
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
        if (await asyncio.to_thread(os.fstat, fd)).st_size != size:
            raise InputFileError(_CHANGED_SIZE)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if progress is not None and size == 0:
        progress(0, 0)
    return [results[i] for i in range(encoder.chunk_count)]


def _read_and_seal(
    encoder: FileEncoder, fd: int, index: int, chunk_size: int, size: int
) -> tuple[ChunkId, bytes, int]:
    """Read plaintext chunk ``index`` and seal it; return its id, stored bytes and plaintext length.

    Raises:
        InputFileError: the file is shorter than it was when the share started, or reading failed.
    """
    length = min(chunk_size, size - index * chunk_size)
    offset = index * chunk_size
    try:
        plaintext = os.pread(fd, length, offset)
        # A read may return less than asked short of the end (network file systems): read on.
        while 0 < len(plaintext) < length:
            more = os.pread(fd, length - len(plaintext), offset + len(plaintext))
            if not more:
                break
            plaintext += more
    except OSError as exc:
        raise InputFileError(f"reading the file failed: {exc.strerror or exc}") from exc
    if len(plaintext) != length:
        raise InputFileError(_CHANGED_SIZE)
    chunk_id, sealed = encoder.encode_chunk(index, plaintext)
    return chunk_id, sealed, length


_CHANGED_SIZE = "the file changed size while it was being shared; try again"
