"""How evenly placement spreads chunks, and how many move when a peer leaves or joins (issue 18).

Usage: python bench/placement.py [--peers 8,200,10000] [--chunks 20000] [--window 20] [--seed 18]

For each N: N peers with random node ids, each on its own /24, in 4 countries (round robin); 20,000 random
chunks, each placed on 2 holders in 2 countries (the default rule). Two orders are compared:

- ``xor``: the rule before issue 18, the first valid set among the candidates by XOR distance to the chunk key;
- ``hrw``: weighted rendezvous hashing (core.placement.choose_holders today);
- ``random``: two random peers of two countries per chunk, the balance that binomial noise alone allows (it
  ignores weights, and every chunk moves when anything changes: only its load columns mean anything).

At N <= 1000 every peer is a candidate (a test network or a small one: share asks everyone). Above that the
candidates of a chunk are what a lookup returns, the ``--window`` nodes closest to its key (k = 20), as in a
large network. Reported: per-peer load max/mean and min/mean, with equal weights and with one peer at weight 2
(its load against the mean of the others, ideal 2.00), and the share of copies and of chunks that change holders
when one peer leaves or one joins (ideal: 1/N of the copies).

Then, at each N <= 1000, ``capacity``: the same peers with a realistic spread of free space (quotas of 2 GB,
10 GB, 100 GB and 1 TB, each between empty and full, one in ten nearly full; a sharer may use a quarter of each), weighed by
core.capacity (weight = clamp(free / 2.5 GB, 1/256, 16)), and chunks of 2 MiB. Reported: each peer's load against
its ideal share (total copies x weight / sum of weights) at the 5th, 50th and 95th percentile, the copies that go
to nearly full peers (under 10 MB free), and how many peers were given more chunks than they have room for
(they would refuse the rest, which the sharer places elsewhere). At N=8 the largest peers hold a copy of nearly
every chunk and cannot take their whole share (a chunk has one copy per peer at most), so the others take more.
"""

from __future__ import annotations

import argparse
import bisect
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence

from p2pmega.core import placement
from p2pmega.core.capacity import capacity_weight
from p2pmega.core.placement import Candidate, choose_holders

COUNTRIES = ["DE", "NZ", "IS", "CH"]
Placer = Callable[[bytes, Sequence[Candidate]], list[Candidate]]


def xor_rule(chunk: bytes, candidates: Sequence[Candidate]) -> list[Candidate]:
    key = int.from_bytes(chunk[:20], "big")
    ordered = sorted(candidates, key=lambda c: int.from_bytes(c.node_id, "big") ^ key)
    chosen = placement._greedy(ordered, 2, 2)
    assert chosen is not None
    return chosen


def random_rule(chunk: bytes, candidates: Sequence[Candidate]) -> list[Candidate]:
    """No rule at all, two random peers of two countries: the binomial noise every rule has at least."""
    rng = random.Random(chunk)
    first = rng.choice(candidates)
    return [first, rng.choice([c for c in candidates if c.country != first.country])]


def hrw_rule(chunk: bytes, candidates: Sequence[Candidate]) -> list[Candidate]:
    return choose_holders(chunk, candidates, replicas=2, min_countries=2)


class Network:
    def __init__(self, peers: list[Candidate], window: int | None) -> None:
        self.peers = peers
        self.window = window
        self.ordered = sorted(peers, key=lambda c: c.node_id)
        self.ids = [int.from_bytes(c.node_id, "big") for c in self.ordered]

    def candidates(self, chunk: bytes) -> Sequence[Candidate]:
        if self.window is None:
            return self.peers
        key = int.from_bytes(chunk[:20], "big")
        # Every node sharing a longer prefix with the key is closer (XOR) than any that does not: shrink the
        # prefix until its block holds the window, then sort that block alone.
        for bits in range(160, -1, -1):
            lo = (key >> (160 - bits)) << (160 - bits)
            hi = lo + (1 << (160 - bits))
            start, end = bisect.bisect_left(self.ids, lo), bisect.bisect_left(self.ids, hi)
            if end - start >= self.window:
                block = self.ordered[start:end]
                return sorted(block, key=lambda c: int.from_bytes(c.node_id, "big") ^ key)[
                    : self.window
                ]
        return self.peers


def place_all(
    net: Network, chunks: list[bytes], rule: Placer
) -> tuple[Counter[bytes], list[frozenset[bytes]]]:
    load: Counter[bytes] = Counter()
    holders = []
    for chunk in chunks:
        chosen = rule(chunk, net.candidates(chunk))
        ids = frozenset(c.node_id for c in chosen)
        load.update(ids)
        holders.append(ids)
    return load, holders


def peers_of(n: int, rng: random.Random) -> list[Candidate]:
    return [
        Candidate(rng.randbytes(20), f"10.{i // 250}.{i % 250}.1", 4000, COUNTRIES[i % 4])
        for i in range(n)
    ]


