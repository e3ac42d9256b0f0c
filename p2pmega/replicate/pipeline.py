"""Pipeline: a share's pair of holders as a replica pipeline (docs/PROTOCOL.md, "Forwarding").

The sharer uploads a chunk once, to its first holder, which forwards it to the second (as a GFS/HDFS client writes a
block once down its replicas). The second holder is told to expect the copy, and confirms it to the sharer directly,
so the first holder is trusted with nothing: a forward dropped, corrupted or late costs only the second upload, which
the Placer (replicate/placer.py) then makes as it would without a pipeline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.core.placement import Candidate
from p2pmega.errors import P2PMegaError, RequestUnknown
from p2pmega.net.forward_requests import Target, expect, store_forward
from p2pmega.node import Node

log = logging.getLogger(__name__)

Address = tuple[str, int]


class Stores(Protocol):
    """What the pipeline needs of the placer it serves (replicate/placer.py's Placer): its direct store with retries."""

    node: Node
    lease_s: float
    failures: Counter[Address]

    async def store_one(
        self,
        cand: Candidate,
        chunk_id: ChunkId,
        data: bytes,
        *,
        forward_to: Candidate | None = None,
        forwarding: list[bool] | None = None,
    ) -> bool: ...


# The second holder must confirm the forwarded copy within this long, or this many times as long as the upload to the
# first took, whichever is more; else the sharer uploads it too, and that holder forwards no more of the share.
# Forwarding pays only where the sharer's upload is the slow part: with a 2 s floor, a forwarder slower than the
# sharer (a 2 Mbit/s seed, a 1 Gbit/s sharer) made a 64 MiB share take 22 s instead of 1.4 s (bench/wan.py, "slow").
FORWARD_WAIT_MIN_S = 0.25
FORWARD_WAIT_FACTOR = 3.0
# Polls of the second holder: first after about as long as the last forwards took (FORWARD_POLL_S before any), then
# at a quarter of that, doubling up to FORWARD_POLL_MAX_S.
FORWARD_POLL_S = 0.005
FORWARD_POLL_MIN_S = 0.002
FORWARD_POLL_MAX_S = 0.5
# Forwards under way through one holder at once. (A slow start, one at a time until a holder delivered one, cost a
# 50 Mbit/s sharer 7 % of its share time and gained nothing once forwarders close forwards as soon as the sharer
# stops waiting, replicate/forward.py.)
FORWARDS_PER_FORWARDER = 4
# A share forwards only while its own upload is slow: once FORWARD_DECIDE_BYTES went up faster than this (about
# 170 Mbit/s), holders' uplinks would rarely forward faster, and one slower than the sharer's held a share back
# (bench/wan.py "slow": a 2 Mbit/s seed's forwards filled its uplink, its acknowledgements of our uploads to it were
# dropped, and the share took 10.8 s instead of 1.4 s). Home uplinks are far below it.
FORWARD_DECIDE_BYTES = 2 << 20
FORWARD_FAST_UPLINK_BYTES_S = 20 << 20


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(eq=False)
class Pipeline:
    """Which pairs of a share's holders forward, the upload to the first, the confirmation by the second.

    Not when both holders are on loopback (every peer on this machine: no link to save, and the pipeline's extra
    hop and polls cost a loopback share 40-60 % of its rate) unless ``loopback`` (tests of the pipeline itself).
    """

    placer: Stores
    renew_key: bytes
    loopback: bool = False
    enabled: bool = True
    forwarded: int = 0  # copies a first holder forwarded and their holder confirmed
    # Holders that do not forward or accept forwards (older ones), or stopped answering: stores go direct.
    no_forward: set[Address] = field(default_factory=set)
    # Holders whose forward was not confirmed in time: they may still receive forwards, but forward none.
    slow_forwarders: set[Address] = field(default_factory=set)
    _forwarding: Counter[Address] = field(
        default_factory=Counter
    )  # forwards under way per forwarder
    _forward_s: float | None = (
        None  # how long confirmed forwards took after the upload (a moving average)
    )
    _upload_began: float | None = None  # loop time of our first upload
    _uploaded_bytes: int = 0  # confirmed by their holders

    def pair(self, wanted: list[Candidate]) -> tuple[list[Candidate], bool]:
        """The two of ``wanted`` to place as a pipeline, forwarder first, and whether they were swapped; [] if none."""
        pair = wanted[:2]
        if self._may_forward(pair):
            return pair, False
        if len(pair) == 2 and self._may_forward([pair[1], pair[0]]):
            return [pair[1], pair[0]], True  # the other forwards instead
        return [], False

    def _may_forward(self, pair: list[Candidate]) -> bool:
        if not self.enabled or len(pair) < 2:
            return False
        if any((c.host, c.port) in self.no_forward for c in pair):
            return False
        forwarder = (pair[0].host, pair[0].port)
        if forwarder in self.slow_forwarders:
            return False
        if self._forwarding[forwarder] >= FORWARDS_PER_FORWARDER:
            return False
        return self.loopback or not all(_loopback(c.host) for c in pair)

    def uploading(self) -> None:
        """One of our uploads starts (the clock of our upload rate starts with the first)."""
        if self._upload_began is None:
            self._upload_began = asyncio.get_running_loop().time()

    def uploaded(self, size: int) -> None:
        """Count a confirmed upload; once enough went up, stop forwarding if our own uplink is fast."""
        self._uploaded_bytes += size
        if not self.enabled or self._upload_began is None:
            return
        if self._uploaded_bytes < FORWARD_DECIDE_BYTES:
            return
        elapsed_s = asyncio.get_running_loop().time() - self._upload_began
        if elapsed_s > 0 and self._uploaded_bytes / elapsed_s > FORWARD_FAST_UPLINK_BYTES_S:
            log.debug(
                "uploading at %.0f MiB/s: the holders would forward no faster; uploading both copies",
                self._uploaded_bytes / elapsed_s / (1 << 20),
            )
            self.enabled = False

    async def store_pair(
        self,
        first: Candidate,
        second: Candidate,
        chunk_id: ChunkId,
        data: bytes,
        uploaded: Callable[[], None] | None = None,
    ) -> tuple[bool, bool]:
        """Upload ``data`` once to ``first``, which forwards it to ``second``; upload again only if that fails.

        ``second`` is told to expect the copy as ``first`` gets it, and confirms it to us directly (LEASES).
        ``uploaded`` is called once our upload is done and only the confirmation is awaited.

        Returns:
            Whether ``first`` and ``second`` hold the chunk.
        """
        forwarder = (first.host, first.port)
        self._forwarding[forwarder] += 1
        try:
            return await self._store_pair(first, second, chunk_id, data, uploaded)
        finally:
            self._forwarding[forwarder] -= 1

    async def _store_pair(
        self,
        first: Candidate,
        second: Candidate,
        chunk_id: ChunkId,
        data: bytes,
        uploaded: Callable[[], None] | None,
    ) -> tuple[bool, bool]:
        placer = self.placer
        second_addr = (second.host, second.port)
        # Told at the same time as the upload starts: the forward leaves the first holder only once the whole chunk
        # is there, long after this small request. Should it lose the race, the forwarder asks again, and after
        # that the copy is uploaded, as for any failed forward.
        told = asyncio.ensure_future(
            expect(
                placer.node.client,
                second_addr,
                [chunk_id],
                placer.lease_s,
                renew_key=self.renew_key,
            )
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        forwarding: list[bool] = []
        try:
            first_ok = await placer.store_one(
                first, chunk_id, data, forward_to=second, forwarding=forwarding
            )
            try:
                [accepted] = await told
            except P2PMegaError as exc:
                log.debug("holder %s takes no forwards: %s", second_addr, exc)
                self.no_forward.add(second_addr)
                accepted = False
        finally:
            told.cancel()
        if first_ok and forwarding and accepted:
            if uploaded is not None:
                uploaded()
            wait_s = max(FORWARD_WAIT_MIN_S, FORWARD_WAIT_FACTOR * (loop.time() - started))
            confirmed = await self._confirm(second_addr, chunk_id, wait_s)
            if confirmed:
                self.forwarded += 1
                placer.failures.pop(second_addr, None)
                return True, True
            # The forwarder did not deliver in time (or at all): it forwards no more of this share's chunks. If the
            # second holder failed to answer, it is the one left out of forwards instead.
            if confirmed is False:
                self.slow_forwarders.add((first.host, first.port))
            else:
                self.no_forward.add(second_addr)
            log.debug(
                "forward of %s by %s:%d not confirmed by %s within %.2f s; uploading it",
                short_id(chunk_id),
                first.host,
                first.port,
                second_addr,
                wait_s,
            )
        return first_ok, await placer.store_one(second, chunk_id, data)

    async def _confirm(self, addr: Address, chunk_id: ChunkId, wait_s: float) -> bool | None:
        """Whether ``addr`` holds ``chunk_id`` for at least half our lease within ``wait_s`` (polled, LEASES);
        None if ``addr`` did not answer."""
        placer = self.placer
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + wait_s
        typical_s = self._forward_s
        delay_s = FORWARD_POLL_S if typical_s is None else max(FORWARD_POLL_MIN_S, 0.8 * typical_s)
        step_s = FORWARD_POLL_S if typical_s is None else max(FORWARD_POLL_MIN_S, typical_s / 4)
        while True:
            await asyncio.sleep(max(0.0, min(delay_s, deadline - loop.time())))
            try:
                [left_s] = await placer.node.client.leases(addr, [chunk_id])
            except P2PMegaError as exc:
                log.debug("holder %s did not confirm %s: %s", addr, short_id(chunk_id), exc)
                return None
            if left_s >= placer.lease_s / 2:
                took_s = loop.time() - now
                self._forward_s = took_s if typical_s is None else 0.8 * typical_s + 0.2 * took_s
                return True
            if loop.time() >= deadline:
                return False
            delay_s, step_s = step_s, min(step_s * 2, FORWARD_POLL_MAX_S)

    async def upload(
        self,
        addr: Address,
        chunk_id: ChunkId,
        data: bytes,
        target: Candidate,
        forwarding: list[bool] | None,
    ) -> bool:
        """STORE_FORWARD to ``addr`` (appending True to ``forwarding`` if it will forward); whether newly stored.

        A holder that does not know the request gets a plain store, now and for the rest of the share.
        """
        placer = self.placer
        try:
            reply = await store_forward(
                placer.node.client,
                addr,
                chunk_id,
                data,
                placer.lease_s,
                renew_key=self.renew_key,
                target=Target(target.node_id, target.host, target.port),
            )
        except RequestUnknown as exc:
            log.debug("holder %s does not forward: %s", addr, exc)
            self.no_forward.add(addr)
            return await placer.node.client.store(
                addr, chunk_id, data, placer.lease_s, renew_key=self.renew_key
            )
        if reply.forwarding and forwarding is not None:
            forwarding.append(True)
        return reply.newly_stored
