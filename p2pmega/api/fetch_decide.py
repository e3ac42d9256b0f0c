"""The decisions of a fetch's schedule: which holder each waiting chunk is asked of, which request under way is
moved or hedged to another holder, and when to plan again. No tasks, no waiting: api/fetch_schedule.py starts,
awaits and cancels the requests these decisions ask for (the hooks ``_start``, ``_cancel``, ``_discover``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from p2pmega.core.chunking import ChunkId
from p2pmega.core.fetch_meter import HolderMeter, Sent
from p2pmega.core.fetch_plan import (
    ChunkGroup,
    HolderLoad,
    Plan,
    choose_moves,
    make_plan,
)
from p2pmega.core.ids import Address
from p2pmega.replicate.locator import HolderLocator

# The schedule's log, as before the split: its decisions and its requests are one story.
log = logging.getLogger("p2pmega.api.fetch_schedule")

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


@dataclass(eq=False, kw_only=True)
class _Request(Sent):
    index: int
    addr: Address | None  # None: the locator's own fetch (a chunk with no holder known yet)
    hedge: bool
    task: asyncio.Task[object] = field(init=False)


class FetchDecisions:
    """The state of a fetch's schedule and every choice made from it; FetchSchedule does the asyncio work.

    ``max_in_flight`` bounds the requests under way (a holder sending nothing may get one up to twice that);
    hedged ones add at most MAX_HEDGES. With ``window``, no chunk at or past ``window()`` is asked for. ``moved``
    counts requests asked of another holder while under way because that ends the fetch sooner.
    """

    def __init__(
        self,
        locator: HolderLocator,
        ids: Sequence[ChunkId],
        todo: Sequence[int],
        sizes: Sequence[int],
        *,
        max_in_flight: int,
        window: Callable[[], int] | None,
    ) -> None:
        self.locator, self.ids, self.sizes = locator, ids, sizes
        self.max_in_flight, self.window = max_in_flight, window
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self.waiting: list[int] = sorted(todo)  # not asked of anyone yet
        self.requests: dict[int, list[_Request]] = {}
        self.holders: dict[Address, HolderMeter] = {}
        self.refused: dict[int, set[Address]] = {}  # holders that failed a chunk, per chunk
        self.hedged = 0
        self.moved = 0
        # Chunk -> its holder search (locator.discover): a chunk with no holder known waits for it, and only a
        # chunk the search found no holder for goes to the locator's own fetch (which searches once more).
        self.searches: dict[int, asyncio.Task[None]] = {}
        self.searched: set[int] = set()
        # The plan, the groups it was made of (each group's waiting chunks, last first) and when it was made.
        self._plan: Plan[Address] = Plan()
        self._groups: list[ChunkGroup[Address]] = []
        self._members: list[list[int]] = []
        self._planned_at = -1.0
        self._plan_cost_s = 0.0
        self._planned_rates: dict[Address, float] = {}
        self._stale = True
        self._moved_chunks: set[int] = set()

    # -- the hooks FetchSchedule implements -----------------------------------------------------------

    def _start(self, index: int, addr: Address | None, now: float, *, hedge: bool) -> None:
        """Ask ``addr`` (None: the locator's own fetch) for chunk ``index`` now."""
        raise NotImplementedError

    def _cancel(self, request: _Request, now: float) -> None:
        """Cancel ``request`` (its chunk was delivered by another holder, or moved)."""
        raise NotImplementedError

    def _discover(self, index: int) -> asyncio.Task[None]:
        """Start a search for holders of chunk ``index``."""
        raise NotImplementedError

    # -- choosing -------------------------------------------------------------------------------------

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
                    self.searches[index] = self._discover(index)
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
