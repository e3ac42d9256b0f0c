"""A holder's routine duties, each an object ``Node`` runs under ``net.supervise``.

- ``Announcer``: announces what the transfer server stored, in batches (docs/DHT.md);
- ``GarbageCollector``: removes expired chunks;
- ``Reannouncer``: queues every held chunk for announcing again, well inside the record lifetime;
- ``Summary``: a one-line state of the node, once a minute and at exit.

The repairer (repair.py) and the keeper (keeper.py) are duties of the same shape.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from p2pmega.core.geo import country_of
from p2pmega.core.ids import ChunkId
from p2pmega.core.words import counted
from p2pmega.defaults import GC_INTERVAL_S, REANNOUNCE_INTERVAL_S
from p2pmega.errors import P2PMegaError
from p2pmega.net.announce import CrawlPace
from p2pmega.node import Node
from p2pmega.storage.sizes import format_size

log = logging.getLogger(__name__)

# Chunk ids announced in one announce_many call at most (it splits them into datagrams itself).
ANNOUNCE_BATCH = 1024
# Stored chunks are announced in batches (docs/DHT.md): a share stores a chunk every few milliseconds on each
# holder, and each announce_many costs a crawl plus requests to the k closest nodes, on the announcer and on
# every recorder. A batch closes once no chunk was stored for ANNOUNCE_QUIET_S, or ANNOUNCE_DELAY_S after its
# first chunk, or at ANNOUNCE_BATCH ids. Nothing urgent reads the records (fetch, check and the keeper find a
# share's holders by searching near its runs' keys, a repairer in its own pool; all use the records as a
# fallback), so a holder waits well past the share that stored them: a command run right after a share does not
# compete with its ~20 holders' crawls (docs/SCALE.md, "Announcements").
ANNOUNCE_QUIET_S = 10.0
ANNOUNCE_DELAY_S = 60.0
# Each batch's quiet and delay are stretched by a random factor in [1, 1 + ANNOUNCE_JITTER]: the holders of one
# share, whose last stores came together, announce spread over the next 10-20 s, not all in the same second.
ANNOUNCE_JITTER = 1.0
# A holder's announce crawls (one per chunk key in a network too large for one crawl to see whole) run at most
# this many at once and start at most this many a second: a burst of stores is a trickle of crawls. 5 a second
# re-announces 216,000 chunks (422 GiB of 2 MiB chunks) in the 12 h between re-announcements; a default seed
# (10 GB) holds at most about 5,000.
ANNOUNCE_CRAWLS_AT_ONCE = 2
ANNOUNCE_CRAWLS_PER_S = 5.0
# At stop, what is still waiting to be announced gets this long (fetchers can also find holders without the
# record, by asking the nodes closest to the chunk).
ANNOUNCE_FLUSH_TIMEOUT_S = 3.0
# A summary line at most this often (the brief: "at most a one-line summary a minute").
SUMMARY_INTERVAL_S = 60.0


async def every(interval_s: float, duty: Callable[[], Awaitable[object]]) -> None:
    """Run ``duty`` every ``interval_s`` seconds, the first time one interval from now."""
    while True:
        await asyncio.sleep(interval_s)
        await duty()


@dataclass(eq=False)
class Announcer:
    """Announces the chunks this holder stored (and the ones queued again by the re-announcer).

    Chunks it stored wait for a batch to close (``quiet_s``, ``delay_s``, each stretched by up to ``jitter``);
    chunks queued again (``requeue``) go out at once. Every crawl waits for its turn in ``pace``.
    """

    node: Node
    quiet_s: float = ANNOUNCE_QUIET_S
    delay_s: float = ANNOUNCE_DELAY_S
    jitter: float = ANNOUNCE_JITTER
    rng: random.Random = field(default_factory=random.Random)
    pace: CrawlPace = field(
        default_factory=lambda: CrawlPace(
            at_once=ANNOUNCE_CRAWLS_AT_ONCE, per_s=ANNOUNCE_CRAWLS_PER_S
        )
    )
    name: str = "announcer"
    announced: int = 0
    queue: asyncio.Queue[ChunkId] = field(default_factory=asyncio.Queue)
    _due: list[ChunkId] = field(
        default_factory=list
    )  # queued again: announced without waiting for quiet
    _due_added: asyncio.Event = field(default_factory=asyncio.Event)
    _holding: list[ChunkId] = field(default_factory=list)  # the batch being announced, until it is

    def __post_init__(self) -> None:
        self.node.stored_listeners.append(self.queue.put_nowait)

    @property
    def crawls(self) -> int:
        """The crawls this node's announcements ran so far (one per key in a large network)."""
        return self.node.dht.announce_crawls if self.node.dht is not None else 0

    @property
    def waiting(self) -> int:
        """Chunks waiting to be announced: stored ones and queued-again ones."""
        return self.queue.qsize() + len(self._due)

    def requeue(self, ids: Iterable[ChunkId]) -> None:
        """Queue chunks held already for announcing again, with no quiet period (the re-announcer's)."""
        self._due.extend(ids)
        self._due_added.set()

    async def run(self) -> None:
        self.node.dht_node.announce_pace = self.pace
        while True:
            if self._due:
                batch = self._holding = self._due[:ANNOUNCE_BATCH]
                del self._due[:ANNOUNCE_BATCH]
            else:
                batch = await self._stored_batch()
            await self._announce(batch)
            self._holding = []

    async def _stored_batch(self) -> list[ChunkId]:
        """The next batch of stored chunks, once it closes (none if chunks were queued again first).

        The batch is ``_holding`` while it fills, so that ``close`` announces it if the node stops meanwhile.
        """
        queue, loop = self.queue, asyncio.get_running_loop()
        self._holding = []
        self._due_added.clear()
        first = asyncio.ensure_future(queue.get())
        due = asyncio.ensure_future(self._due_added.wait())
        try:
            await asyncio.wait([first, due], return_when=asyncio.FIRST_COMPLETED)
        finally:
            due.cancel()
            if first.done() and not first.cancelled():
                self._holding = [
                    first.result()
                ]  # taken off the queue: close() must see it if we stop now
            else:
                first.cancel()
        if not self._holding:
            return []  # chunks were queued again: the caller announces them first
        batch = self._holding
        stretch = 1 + self.jitter * self.rng.random()
        quiet_s, deadline = self.quiet_s * stretch, loop.time() + self.delay_s * stretch
        while len(batch) < ANNOUNCE_BATCH:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            wait_s = min(quiet_s, deadline - loop.time())
            if wait_s <= 0:
                break
            try:
                async with asyncio.timeout(wait_s):
                    batch.append(await queue.get())
            except TimeoutError:
                break
        return batch

    async def _announce(self, ids: list[ChunkId]) -> None:
        if not ids:
            return
        try:
            await self.node.dht_node.announce_many(ids, self.node.port)
            self.announced += len(ids)
        except P2PMegaError as exc:
            log.debug("announcing %d chunks failed: %s", len(ids), exc)

    async def close(self) -> None:
        """Announce what the stopped worker held or had queued, within ANNOUNCE_FLUSH_TIMEOUT_S."""
        ids, self._holding = self._holding, []
        ids.extend(self._due)
        self._due.clear()
        while not self.queue.empty():
            ids.append(self.queue.get_nowait())
        if not ids or self.node.dht is None:
            return
        try:
            async with asyncio.timeout(ANNOUNCE_FLUSH_TIMEOUT_S):
                await self._announce(ids)
        except TimeoutError:
            log.debug("announcing %d chunks at stop timed out", len(ids))


