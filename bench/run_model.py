"""Who sees a run's holders, in a model of random node ids (no sockets): the numbers behind docs/SCALE.md
("Announcements") and docs/REPAIR.md ("Runs").

Usage: python bench/run_model.py [--nodes 200,1000,5000] [--trials 1000] [--seed 19]

A share places a run's chunks among the k (20) nodes nearest the run's key (replicate/peers.py). A node's routing
table is modelled as Kademlia keeps it: every node of a bucket that has at most k, k at random of a larger one.
Crawls are modelled as exact (the k nearest). Three questions:

- reuse: does one announce crawl (the ~30 nodes it hears from near key K1) hold the k nearest of another random
  key K2 of the same batch? (net/announce.py AnnouncePlan: the crawl a second key would save)
- repairer: of the other holders of a run a holder is in, how many are in its pool (its table and its k nearest),
  and how many among its k nearest alone? (replicate/repair.py locate)
- keeper: of a chunk's 2 copies near its run's key, how many does a node elsewhere see through its pool (its table,
  its k nearest, the k nearest of 3 random keys: replicate/peers.py candidate_pool)? (replicate/keeper.py)
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import Counter

K = 20
HEARD = 30  # nodes a converged crawl hears from: the k nearest and some it passed


def nearest(ids: list[int], key: int, count: int) -> list[int]:
    return heapq.nsmallest(count, ids, key=lambda x: x ^ key)


def table(me: int, ids: list[int], rng: random.Random) -> set[int]:
    buckets: dict[int, list[int]] = {}
    for i in ids:
        if i != me:
            buckets.setdefault((i ^ me).bit_length(), []).append(i)
    return {i for b in buckets.values() for i in rng.sample(b, min(K, len(b)))}


def model(nodes: int, trials: int, rng: random.Random) -> None:
    ids = [rng.getrandbits(160) for _ in range(nodes)]
    reused = 0
    pairs = unseen = unseen_nearest = 0
    keeper: Counter[int] = Counter()
    for _ in range(trials):
        k1, k2 = rng.getrandbits(160), rng.getrandbits(160)
        reused += set(nearest(ids, k2, K)) <= set(nearest(ids, k1, HEARD))
        run = nearest(ids, rng.getrandbits(160), K)
        holder = rng.choice(run)
        own = set(nearest([i for i in ids if i != holder], holder, K))
        pool = table(holder, ids, rng) | own
        others = [i for i in run if i != holder]
        pairs += len(others)
        unseen += sum(i not in pool for i in others)
        unseen_nearest += sum(i not in own for i in others)
        me = rng.getrandbits(160)
        view = table(me, ids, rng)
        for key in [me] + [rng.getrandbits(160) for _ in range(3)]:
            view |= set(nearest(ids, key, K))
        keeper[sum(c in view for c in rng.sample(run, 2))] += 1
    print(
        f"{nodes:6} nodes: reuse {reused / trials:6.1%} of second keys | repairer misses "
        f"{unseen / pairs:6.2%} of other holders ({unseen_nearest / pairs:5.1%} with its k nearest alone) | "
        f"keeper sees 2 / 1 / 0 copies of a chunk: "
        + " / ".join(f"{keeper[n] / trials:4.0%}" for n in (2, 1, 0))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="200,1000,5000")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for nodes in (int(n) for n in args.nodes.split(",")):
        model(nodes, args.trials, rng)


if __name__ == "__main__":
    main()
