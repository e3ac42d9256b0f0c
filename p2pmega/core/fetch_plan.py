"""The fetch plan: how many chunks of each holder set each holder should send, given the holders' rates and loads.

Pure: rates, loads and groups of chunks in, counts out; api/fetch_schedule.py measures the rates and acts on the
plan. Not the best schedule (an integral max flow, as bench/wan.py computes), but the greedy one that comes close
when holders' rates differ widely: the chunks whose fastest holder is slowest are placed first, each on the holder
that would finish it first.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

H = TypeVar("H", bound=Hashable)

# Moving a chunk off the holder sending it must shorten the plan by this much, in seconds and as a fraction of
# the plan: a move wastes what that holder sent of it, and estimated rates are noisy.
MOVE_GAIN_S: Final = 0.2
MOVE_GAIN_FRACTION: Final = 0.15
# A rate never taken as lower than this (bytes/s), so a holder that sent nothing yet has a finite time.
MIN_RATE_BYTES_S: Final = 1.0
# Finish times closer than this are equal (floating point).
_EPS_S: Final = 1e-6


@dataclass(frozen=True)
class HolderLoad:
    """One holder as the plan sees it: its rate, and how long what it is sending now still takes."""

    rate_bytes_s: float
    busy_s: float = 0.0

    def seconds(self, nbytes: int) -> float:
        return nbytes / max(self.rate_bytes_s, MIN_RATE_BYTES_S)


@dataclass(frozen=True)
class ChunkGroup(Generic[H]):
    """``count`` waiting chunks of at most ``chunk_bytes`` each, all held by exactly ``holders``.

    A chunk under way (count 1) names the holder sending it, ``sent_by``, and ``sent_bytes`` it sent so far:
    it costs that holder only the rest.
    """

    holders: tuple[H, ...]
    count: int
    chunk_bytes: int
    sent_by: H | None = None
    sent_bytes: int = 0

    def seconds(self, holder: H, load: HolderLoad) -> float:
        """How long ``holder`` takes to send one of these chunks."""
        if holder == self.sent_by:
            return load.seconds(max(0, self.chunk_bytes - self.sent_bytes))
        return load.seconds(self.chunk_bytes)


@dataclass
class Plan(Generic[H]):
    """``counts[holder][g]``: chunks of group ``g`` the holder should send; ``finish_s``: when each is done."""

    counts: dict[H, dict[int, int]] = field(default_factory=dict)
    finish_s: dict[H, float] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # the groups, most urgent first

    @property
    def makespan_s(self) -> float:
        return max(self.finish_s.values(), default=0.0)

    def next_group(self, holder: H) -> int | None:
        """The most urgent group ``holder`` should still send a chunk of, if any."""
        mine = self.counts.get(holder)
        if not mine:
            return None
        return next((g for g in self.order if mine.get(g, 0) > 0), None)

    def take(self, holder: H, group: int) -> None:
        """``holder`` started a chunk of ``group``."""
        mine = self.counts[holder]
        mine[group] -= 1
        if mine[group] <= 0:
            del mine[group]


def make_plan(groups: Sequence[ChunkGroup[H]], loads: Mapping[H, HolderLoad]) -> Plan[H]:
    """Place every chunk of ``groups`` on one of its holders, greedily by earliest finish.

    Groups are placed in order of urgency: those whose fastest holder is slowest first (a chunk only slow
    holders hold gets them before chunks faster holders could send), then those with fewer holders. Each chunk
    goes to the holder of its group that would finish it first, after what it is sending (``busy_s``) and what
    the plan gave it so far.

    Raises:
        KeyError: a group names a holder not in ``loads``.
    """
    plan: Plan[H] = Plan(finish_s={h: load.busy_s for h, load in loads.items()})
    plan.order = sorted(
        range(len(groups)),
        key=lambda g: (
            max((loads[h].rate_bytes_s for h in groups[g].holders), default=0.0),
            len(groups[g].holders),
        ),
    )
    finish = plan.finish_s
    for g in plan.order:
        group = groups[g]
        if not group.holders or group.count <= 0:
            continue
        cost = [group.seconds(h, loads[h]) for h in group.holders]
        heap = [(finish[h] + cost[i], i) for i, h in enumerate(group.holders)]
        heapq.heapify(heap)
        for _ in range(group.count):
            at, i = heapq.heappop(heap)
            holder = group.holders[i]
            finish[holder] = at
            mine = plan.counts.setdefault(holder, {})
            mine[g] = mine.get(g, 0) + 1
            heapq.heappush(heap, (at + cost[i], i))
    _rebalance(plan, groups, loads)
    return plan


def _rebalance(
    plan: Plan[H], groups: Sequence[ChunkGroup[H]], loads: Mapping[H, HolderLoad]
) -> None:
    """Shorten the greedy plan where chunks can be passed along: a chunk of the holder that finishes last goes to
    another holder of its group, which may pass one of its own chunks on in turn, until one lands on a holder
    that still finishes before the plan does (an augmenting path, as in a max flow).

    Greedy placement misses these when slow holders share groups unevenly: with two chunks held by slow A and B
    and two held by slow B and C, placing the first pair first gives A one and B one, and then B or C two.
    """
    finish = plan.finish_s
    of_holder: dict[H, list[int]] = {}
    for g, group in enumerate(groups):
        for h in group.holders:
            of_holder.setdefault(h, []).append(g)
    for _ in range(
        sum(group.count for group in groups)
    ):  # each round moves one chunk off a bottleneck
        makespan = plan.makespan_s
        bottlenecks = [h for h in finish if finish[h] >= makespan - _EPS_S and plan.counts.get(h)]
        if not any(_augment(plan, groups, loads, of_holder, b, makespan) for b in bottlenecks):
            return


def _augment(
    plan: Plan[H],
    groups: Sequence[ChunkGroup[H]],
    loads: Mapping[H, HolderLoad],
    of_holder: Mapping[H, list[int]],
    start: H,
    makespan: float,
) -> bool:
    """Move one chunk off ``start`` along a path of holders that all still finish before ``makespan``; True if
    one was found (and applied)."""
    finish, counts = plan.finish_s, plan.counts
    # Breadth first over holders: parent[h] = (the holder that passed h a chunk, of which group).
    parent: dict[H, tuple[H, int] | None] = {start: None}
    queue = [start]
    for h in queue:
        incoming = parent[h]
        gain_in = 0.0 if incoming is None else groups[incoming[1]].seconds(h, loads[h])
        for g in of_holder.get(h, ()):
            if counts.get(h, {}).get(g, 0) <= 0:
                continue
            # h gives up one chunk of g (and takes the one passed to it): it must stay under the makespan.
            if h != start and finish[h] - groups[g].seconds(h, loads[h]) + gain_in >= (
                makespan - _EPS_S
            ):
                continue
            for nxt in groups[g].holders:
                if nxt in parent:
                    continue
                parent[nxt] = (h, g)
                if finish[nxt] + groups[g].seconds(nxt, loads[nxt]) < makespan - _EPS_S:
                    _apply(plan, groups, loads, parent, nxt)
                    return True
                queue.append(nxt)
    return False


def _apply(
    plan: Plan[H],
    groups: Sequence[ChunkGroup[H]],
    loads: Mapping[H, HolderLoad],
    parent: Mapping[H, tuple[H, int] | None],
    end: H,
) -> None:
    """Pass one chunk along the path that ends at ``end``."""
    h = end
    while (step := parent[h]) is not None:
        prev, g = step
        mine = plan.counts.setdefault(h, {})
        mine[g] = mine.get(g, 0) + 1
        plan.finish_s[h] += groups[g].seconds(h, loads[h])
        plan.counts[prev][g] -= 1
        if plan.counts[prev][g] == 0:
            del plan.counts[prev][g]
        plan.finish_s[prev] -= groups[g].seconds(prev, loads[prev])
        h = prev


def plan_moves(
    groups: Sequence[ChunkGroup[H]],
    loads: Mapping[H, HolderLoad],
    under_way: Sequence[tuple[ChunkGroup[H], float]],
) -> Plan[H]:
    """The plan if the chunks ``under_way`` could each be left where they are or sent by another of their holders.

    Each is a group of one chunk with ``sent_by`` set, and the seconds its holder still needs for it (which
    ``loads`` counts in that holder's ``busy_s``). Its groups follow ``groups`` in the plan, in that order.

    Raises:
        KeyError: a group names a holder not in ``loads``.
    """
    free = dict(loads)
    for group, remaining_s in under_way:
        if group.sent_by is not None:
            load = free[group.sent_by]
            free[group.sent_by] = HolderLoad(load.rate_bytes_s, max(0.0, load.busy_s - remaining_s))
    return make_plan([*groups, *(group for group, _ in under_way)], free)


def worth_moving(before: Plan[H], after: Plan[H]) -> bool:
    """Whether a move from plan ``before`` to plan ``after`` ends the fetch sooner by enough to pay for what it
    wastes (what the holder sent of the chunk so far)."""
    gain_s = before.makespan_s - after.makespan_s
    return gain_s > max(MOVE_GAIN_S, MOVE_GAIN_FRACTION * before.makespan_s)


@dataclass(frozen=True)
class Move(Generic[H]):
    """Chunk ``position`` of the chunks under way goes to ``target``; ``stop``: its holder has waiting chunks
    planned, so it stops sending this one at once (else it may race the target)."""

    position: int
    target: H
    stop: bool


def choose_moves(
    groups: Sequence[ChunkGroup[H]],
    loads: Mapping[H, HolderLoad],
    current: Plan[H],
    under_way: Sequence[tuple[ChunkGroup[H], float]],
) -> tuple[list[Move[H]], float]:
    """The chunks under way (as plan_moves takes them) that a plan letting them move puts on another holder, and
    how much sooner that plan ends than ``current``; no moves unless that pays (worth_moving).

    Raises:
        KeyError: a group names a holder not in ``loads``.
    """
    after = plan_moves(groups, loads, under_way)
    gain_s = current.makespan_s - after.makespan_s
    if not under_way or not worth_moving(current, after):
        return [], gain_s
    moves: list[Move[H]] = []
    for k, (group, _) in enumerate(under_way):
        g = len(groups) + k
        target = next(h for h, mine in after.counts.items() if mine.get(g))
        if target != group.sent_by and group.sent_by is not None:
            waiting = any(other < len(groups) for other in after.counts.get(group.sent_by, {}))
            moves.append(Move(k, target, waiting))
    return moves, gain_s
