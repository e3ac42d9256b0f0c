"""FetchMixin: TransferClient's fetch paths, from one holder or the first of several to serve a chunk intact.

TransferClient (net.transfer_client) inherits it and supplies the pool it fetches through: ``ask``, ``_connection``,
the pool and its buffers. This module holds only what a fetch adds: the FETCH request, the hash check (in a worker
thread, with the caller's ``consume``), failing over from holder to holder, and racing their connections to them.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from p2pmega import errors
from p2pmega.core.chunking import ChunkId, short_id, verify_chunk
from p2pmega.core.ids import Address
from p2pmega.core.wire import ChunkData, FetchRequest
from p2pmega.core.words import counted
from p2pmega.net.buffers import BufferPool, recycle
from p2pmega.net.transfer_peer import PeerConnection
from p2pmega.net.transfer_peer import where as _where
from p2pmega.net.transfer_requests import Asks

# Every transfer module logs as p2pmega.net.transfer, so one logger setting covers the transfer.
log = logging.getLogger("p2pmega.net.transfer")

_T = TypeVar("_T")
ChunkBytes = bytes | memoryview

# A holder that has not accepted a connection this long gets company: the next holder is tried at the same time
# (_reachable_first). Far above a connect across the world (one round trip, <= 0.3 s), far below the connect timeout.
CONNECT_RACE_S: Final = 0.5


class FetchMixin(Asks):
    """The fetch methods of TransferClient (``fetch``, ``fetch_into``, ``fetch_any``, ``fetch_any_into``).

    Every fetched chunk is hash-checked (in a thread) before it is returned or handed to ``consume``.
    """

    # Set by TransferClient.__init__.
    connect_timeout_s: float
    _buffers: BufferPool
    _pool: dict[Address, list[PeerConnection]]

    # Implemented by TransferClient (as ``ask``, Asks).
    @abstractmethod
    async def _connection(self, addr: Address, *, fresh: bool = False) -> PeerConnection:
        """A pooled connection to ``addr``, or a new one (TransferClient._connection)."""

    async def fetch(self, addr: Address, chunk_id: ChunkId) -> ChunkBytes:
        """Fetch the chunk ``chunk_id`` from ``addr`` and verify its hash.

        A large chunk comes as a read-only view of the buffer it was received into (no copy).

        Raises:
            errors.ChunkNotStored: the peer does not have it.
            errors.ChunkHashMismatch: the peer sent bytes that do not hash to ``chunk_id``.
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
        """
        return await self._fetch(addr, chunk_id, _as_is, reuse=False)

    async def fetch_into(
        self,
        addr: Address,
        chunk_id: ChunkId,
        consume: Callable[[ChunkBytes], _T],
        *,
        drop_on_cancel: bool = False,
    ) -> _T:
        """`fetch`, then ``consume(data)`` in the worker thread that verified it; return its result.

        With ``drop_on_cancel``, cancelling the call while the reply is on its way closes the
        connection it was sent on, so the holder stops sending; other requests pending on that
        connection fail (or are retried once on a fresh connection, as for any dropped connection).

        One thread hop per chunk for hashing and whatever the caller does with the bytes next
        (fetch decrypts and writes them). ``consume`` runs only on bytes that match ``chunk_id``;
        what it raises propagates unchanged. ``data`` is valid only while ``consume`` runs: its
        buffer receives a later chunk (keep a copy, never the view).

        Raises:
            As `fetch`, and whatever ``consume`` raises.
        """
        return await self._fetch(addr, chunk_id, consume, reuse=True, drop_on_cancel=drop_on_cancel)

    async def _fetch(
        self,
        addr: Address,
        chunk_id: ChunkId,
        consume: Callable[[ChunkBytes], _T],
        *,
        reuse: bool,
        drop_on_cancel: bool = False,
    ) -> _T:
        reply = await self.ask(
            addr, lambda rid: FetchRequest(rid, chunk_id), chunk_id, drop_on_cancel=drop_on_cancel
        )
        if not isinstance(reply, ChunkData):
            raise AssertionError("core.wire matches FETCH with CHUNK_DATA")
        try:
            return await asyncio.to_thread(
                _verified, chunk_id, reply.data, consume, self._buffers if reuse else None
            )
        except errors.ChunkHashMismatch:
            log.debug(
                "peer %s sent bad bytes for chunk %s; dropping its connections",
                _where(addr),
                short_id(chunk_id),
            )
            for peer_conn in self._pool.pop(addr, []):
                await peer_conn.close()
            raise

    async def fetch_any(
        self, addrs: Sequence[Address], chunk_id: ChunkId
    ) -> tuple[ChunkBytes, Address]:
        """Fetch ``chunk_id`` from the first holder in ``addrs`` that serves it intact.

        Returns:
            The verified bytes and the address that served them.

        Raises:
            errors.ChunkUnavailable: every holder failed (names how many were tried and why).
        """
        return await self._fetch_any(addrs, chunk_id, _as_is, reuse=False)

    async def fetch_any_into(
        self,
        addrs: Sequence[Address],
        chunk_id: ChunkId,
        consume: Callable[[ChunkBytes], _T],
        *,
        failed: set[Address] | None = None,
    ) -> tuple[_T, Address]:
        """`fetch_any` with `fetch_into`'s ``consume``: its result and the address that served.

        ``failed`` collects the holders that timed out, could not be reached or sent bad bytes (not those that
        merely lack the chunk), so the caller can leave them out of its next requests.

        Raises:
            errors.ChunkUnavailable: every holder failed (names how many were tried and why).
            Whatever else ``consume`` raises (the next holder is not tried for it); it should
            raise none of the errors that mean a bad holder (hash mismatch, not stored, network).
        """
        return await self._fetch_any(addrs, chunk_id, consume, reuse=True, failed=failed)

    async def _fetch_any(
        self,
        addrs: Sequence[Address],
        chunk_id: ChunkId,
        consume: Callable[[ChunkBytes], _T],
        *,
        reuse: bool,
        failed: set[Address] | None = None,
    ) -> tuple[_T, Address]:
        reasons: Counter[str] = Counter()
        bad = failed if failed is not None else set()
        order, unreachable = await self._reachable_first([a for a in addrs if a not in bad])
        reasons["unreachable"] += len(unreachable)
        bad.update(unreachable)
        for addr in order:
            if addr in bad:
                continue  # failed another request of the caller's meanwhile
            try:
                return await self._fetch(addr, chunk_id, consume, reuse=reuse), addr
            except errors.ChunkNotStored:
                reasons["not found"] += 1
                continue
            except errors.ChunkHashMismatch:
                reasons["bad hash"] += 1
            except errors.TransferTimeout:
                reasons["timeout"] += 1
            except errors.PeerNotAuthentic:
                reasons["wrong key"] += 1
            except errors.NetworkError:
                reasons["unreachable"] += 1
            bad.add(addr)
            log.debug(
                "chunk %s not served by %s; trying the next holder",
                short_id(chunk_id),
                _where(addr),
            )
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        raise errors.ChunkUnavailable(
            f"no holder served chunk {short_id(chunk_id)} (tried {counted(len(addrs), 'holder')}"
            f"{': ' + why if why else ''}); retry later or ask more peers"
        )

    async def _reachable_first(
        self, addrs: Sequence[Address]
    ) -> tuple[list[Address], set[Address]]:
        """``addrs`` with the first holder to accept a connection moved to the front, and the holders whose
        connection failed (or, when none connected, did not connect within the connect timeout).

        Connections are raced as Happy Eyeballs races addresses (RFC 8305): the first holder is tried, and every
        CONNECT_RACE_S that passes without a connection the next one is tried too, so a holder that silently
        drops connections (gone, firewalled) costs CONNECT_RACE_S, not the connect timeout. A pooled connection
        wins at once, so a healthy holder costs nothing extra; the losers' connections stay in the pool.
        """
        if len(addrs) < 2:
            return list(addrs), set()
        racing: dict[asyncio.Task[PeerConnection], Address] = {}
        winner: Address | None = None
        try:
            for addr in addrs:
                racing[asyncio.create_task(self._connection(addr))] = addr
                winner = await self._first_connected(racing, CONNECT_RACE_S)
                if winner is not None:
                    break
            else:
                winner = await self._first_connected(racing, self.connect_timeout_s)
        finally:
            for task in racing:
                if not task.done():
                    task.cancel()
            # Retrieve every outcome: a refused or cancelled attempt is not an error here.
            await asyncio.gather(*racing, return_exceptions=True)
        failed = {
            addr
            for task, addr in racing.items()
            if winner is None
            or (task.done() and not task.cancelled() and task.exception() is not None)
        }
        if winner is None:
            return [], failed
        return [winner, *(a for a in addrs if a != winner and a not in failed)], failed

    @staticmethod
    async def _first_connected(
        racing: dict[asyncio.Task[PeerConnection], Address], wait_s: float
    ) -> Address | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        pending = [t for t in racing if not t.done()]
        while True:
            for task in racing:
                if task.done() and not task.cancelled() and task.exception() is None:
                    return racing[task]
            pending = [t for t in pending if not t.done()]
            left = deadline - loop.time()
            if not pending or left <= 0:
                return None
            await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)


def _as_is(data: ChunkBytes) -> ChunkBytes:
    return data


def _verified(
    chunk_id: ChunkId,
    data: ChunkBytes,
    consume: Callable[[ChunkBytes], _T],
    buffers: BufferPool | None,
) -> _T:
    """Hash-check ``data``, hand it to ``consume``, then give its buffer to ``buffers`` (if any)."""
    try:
        verify_chunk(chunk_id, data)
        return consume(data)
    finally:
        if buffers is not None:
            recycle(data, buffers)
