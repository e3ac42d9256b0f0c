"""A simulated internet for the DHT's lookups: our own protocol and crawl code, thousands of nodes, virtual time.

Usage: python bench/dht_sim.py [--nodes 1000,10000] [--dead 0,10,30] [--lookups 300] [--seed 15]

Every node is a real ``HardenedServer``/``HardenedProtocol`` (the code a seed runs), but datagrams travel through
an in-memory network instead of sockets, on an event loop whose clock is virtual: waiting costs nothing, so
10,000 nodes and their round trips fit in one process and a few minutes. The network:

- each node sits at a one-way delay drawn from a log-normal distribution (median 40 ms, clipped to 10-150 ms), so
  the round trip between two nodes is the sum of theirs: 20-300 ms, median ~80 ms, with a long tail;
- 1 % of datagrams are lost, each way;
- every node on its own /24, its id bound to its key and that network (core.node_id);
- routing tables are what a live network converges to: for every node and every prefix length, up to k = 20 nodes
  of that region of the id space (sampled at random), built directly rather than by 10,000 joins;
- then a share of the nodes (``--dead``) dies: they stay in every table and never answer again, as after a seizure.

Each lookup starts at a random live node that has been running a while (its round-trip estimates warmed by 20
pings to random contacts first). Two kinds: ``find_node`` of a random key (a full crawl for the k closest nodes:
what placement and a join do), and ``providers``, the lookup a fetch makes, of a key whose records the K closest
nodes kept from before the seizure. Reported per kind, N and dead share: latency p50/p95/p99 (virtual seconds),
messages per lookup (median and mean, and the mean against the healthy case), and how often the lookup succeeded
(find_node: found the live node closest to the key; providers: found a record). Targets (issue 15): at N = 10,000 with 30 % dead, p50 <= 200 ms, p99 <= 1 s, messages <= 1.5x
the healthy case.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import random
import selectors
import statistics
import time
from typing import Any

from kademlia.node import Node

from p2pmega.core.crypto import public_key_of
from p2pmega.core.node_id import node_id_for
from p2pmega.net.kademlia_server import HardenedServer

K = 20
ALPHA = 3
LOSS = 0.01
MEDIAN_ONE_WAY_S = 0.040


class VirtualSelector(selectors.BaseSelector):
    """A selector that never waits: ``select(timeout)`` moves the virtual clock forward instead."""

    def __init__(self) -> None:
        self.now = 0.0
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            self.now += timeout
        return []

    def get_map(self) -> Any:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.virtual = VirtualSelector()
        super().__init__(self.virtual)

    def time(self) -> float:
        return self.virtual.now


class SimTransport(asyncio.DatagramTransport):
    def __init__(self, net: SimNet, address: tuple[str, int]) -> None:
        super().__init__()
        self.net, self.address = net, address

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.net.send(self.address, (addr[0], addr[1]), bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.address if name == "sockname" else default


class SimNet:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.delay: dict[tuple[str, int], float] = {}
        self.protocols: dict[tuple[str, int], Any] = {}
        self.dead: set[tuple[str, int]] = set()
        self.loop = asyncio.get_event_loop()

    def send(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        if (
            dst in self.dead
            or src in self.dead
            or dst not in self.protocols
            or self.rng.random() < LOSS
        ):
            return
        one_way = (self.delay[src] + self.delay[dst]) / 2
        self.loop.call_later(one_way, self.protocols[dst].datagram_received, data, src)


def address(i: int) -> tuple[str, int]:
    """Each node on its own /24, as node ids bound to networks (core.node_id) and per-/24 caps expect."""
    return (f"127.{1 + i // 250}.{i % 250 + 1}.1", 4000)


def build(n: int, rng: random.Random, net: SimNet) -> list[HardenedServer]:
    servers = []
    for i in range(n):
        addr = address(i)
        seed = rng.randbytes(32)
        server = HardenedServer(
            K, ALPHA, node_id_for(public_key_of(seed), addr[0]), seed=seed, rpc_timeout_s=2.0
        )
        transport = SimTransport(net, addr)
        proto = server._create_protocol()
        proto.connection_made(transport)
        server.transport, server.protocol = transport, proto
        net.protocols[addr] = proto
        net.delay[addr] = min(
            0.150, max(0.010, rng.lognormvariate(math.log(MEDIAN_ONE_WAY_S), 0.6))
        )
        servers.append(server)
    # What a converged network knows: for each node and prefix length b, up to K nodes of the sibling region.
    order = sorted(range(n), key=lambda i: servers[i].node.long_id)
    ids = [servers[i].node.long_id for i in order]
    nodes = [Node(servers[i].node.id, *address(i)) for i in range(n)]
    for server in servers:
        me = server.node.long_id
        router = server.protocol.router  # type: ignore[union-attr]
        for b in range(160):
            # ids sharing exactly b leading bits with me: the prefix is mine for b bits, then the other bit
            prefix = (me >> (159 - b)) ^ 1
            lo, hi = prefix << (159 - b), (prefix + 1) << (159 - b)
            start, end = bisect.bisect_left(ids, lo), bisect.bisect_left(ids, hi)
            if end - start == 0:
                if b > math.log2(n) + 8:
                    break
                continue
            picks = range(start, end) if end - start <= K else rng.sample(range(start, end), K)
            for p in picks:
                router.add_contact(nodes[order[p]])
    return servers


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return tuple(ordered[min(len(ordered) - 1, int(p * len(ordered)))] for p in (0.50, 0.95, 0.99))  # type: ignore[return-value]


async def lookups(
    servers: list[HardenedServer], net: SimNet, rng: random.Random, count: int
) -> dict[str, dict[str, float]]:
    """``count`` find_node lookups and ``count`` provider lookups, each from a random warmed-up live node."""
    alive = [i for i in range(len(servers)) if address(i) not in net.dead]
    alive_ids = sorted((servers[i].node.long_id, i) for i in alive)
    by_id = sorted(range(len(servers)), key=lambda i: servers[i].node.long_id)
    loop = asyncio.get_running_loop()
    out: dict[str, dict[str, float]] = {}
    for mode in ("node", "providers"):
        latencies, messages, hits = [], [], 0
        for _ in range(count):
            seeker = servers[rng.choice(alive)]
            proto = seeker.protocol
            assert proto is not None
            contacts = proto.router.all_contacts()
            for node in rng.sample(contacts, min(20, len(contacts))):
                await proto.call_ping(node)
            key = rng.randbytes(20)
            target = int.from_bytes(key, "big")
            if mode == "providers":
                # Announced before the seizure: the K nodes closest to the key (dead ones too) keep a record.
                holder = servers[rng.choice(alive)]
                for i in sorted(by_id, key=lambda i: servers[i].node.long_id ^ target)[:K]:
                    servers[i].providers.add(
                        key, holder.node.id, address(0)[0], 5000, now=time.monotonic()
                    )
            started = loop.time()
            result = await seeker.crawl(key, mode)
            latencies.append(loop.time() - started)
            messages.append(result.messages)
            if mode == "providers":
                hits += bool(result.providers)
            else:
                closest = min(alive_ids, key=lambda t: t[0] ^ target)[1]
                hits += bool(result.peers) and result.peers[0].node_id == servers[closest].node.id
        p50, p95, p99 = _percentiles(latencies)
        out[mode] = {
            "p50": p50,
            "p95": p95,
            "p99": p99,
            "msgs_median": statistics.median(messages),
            "msgs_mean": statistics.fmean(messages),
            "found": hits / count,
        }
    return out


async def scenario(n: int, dead_share: float, count: int, seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    net = SimNet(rng)
    servers = build(n, rng, net)
    victims = rng.sample(range(n), round(dead_share * n))
    net.dead = {address(i) for i in victims}
    try:
        return await lookups(servers, net, rng, count)
    finally:
        for s in servers:
            await s.protocol.close()  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", default="1000,10000")
    parser.add_argument("--dead", default="0,10,30", help="percent of nodes dead")
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    print(
        "lookup     N       dead  p50 ms  p95 ms  p99 ms  msgs median/mean (vs healthy)  found   (wall s)"
    )
    for n in [int(x) for x in args.nodes.split(",")]:
        base: dict[str, float] = {}
        for dead in [int(x) for x in args.dead.split(",")]:
            loop = VirtualLoop()
            wall = time.perf_counter()
            try:
                results = loop.run_until_complete(scenario(n, dead / 100, args.lookups, args.seed))
            finally:
                loop.close()
            for mode, r in results.items():
                base.setdefault(mode, r["msgs_mean"])
                print(
                    f"{'find_node' if mode == 'node' else 'providers':<10} {n:<7d} {dead:3d}%  "
                    f"{r['p50'] * 1000:6.0f}  {r['p95'] * 1000:6.0f}  {r['p99'] * 1000:6.0f}  "
                    f"{r['msgs_median']:5.0f} / {r['msgs_mean']:5.1f} ({r['msgs_mean'] / base[mode]:.2f}x)"
                    f"          {r['found'] * 100:5.1f} %  ({time.perf_counter() - wall:.0f})"
                )


if __name__ == "__main__":
    main()
