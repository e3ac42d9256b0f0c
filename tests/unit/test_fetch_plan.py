"""The fetch plan (core/fetch_plan.py): which holder sends how many chunks of each holder set."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmega.core.fetch_plan import (
    ChunkGroup,
    HolderLoad,
    Move,
    choose_moves,
    make_plan,
    plan_moves,
    worth_moving,
)

MIB = 1 << 20
CHUNK = 2 * MIB
FAST = 25_000_000.0  # 200 Mbit/s, in bytes/s
MEDIUM = 6_250_000.0  # 50 Mbit/s
SLOW = 1_250_000.0  # 10 Mbit/s


def placed(plan_counts: dict[str, dict[int, int]], group: int) -> int:
    return sum(mine.get(group, 0) for mine in plan_counts.values())


def test_chunks_only_slow_holders_hold_go_to_them_and_the_rest_to_the_fast_one() -> None:
    loads = {"f": HolderLoad(FAST), "s1": HolderLoad(SLOW), "s2": HolderLoad(SLOW)}
    groups = [ChunkGroup(("f", "s1"), 10, CHUNK), ChunkGroup(("s1", "s2"), 2, CHUNK)]
    plan = make_plan(groups, loads)
    assert plan.counts["f"] == {0: 10}, "every chunk the fast holder holds"
    assert plan.counts["s1"] == {1: 1}
    assert plan.counts["s2"] == {1: 1}
    assert plan.next_group("s1") == 1
    assert plan.order[0] == 1, "the group only slow holders hold is the most urgent"
    assert plan.makespan_s == pytest.approx(CHUNK / SLOW)


def test_a_busy_holder_gets_fewer_chunks() -> None:
    loads = {"a": HolderLoad(FAST, busy_s=4 * CHUNK / FAST), "b": HolderLoad(FAST)}
    plan = make_plan([ChunkGroup(("a", "b"), 6, CHUNK)], loads)
    assert plan.counts["a"] == {0: 1}
    assert plan.counts["b"] == {0: 5}


def test_chunks_are_passed_along_when_slow_holders_share_groups_unevenly() -> None:
    """Greedy alone gives A three: the two chunks B and C hold are placed first, one on each."""
    loads = {"a": HolderLoad(SLOW), "b": HolderLoad(SLOW), "c": HolderLoad(SLOW)}
    groups = [ChunkGroup(("b", "c"), 2, CHUNK), ChunkGroup(("a", "b"), 4, CHUNK)]
    plan = make_plan(groups, loads)
    assert plan.makespan_s == pytest.approx(2 * CHUNK / SLOW)
    assert plan.counts["c"] == {0: 2}
    assert plan.counts["a"] == {1: 2}
    assert plan.counts["b"] == {1: 2}


def test_take_uses_up_a_holders_share() -> None:
    loads = {"a": HolderLoad(FAST)}
    plan = make_plan([ChunkGroup(("a",), 2, CHUNK)], loads)
    plan.take("a", 0)
    assert plan.next_group("a") == 0
    plan.take("a", 0)
    assert plan.next_group("a") is None


def test_moving_a_slow_holders_chunk_pays_when_the_plan_needs_that_holder() -> None:
    """A slow holder sending a chunk the fast one also holds, while two chunks only it and another slow holder
    hold wait: moving it ends the fetch more than a second sooner."""
    remaining_s = 0.9 * CHUNK / SLOW
    loads = {
        "f": HolderLoad(FAST),
        "s1": HolderLoad(SLOW, busy_s=remaining_s),
        "s2": HolderLoad(SLOW),
    }
    groups = [ChunkGroup(("s1", "s2"), 2, CHUNK)]
    before = make_plan(groups, loads)
    sending = ChunkGroup(("s1", "f"), 1, CHUNK, sent_by="s1", sent_bytes=CHUNK // 10)
    after = plan_moves(groups, loads, [(sending, remaining_s)])
    assert after.counts["f"] == {1: 1}, "the chunk under way goes to the fast holder"
    assert worth_moving(before, after)
    moves, gain_s = choose_moves(groups, loads, before, [(sending, remaining_s)])
    assert moves == [Move(0, "f", stop=True)], (
        "it stops: it has a chunk only slow holders hold to send"
    )
    assert gain_s > 1.0


def test_moving_is_not_worth_it_when_the_chunk_is_nearly_done() -> None:
    remaining_s = 0.05
    loads = {"f": HolderLoad(MEDIUM), "s": HolderLoad(SLOW, busy_s=remaining_s)}
    groups = [ChunkGroup(("f",), 4, CHUNK)]
    before = make_plan(groups, loads)
    sending = ChunkGroup(("s", "f"), 1, CHUNK, sent_by="s", sent_bytes=CHUNK - 60_000)
    after = plan_moves(groups, loads, [(sending, remaining_s)])
    assert after.counts["s"] == {1: 1}, "it stays where it is nearly done"
    assert not worth_moving(before, after)
    assert choose_moves(groups, loads, before, [(sending, remaining_s)])[0] == []


def test_a_slow_holder_with_nothing_else_to_send_races_the_fast_one() -> None:
    remaining_s = 0.9 * CHUNK / SLOW
    loads = {"f": HolderLoad(FAST), "s": HolderLoad(SLOW, busy_s=remaining_s)}
    groups = [ChunkGroup(("f",), 3, CHUNK)]
    sending = ChunkGroup(("s", "f"), 1, CHUNK, sent_by="s", sent_bytes=CHUNK // 10)
    moves, _ = choose_moves(groups, loads, make_plan(groups, loads), [(sending, remaining_s)])
    assert moves == [Move(0, "f", stop=False)]


def _best_makespan(
    groups: list[ChunkGroup[str]], loads: dict[str, HolderLoad]
) -> tuple[float, float]:
    """By trying every placement (small cases only): the best makespan and the greatest single cost."""
    chunks = [g for g in groups for _ in range(g.count)]
    best = float("inf")
    for choice in itertools.product(*(g.holders for g in chunks)):
        finish = {h: load.busy_s for h, load in loads.items()}
        for group, holder in zip(chunks, choice, strict=True):
            finish[holder] += loads[holder].seconds(group.chunk_bytes)
        best = min(best, max(finish.values()))
    return best, max(loads[h].seconds(CHUNK) for h in loads)


HOLDERS = ("a", "b", "c", "d")


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[ChunkGroup[str]], dict[str, HolderLoad]]:
    rates = [FAST, MEDIUM, SLOW, SLOW / 2]
    loads = {
        h: HolderLoad(
            draw(st.sampled_from(rates)), busy_s=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
        )
        for h in HOLDERS
    }
    sets = [
        tuple(sorted(s))
        for s in itertools.chain.from_iterable(
            itertools.combinations(HOLDERS, k) for k in (1, 2, 3)
        )
    ]
    chosen = draw(st.lists(st.sampled_from(sets), min_size=1, max_size=4, unique=True))
    counts = draw(st.lists(st.integers(1, 3), min_size=len(chosen), max_size=len(chosen)))
    total = sum(counts)
    while total > 7:  # keeps the exhaustive search small
        i = counts.index(max(counts))
        counts[i] -= 1
        total -= 1
    groups = [ChunkGroup(s, c, CHUNK) for s, c in zip(chosen, counts, strict=True)]
    return groups, loads


@settings(max_examples=150, deadline=None)
@given(cases())
def test_the_plan_places_every_chunk_once_on_one_of_its_holders_and_is_optimal(
    case: tuple[list[ChunkGroup[str]], dict[str, HolderLoad]],
) -> None:
    groups, loads = case
    plan = make_plan(groups, loads)
    for g, group in enumerate(groups):
        assert placed(plan.counts, g) == group.count
        assert all(h in group.holders for h, mine in plan.counts.items() if mine.get(g))
    for h, load in loads.items():
        work = sum(
            load.seconds(groups[g].chunk_bytes) * n for g, n in plan.counts.get(h, {}).items()
        )
        assert plan.finish_s[h] == pytest.approx(load.busy_s + work)
    best, _ = _best_makespan(groups, loads)
    assert plan.makespan_s == pytest.approx(best), "equal chunks: passing chunks along is exact"
