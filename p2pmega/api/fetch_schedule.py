"""Which holder each chunk of a fetch is asked of: by a plan over measured rates, with hedged requests.

Each holder's rate is measured from the bytes it sends while it has requests under way (replies still arriving
count, so a slow holder is known as slow within a tenth of a second, not after its first 2 MiB). A plan
(core/fetch_plan.py) gives every waiting chunk to the holder that would finish it first, chunks that only slow
holders hold first; each holder is asked for its planned chunks one or two at a time (the next one shortly before
the last is done). A chunk a holder is sending that another holder would finish so much sooner that the whole
fetch ends sooner is asked of that other holder too, and the first holder goes on to its next planned chunk; a
holder with nothing planned asks for a chunk still on its way from a much slower one. The first verified copy is
written, the other request is cancelled (which closes its connection, docs/PROTOCOL.md "Cancelling a request").
The decisions are FetchDecisions's (api/fetch_decide.py); this module starts, awaits, cancels and writes the
requests they ask for. No I/O but the client's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar, cast

from p2pmega.api.fetch_decide import (
    HEDGE_GAIN_FRACTION,
    HEDGE_GAIN_S,
    LEAD_S,
    MAX_HEDGES,
    MAX_SEARCHES,
    MOVE_MIN_S,
    PLAN_SPACING,
    REPLAN_RATE_CHANGE,
    SLOTS_PER_HOLDER,
    TICK_S,
    FetchDecisions,
    _Request,
)
from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.core.ids import Address
from p2pmega.errors import ChunkHashMismatch, ChunkNotStored, ChunkUnavailable, NetworkError
from p2pmega.replicate.locator import HolderLocator

__all__ = [
    "HEDGE_GAIN_FRACTION",
    "HEDGE_GAIN_S",
    "LEAD_S",
    "MAX_HEDGES",
    "MAX_SEARCHES",
    "MOVE_MIN_S",
    "PLAN_SPACING",
    "REPLAN_RATE_CHANGE",
    "SLOTS_PER_HOLDER",
    "TICK_S",
    "FetchSchedule",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class FetchSchedule(FetchDecisions, Generic[_T]):
    """Fetches chunks ``todo`` of ``ids``: ``consume(index, bytes)`` takes a verified chunk exactly once.

    ``consume`` runs in the thread that hash-checked the bytes; ``on_done(index, result)`` runs in the loop
    after it, with what it returned. ``max_in_flight`` bounds the requests under way (a holder sending nothing
    may get one up to twice that); hedged ones add at most MAX_HEDGES. With ``window``, no chunk at or past ``window()`` is asked for (a stream's bounded memory): call
    ``kick`` when it moves. With ``stop_on_missing``, a chunk no holder has ends the run at once (ChunkUnavailable)
    instead of being counted in ``missing``. ``cancelled`` counts requests cancelled because another holder
    delivered the chunk first or was asked instead; ``moved`` counts requests asked of another holder while under
    way because that ends the fetch sooner.
    """

    def __init__(
        self,
        locator: HolderLocator,
        ids: Sequence[ChunkId],
        todo: Sequence[int],
        sizes: Sequence[int],
        consume: Callable[[int, bytes | memoryview], _T],
        on_done: Callable[[int, _T], Awaitable[None]],
        *,
        max_in_flight: int,
        window: Callable[[], int] | None = None,
        stop_on_missing: bool = False,
    ) -> None:
        super().__init__(locator, ids, todo, sizes, max_in_flight=max_in_flight, window=window)
        self.consume, self.on_done = consume, on_done
        self.stop_on_missing = stop_on_missing
        self._kicked = asyncio.Event()
        self.missing: list[tuple[int, ChunkUnavailable]] = []
        self.cancelled = 0  # requests cancelled: another copy came first, or they were moved
        # Copies verified after another copy of their chunk was claimed for writing, and dropped; ``on_late``
        # is told each one's index (in the verifying thread).
        self.late = 0
        self.on_late: Callable[[int], None] | None = None
        self._claimed: set[int] = set()
        # Cancelled or lost requests, awaited at the end.
        self._abandoned: list[asyncio.Task[object]] = []
        self._lock = threading.Lock()

    async def run(self) -> None:
        """Fetch every chunk or find it missing (``self.missing``).

        Raises:
            Whatever ``consume`` or ``on_done`` raises first: no chunk is asked for after it, but the requests
            under way finish (and are recorded) before it is raised.
        """
        failure: BaseException | None = None
        kick_wait: asyncio.Task[object] | None = None
        try:
            while self.waiting or self.requests:
                if failure is not None:
                    self.waiting.clear()
                else:
                    self._assign()
                tasks: list[asyncio.Task[object]] = [
                    r.task for rs in self.requests.values() for r in rs
                ]
                tasks += list(self.searches.values())
                if not tasks and not self.waiting:
                    break
                if not tasks and self.waiting[0] < self._limit():
                    # Nothing under way or searched, yet chunks wait (their holders all refused or failed): the
                    # locator searches again and fails over itself.
                    self._start(self.waiting.pop(0), None, self._loop.time(), hedge=False)
                    continue
                if self.window is not None:
                    if kick_wait is None or kick_wait.done():
                        self._kicked.clear()
                        kick_wait = asyncio.create_task(self._kicked.wait())
                    tasks.append(kick_wait)
                done, _ = await asyncio.wait(
                    tasks, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED
                )
                for index, search in list(self.searches.items()):
                    if search in done:
                        del self.searches[index]
                        self.searched.add(index)
                        self._stale = True
                        search.result()  # discover() catches the network's errors itself
                for request in [r for rs in list(self.requests.values()) for r in rs]:
                    if request.task in done:
                        try:
                            await self._finished(request)
                        except Exception as exc:  # raised once the requests under way are done
                            failure = failure or exc
            if failure is not None:
                raise failure
            log.debug(
                "schedule: %d hedged, %d moved, %d cancelled; rates %s",
                self.hedged,
                self.moved,
                self.cancelled,
                {
                    f"{a[0]}:{a[1]}": f"{h.rate_bytes_s / 2**20:.1f} MiB/s"
                    for a, h in self.holders.items()
                },
            )
        finally:
            leftover = [r.task for rs in self.requests.values() for r in rs] + self._abandoned
            leftover += list(self.searches.values())
            if kick_wait is not None:
                leftover.append(kick_wait)
            for task in leftover:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)

    def kick(self) -> None:
        """The ``window`` moved: look again now."""
        self._stale = True
        self._kicked.set()

    # -- requests -------------------------------------------------------------------------------------

    def _discover(self, index: int) -> asyncio.Task[None]:
        return asyncio.create_task(self.locator.discover(self.ids[index]))

    def _start(self, index: int, addr: Address | None, now: float, *, hedge: bool) -> None:
        size = self.sizes[index]
        expected_s = 0.0
        if addr is not None:
            holder = self._holder(addr)
            expected_s = holder.load_s(now) + size / holder.rate_bytes_s
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "chunk %d asked of %s at %.2f s%s; holders %s",
                index,
                addr and addr[0],
                now - self._t0,
                " (hedge)" if hedge else "",
                [(a[0], round(self._holder(a).rate_bytes_s / 2**20, 1)) for a in self._live(index)],
            )
        request = _Request(
            index=index, addr=addr, size=size, started=now, expected_s=expected_s, hedge=hedge
        )
        request.task = asyncio.create_task(self._fetch(index, addr))
        self.requests.setdefault(index, []).append(request)
        if addr is not None:
            holder = self._holder(addr)
            holder.account(now, self.locator.node.client.received_bytes(addr))
            holder.requests.append(request)

    async def _fetch(self, index: int, addr: Address | None) -> _T | None:
        def consume(data: bytes | memoryview) -> _T | None:
            # Two holders may deliver the same chunk at once: the first verified copy is written, and only once.
            with self._lock:
                if index in self._claimed:
                    self.late += 1
                    if self.on_late is not None:
                        self.on_late(index)
                    return None
                self._claimed.add(index)
            return self.consume(index, data)

        chunk_id = self.ids[index]
        if addr is None:
            return await self.locator.fetch_into(chunk_id, consume, spread=index)
        return await self.locator.node.client.fetch_into(
            addr, chunk_id, consume, drop_on_cancel=True
        )

    async def _finished(self, request: _Request) -> None:
        index, addr = request.index, request.addr
        now = self._loop.time()
        siblings = self.requests.get(index, [])
        if request not in siblings:
            return  # cancelled in this same round, after another copy was written
        siblings.remove(request)
        if not siblings:
            self.requests.pop(index, None)
        elif all(r.moved for r in siblings):
            for r in siblings:
                r.moved = (
                    False  # the copy it was moved to failed: it is the chunk's only request again
                )
        task = request.task
        holder = self._holder(addr) if addr is not None else None
        delivered = not task.cancelled() and task.exception() is None
        if holder is not None and addr is not None:
            holder.account(now, self.locator.node.client.received_bytes(addr))
            if delivered:
                self._stale = self._stale or not holder.measured
                holder.delivered(request)
            else:
                holder.remove(request)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            written = cast("_T | None", task.result())
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "chunk %d from %s at %.2f s: took %.2f s (expected %.2f s)%s",
                    index,
                    addr and addr[0],
                    now - self._t0,
                    now - request.started,
                    request.expected_s,
                    " (hedge)" if request.hedge else "",
                )
            if written is None:
                return  # the other copy won the race to be written
            for other in self.requests.pop(index, []):
                self._cancel(other, now)
            await self.on_done(index, written)
            return
        if isinstance(exc, ChunkUnavailable) and addr is None:
            if self.stop_on_missing:
                raise exc
            self.missing.append((index, exc))
            return
        if not isinstance(exc, ChunkNotStored | ChunkHashMismatch | NetworkError):
            raise exc  # the writer's failure, or a decryption failure: the fetch stops
        if addr is None or holder is None:
            raise exc  # the locator's own fetch gives up with ChunkUnavailable only; anything else stops the fetch
        log.debug("holder %s failed chunk %s: %s", addr, short_id(self.ids[index]), exc)
        self._stale = True
        self.refused.setdefault(index, set()).add(addr)
        ours = holder.dropped_at >= request.started  # its connection closed by one of our cancels
        if not ours and not isinstance(exc, ChunkNotStored):
            # Timed out, unreachable or sent bad bytes: out for this fetch.
            self.locator.dead.add(addr)
        if ours:
            self.refused[index].discard(addr)
        if index not in self.requests and index not in self._claimed:
            self.waiting.append(index)
            self.waiting.sort()

    def _cancel(self, request: _Request, now: float) -> None:
        request.task.cancel()
        self._abandoned.append(request.task)
        self.cancelled += 1
        if request.addr is not None:
            holder = self._holder(request.addr)
            holder.account(now, self.locator.node.client.received_bytes(request.addr))
            holder.remove(request)
            holder.dropped_at = now
