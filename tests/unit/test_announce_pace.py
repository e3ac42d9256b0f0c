"""net.announce: a paced AnnouncePlan turns a batch of keys into crawls one pace slot at a time (issue 19)."""

from __future__ import annotations

import asyncio
import os

import pytest

from p2pmega.net.announce import AnnouncePlan, CrawlPace
from p2pmega.net.crawl import LookupResult, Peer

PEERS = [Peer(os.urandom(20), f"127.0.{i}.1", 4000 + i) for i in range(30)]


class Crawler:
    """Answers each crawl with a network too large to see whole; records how many ran at once and when."""

    def __init__(self) -> None:
        self.running = 0
        self.most_at_once = 0
        self.started: list[float] = []

    async def __call__(self, key: bytes) -> LookupResult:
        self.started.append(asyncio.get_running_loop().time())
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.running -= 1
        return LookupResult(PEERS[:20], [], 20, 2, closed=False)


async def test_a_paced_plan_crawls_every_key_within_the_pace() -> None:
    crawler = Crawler()
    pace = CrawlPace(at_once=2, per_s=200.0)
    keys = [os.urandom(20) for _ in range(12)]
    async with asyncio.timeout(10):
        plan = await AnnouncePlan(ksize=20, crawl=crawler, pace=pace).run(keys)
    assert set(plan) == set(keys), "every key gets its k nodes"
    assert len(crawler.started) == len(keys)
    assert crawler.most_at_once == 2
    gaps = [b - a for a, b in zip(crawler.started, crawler.started[1:], strict=False)]
    # The loop's clock: each start waits for its turn (sleep never wakes early).
    assert min(gaps) >= 1 / 200.0 - 1e-3, gaps


async def test_one_pace_holds_for_every_batch_that_shares_it() -> None:
    """The holder's batches share its pace: two announce_many at once do not double the crawls in flight."""
    crawler = Crawler()
    pace = CrawlPace(at_once=1, per_s=1000.0)
    batches = [[os.urandom(20) for _ in range(5)] for _ in range(2)]
    async with asyncio.timeout(10):
        await asyncio.gather(
            *(AnnouncePlan(ksize=20, crawl=crawler, pace=pace).run(b) for b in batches)
        )
    assert len(crawler.started) == 10
    assert crawler.most_at_once == 1


async def test_unpaced_a_batch_crawls_eight_at_once_as_before() -> None:
    crawler = Crawler()
    async with asyncio.timeout(10):
        await AnnouncePlan(ksize=20, crawl=crawler).run([os.urandom(20) for _ in range(17)])
    assert len(crawler.started) == 17
    assert crawler.most_at_once == 8


@pytest.mark.parametrize(("at_once", "per_s"), [(0, 1.0), (1, 0.0)])
def test_a_pace_that_admits_nothing_is_refused(at_once: int, per_s: float) -> None:
    with pytest.raises(ValueError, match="at least one crawl"):
        CrawlPace(at_once=at_once, per_s=per_s)
