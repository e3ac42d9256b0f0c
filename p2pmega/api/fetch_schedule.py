"""Which holder each chunk of a fetch is asked of: by measured throughput, with hedged requests near the end.

Each holder's rate is measured as its chunks arrive. A holder with a free slot takes the first waiting chunk it
holds if it is that chunk's fastest holder, or if it would still deliver it before the fetch is expected to end;
a holder with nothing to take asks for a chunk that is still on its way from a slower holder (near the end, or
when that request runs far past its expected time). The first verified copy is written, the other request is
cancelled (which closes its connection, docs/PROTOCOL.md "Cancelling a request"). No I/O but the client's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar, cast

from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.core.ids import Address
from p2pmega.errors import ChunkHashMismatch, ChunkNotStored, ChunkUnavailable, NetworkError
from p2pmega.replicate.locator import HolderLocator

log = logging.getLogger(__name__)

# Requests one holder has under way at once: two keep its link busy while a reply is verified and written.
SLOTS_PER_HOLDER: Final = 2
# A holder's rate before its first chunk arrived: optimistic (100 MiB/s), so every holder gets a first request
# and is measured. Until then it has one request at a time: a slow one costs one chunk that faster holders then
# ask for too.
PRIOR_RATE_BYTES_S: Final = 100 * 1024 * 1024
# A request running this many times its expected duration is asked of another holder too, endgame or not.
OVERDUE_FACTOR: Final = 2.0
# Requests asked of a second holder at once (each one may waste up to a chunk of someone's upload).
MAX_HEDGES: Final = 8
# Holder searches (DHT lookups) at once for chunks with no holder known; one usually finds them all.
MAX_SEARCHES: Final = 4
# Waiting chunks a free holder chooses among (the first ones it holds): enough to find the ones only it holds,
# few enough that choosing stays cheap for a file of thousands of chunks.
SCAN_CHUNKS: Final = 64
# How often the schedule looks again without a reply arriving (overdue requests, holders found meanwhile).
TICK_S: Final = 0.1

_T = TypeVar("_T")


@dataclass(eq=False)
class _Request:
    index: int
    addr: Address | None  # None: the locator's own fetch (a chunk with no holder known yet)
    started: float
    expected_end: float
    hedge: bool
    task: asyncio.Task[object] = field(init=False)


@dataclass
class _Holder:
    """What the schedule knows about one holder: its measured rate and what it has under way."""

    rate_bytes_s: float = PRIOR_RATE_BYTES_S
    measured: bool = False
    in_flight: int = 0
    # Its rate is bytes delivered over time busy (some request under way): requests under way at once share
    # its link, so the time per request would count that link several times over.
    delivered_bytes: int = 0
    busy_s: float = 0.0
    busy_mark: float = 0.0
    # When we last cancelled a request of its (which closes that connection).
    dropped_at: float = -1.0

    def count_busy(self, now: float) -> None:
        """Add the time since the last change to busy_s if something was under way; call before each change."""
        if self.in_flight > 0:
            self.busy_s += now - self.busy_mark
        self.busy_mark = now


class FetchSchedule(Generic[_T]):
    """Fetches chunks ``todo`` of ``ids``: ``consume(index, bytes)`` takes a verified chunk exactly once.

    ``consume`` runs in the thread that hash-checked the bytes; ``on_done(index, result)`` runs in the loop
    after it, with what it returned. ``max_in_flight`` bounds the first requests; hedged ones add at most
    MAX_HEDGES. With ``window``, no chunk at or past ``window()`` is asked for (a stream's bounded memory): call
    ``kick`` when it moves. With ``stop_on_missing``, a chunk no holder has ends the run at once (ChunkUnavailable)
    instead of being counted in ``missing``. ``cancelled`` counts requests cancelled because another holder
    delivered the chunk first.
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
        self.locator, self.ids, self.sizes = locator, ids, sizes
        self.consume, self.on_done, self.max_in_flight = consume, on_done, max_in_flight
        self.window, self.stop_on_missing = window, stop_on_missing
        self._kicked = asyncio.Event()
        self._t0 = asyncio.get_running_loop().time()
        self.waiting: list[int] = sorted(todo)  # not asked of anyone yet
        self.requests: dict[int, list[_Request]] = {}
        self.holders: dict[Address, _Holder] = {}
        self.refused: dict[int, set[Address]] = {}  # holders that failed a chunk, per chunk
        self.missing: list[tuple[int, ChunkUnavailable]] = []
        self.cancelled = 0
        self.hedged = 0
        # Copies verified after another copy of their chunk was claimed for writing, and dropped; ``on_late``
        # is told each one's index (in the verifying thread).
        self.late = 0
        self.on_late: Callable[[int], None] | None = None
        self._claimed: set[int] = set()
        # Cancelled or lost requests, awaited at the end.
        self._abandoned: list[asyncio.Task[object]] = []
        # Chunk -> its holder search (locator.discover): a chunk with no holder known waits for it, and only a
        # chunk the search found no holder for goes to the locator's own fetch (which searches once more).
        self.searches: dict[int, asyncio.Task[None]] = {}
        self.searched: set[int] = set()
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()

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
                "schedule: %d hedged, %d cancelled; rates %s",
                self.hedged,
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
        self._kicked.set()

    def _limit(self) -> int:
        return len(self.ids) if self.window is None else self.window()

    # -- choosing -------------------------------------------------------------------------------------

    def _holder(self, addr: Address) -> _Holder:
        return self.holders.setdefault(addr, _Holder())

    def _live(self, index: int) -> list[Address]:
        refused = self.refused.get(index, set())
        return [a for a in self.locator.live_holders(self.ids[index]) if a not in refused]

    def _finish_at(self, addr: Address, index: int | None, now: float) -> float:
        """When ``addr`` would deliver chunk ``index`` if asked now: after what it is sending, at its rate
        (``index`` None: when it is done with what it is sending)."""
        holder = self._holder(addr)
        busy_until = max(
            (
                r.expected_end
                for rs in self.requests.values()
                for r in rs
                if r.addr == addr and r.expected_end > now
            ),
            default=now,
        )
        return busy_until + (0 if index is None else self.sizes[index] / holder.rate_bytes_s)

    def _projected_end(self, now: float) -> float:
        """When the chunks not asked yet would be done if every known holder shared them by its rate."""
        rates = sum(h.rate_bytes_s for a, h in self.holders.items() if a not in self.locator.dead)
        waiting_bytes = sum(self.sizes[i] for i in self.waiting)
        return now + waiting_bytes / max(rates, 1.0)

    def _assign(self) -> None:
        now = self._loop.time()
        limit = self._limit()
        for index in list(self.waiting):
            if index >= limit:
                break  # waiting is sorted
            live = self._live(index)
            for addr in live:
                self._holder(addr)
            if live or index in self.searches:
                continue
            if index not in self.searched:
                # A few searches at a time: the peers one finds are asked about every wanted chunk at once.
                if len(self.searches) < MAX_SEARCHES:
                    chunk_id = self.ids[index]
                    self.searches[index] = asyncio.create_task(self.locator.discover(chunk_id))
            elif self._primary_count() < self.max_in_flight:
                # Searched and still no holder: the locator's own fetch searches again and fails over.
                self.waiting.remove(index)
                self._start(index, None, now, hedge=False)
        end = self._projected_end(now)
        order = sorted(
            (a for a in self.holders if a not in self.locator.dead),
            key=lambda a: -self.holders[a].rate_bytes_s,
        )
        for addr in order:
            holder = self._holder(addr)
            while holder.in_flight < (SLOTS_PER_HOLDER if holder.measured else 1):
                if not self._take_waiting(addr, now, end) and not self._hedge(addr, now):
                    break

    def _primary_count(self) -> int:
        return sum(1 for rs in self.requests.values() for r in rs if not r.hedge)

    def _take_waiting(self, addr: Address, now: float, end: float) -> bool:
        """Start the waiting chunk ``addr`` should take, if any: of those it holds, the one whose other holders
        are slowest (a chunk only it holds first), provided it is that chunk's fastest holder or would deliver
        it before the fetch is expected to end."""
        if self._primary_count() >= self.max_in_flight:
            return False
        rate = self._holder(addr).rate_bytes_s
        busy_until = self._finish_at(addr, None, now)
        limit = self._limit()
        best: tuple[float, int] | None = None
        looked = 0
        for index in self.waiting:
            if index >= limit or looked >= SCAN_CHUNKS:
                break
            live = self._live(index)
            if addr not in live:
                continue
            looked += 1
            fastest_other = max(
                (self._holder(a).rate_bytes_s for a in live if a != addr), default=0.0
            )
            if rate < fastest_other and busy_until + self.sizes[index] / rate > end:
                continue
            if best is None or (fastest_other, index) < best:
                best = (fastest_other, index)
        if best is None:
            return False
        self.waiting.remove(best[1])
        self._start(best[1], addr, now, hedge=False)
        return True

    def _hedge(self, addr: Address, now: float) -> bool:
        """Ask ``addr`` for a chunk under way at a slower holder, if it would deliver it first.

        Only in the endgame (nothing left to take) or for a request far past its expected time.
        """
        if sum(1 for rs in self.requests.values() for r in rs if r.hedge) >= MAX_HEDGES:
            return False
        if not self._holder(addr).measured:
            return False  # its rate is a guess: a slow holder would spend its link on a copy not needed
        endgame = not self.waiting or self.waiting[0] >= self._limit()  # nothing left it may take
        best: tuple[float, int] | None = None
        for index, requests in self.requests.items():
            if len(requests) != 1 or requests[0].addr in (None, addr):
                continue
            if addr not in self._live(index):
                continue
            (other,) = requests
            expected = other.expected_end
            overdue = now - other.started > OVERDUE_FACTOR * max(expected - other.started, TICK_S)
            if overdue:
                expected = max(expected, now + (now - other.started))
            if not (endgame or overdue):
                continue
            mine = self._finish_at(addr, index, now)
            if mine < expected and (best is None or expected > best[0]):
                best = (expected, index)
        if best is None:
            return False
        self.hedged += 1
        self._start(best[1], addr, now, hedge=True)
        return True

    # -- requests -------------------------------------------------------------------------------------

    def _start(self, index: int, addr: Address | None, now: float, *, hedge: bool) -> None:
        expected = now if addr is None else self._finish_at(addr, index, now)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "chunk %d asked of %s at %.2f s%s; holders %s",
                index,
                addr and addr[0],
                now - self._t0,
                " (hedge)" if hedge else "",
                [(a[0], round(self._holder(a).rate_bytes_s / 2**20, 1)) for a in self._live(index)],
            )
        request = _Request(index, addr, now, expected, hedge)
        request.task = asyncio.create_task(self._fetch(index, addr))
        self.requests.setdefault(index, []).append(request)
        if addr is not None:
            self._holder(addr).count_busy(now)
            self._holder(addr).in_flight += 1

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
        holder = self._holder(addr) if addr is not None else None
        if holder is not None:
            holder.count_busy(now)
            holder.in_flight -= 1
        task = request.task
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            written = cast("_T | None", task.result())
            if holder is not None:
                self._measure(holder, request)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "chunk %d from %s at %.2f s: took %.2f s (expected %.2f s)%s",
                    index,
                    addr and addr[0],
                    now - self._t0,
                    now - request.started,
                    request.expected_end - request.started,
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
        self.refused.setdefault(index, set()).add(addr)
        ours = holder.dropped_at >= request.started  # its connection closed by one of our cancels
        if not ours and not isinstance(exc, ChunkNotStored):
            self.locator.dead.add(
                addr
            )  # timed out, unreachable or sent bad bytes: out for this fetch
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
            holder.count_busy(now)
            holder.in_flight -= 1
            holder.dropped_at = now
            # In the time it was busy it did not deliver this chunk on top of what it did: its rate is at most
            # that (so an unmeasured slow holder is not asked again at the optimistic prior rate).
            bound = (holder.delivered_bytes + self.sizes[request.index]) / max(holder.busy_s, 1e-3)
            if bound < holder.rate_bytes_s:
                holder.rate_bytes_s, holder.measured = bound, True

    def _measure(self, holder: _Holder, request: _Request) -> None:
        """Its rate so far: every byte it delivered over the time it was busy (count_busy was just called)."""
        holder.delivered_bytes += self.sizes[request.index]
        holder.rate_bytes_s = holder.delivered_bytes / max(holder.busy_s, 1e-3)
        holder.measured = True