def moved(before: list[frozenset[bytes]], after: list[frozenset[bytes]]) -> tuple[float, float]:
    copies = sum(len(a - b) for a, b in zip(before, after, strict=True))
    chunks = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    total = sum(len(a) for a in before)
    return copies / total, chunks / len(before)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", default="8,200,10000")
    parser.add_argument("--chunks", type=int, default=20000)
    parser.add_argument("--window", type=int, default=20, help="candidates per chunk above N=1000")
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    print(
        "rule  N      max/mean  min/mean  weight-2 peer  leave: copies/chunks moved (x 1/N)"
        "  join: copies moved (x 1/N)  s"
    )
    for n in [int(x) for x in args.peers.split(",")]:
        rng = random.Random(args.seed)
        peers = peers_of(n, rng)
        chunks = [rng.randbytes(32) for _ in range(args.chunks)]
        window = None if n <= 1000 else args.window
        for name, rule in (("xor", xor_rule), ("hrw", hrw_rule), ("random", random_rule)):
            started = time.perf_counter()
            net = Network(peers, window)
            load, before = place_all(net, chunks, rule)
            counts = [load[p.node_id] for p in peers]
            mean = sum(counts) / n
            heavy = Candidate(peers[0].node_id, peers[0].host, 4000, peers[0].country, weight=2.0)
            wload, _ = place_all(Network([heavy, *peers[1:]], window), chunks, rule)
            others = sum(wload[p.node_id] for p in peers[1:]) / (n - 1)
            # The busiest peer leaves (worst case for movement); a new peer joins.
            leaver = max(peers, key=lambda p: load[p.node_id])
            _, after_leave = place_all(
                Network([p for p in peers if p != leaver], window), chunks, rule
            )
            joiner = Candidate(rng.randbytes(20), "10.250.0.1", 4000, "DE")
            _, after_join = place_all(Network([*peers, joiner], window), chunks, rule)
            leave_copies, leave_chunks = moved(before, after_leave)
            join_copies, _ = moved(before, after_join)
            print(
                f"{name:<6}{n:<7d} {max(counts) / mean:8.2f}  {min(counts) / mean:8.2f}"
                f"  {wload[heavy.node_id] / others:13.2f}"
                f"  {leave_copies * 100:6.2f} % / {leave_chunks * 100:6.2f} % ({leave_copies * n:4.2f})"
                f"         {join_copies * 100:6.2f} % ({join_copies * (n + 1):4.2f})"
                f"          {time.perf_counter() - started:4.0f}"
            )

    for n in [int(x) for x in args.peers.split(",") if int(x) <= 1000]:
        capacity(n, args.chunks, random.Random(args.seed))


CHUNK_BYTES = 2 << 20
QUOTAS = [(2 * 10**9, 0.25), (10 * 10**9, 0.5), (100 * 10**9, 0.2), (1000 * 10**9, 0.05)]


def capacity(n: int, chunks: int, rng: random.Random) -> None:
    """One line: placement by reported free space over a realistic spread of seeds (see the docstring)."""
    free: list[int] = []
    for _ in range(n):
        quota = rng.choices([q for q, _ in QUOTAS], [w for _, w in QUOTAS])[0]
        # One seed in ten is nearly full (under 20 MB left); the others anywhere between empty and full.
        left = rng.uniform(0, 2 * 10**7) if rng.random() < 0.1 else quota * (1 - rng.random())
        free.append(min(int(left), quota // 4))
    peers = [
        Candidate(rng.randbytes(20), f"10.{i // 250}.{i % 250}.1", 4000, COUNTRIES[i % 4], w)
        for i, w in enumerate(capacity_weight(f) for f in free)
    ]
    load, _ = place_all(Network(peers, None), [rng.randbytes(32) for _ in range(chunks)], hrw_rule)
    total = sum(load.values())
    weights = sum(p.weight for p in peers)
    # Peers whose ideal is under 10 copies are left out of the percentiles: noise, not balance.
    ideal = {p.node_id: total * p.weight / weights for p in peers}
    ratios = sorted(load[i] / ideal[i] for i in ideal if ideal[i] >= 10)
    m = len(ratios)
    near = sum(load[p.node_id] for p, f in zip(peers, free, strict=True) if f < 10**7)
    over = sum(1 for p, f in zip(peers, free, strict=True) if load[p.node_id] * CHUNK_BYTES > f)
    print(
        f"capacity N={n}: load / ideal share p5 {ratios[m // 20]:.2f}, p50 {ratios[m // 2]:.2f},"
        f" p95 {ratios[m - 1 - m // 20]:.2f}; {near} of {total} copies on nearly full peers"
        f" ({sum(1 for f in free if f < 10**7)} peers); {over} peers given more than their room"
    )


if __name__ == "__main__":
    main()
