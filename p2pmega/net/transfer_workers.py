"""The worker threads of a TransferServer: they run store calls off the event loop, in batches.

Plain threads on one queue, whose results return to the loop with one wake-up for all that
finished meanwhile. What the store raised becomes a typed Error (net.wire_errors).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from p2pmega.core.renewal import check_renewal
from p2pmega.core.wire import (
    CHUNK_DATA_HEAD_BYTES,
    MAX_LEASE_S,
    Error,
    ErrorCode,
    ExpectRequest,
    FetchRequest,
    ForwardedStoreRequest,
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
from p2pmega.errors import BadSignature, ForwardNotExpected
from p2pmega.net.buffers import BufferPool
from p2pmega.net.wire_errors import error_reply

if TYPE_CHECKING:
    from p2pmega.storage import ChunkStore
    from p2pmega.storage.expect import Expectations

log = logging.getLogger("p2pmega.net.transfer")

# Threads that run store calls: enough to overlap the fsyncs of concurrent stores.
WORKER_THREADS: Final = 8


@dataclass(frozen=True)
class Chunk:
    """A fetched chunk: its ChunkData frame at ``start`` in a buffer of BufferPool.

    The frame's ``size`` data bytes follow CHUNK_DATA_HEAD_BYTES of room for its header.
    """

    buffer: bytearray
    start: int
    size: int


class Requester(Protocol):
    """The connection a request came from (transfer_server._Connection)."""

    # The peer's network (core.node_id.network_of): what its stores count against, who it may renew.
    source: bytes

    def finished(self, event: Request, reply: Reply | Chunk, buffers: BufferPool) -> None: ...

    def abort(self) -> None: ...

    def release(self, request_id: int) -> None: ...


def answer(
    store: ChunkStore,
    event: Request,
    buffers: BufferPool,
    *,
    source: bytes,
    holder_id: bytes | None,
    expected: Expectations | None = None,
) -> Reply | Chunk:
    """Run one request against the store (in a worker thread); every failure becomes an Error.

    ``source`` is the requester's network, ``holder_id`` this holder's node id (what a signed
    renewal must name), ``expected`` the forwards sharers announced (None: none are accepted).
    """
    try:
        if isinstance(event, ForwardedStoreRequest):
            return _store_forwarded(store, event, expected)
        if isinstance(event, ExpectRequest):
            # The copies will count against the requester's network: it must have room for some.
            if expected is None or store.free_bytes(source) <= 0:
                return RenewReply(event.request_id, (False,) * len(event.ids))
            flags = expected.expect(
                source, event.ids, lease_s=event.lease_s, renew_key=event.renew_key
            )
            return RenewReply(event.request_id, tuple(flags))
        if isinstance(event, StoreRequest):
            renew_key = event.renew_key if isinstance(event, KeyedStoreRequest) else None
            newly = store.put(
                event.chunk_id,
                event.data,
                lease_s=event.lease_s,
                source=source,
                renew_key=renew_key,
            )
            return StoreOK(event.request_id, newly)
        if isinstance(event, FetchRequest):
            taken: list[bytearray] = []
            starts: list[int] = []

            def room(size: int) -> memoryview:
                # The chunk goes after room for its frame header (send_chunk_data_in_place), on a
                # direct I/O boundary, so the disk reads it into place.
                taken.append(buffers.take(CHUNK_DATA_HEAD_BYTES + size + store.ROOM_SPARE_BYTES))
                starts.append(store.room_offset(taken[-1], CHUNK_DATA_HEAD_BYTES))
                return memoryview(taken[-1])[starts[-1] + CHUNK_DATA_HEAD_BYTES :]

            try:
                size = store.read_into(event.chunk_id, room)
            except BaseException:
                for buffer in taken:
                    buffers.give(buffer)
                raise
            return Chunk(taken[0], starts[0], size)
        if isinstance(event, HasRequest):
            return HasReply(event.request_id, tuple(store.has_many(event.ids)))
        if isinstance(event, LeasesRequest):
            # The wire carries a u32 of seconds: a longer lease (136 years) reads as the largest.
            remaining = (min(s, MAX_LEASE_S) for s in store.leases(event.ids))
            return LeasesReply(event.request_id, tuple(remaining))
        if isinstance(event, SpaceRequest):
            # The room for this requester's network: what decides whether its next store fits.
            free = store.free_bytes(source)
            return SpaceReply(event.request_id, free, store.quota_bytes)
        if isinstance(event, RenewSignedRequest):
            # Checked against this holder's own id: a renewal signed for another holder fails here.
            if holder_id is None:
                raise BadSignature("this holder has no node id to check renewals against")
            check_renewal(event.renew_key, event.signature, holder_id, event.expiry_s, event.ids)
            flags = store.renew_signed(event.ids, renew_key=event.renew_key, expiry=event.expiry_s)
            return RenewReply(event.request_id, tuple(flags))
        if isinstance(event, RenewRequest):
            flags = store.renew_unsigned(event.ids, lease_s=event.lease_s, source=source)
            return RenewReply(event.request_id, tuple(flags))
        raise AssertionError(f"unknown request {type(event).__name__}")
    except Exception as exc:
        refusal = error_reply(event, exc)
        if refusal is None:
            # A bug in the store must not leave the peer waiting for its timeout.
            log.exception("store raised unexpectedly on request %d", event.request_id)
            return Error(event.request_id, ErrorCode.INTERNAL, "internal error")
        return refusal


def _store_forwarded(
    store: ChunkStore, event: ForwardedStoreRequest, expected: Expectations | None
) -> StoreOK:
    """Keep a forwarded copy on the terms its sharer announced (EXPECT), counted against the sharer."""
    terms = expected.take(event.chunk_id) if expected is not None else None
    if terms is None or terms.lease_s != event.lease_s:
        if terms is not None and expected is not None:
            expected.put_back(event.chunk_id, terms)
        raise ForwardNotExpected("no live expectation on these terms")
    try:
        newly = store.put(
            event.chunk_id,
            event.data,
            lease_s=terms.lease_s,
            source=terms.source,
            renew_key=terms.renew_key,
        )
    except Exception:
        assert expected is not None  # noqa: S101 - terms came from it
        expected.put_back(event.chunk_id, terms)  # bad bytes: the right ones may still come
        raise
    return StoreOK(event.request_id, newly)


_Done = tuple[Requester, Request, Reply | Chunk]


class Workers:
    """Store calls in worker threads; results return to the loop in batches.

    Plain threads on one queue (a ThreadPoolExecutor costs a Future, a work item and a semaphore
    per request). A thread that finishes a request queues the reply and wakes the loop only if no
    wake-up is pending already, so requests that finish close together cost one wake-up.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        store: ChunkStore,
        buffers: BufferPool,
        *,
        holder_id: bytes | None,
        expected: Expectations | None = None,
    ) -> None:
        self._loop = loop
        self._store = store
        self._holder_id = holder_id
        self._expected = expected
        self.buffers = buffers
        self._jobs: queue.SimpleQueue[tuple[Requester, Request] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: deque[_Done] = deque()
        self._wake_pending = False
        self._running = 0
        self._idle: asyncio.Future[None] | None = None
        # Daemon threads: a process that exits without stop() loses at most writes that were
        # never acknowledged, which the store's repair at open removes (as after kill -9).
        self._threads = [
            threading.Thread(target=self._work, name=f"p2pmega-transfer-{i}", daemon=True)
            for i in range(WORKER_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, connection: Requester, event: Request) -> None:
        self._running += 1
        self._jobs.put((connection, event))

    def _work(self) -> None:
        store, buffers, jobs, holder_id = self._store, self.buffers, self._jobs, self._holder_id
        expected = self._expected
        while (job := jobs.get()) is not None:
            connection, event = job
            reply = answer(
                store,
                event,
                buffers,
                source=connection.source,
                holder_id=holder_id,
                expected=expected,
            )
            with self._lock:
                self._done.append((connection, event, reply))
                wake = not self._wake_pending
                self._wake_pending = True
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:
                    return  # the loop is closed: the server was never stopped, nobody waits

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, deque()
            self._wake_pending = False
        self._running -= len(done)
        for connection, event, reply in done:
            try:
                connection.finished(event, reply, self.buffers)
            except Exception:
                log.exception("sending the reply to request %d failed", event.request_id)
                connection.abort()
                connection.release(event.request_id)  # its slot, which connection_lost cannot see
                if isinstance(reply, Chunk):
                    self.buffers.give(reply.buffer)
        if not self._running and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def wait_idle(self) -> None:
        """Until every submitted request has finished (store writes are never abandoned)."""
        if self._running:
            self._idle = self._loop.create_future()
            await self._idle

    def shutdown(self) -> None:
        """Let the threads end (each takes one None off the queue once the jobs are done)."""
        for _ in self._threads:
            self._jobs.put(None)
