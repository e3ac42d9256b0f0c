"""net.crawl against a scripted protocol: which nodes a lookup asks, and how many at once."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from kademlia.node import Node

from p2pmega.core.node_id import node_id_for
from p2pmega.core.rtt import RttTable
from p2pmega.net.crawl import Crawl
from p2pmega.net.dht_wire import DHTLimits

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
        self.limits = DHTLimits()
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


def _world(rng: random.Random, count: int = 200) -> list[Node]:
    """Nodes whose ids are bound to their own /24s (core.node_id), as a lookup accepts them."""
    return [
        Node(
            node_id_for(rng.randbytes(32), f"10.{i // 250}.{i % 250}.1"),
            f"10.{i // 250}.{i % 250}.1",
            4000,
        )
        for i in range(count)
    ]


def _near_and_far(rng: random.Random) -> tuple[bytes, list[Node], list[Node]]:
    """A key, the 30 nodes nearest it and 3 far ones."""
    world = _world(rng)
    key = bytes(a ^ b for a, b in zip(world[0].id, b"\x00" * 17 + rng.randbytes(3), strict=True))
    target = int.from_bytes(key, "big")
    ordered = sorted(world, key=lambda n: n.long_id ^ target)
    return key, ordered[:30], ordered[-3:]


async def test_a_converged_crawl_asks_the_rest_of_the_k_closest_at_once() -> None:
    # Section 2.3 of the paper: once a round brings nothing closer, the k closest not yet asked are asked in
    # one go. The three seeds all know the same 30 nodes near the key, and those know nobody new: after the
    # first reply nothing gets closer, so the remaining closest must go out together, not three at a time.
    rng = random.Random(15)
    key, near, seeds = _near_and_far(rng)
    target = int.from_bytes(key, "big")
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
    key, near, seeds = _near_and_far(rng)
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
    seeds = _world(rng, 10)
    crawl = Crawl(ScriptedProtocol({}), key, seeds, alpha=ALPHA, mode="node")  # type: ignore[arg-type]
    for node in seeds[:3]:
        crawl.state[node.id] = "failed"
    for node in seeds[3:]:
        crawl.state[node.id] = "done"
    assert crawl._spare(now=0.0) == 0  # still converging: alpha at a time, no spares
    crawl.converged = True
    assert crawl._spare(now=0.0) == 6  # 3 of 10 asked did not answer: ceil(20 * 3 / 10)
