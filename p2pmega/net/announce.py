"""Batched provider announcements: which nodes should record which keys, with few crawls.

Plans with the crawls it is given and sends through the callback it is given; no sockets here.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from p2pmega.net.crawl import LookupResult, Peer

Crawler = Callable[[bytes], Awaitable[LookupResult]]
Sender = Callable[[Peer, list[bytes]], Awaitable[int]]

CRAWL_CONCURRENCY = 8
"""Crawls run at once while planning, as node.py's announce worker ran whole announces."""
SEND_CONCURRENCY = 32
"""add_providers requests in flight at once: enough to fill a round trip, few enough to not flood."""


def _distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


class CrawlPace:
    """Admits crawls at most ``at_once`` at a time, starting at most ``per_s`` a second (a bucket of one token).

    A holder's announcer paces every batch with one (replicate/duties.py): the stores of a share come in a burst,
    and without a pace each holder's crawls went out at once, on every holder of the share together.
    """

    def __init__(self, *, at_once: int, per_s: float) -> None:
        if at_once < 1 or per_s <= 0:
            raise ValueError("a pace admits at least one crawl at a time, at a positive rate")
        self._slots = asyncio.Semaphore(at_once)
        self._gap_s = 1.0 / per_s
        self._next_at = 0.0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot and the crawl's turn, and hold the slot while the crawl runs."""
        async with self._slots:
            now = asyncio.get_running_loop().time()
            start = max(now, self._next_at)
            self._next_at = start + self._gap_s
            if start > now:
                await asyncio.sleep(start - now)
            yield


class AnnouncePlan:
    """Maps keys to the nodes that should record them, crawling only where a crawl could differ.

    If a crawl saw the whole reachable network (``LookupResult.closed``: fewer than k contacts
    everywhere, every node asked), every key's k closest nodes follow from it without a crawl;
    that is the case of a test network or a young one. Otherwise every key gets its own crawl, as
    a single announce would. Reusing a crawl for a nearby key is provable only in rare cases: the
    k closest to K1 are all nodes within R of K1, and those to K2 = K1 xor r are then provably the
    same only if r's set bits are among R's, so it is not attempted. Nor is a guess: the keys of a batch are
    hashes of unrelated chunks, so another key's k closest lie inside one crawl's region (about k of the N nodes)
    only for about k/N of the keys (docs/SCALE.md, "Announcements").

    With a ``pace``, every crawl waits for its turn in it (:class:`CrawlPace`).
    """

    def __init__(self, *, ksize: int, crawl: Crawler, pace: CrawlPace | None = None) -> None:
        self.ksize = ksize
        self.crawl = crawl
        self.pace = pace
        self.crawls = 0
        self._everyone: list[Peer] | None = None

    def _closest(self, key: bytes) -> list[Peer] | None:
        if self._everyone is None:
            return None
        return heapq.nsmallest(self.ksize, self._everyone, key=lambda p: _distance(key, p.node_id))

    async def run(self, keys: Sequence[bytes]) -> dict[bytes, list[Peer]]:
        """The nodes that should record each of ``keys`` (20-byte DHT keys)."""
        plan: dict[bytes, list[Peer]] = {}
        remaining = list(dict.fromkeys(keys))
        width = 1  # crawl one key first: in a small network that one crawl settles every key
        while remaining:
            if self._everyone is not None:
                plan.update((key, self._closest(key) or []) for key in remaining)
                break
            batch, remaining = remaining[:width], remaining[width:]
            results = await asyncio.gather(*(self._paced(k) for k in batch))
            self.crawls += len(batch)
            for key, result in zip(batch, results, strict=True):
                plan[key] = result.peers
                if result.closed:
                    self._everyone = result.answered
            width = CRAWL_CONCURRENCY
        return plan

    async def _paced(self, key: bytes) -> LookupResult:
        if self.pace is None:
            return await self.crawl(key)
        async with self.pace.slot():
            return await self.crawl(key)


async def send_plan(plan: dict[bytes, list[Peer]], send: Sender, *, batch_keys: int) -> int:
    """Send each node its keys, ``batch_keys`` per request; returns the records confirmed."""
    per_node: dict[bytes, tuple[Peer, list[bytes]]] = {}
    for key, peers in plan.items():
        for peer in peers:
            per_node.setdefault(peer.node_id, (peer, []))[1].append(key)
    limit = asyncio.Semaphore(SEND_CONCURRENCY)

    async def one(peer: Peer, keys: list[bytes]) -> int:
        async with limit:
            return await send(peer, keys)

    counts = await asyncio.gather(
        *(
            one(peer, keys[i : i + batch_keys])
            for peer, keys in per_node.values()
            for i in range(0, len(keys), batch_keys)
        )
    )
    return sum(counts)
