"""RequestsMixin: TransferClient's request/response calls other than fetch: store, has, renew, leases, space.

TransferClient (net.transfer_client) inherits it and supplies ``ask``, which sends one request over its pool and
turns an Error reply into an exception. This module holds only the calls: building each request, checking the reply
type core.wire pairs with it, and splitting lists of ids into MAX_BATCH_IDS batches (one helper, _batched).
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from p2pmega.core.chunking import ChunkId
from p2pmega.core.ids import Address
from p2pmega.core.renewal import RenewCredential
from p2pmega.core.wire import (
    MAX_BATCH_IDS,
    MAX_LEASE_S,
    HasReply,
    HasRequest,
    KeyedStoreRequest,
    LeasesReply,
    LeasesRequest,
    RenewReply,
    RenewRequest,
    RenewSignedRequest,
    Reply,
    Request,
    SpaceReply,
    SpaceRequest,
    StoreOK,
    StoreRequest,
)

_T = TypeVar("_T")


def _lease_seconds(lease_s: float) -> int:
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    return min(math.ceil(lease_s), MAX_LEASE_S)


class Asks:
    """What both TransferClient mixins call: ``ask``, implemented by TransferClient.

    mypy checks @abstractmethod without ABCMeta, so TransferClient keeps its metaclass.
    """

    @abstractmethod
    async def ask(
        self,
        addr: Address,
        event: Callable[[int], Request],
        chunk_id: bytes = b"",
        *,
        drop_on_cancel: bool = False,
    ) -> Reply:
        """Send the request ``event(request_id)`` to ``addr`` and return its reply (TransferClient.ask)."""


class RequestsMixin(Asks):
    """TransferClient's calls other than fetch: store, has, renew, renew_signed, leases and space."""

    async def store(
        self,
        addr: Address,
        chunk_id: ChunkId,
        data: bytes,
        lease_s: float,
        *,
        renew_key: bytes | None = None,
    ) -> bool:
        """Ask ``addr`` to store ``data`` under ``chunk_id`` for at least ``lease_s`` seconds.

        With ``renew_key`` (the file's renewal public key, core.renewal) the holder keeps it with
        the chunk, and `renew_signed` with that file's credential extends the lease later.

        Returns:
            True if the chunk was newly stored, False if the peer already held it (its lease is
            then left as it was).

        Raises:
            errors.QuotaExceeded: the peer's quota is full, or (SourceLimitExceeded) our network
                used its share of it or its store rate there.
            errors.BadChunk: the peer found ``data`` is not shaped like a stored chunk.
            errors.ChunkHashMismatch: the peer found ``data`` does not hash to ``chunk_id``.
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
            ValueError: ``data`` exceeds MAX_SEALED_CHUNK_BYTES or ``lease_s`` is not positive.
        """
        lease = _lease_seconds(lease_s)

        def request(rid: int) -> StoreRequest:
            if renew_key is None:
                return StoreRequest(rid, chunk_id, lease, data)
            return KeyedStoreRequest(rid, chunk_id, lease, data, renew_key=renew_key)

        reply = await self.ask(addr, request, chunk_id)
        if not isinstance(reply, StoreOK):
            raise AssertionError("core.wire matches STORE with STORE_OK")
        return reply.newly_stored

    async def has(self, addr: Address, ids: Sequence[ChunkId]) -> list[bool]:
        """Which of ``ids`` does ``addr`` hold? Batches larger than MAX_BATCH_IDS are split.

        Raises:
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
        """

        async def ask(batch: tuple[ChunkId, ...]) -> tuple[bool, ...]:
            reply = await self.ask(addr, functools.partial(HasRequest, ids=batch))
            if not isinstance(reply, HasReply):
                raise AssertionError("core.wire matches HAS with HAS_REPLY")
            return reply.flags

        return await _batched(ids, ask)

    async def renew_signed(
        self,
        addr: Address,
        ids: Sequence[ChunkId],
        *,
        holder_id: bytes,
        expiry_s: int,
        credential: RenewCredential,
    ) -> list[bool]:
        """Extend ``ids`` at ``addr`` to at least ``expiry_s`` (Unix seconds), signed with ``credential``.

        The holder renews only the chunks stored with ``credential``'s public key; the signature
        names ``holder_id`` (the holder's node id), so it is worth nothing at another holder.

        Returns:
            True for each id the peer holds with that key and renewed.

        Raises:
            errors.BadSignature: the holder's node id is not ``holder_id``, so the signature failed.
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
        """
        key = credential.public_key

        async def ask(batch: tuple[ChunkId, ...]) -> tuple[bool, ...]:
            signature = credential.sign(holder_id, expiry_s, batch)
            reply = await self.ask(
                addr, lambda rid: RenewSignedRequest(rid, batch, expiry_s, key, signature)
            )
            if not isinstance(reply, RenewReply):
                raise AssertionError("core.wire matches RENEW_SIGNED with RENEW_REPLY")
            return reply.flags

        return await _batched(ids, ask)

    async def renew(self, addr: Address, ids: Sequence[ChunkId], lease_s: float) -> list[bool]:
        """Extend the leases of ``ids`` at ``addr``, unsigned: `renew_signed` is what keepers use.

        A holder renews this way only chunks stored without a renewal key from our own network.

        Raises:
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
            ValueError: ``lease_s`` is not positive.
        """
        lease = _lease_seconds(lease_s)

        async def ask(batch: tuple[ChunkId, ...]) -> tuple[bool, ...]:
            reply = await self.ask(addr, functools.partial(RenewRequest, ids=batch, lease_s=lease))
            if not isinstance(reply, RenewReply):
                raise AssertionError("core.wire matches RENEW with RENEW_REPLY")
            return reply.flags

        return await _batched(ids, ask)

    async def leases(self, addr: Address, ids: Sequence[ChunkId]) -> list[int]:
        """Whole seconds left on each of ``ids``' leases at ``addr`` (0: not held there).

        Batches larger than MAX_BATCH_IDS are split. A holder older than the LEASES message
        refuses it with BAD_REQUEST and closes the connection (docs/PROTOCOL.md, "Versioning").

        Raises:
            errors.PeerUnreachable: the peer cannot be reached or refused the request (an old
                holder that does not know LEASES).
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
        """

        async def ask(batch: tuple[ChunkId, ...]) -> tuple[int, ...]:
            reply = await self.ask(addr, functools.partial(LeasesRequest, ids=batch))
            if not isinstance(reply, LeasesReply):
                raise AssertionError("core.wire matches LEASES with LEASES_REPLY")
            return reply.remaining_s

        return await _batched(ids, ask)

    async def space(self, addr: Address) -> SpaceReply:
        """The bytes ``addr`` says this node's network may still store there, and its quota.

        Untrusted: the holder can claim anything up to its claimed quota (core.capacity bounds what
        the claim is worth). A holder older than the SPACE message refuses it with BAD_REQUEST and
        closes the connection (docs/PROTOCOL.md, "Versioning").

        Raises:
            errors.PeerUnreachable: the peer cannot be reached or refused the request (an old
                holder that does not know SPACE).
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
        """
        reply = await self.ask(addr, SpaceRequest)
        if not isinstance(reply, SpaceReply):
            raise AssertionError("core.wire matches SPACE with SPACE_REPLY")
        return reply


async def _batched(
    ids: Sequence[ChunkId], ask: Callable[[tuple[ChunkId, ...]], Awaitable[Sequence[_T]]]
) -> list[_T]:
    """Ask ``ask`` about each slice of at most MAX_BATCH_IDS ``ids``; join the answers in order.

    The slices go one after another, so a long list holds one pooled connection, not all of them.
    """
    answers: list[_T] = []
    for start in range(0, len(ids), MAX_BATCH_IDS):
        answers.extend(await ask(tuple(ids[start : start + MAX_BATCH_IDS])))
    return answers
