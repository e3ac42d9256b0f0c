"""Which peers a share can use: the storage-peer probe, re-confirming a resumed share's holders, and the words
for a rule the peers found cannot meet. Used by api/share.py only; no placement decisions are made here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pmega.core.capacity import capacity_weight, is_full
from p2pmega.core.chunking import ChunkId
from p2pmega.core.geo import GeoTable
from p2pmega.core.ids import Address
from p2pmega.core.placement import Candidate, meets_rule
from p2pmega.core.renewal import RenewCredential
from p2pmega.core.words import counted
from p2pmega.errors import P2PMegaError, PeerUnreachable, RequestUnknown
from p2pmega.node import Node
from p2pmega.replicate.peers import candidate_of
from p2pmega.storage.share_state import PlacedChunk, ShareState
from p2pmega.storage.sizes import format_size

log = logging.getLogger(__name__)

# Before anything is stored, each candidate is asked its free space (SPACE): only storage peers answer (a bootstrap
# node has no transfer server), and dead contacts drop out. A small network is probed whole (it is under
# SMALL_NETWORK_NODES); a large one by a sample this big, enough to judge whether the rule can be met.
PROBE_PEERS = 64
# A storage peer answers in one round trip; one that is silent this long is left out of the share. Far
# above a round trip across the world (~0.3 s), far below the transfer timeout a dead peer would otherwise cost.
PROBE_TIMEOUT_S = 3.0
# Once the peers that answered can meet the rule, the others get this much longer: on a LAN or across a continent
# every storage peer has answered by then.
PROBE_GRACE_S = 0.5


@dataclass(frozen=True)
class Probe:
    """What the storage-peer probe found (each list sorted by node id).

    Attributes:
        live: storage peers with room for a chunk, weighted by the free space they reported (core.capacity).
        silent: contacts that did not answer (DHT-only nodes, dead contacts).
        full: storage peers that said they have less room than one chunk: no candidates.
        space: the free bytes each answering peer reported, by address (for ``Placer.space``); an older holder
            that only answered ``has`` is missing and weighs 1.0.
    """

    live: list[Candidate]
    silent: list[Candidate]
    full: list[Candidate] = field(default_factory=list)
    space: dict[Address, int] = field(default_factory=dict)


async def storage_peers(
    node: Node,
    pool: list[Candidate],
    rng: random.Random,
    *,
    enough: Callable[[list[Candidate]], bool] = lambda _live: False,
    chunk_bytes: int = 1,
) -> Probe:
    """Which of ``pool`` store chunks, and how much room each has: one SPACE request each, in parallel.

    DHT-only nodes (a bootstrap node has no transfer server) and dead contacts do not answer; they can hold
    nothing, so they must not count towards the rule. A peer with less room than ``chunk_bytes`` (one stored
    chunk) is full: it gets no chunk and does not count either. A holder older than the SPACE message refuses
    it; it is asked the old probe, one batched ``has``, instead. Waits for every answer up to PROBE_TIMEOUT_S,
    but once the peers that answered are ``enough``, only PROBE_GRACE_S more: a firewalled contact that drops
    the connection then costs a share half a second, not three.

    Returns:
        The live, silent and full peers and the space each reported (a Probe).
    """
    probed = pool if len(pool) <= PROBE_PEERS else rng.sample(pool, PROBE_PEERS)
    probe = [ChunkId(rng.randbytes(32))]

    async def answers(cand: Candidate) -> int | None:
        """The free bytes ``cand`` reports; -1 if it stores chunks but does not say; None if it stores none."""
        addr = (cand.host, cand.port)
        try:
            return (await node.client.space(addr)).free_bytes
        except PeerUnreachable as exc:
            # Its subclasses say there is no usable holder there (refused connection, incompatible, not
            # authentic); only a refusal of the request may be an older holder that does not know SPACE.
            if type(exc) not in (PeerUnreachable, RequestUnknown):
                log.debug("%s:%d is no storage peer: %s", cand.host, cand.port, exc)
                return None
            log.debug("%s:%d refused SPACE, asking has: %s", cand.host, cand.port, exc)
        except P2PMegaError as exc:
            log.debug("%s:%d is no storage peer: %s", cand.host, cand.port, exc)
            return None
        try:
            await node.client.has(addr, probe)
        except P2PMegaError as exc:
            log.debug("%s:%d is no storage peer: %s", cand.host, cand.port, exc)
            return None
        return -1

    tasks = {asyncio.create_task(answers(c)): c for c in probed}
    found = Probe([], [])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_TIMEOUT_S
    pending = set(tasks)
    try:
        while pending and loop.time() < deadline:
            done, pending = await asyncio.wait(
                pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                cand, free = tasks[task], task.result()
                if free is None:
                    continue
                if free < 0:
                    found.live.append(cand)
                    continue
                found.space[(cand.host, cand.port)] = free
                if is_full(free, chunk_bytes):
                    found.full.append(cand)
                else:
                    found.live.append(dataclasses.replace(cand, weight=capacity_weight(free)))
            if enough(found.live):
                deadline = min(deadline, loop.time() + PROBE_GRACE_S)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    answered = {(c.host, c.port) for c in [*found.live, *found.full]}
    return Probe(
        live=sorted(found.live, key=lambda c: c.node_id),
        silent=sorted(
            (c for c in probed if (c.host, c.port) not in answered), key=lambda c: c.node_id
        ),
        full=sorted(found.full, key=lambda c: c.node_id),
        space=found.space,
    )


def full_note(probe: Probe, chunk_bytes: int) -> str:
    """The clause a share error adds when storage peers were left out as full ("" when none was).

    A full peer is never the reason a share fails; it just does not count, and the user should know why.
    """
    if not probe.full:
        return ""
    shown = ", ".join(c.label() for c in probe.full[:4]) + (", ..." if len(probe.full) > 4 else "")
    every = "every storage peer found is full" if not probe.live else "left out as full"
    return (
        f"; {every}: {counted(len(probe.full), 'peer')} ({shown}) with less than one chunk "
        f"({format_size(chunk_bytes)}) free for this network; their operators can raise --quota, or add "
        "storage peers"
    )


async def recheck(
    node: Node,
    state: ShareState,
    geo: GeoTable | None,
    replicas: int,
    min_countries: int,
    lease_s: float,
    credential: RenewCredential,
) -> None:
    """Keep the recorded chunks whose holders still have them, enough for the rule; renew their leases.

    One batched signed renewal per recorded holder (``credential`` is the file's): it confirms the chunks (True
    only for chunks held with the file's renewal key) and gives them the new share's lease. A chunk short of the rule now is dropped from the state and uploaded again (sealed
    anew, so under a new id: the manifest is not built yet).
    """
    by_holder: dict[Address, list[int]] = {}
    for index, placed in state.chunks.items():
        for holder in placed.holders:
            by_holder.setdefault(holder.address, []).append(index)

    recorded = {h.address: h for placed in state.chunks.values() for h in placed.holders}
    expiry_s = math.ceil(time.time() + lease_s)

    async def renew(addr: Address, indexes: list[int]) -> tuple[Address, list[int]]:
        ids = [state.chunks[i].chunk_id for i in indexes]
        try:
            flags = await node.client.renew_signed(
                addr,
                ids,
                holder_id=recorded[addr].node_id,
                expiry_s=expiry_s,
                credential=credential,
            )
        except P2PMegaError as exc:
            log.debug("recorded holder %s did not answer renew(): %s", addr, exc)
            return addr, []
        return addr, [i for i, held in zip(indexes, flags, strict=True) if held]

    answers = await asyncio.gather(*(renew(a, ix) for a, ix in by_holder.items()))
    confirmed: dict[int, list[Candidate]] = {}
    for addr, held in answers:
        for index in held:
            # The country again from today's geo table; the node id as recorded when the chunk was stored.
            confirmed.setdefault(index, []).append(candidate_of(recorded[addr].node_id, addr, geo))
    kept: dict[int, PlacedChunk] = {}
    for index, holders in confirmed.items():
        if meets_rule(holders, replicas=replicas, min_countries=min_countries):
            kept[index] = PlacedChunk(state.chunks[index].chunk_id, tuple(holders))
    state.chunks = kept
