"""Lookups of the DHT: one iterative crawl that never waits on a dead node in series, and its result.

Peer, Provider and LookupResult are the values the crawl (and p2pmega.net.dht) hands out.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from kademlia.node import Node

from p2pmega.core.node_id import prefix_matches
from p2pmega.core.record import ProviderRecord
from p2pmega.net.dht_wire import network_of
from p2pmega.net.kademlia_protocol import LATE_TIMER_S, HardenedProtocol


@dataclass(frozen=True)
class Peer:
    """A DHT contact; ``host`` is always the address we observed, never one the peer claimed."""

    node_id: bytes
    host: str
    port: int


@dataclass(frozen=True)
class Provider:
    """A node that holds a chunk: ``port`` is its transfer port, ``expires_at`` is wall-clock."""

    node_id: bytes
    host: str
    port: int
    expires_at: float


@dataclass(frozen=True)
class LookupResult:
    """What one crawl found and cost: ``messages`` requests sent, ``round_trips`` longest chain."""

    peers: list[Peer]
    providers: list[Provider]
    messages: int
    round_trips: int
    value: bytes | str | None = None
    closed: bool = False
    """The crawl saw the whole reachable network: we and every node that answered know fewer than
    k contacts (so each reply was a whole routing table) and every node learned was asked."""
    answered: list[Peer] = field(default_factory=list)
    """Every node that answered, nearest first (``peers`` is its first k)."""


class Crawl:
    """One iterative lookup (section 2.3 of the paper) that never waits on a dead node in series.

    kademlia's SpiderCrawl sends alpha queries and waits for all of them, so each round with a dead
    node costs a full timeout. Here alpha queries are kept in flight; a query unanswered after its
    node's stall time (the measured round-trip timeout, ``HardenedProtocol.rtt``: a node that answered
    before by its own history, others by everyone's) is "stalled": it stops counting against alpha and
    its node stops counting among the k closest (so the next candidate is asked at once), though a late
    answer is still used while the crawl runs. A node the protocol already suspects (another lookup's
    query to it stalled, or one timed out lately) is never waited on and not asked again: never wait on
    the dead twice. While replies bring closer nodes, alpha queries are in flight; once one brings
    nothing closer (section 2.3's last step) a find_node crawl asks all of the k closest not yet asked
    at once, plus as many more as the share of failed or stalled nodes so far says will not answer.
    The crawl ends when the k closest nodes neither failed nor stalled have answered, or after 1.75
    timeouts, not counting a time our own loop was blocked. Unfinished queries run out in the background, so a dead node still gets its
    miss recorded and is evicted after MAX_MISSES.
    """

    def __init__(
        self, protocol: HardenedProtocol, key: bytes, seeds: list[Node], *, alpha: int, mode: str
    ) -> None:
        self.protocol = protocol
        self.target = Node(key)
        self.alpha = alpha
        self.mode = mode  # "node", "value" or "providers"
        self.nodes: dict[bytes, Node] = {}
        self.depth: dict[bytes, int] = {}
        self.state: dict[bytes, str] = {}  # new, pending, done, failed
        self.started: dict[bytes, float] = {}
        self.records: dict[tuple[bytes, str], ProviderRecord] = {}
        self.value: bytes | str | None = None
        self.messages = 0
        self.round_trips = 0
        # Section 2.3's last step: once a reply brings no node closer than the closest known, the crawl
        # has converged and asks all of the k closest it has not asked at once, not alpha at a time.
        self.converged = False
        # Stays True while every contact list seen (our seeds, then each reply) is a whole table.
        self.exhaustive = len(seeds) < protocol.ksize
        self._learn(seeds, 0)

    def _learn(self, nodes: list[Node], depth: int) -> None:
        for node in nodes:
            # An id not of its address's network is a lie (core.node_id): never asked, never returned.
            if not prefix_matches(node.id, node.ip):
                continue
            if node.id != self.protocol.source_node.id and node.id not in self.nodes:
                self.nodes[node.id] = node
                self.depth[node.id] = depth
                self.state[node.id] = "new"

    def _stall_s(self, node_id: bytes) -> float:
        node = self.nodes[node_id]
        return float(self.protocol.rtt.stall_after((node.ip, node.port)))

    def _counts(self, node_id: bytes, now: float) -> bool:
        state = self.state[node_id]
        if state == "done":
            return True
        if state == "new":
            if self.protocol.suspect(self.nodes[node_id], now):
                self.state[node_id] = "failed"  # never wait on the dead twice
                return False
            return True
        return state == "pending" and now - self.started[node_id] < self._stall_s(node_id)

    def _closest(self, now: float, extra: int = 0) -> list[Node]:
        alive = (n for i, n in self.nodes.items() if self._counts(i, now))
        return heapq.nsmallest(self.protocol.ksize + extra, alive, key=self.target.distance_to)

    def _spare(self, now: float) -> int:
        """How many nodes beyond the k closest a converged crawl asks too: as many as are likely dead."""
        asked = [i for i, s in self.state.items() if s != "new"]
        if not self.converged or not asked:
            return 0
        lost = sum(1 for i in asked if not self._counts(i, now))
        return -(-self.protocol.ksize * lost // len(asked))

    def _query(self, node: Node) -> Coroutine[Any, Any, tuple[bool, Any]]:
        if self.mode == "providers":
            return self.protocol.call_find_providers(node, self.target.id)
        if self.mode == "value":
            return self.protocol.call_find_value(node, self.target)
        return self.protocol.call_find_node(node, self.target)

    def _absorb(self, node_id: bytes, ok: bool, reply: Any) -> None:
        self.state[node_id] = "done" if ok else "failed"
        if not ok:
            return
        self.round_trips = max(self.round_trips, self.depth[node_id] + 1)
        if self.mode == "providers":
            records, contacts = reply
            for r in records:
                self.records[(r.node_id, r.host)] = r
        elif isinstance(reply, dict):
            self.value = reply["value"]
            return
        else:
            contacts = reply
        if len(contacts) >= self.protocol.ksize:
            self.exhaustive = False
        best = min((self.target.distance_to(n) for n in self.nodes.values()), default=None)
        self._learn(contacts, self.depth[node_id] + 1)
        closer = any(best is None or self.target.distance_to(n) < best for n in contacts)
        # Provider and value lookups end at the first record instead: widening them only costs messages.
        self.converged = self.mode == "node" and not closer

    async def run(self) -> LookupResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.75 * self.protocol._wait_timeout
        pending: dict[asyncio.Task[tuple[bool, Any]], bytes] = {}
        while self.value is None and not self.records and loop.time() < deadline:
            now = loop.time()
            closest = self._closest(now)
            if all(self.state[n.id] == "done" for n in closest):
                break
            active = [i for i in pending.values() if now - self.started[i] < self._stall_s(i)]
            in_flight = self.protocol.ksize if self.converged else self.alpha
            spare = self._spare(now)
            for node in self._closest(now, spare) if spare else closest:
                if len(active) >= in_flight + spare:
                    break
                if self.state[node.id] == "new":
                    self.state[node.id], self.started[node.id] = "pending", now
                    pending[self.protocol.spawn(self._query(node))] = node.id
                    self.messages += 1
                    active.append(node.id)
            if not pending:
                break
            wake = min([self.started[i] + self._stall_s(i) for i in active] + [deadline])
            done, _ = await asyncio.wait(
                pending, timeout=max(wake - now, 0.001), return_when=asyncio.FIRST_COMPLETED
            )
            # Woken this late, our own loop was blocked (as in HardenedProtocol._expire): that time is not the
            # peers', and their replies may be waiting unread in the socket.
            if (lag := loop.time() - max(wake, now)) > LATE_TIMER_S:
                deadline += lag
            for task in done:
                ok, reply = task.result()
                self._absorb(pending.pop(task), ok, reply)
        return self._result()

    def _result(self) -> LookupResult:
        answered = [n for i, n in self.nodes.items() if self.state[i] == "done"]
        answered.sort(key=self.target.distance_to)
        # At most a few per /24 (/48) among the closest, as in every reply (issue 16: many sockets
        # on one address must not make up the k closest of a key).
        per_network: Counter[bytes] = Counter()
        closest = []
        for n in answered:
            per_network[network_of(n.ip)] += 1
            if per_network[network_of(n.ip)] <= self.protocol.limits.max_per_network_in_reply:
                closest.append(n)
        closest = closest[: self.protocol.ksize]
        closed = self.exhaustive and all(s in ("done", "failed") for s in self.state.values())
        wall = time.time()
        providers = [
            Provider(r.node_id, r.host, r.port, wall + r.expires_in) for r in self.records.values()
        ]
        return LookupResult(
            peers=[Peer(n.id, n.ip, n.port) for n in closest],
            providers=providers,
            messages=self.messages,
            round_trips=self.round_trips,
            value=self.value,
            closed=closed and self.mode == "node",
            answered=[Peer(n.id, n.ip, n.port) for n in answered],
        )


def dedupe_providers(providers: list[Provider]) -> list[Provider]:
    """One provider per node id: the record that lives longest (the most recent announce)."""
    best: dict[bytes, Provider] = {}
    for p in providers:
        if p.node_id not in best or p.expires_at > best[p.node_id].expires_at:
            best[p.node_id] = p
    return sorted(best.values(), key=lambda p: p.node_id)