@dataclass(eq=False)
class GarbageCollector:
    """Removes expired chunks every ``interval_s``."""

    node: Node
    interval_s: float = GC_INTERVAL_S
    name: str = "garbage collector"

    async def run(self) -> None:
        await every(self.interval_s, self.collect)

    async def collect(self) -> int:
        store = self.node.store
        removed = await asyncio.to_thread(store.collect_garbage) if store is not None else 0
        if removed:
            log.info("garbage collector removed %s", counted(removed, "expired chunk"))
        return removed

    async def close(self) -> None:
        return None


@dataclass(eq=False)
class Reannouncer:
    """Queues every held chunk for the announcer at start and every ``interval_s``, so its records never lapse."""

    node: Node
    announcer: Announcer
    interval_s: float = REANNOUNCE_INTERVAL_S
    name: str = "re-announcer"

    async def run(self) -> None:
        # At once too: a holder that was down may have missed records lapsing, and repair looks for providers.
        await self.reannounce()
        await every(self.interval_s, self.reannounce)

    async def reannounce(self) -> None:
        if self.node.store is None:
            return
        if self.announcer.waiting:
            # The last round is still being announced (a very large store on a slow network): queueing every
            # id again would only grow the queue.
            log.info(
                "re-announcing skipped: %d chunks still wait to be announced",
                self.announcer.waiting,
            )
            return
        self.announcer.requeue(await asyncio.to_thread(self.node.store.ids))

    async def close(self) -> None:
        return None


@dataclass(eq=False)
class Summary:
    """Reports one line about the node every ``interval_s`` (the announcer's and repairer's counts if given)."""

    node: Node
    report: Callable[[str], None]
    announcer: Announcer | None = None
    extra: list[Callable[[], str]] = field(default_factory=list)
    interval_s: float = SUMMARY_INTERVAL_S
    name: str = "summary"

    async def run(self) -> None:
        await every(self.interval_s, self._report_line)

    async def _report_line(self) -> None:
        self.report(self.line())

    def line(self) -> str:
        """One line about this node's state, for the per-minute log of long-running commands."""
        node = self.node
        peers = node.dht.contacts() if node.dht is not None else []
        countries = {country_of(p.host, node.settings.geo) for p in peers} - {None}
        contacts = f"{counted(len(peers), 'contact')} in {counted(len(countries), 'known country', 'known countries')}"
        store = node.store
        if store is None:
            return contacts
        parts = [
            f"holding {counted(store.chunk_count, 'chunk')} "
            f"({format_size(store.used_bytes)} of {format_size(store.quota_bytes)})",
            contacts,
        ]
        if self.announcer is not None:
            announcer = self.announcer
            parts.append(
                f"{counted(announcer.announced, 'announcement')} ({counted(announcer.crawls, 'crawl')})"
            )
        parts.extend(part() for part in self.extra)
        return ", ".join(parts)

    async def close(self) -> None:
        return None
