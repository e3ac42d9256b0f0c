"""net.crawl against a scripted protocol: which nodes a lookup asks, and how many at once."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from kademlia.node import Node

from p2pmega.core.rtt import RttTable
from p2pmega.net.crawl import Crawl

K = 20
ALPHA = 3
REPLY_S = 0.01


class ScriptedProtocol:
    """Answers find_node from a fixed map of who knows whom, after REPLY_S; counts queries in flight."""

    def __init__(self, knows: dict[bytes, list[Node]]) -> None:
        self.ksize = K
        self.source_node = Node(b"\xff" * 20)
        self.rtt = RttTable(floor_s=1.0, ceiling_s=1.0)  # nobody stalls in this script
        self._wait_timeout = 5.0
        self.knows = knows
        self.in_flight = 0
        self.most_in_flight = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    def suspect(self, _node: Node, _now: float) -> bool:
        return False

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        return task

    async def call_find_node(self, node: Node, _target: Node) -> tuple[bool, Any]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(REPLY_S)
            return True, self.knows.get(node.id, [])
        finally:
            self.in_flight -= 1


def _near(target: int, distance: int) -> Node:
    return Node((target ^ distance).to_bytes(20, "big"))


async def test_a_converged_crawl_asks_the_rest_of_the_k_closest_at_once() -> None:
    # Section 2.3 of the paper: once a round brings nothing closer, the k closest not yet asked are asked in
    # one go. The three seeds all know the same 30 nodes near the key, and those know nobody new: after the
    # first reply nothing gets closer, so the remaining closest must go out together, not three at a time.
    rng = random.Random(15)
    key = rng.randbytes(20)
    target = int.from_bytes(key, "big")
    near = [_near(target, d) for d in rng.sample(range(1, 2**20), 30)]
    seeds = [_near(target, d) for d in (2**100, 2**101, 2**102)]
    protocol = ScriptedProtocol({s.id: near for s in seeds})

    result = await asyncio.wait_for(
        Crawl(protocol, key, seeds, alpha=ALPHA, mode="node").run(),  # type: ignore[arg-type]
        timeout=10,
    )

    closest = sorted(near, key=lambda n: n.long_id ^ target)[:K]
    assert [p.node_id for p in result.peers] == [n.id for n in closest]
    assert protocol.most_in_flight >= K - ALPHA
    await asyncio.gather(*protocol.tasks)


async def test_a_provider_lookup_stays_at_alpha() -> None:
    # A provider lookup ends at its first record: asking the k closest at once would only cost messages.
    rng = random.Random(16)
    key = rng.randbytes(20)
    target = int.from_bytes(key, "big")
    near = [_near(target, d) for d in rng.sample(range(1, 2**20), 30)]
    seeds = [_near(target, d) for d in (2**100, 2**101, 2**102)]
    protocol = ScriptedProtocol({s.id: near for s in seeds})

    async def call_find_providers(node: Node, _key: bytes) -> tuple[bool, Any]:
        ok, contacts = await protocol.call_find_node(node, Node(key))
        return ok, ([], contacts)

    protocol.call_find_providers = call_find_providers  # type: ignore[attr-defined]
    await asyncio.wait_for(
        Crawl(protocol, key, seeds, alpha=ALPHA, mode="providers").run(),  # type: ignore[arg-type]
        timeout=10,
    )
    assert protocol.most_in_flight == ALPHA
    await asyncio.gather(*protocol.tasks)


def test_a_converged_crawl_asks_spares_for_the_share_that_did_not_answer() -> None:
    # After a seizure some of the k closest never answer: asking that many more at once saves a wave.
    rng = random.Random(17)
    key = rng.randbytes(20)
    target = int.from_bytes(key, "big")
    seeds = [_near(target, 2**100 + i) for i in range(10)]
    crawl = Crawl(ScriptedProtocol({}), key, seeds, alpha=ALPHA, mode="node")  # type: ignore[arg-type]
    for node in seeds[:3]:
        crawl.state[node.id] = "failed"
    for node in seeds[3:]:
        crawl.state[node.id] = "done"
    assert crawl._spare(now=0.0) == 0  # still converging: alpha at a time, no spares
    crawl.converged = True
    assert crawl._spare(now=0.0) == 6  # 3 of 10 asked did not answer: ceil(20 * 3 / 10)
