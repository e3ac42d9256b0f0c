"""The three requests of pipelined replication, over a TransferClient (docs/PROTOCOL.md, "Forwarding").

A sharer sends EXPECT to a chunk's second holder and STORE_FORWARD (the chunk, once) to its first; the first holder
sends FORWARDED_STORE to the second. Typed results, errors as the client raises them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from p2pmega.core.chunking import ChunkId
from p2pmega.core.ids import Address
from p2pmega.core.wire import (
    MAX_BATCH_IDS,
    MAX_LEASE_S,
    ExpectRequest,
    ForwardedStoreRequest,
    ForwardOK,
    ForwardStoreRequest,
    RenewReply,
    StoreOK,
)
from p2pmega.net.transfer_client import TransferClient


@dataclass(frozen=True)
class Target:
    """The holder a first holder forwards a chunk to: the node id it must prove at that address."""

    node_id: bytes
    host: str
    port: int


def whole_seconds(lease_s: float) -> int:
    """A lease as the wire carries it: whole seconds, rounded up, at most MAX_LEASE_S.

    Raises:
        ValueError: ``lease_s`` is not positive.
    """
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    return min(math.ceil(lease_s), MAX_LEASE_S)


async def store_forward(
    client: TransferClient,
    addr: Address,
    chunk_id: ChunkId,
    data: bytes,
    lease_s: float,
    *,
    renew_key: bytes,
    target: Target,
) -> ForwardOK:
    """Store at ``addr`` (as STORE_KEYED) and ask it to forward the chunk to ``target``.

    Returns:
        Whether the chunk was newly stored, and whether the holder will forward it.

    Raises:
        errors.PeerUnreachable: also an older holder that does not know STORE_FORWARD (BAD_REQUEST).
        errors.P2PMegaError: as TransferClient.store.
    """
    lease = whole_seconds(lease_s)
    reply = await client.ask(
        addr,
        lambda rid: ForwardStoreRequest(
            rid,
            chunk_id,
            lease,
            data,
            renew_key=renew_key,
            target_id=target.node_id,
            target_host=target.host,
            target_port=target.port,
        ),
        chunk_id,
    )
    if not isinstance(reply, ForwardOK):
        raise AssertionError("core.wire matches STORE_FORWARD with FORWARD_OK")
    return reply


async def expect(
    client: TransferClient,
    addr: Address,
    ids: Sequence[ChunkId],
    lease_s: float,
    *,
    renew_key: bytes,
) -> list[bool]:
    """Tell ``addr`` to accept forwarded copies of ``ids``, kept ``lease_s`` with ``renew_key``.

    Returns:
        True for each id it will accept (False: over its caps, or no room for our network).

    Raises:
        errors.PeerUnreachable: also an older holder that does not know EXPECT (BAD_REQUEST).
        errors.TransferTimeout: no data moved for the client's timeout.
    """
    lease = whole_seconds(lease_s)
    flags: list[bool] = []
    for start in range(0, len(ids), MAX_BATCH_IDS):
        batch = tuple(ids[start : start + MAX_BATCH_IDS])
        reply = await client.ask(
            addr,
            lambda rid, b=batch: ExpectRequest(rid, b, lease, renew_key),  # type: ignore[misc]
        )
        if not isinstance(reply, RenewReply):
            raise AssertionError("core.wire matches EXPECT with RENEW_REPLY")
        flags.extend(reply.flags)
    return flags


async def forwarded_store(
    client: TransferClient, addr: Address, chunk_id: ChunkId, data: bytes, lease_s: int
) -> bool:
    """A forwarder's store of ``chunk_id`` at ``addr``, on the lease its sharer asked for.

    Returns:
        True if newly stored, False if ``addr`` held it already.

    Raises:
        errors.ForwardNotExpected: ``addr`` has no expectation of it on these terms.
        errors.P2PMegaError: as TransferClient.store.
    """
    # Cancelled (a forwarder's deadline), the connection closes: the rest of the chunk must not keep its uplink busy.
    reply = await client.ask(
        addr,
        lambda rid: ForwardedStoreRequest(rid, chunk_id, lease_s, data),
        chunk_id,
        drop_on_cancel=True,
    )
    if not isinstance(reply, StoreOK):
        raise AssertionError("core.wire matches FORWARDED_STORE with STORE_OK")
    return reply.newly_stored
