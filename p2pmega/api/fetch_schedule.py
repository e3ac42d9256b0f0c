"""Which holder each chunk of a fetch is asked of: by a plan over measured rates, with hedged requests.

Each holder's rate is measured from the bytes it sends while it has requests under way (replies still arriving
count, so a slow holder is known as slow within a tenth of a second, not after its first 2 MiB). A plan
(core/fetch_plan.py) gives every waiting chunk to the holder that would finish it first, chunks that only slow
holders hold first; each holder is asked for its planned chunks one or two at a time (the next one shortly before
the last is done). A chunk a holder is sending that another holder would finish so much sooner that the whole
fetch ends sooner is asked of that other holder too, and the first holder goes on to its next planned chunk; a
holder with nothing planned asks for a chunk still on its way from a much slower one. The first verified copy is
written, the other request is cancelled (which closes its connection, docs/PROTOCOL.md "Cancelling a request").
No I/O but the client's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar, cast

from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.core.fetch_meter import HolderMeter, Sent
from p2pmega.core.fetch_plan import (
    ChunkGroup,
    HolderLoad,
    Plan,
    choose_moves,
    make_plan,
)
from p2pmega.core.ids import Address
from p2pmega.errors import ChunkHashMismatch, ChunkNotStored, ChunkUnavailable, NetworkError
from p2pmega.replicate.locator import HolderLocator

log = logging.getLogger(__name__)

# Requests one holder has under way at once: two keep its link busy while a reply is verified and written.
SLOTS_PER_HOLDER: Final = 2
# A holder is asked for its next chunk this long before what it is sending should be done, so its link does not
# idle for a round trip between chunks; asked any earlier, the two replies would only share its link.
LEAD_S: Final = 0.2
# Only a request with at least this long still to go is moved to another holder: moving a shorter one cannot
# gain more than it wastes.
MOVE_MIN_S: Final = 0.2
# A look makes a new plan when a holder's rate moved this much (as a fraction) since the last one.
REPLAN_RATE_CHANGE: Final = 0.2
# A holder with nothing planned asks for a chunk under way elsewhere only if it would deliver it this much sooner
# (in seconds, and as a fraction of the time the other still needs: in half the time): a copy not needed costs
# someone's upload, and two holders of about the same rate would only share the work twice.
HEDGE_GAIN_S: Final = 0.05
HEDGE_GAIN_FRACTION: Final = 0.5
# Requests asked of a second holder at once (each one may waste up to a chunk of someone's upload).
MAX_HEDGES: Final = 8
# Holder searches (DHT lookups) at once for chunks with no holder known; one usually finds them all.
MAX_SEARCHES: Final = 4
# How often the schedule looks again without a reply arriving (rates, moves, holders found meanwhile), and how
# old a plan may get before it is made again.
TICK_S: Final = 0.05
# A new plan waits until this many times as long as the last one took has passed, so planning costs at most about
# a tenth of the event loop's time (a 1 GiB file on 200 holders takes ~10 ms a plan; 64 MiB on 8, ~0.3 ms).
PLAN_SPACING: Final = 10.0

_T = TypeVar("_T")


@dataclass(eq=False, kw_only=True)
class _Request(Sent):
    index: int
    addr: Address | None  # None: the locator's own fetch (a chunk with no holder known yet)
    hedge: bool
    task: asyncio.Task[object] = field(init=False)


class FetchSchedule(Generic[_T]):
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
        self.locator, self.ids, self.sizes = locator, ids, sizes
        self.consume, self.on_done, self.max_in_flight = consume, on_done, max_in_flight
        self.window, self.stop_on_missing = window, stop_on_missing
        self._kicked = asyncio.Event()
        self._t0 = asyncio.get_running_loop().time()
        self.waiting: list[int] = sorted(todo)  # not asked of anyone yet
        self.requests: dict[int, list[_Request]] = {}
        self.holders: dict[Address, HolderMeter] = {}
        self.refused: dict[int, set[Address]] = {}  # holders that failed a chunk, per chunk
        self.missing: list[tuple[int, ChunkUnavailable]] = []
        self.cancelled = 0  # requests cancelled: another copy came first, or they were moved
        self.hedged = 0
        self.moved = 0
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
        # The plan, the groups it was made of (each group's waiting chunks, last first) and when it was made.
        self._plan: Plan[Address] = Plan()
        self._groups: list[ChunkGroup[Address]] = []
        self._members: list[list[int]] = []
        self._planned_at = -1.0
        self._plan_cost_s = 0.0
        self._planned_rates: dict[Address, float] = {}
        self._stale = True
        self._moved_chunks: set[int] = set()

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

    def _limit(self) -> int:
        return len(self.ids) if self.window is None else self.window()

    # -- choosing -------------------------------------------------------------------------------------

    def _holder(self, addr: Address) -> HolderMeter:
        holder = self.holders.get(addr)
        if holder is None:
            holder = self.holders[addr] = HolderMeter(busy_mark=self._loop.time())
            holder.received_mark = self.locator.node.client.received_bytes(addr)
            self._stale = True
        return holder

    def _live(self, index: int) -> list[Address]:
        refused = self.refused.get(index, set())
        return [a for a in self.locator.live_holders(self.ids[index]) if a not in refused]

    def _account(self, now: float) -> None:
        if not self.holders:
            return  # every chunk so far went to the locator's own fetch
        client = self.locator.node.client
        for addr, holder in self.holders.items():
            if holder.account(now, client.received_bytes(addr)):
                self._stale = True

    def _assign(self) -> None:
        now = self._loop.time()
        self._account(now)
        self._search(now)
        if self._may_replan(now) and (
            self._stale or (now - self._planned_at >= TICK_S and self._rates_moved())
        ):
            self._replan(now)
            if self._move(now):
                self._replan(now)
        order = sorted(
            (a for a in self.holders if a not in self.locator.dead),
            key=lambda a: (self.holders[a].kept(), -self.holders[a].rate_bytes_s),
        )
        for addr in order:
            holder = self.holders[addr]
            while self._has_room(holder, now):
                if self._take_planned(addr, now):
                    continue
                if self._plan.next_group(addr) is not None or not self._hedge(addr, now):
                    break  # planned chunks wait for a free slot; it hedges only with nothing planned

    def _search(self, now: float) -> None:
        """Search for holders of waiting chunks with none known; a chunk searched in vain goes to the locator."""
        limit = self._limit()
        for index in list(self.waiting):
            if index >= limit:
                break  # waiting is sorted
            live = self._live(index)
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

    def _may_replan(self, now: float) -> bool:
        return now > self._planned_at + PLAN_SPACING * self._plan_cost_s

    def _rates_moved(self) -> bool:
        planned = self._planned_rates
        return any(
            abs(h.rate_bytes_s - planned.get(a, 0.0)) > REPLAN_RATE_CHANGE * h.rate_bytes_s
            for a, h in self.holders.items()
        )

    def _loads(self, now: float) -> dict[Address, HolderLoad]:
        return {
            a: HolderLoad(h.rate_bytes_s, h.load_s(now))
            for a, h in self.holders.items()
            if a not in self.locator.dead
        }

    def _replan(self, now: float) -> None:
        """Group the waiting chunks by their live holders and plan them over the holders' rates and loads."""
        started = self._loop.time()
        limit = self._limit()
        by_holders: dict[tuple[Address, ...], list[int]] = {}
        for index in self.waiting:
            if index >= limit:
                break
            live = tuple(sorted(self._live(index)))
            for addr in live:
                self._holder(addr)
            if live:
                by_holders.setdefault(live, []).append(index)
        self._groups = [
            ChunkGroup(live, len(members), max(self.sizes[i] for i in members))
            for live, members in by_holders.items()
        ]
        self._members = [members[::-1] for members in by_holders.values()]
        self._plan = make_plan(self._groups, self._loads(now))
        self._plan_cost_s = self._loop.time() - started
        self._planned_at = now
        self._planned_rates = {a: h.rate_bytes_s for a, h in self.holders.items()}
        self._stale = False

    def _has_room(self, holder: HolderMeter, now: float) -> bool:
        kept = holder.kept()
        if kept == 0:
            return True
        if kept >= SLOTS_PER_HOLDER or not holder.measured:
            return False
        return holder.load_s(now) <= LEAD_S

    def _primary_count(self) -> int:
        return sum(1 for rs in self.requests.values() for r in rs if not r.hedge and not r.moved)

    def _take_planned(self, addr: Address, now: float) -> bool:
        """Start the next chunk the plan gives ``addr`` (from its most urgent group, the first chunk)."""
        # max_in_flight bounds the requests under way, but a holder sending nothing gets one up to twice that: its
        # link would idle while faster holders had their second requests under way.
        cap = self.max_in_flight if self.holders[addr].kept() else 2 * self.max_in_flight
        if self._primary_count() >= cap:
            return False
        while (group := self._plan.next_group(addr)) is not None:
            self._plan.take(addr, group)
            members = self._members[group]
            while members and members[-1] not in self.waiting:
                members.pop()  # started meanwhile by the locator's own fetch
            if not members:
                self._stale = True
                continue
            index = members.pop()
            self.waiting.remove(index)
            self._start(index, addr, now, hedge=False)
            return True
        if self._may_replan(now) and any(
            addr in group.holders and members
            for group, members in zip(self._groups, self._members, strict=True)
        ):
            # Its planned chunks are done sooner than planned while chunks it holds still wait: plan again.
            self._replan(now)
            return self._take_planned(addr, now)
        return False

    def _move(self, now: float) -> bool:
        """Ask other holders for chunks under way when that ends the whole fetch sooner: a slow holder's chunk a
        faster one also holds, when the plan needs the slow one for chunks only it (or slower ones) holds, or a
        chunk a fast holder would send long before the slow one is done. True if any moved.

        The chunks under way at measured holders are planned again together with the waiting ones, each either
        left where it is (costing the rest of it) or given whole to another measured holder; only a plan that
        ends sooner by enough to pay for what is thrown away is acted on, and a chunk is moved at most once.
        """
        loads = self._loads(now)
        under_way: list[tuple[ChunkGroup[Address], float]] = []
        requests: list[_Request] = []
        for index, rs in self.requests.items():
            if len(rs) != 1 or rs[0].addr is None or rs[0].moved or index in self._moved_chunks:
                continue
            (request,) = rs
            addr = rs[0].addr
            holder = self._holder(addr)
            if not holder.measured or addr not in loads:
                continue
            remaining_s = holder.ends(now)[request] - now
            others = [
                a
                for a in self._live(index)
                if a != addr and a in loads and self.holders[a].measured
            ]
            if remaining_s < MOVE_MIN_S or not others:
                continue
            sent = max(0, request.size - int(remaining_s * holder.rate_bytes_s))
            group = ChunkGroup((addr, *others), 1, request.size, sent_by=addr, sent_bytes=sent)
            under_way.append((group, remaining_s))
            requests.append(request)
        moves, gain_s = choose_moves(self._groups, loads, self._plan, under_way)
        moved = False
        for move in moves:
            request = requests[move.position]
            assert request.addr is not None  # noqa: S101 - only requests with a holder are planned
            if not move.stop and self._hedges() >= MAX_HEDGES:
                continue
            log.debug(
                "chunk %d moved from %s to %s at %.2f s%s: the plan ends %.2f s sooner",
                request.index,
                request.addr[0],
                move.target[0],
                now - self._t0,
                "" if move.stop else " (racing)",
                gain_s,
            )
            self.moved += 1
            moved = True
            self._reassign(request, move.target, now, stop=move.stop)
        return moved

    def _hedges(self) -> int:
        return sum(1 for rs in self.requests.values() for r in rs if r.hedge)

    def _reassign(self, request: _Request, target: Address, now: float, *, stop: bool) -> None:
        """Ask ``target`` for ``request``'s chunk. With ``stop`` (its holder has other chunks to send) the
        request is cancelled now, so they get its whole link; else it races the new one."""
        self._moved_chunks.add(request.index)
        if stop:
            self.requests.pop(request.index, None)
            self._cancel(request, now)
            self._start(request.index, target, now, hedge=False)
        else:
            request.moved = True
            self._start(request.index, target, now, hedge=True)

    def _hedge(self, addr: Address, now: float) -> bool:
        """Ask ``addr``, which has nothing planned, for a chunk under way at a holder it would beat by far."""
        if self._hedges() >= MAX_HEDGES:
            return False
        holder = self.holders[addr]
        if not holder.measured:
            return False  # its rate is a guess: a slow holder would spend its link on a copy not needed
        ready_at = now + holder.load_s(now)
        best: tuple[float, int] | None = None
        for index, requests in self.requests.items():
            if len(requests) != 1 or requests[0].addr in (None, addr):
                continue
            (other,) = requests
            assert other.addr is not None  # noqa: S101 - checked above
            if addr not in self._live(index):
                continue
            theirs = self.holders[other.addr].ends(now)[other]
            mine = ready_at + self.sizes[index] / holder.rate_bytes_s
            if theirs - mine < max(HEDGE_GAIN_S, HEDGE_GAIN_FRACTION * (theirs - now)):
                continue
            if best is None or theirs > best[0]:
                best = (theirs, index)
        if best is None:
            return False
        (other,) = self.requests[best[1]]
        assert other.addr is not None  # noqa: S101 - checked above
        if self._plan.next_group(other.addr) is not None:
            log.debug(
                "chunk %d moved from %s to %s, which has nothing planned",
                best[1],
                other.addr[0],
                addr[0],
            )
            self.moved += 1  # that holder has other chunks to send: it stops this one
            self._reassign(other, addr, now, stop=True)
        else:
            self.hedged += 1
            self._reassign(other, addr, now, stop=False)
        return True

    # -- requests -------------------------------------------------------------------------------------

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
