"""Forwarder: a holder's duty of passing on the chunks a sharer uploads once (docs/PROTOCOL.md, "Forwarding").

A sharer sends a chunk to its first holder with STORE_FORWARD, naming the second holder; the first stores it, answers,
and then sends it on (FORWARDED_STORE), as a GFS/HDFS replica pipeline does. The second holder keeps it only if the
sharer told it to (EXPECT), and the sharer confirms that copy with the second holder itself before it counts it, so
this holder is trusted with nothing: one that drops, corrupts or delays a forward only makes the sharer upload
that copy too. What this holder does limit is its own work: only chunks a request newly stored (so the requester
is that copy's sharer), each at most once, with the sharer's lease, to a target in the requester's own address
scope (a sharer on the internet cannot aim this holder at a loopback or private address), a bounded queue.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.core.node_id import network_of
from p2pmega.core.wire import ForwardStoreRequest
from p2pmega.core.words import counted
from p2pmega.errors import ForwardNotExpected, P2PMegaError
from p2pmega.net.forward_requests import forwarded_store
from p2pmega.net.transfer_client import TransferClient
from p2pmega.node import Node

log = logging.getLogger(__name__)

# Forwards waiting at once: a sharer keeps a few chunks in flight per holder; past this it uploads the copy itself.
FORWARD_QUEUE: Final = 64
# Forwards sent at once, and at once for one requester network (/24, /48): a network whose forwards go to targets
# that never answer holds at most two of the eight, so other sharers' forwards start at once.
FORWARDS_AT_ONCE: Final = 8
RUNNING_PER_NETWORK: Final = 2
# Forwards queued or under way for one requester network: a sharer keeps about SHARE_CONCURRENCY chunks in flight
# (spread over many holders), and one network cannot fill the queue.
FORWARDS_PER_NETWORK: Final = 8
# Opening the connection to a target (TCP and channel handshake) must take no longer.
FORWARD_CONNECT_TIMEOUT_S: Final = 3.0
# A target that did not expect the chunk yet (the sharer's EXPECT still on its way) is asked again after these waits:
# a longer path from the sharer costs a round trip or so; the sharer waits at least 0.25 s (replicate/pipeline.py).
FORWARD_RETRIES_S: Final = (0.05, 0.1)
# A forward must be done within as long as the sharer waits for it (replicate/pipeline.py: the larger of 0.25 s and
# three times its upload, which this holder sees as the time the chunk took to arrive), counted from its acceptance,
# queueing included, or it is abandoned, its connection closed. Forwarding pays only when it beats the sharer's own
# upload, and an uplink kept full of forwards nobody waits for any more starved even the acknowledgements of what
# this holder receives (one 2 Mbit/s seed made a 64 MiB share take 38 s, not 1.4 s).
FORWARD_MIN_S: Final = 0.25
FORWARD_WAIT_FACTOR: Final = 3.0
# Chunks remembered as forwarded, so no request makes this holder forward one twice.
FORWARDED_REMEMBERED: Final = 65536


def _scope(host: str) -> str:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "other"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "other"  # 169.254/16, fe80::/10: a cloud's metadata service lives there
    if address.is_private:
        return "private"
    if address.is_global:
        return "global"
    return "other"


def same_scope(requester: str, target: str) -> bool:
    """Whether ``target`` is an address the sharer at ``requester`` could reach itself (loopback, private, global).

    A forward goes where the sharer points it; this keeps a sharer from aiming a holder at addresses behind it
    (its loopback, its LAN) that the sharer could not reach, as SSRF guards do. Reserved and multicast: never.
    """
    try:
        scope = _scope(requester)
        return scope != "other" and scope == _scope(target)
    except ValueError:
        return False


@dataclass(frozen=True)
class _Job:
    chunk_id: ChunkId
    lease_s: int
    target_id: bytes
    addr: tuple[str, int]
    network: bytes  # the requester's
    deadline: float  # loop time


@dataclass(eq=False)
class Forwarder:
    """Forwards the chunks sharers ask this holder to pass on, each once, a few at a time."""

    node: Node
    name: str = "forwarder"
    forwarded: int = 0  # confirmed by the target
    failed: int = 0
    refused: int = 0  # offers turned down (target out of scope, queue full, forwarded already)
    # Waiting forwards by requester network, the network waiting longest first (served in turn).
    _waiting: OrderedDict[bytes, deque[_Job]] = field(default_factory=OrderedDict)
    _queued: int = 0
    _running: Counter[bytes] = field(default_factory=Counter)
    _per_network: Counter[bytes] = field(default_factory=Counter)  # queued or under way
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _seen: OrderedDict[ChunkId, None] = field(default_factory=OrderedDict)
    _client: TransferClient | None = None

    def __post_init__(self) -> None:
        self.node.forwarder = self.offer

    def summary(self) -> str:
        """The part of the holder's summary line about forwards (forwarded, and failed if any)."""
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{counted(self.forwarded, 'chunk')} forwarded{failed}"

    def offer(self, event: ForwardStoreRequest, requester: str, received_s: float = 0.0) -> bool:
        """Take a chunk a STORE_FORWARD newly stored; False if it will not be forwarded (the sharer then uploads)."""
        addr = (event.target_host, event.target_port)
        try:
            network = network_of(requester)
        except ValueError:
            network = requester.encode()
        now = asyncio.get_running_loop().time()
        if event.chunk_id in self._seen:
            reason = "forwarded already"
        elif self._queued >= FORWARD_QUEUE:
            reason = "queue full"
        elif self._per_network[network] >= FORWARDS_PER_NETWORK:
            reason = f"{FORWARDS_PER_NETWORK} forwards of {requester}'s network under way"
        elif not same_scope(requester, event.target_host):
            reason = f"target {event.target_host} is outside {requester}'s address scope"
        elif addr == (self.node.settings.host, self.node.port):
            reason = "target is this holder"
        else:
            self._seen[event.chunk_id] = None
            while len(self._seen) > FORWARDED_REMEMBERED:
                self._seen.popitem(last=False)
            self._per_network[network] += 1
            deadline = now + max(FORWARD_MIN_S, FORWARD_WAIT_FACTOR * received_s)
            job = _Job(event.chunk_id, event.lease_s, event.target_id, addr, network, deadline)
            self._waiting.setdefault(network, deque()).append(job)
            self._queued += 1
            self._wake.set()
            return True
        self.refused += 1
        log.debug("not forwarding %s: %s", short_id(event.chunk_id), reason)
        return False

    async def run(self) -> None:
        # Its own client: a target's node id is the sharer's claim, so it must not enter the node's client (where
        # a wrong one would refuse that holder for every later request of this node, repair's included).
        s = self.node.settings
        self._client = TransferClient(
            local_host=s.host,
            timeout_s=s.transfer_timeout_s,
            connect_timeout_s=min(FORWARD_CONNECT_TIMEOUT_S, s.transfer_timeout_s),
        )
        self._client.identity_seed = self.node.client.identity_seed
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while (job := self._next()) is not None:
                    task = asyncio.create_task(self._one(job))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _next(self) -> _Job | None:
        """The next forward to start: from the network waiting longest that has fewer than its share running."""
        if sum(self._running.values()) >= FORWARDS_AT_ONCE:
            return None
        for network, jobs in self._waiting.items():
            if self._running[network] < RUNNING_PER_NETWORK:
                job = jobs.popleft()
                del self._waiting[network]
                if jobs:
                    self._waiting[network] = jobs  # to the back: the others' turn first
                self._queued -= 1
                self._running[network] += 1
                return job
        return None

    async def _one(self, job: _Job) -> None:
        try:
            await self._forward(job)
            self.forwarded += 1
        except (P2PMegaError, TimeoutError) as exc:
            self.failed += 1
            log.debug("forward of %s to %s failed: %s", short_id(job.chunk_id), job.addr, exc)
        finally:
            for counts in (self._running, self._per_network):
                counts[job.network] -= 1
                if counts[job.network] <= 0:
                    del counts[job.network]
            self._wake.set()

    async def _forward(self, job: _Job) -> None:
        store, client = self.node.store, self._client
        if store is None or client is None:
            return
        client.expect_node_id(job.addr, job.target_id)
        try:
            async with asyncio.timeout_at(job.deadline):
                data = await asyncio.to_thread(store.get, job.chunk_id)
                await self._send(client, job, data)
        finally:
            client.forget_node_id(job.addr)  # the sharer's word, good for this forward only

    async def _send(self, client: TransferClient, job: _Job, data: bytes) -> None:
        for retry_s in (*FORWARD_RETRIES_S, None):
            try:
                await forwarded_store(client, job.addr, job.chunk_id, data, job.lease_s)
                return
            except ForwardNotExpected:
                # The sharer sends EXPECT as it starts the upload; over a longer path than ours to the target it
                # can arrive after a small chunk's forward.
                if retry_s is None:
                    raise
                await asyncio.sleep(retry_s)

    async def close(self) -> None:
        """Drop what is queued (each sharer uploads those copies itself) and close the connections."""
        self._waiting.clear()
        self._queued = 0
        if self._client is not None:
            await self._client.close()
            self._client = None
