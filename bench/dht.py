"""DHT lookup cost: N nodes in one process on loopback, messages and round trips per lookup.

Usage: python bench/dht.py [N ...]   (default 50 200 1000; each node has its own 127.x.y.1 address)
       python bench/dht.py announce [N [CHUNKS]]   (default 9 256: announce cost, before and after)

For each N it starts N DHTNodes (ksize 20, alpha 3, RPC timeout 2 s), joins them one by one through
node 0, lets every node refresh its buckets once (the hourly maintenance of a live network),
announces chunks from random nodes and looks each up from random other nodes. Messages are the
requests the seeker sent during the lookup (DHTStats counters, so table-maintenance pings the lookup
triggers count too; "crawl" is the crawl's own queries); round trips are the longest reply chain of
the crawl. It prints medians and lookup-time percentiles, then the growth from the second-largest N
to the largest against log(N) growth and linear growth.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import statistics
import sys
import time

from kademlia.node import Node

from p2pmega.net.dht import DHTNode

ANNOUNCES = 40
ANNOUNCE_CONCURRENCY = 8
"""node.py's announce worker runs this many announces at once."""
SEEKERS_PER_CHUNK = 3


def address(i: int) -> str:
    return f"127.{100 + i // 250}.{i % 250 + 1}.1"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def measure(n: int, rng: random.Random) -> dict[str, float]:
    nodes = [DHTNode(host=address(i), seed=rng.randbytes(32)) for i in range(n)]
    try:
        for node in nodes:
            await node.start()
        started = time.monotonic()
        for node in nodes[1:]:
            async with asyncio.timeout(30):
                await node.join([(nodes[0].host, nodes[0].port)])
        # A live network refreshes its buckets hourly; do one round now, or the nodes that joined
        # first keep the sparse tables of a young network and a few lookups end in a region that
        # knows nothing closer (measured: 1-2% misses at N=1000 without it).
        for i in range(0, n, 25):
            async with asyncio.timeout(60):
                await asyncio.gather(*(node.refresh() for node in nodes[i : i + 25]))
        join_s = time.monotonic() - started
        messages: list[float] = []
        crawl_messages: list[float] = []
        trips: list[float] = []
        walls: list[float] = []
        peer_messages: list[float] = []
        found = 0
        for _ in range(ANNOUNCES):
            holder = rng.choice(nodes)
            chunk_id = rng.randbytes(32)
            async with asyncio.timeout(30):
                await holder.announce_many([chunk_id], 7000)
            for seeker in rng.sample([x for x in nodes if x is not holder], SEEKERS_PER_CHUNK):
                before = seeker.stats.requests_sent
                start = time.monotonic()
                async with asyncio.timeout(30):
                    result = await seeker.lookup_providers(chunk_id)
                walls.append(time.monotonic() - start)
                messages.append(seeker.stats.requests_sent - before)
                crawl_messages.append(result.messages)
                trips.append(result.round_trips)
                found += holder.node_id in {p.node_id for p in result.providers}
                before = seeker.stats.requests_sent
                async with asyncio.timeout(30):
                    await seeker.find_peers(rng.randbytes(20))
                peer_messages.append(seeker.stats.requests_sent - before)
        lookups = ANNOUNCES * SEEKERS_PER_CHUNK
        return {
            "n": n,
            "join_s": join_s,
            "success": found / lookups,
            "messages": statistics.median(messages),
            "crawl_messages": statistics.median(crawl_messages),
            "round_trips": statistics.median(trips),
            "p50_ms": 1000 * percentile(walls, 0.50),
            "p95_ms": 1000 * percentile(walls, 0.95),
            "find_peers_messages": statistics.median(peer_messages),
        }
    finally:
        for node in nodes:
            await node.stop()


async def main(sizes: list[int]) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    rows = []
    print(
        "N      join+refresh_s  found  msgs/lookup  (crawl)  round_trips  p50_ms  p95_ms  find_peers_msgs"
    )
    for n in sizes:
        row = await measure(n, rng)
        rows.append(row)
        print(
            f"{n:<6} {row['join_s']:14.1f}  {row['success']:5.0%}  {row['messages']:11.1f}  "
            f"{row['crawl_messages']:7.1f}  "
            f"{row['round_trips']:11.1f}  {row['p50_ms']:6.1f}  {row['p95_ms']:6.1f}  "
            f"{row['find_peers_messages']:15.1f}"
        )
    if len(rows) >= 2:
        small, large = rows[-2], rows[-1]
        log_ratio = math.log(large["n"]) / math.log(small["n"])
        print(
            f"N {small['n']:.0f} -> {large['n']:.0f}: nodes x{large['n'] / small['n']:.1f}, "
            f"log N x{log_ratio:.2f}; messages x{large['messages'] / small['messages']:.2f}, "
            f"round trips x{large['round_trips'] / small['round_trips']:.2f}, "
            f"find_peers messages x{large['find_peers_messages'] / small['find_peers_messages']:.2f}"
        )


async def legacy_announce(node: DHTNode, chunk_id: bytes, port: int) -> int:
    """One announce as before announce_many: a crawl, then one add_provider per close node."""
    key = chunk_id[:20]
    proto = node.server._proto()
    peers = (await node.server.crawl(key, "node", node._seeds(key))).peers
    results = await asyncio.gather(
        *(proto.call_add_provider(Node(p.node_id, p.host, p.port), key, port) for p in peers)
    )
    return sum(1 for ok, stored in results if ok and stored)


async def measure_announce(n: int, chunks: int, rng: random.Random) -> None:
    """CPU (all N nodes: one process), wall time and datagrams of announcing ``chunks`` chunks."""
    nodes = [DHTNode(host=address(i), seed=rng.randbytes(32)) for i in range(n)]
    try:
        for node in nodes:
            await node.start()
        for node in nodes[1:]:
            async with asyncio.timeout(30):
                await node.join([(nodes[0].host, nodes[0].port)])
        holder = nodes[-1]
        limit = asyncio.Semaphore(ANNOUNCE_CONCURRENCY)

        async def one(chunk_id: bytes) -> int:
            async with limit:
                return await legacy_announce(holder, chunk_id, 7000)

        async def per_chunk(ids: list[bytes]) -> int:
            return sum(await asyncio.gather(*(one(c) for c in ids)))

        async def batched(ids: list[bytes]) -> int:
            return await holder.announce_many(ids, 7000)

        for name, run in (("per chunk (before)", per_chunk), ("announce_many", batched)):
            ids = [rng.randbytes(32) for _ in range(chunks)]
            sent = sum(x.stats.requests_sent for x in nodes)
            cpu, wall = time.process_time(), time.monotonic()
            async with asyncio.timeout(120):
                confirmed = await run(ids)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            sent = sum(x.stats.requests_sent for x in nodes) - sent
            print(
                f"N={n} {chunks} chunks, {name:18}: cpu {1000 * cpu:7.1f} ms  wall "
                f"{1000 * wall:7.1f} ms  requests {sent:6}  records confirmed {confirmed}"
            )
    finally:
        for node in nodes:
            await node.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["announce"]:
        n, chunks = ([int(a) for a in sys.argv[2:4]] + [9, 256][len(sys.argv[2:4]) :])[:2]
        asyncio.run(measure_announce(n, chunks, random.Random(7)))
    else:
        asyncio.run(main([int(a) for a in sys.argv[1:]] or [50, 200, 1000]))
