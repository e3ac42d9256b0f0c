"""core.blocs and the placement rule counting jurisdiction blocs instead of countries."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmega.core.blocs import DEFAULT_BLOCS, parse_bloc_table
from p2pmega.core.placement import Candidate, choose_holders, meets_rule, plan_repair
from p2pmega.errors import BadBlocTable, PlacementImpossible
from tests.unit.test_placement import CHUNK, by_distance, network, peer

TABLE = parse_bloc_table("ALLIES: DE NZ  # two of four\n")


def test_the_shipped_table_knows_the_two_blocs() -> None:
    assert DEFAULT_BLOCS.bloc_of("NZ") == DEFAULT_BLOCS.bloc_of("US") == "FIVE-EYES"
    assert DEFAULT_BLOCS.bloc_of("DE") == DEFAULT_BLOCS.bloc_of("NO") == "EU-EEA"
    assert DEFAULT_BLOCS.bloc_of("CH") == "CH"  # in no bloc: a bloc of its own
    assert DEFAULT_BLOCS.spanned(["NZ", "AU", None, "CH"]) == ["CH", "FIVE-EYES"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ALLIES DE NZ\n", "expected 'NAME: CC CC ...'"),
        ("ALLIES:\n", "lists no country"),
        ("ALLIES: DE DEU\n", "'DEU' is not a two-letter country code"),
        ("ALLIES: DE\nOTHERS: NZ DE\n", "DE is already in bloc ALLIES (line 1)"),
        ("ALLIES: DE\nALLIES: NZ\n", "bloc ALLIES is listed twice"),
        ("NZ: DE\n", "bloc name 'NZ'"),
        ("1X: DE\n", "bloc name '1X'"),
    ],
)
def test_bad_tables_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(BadBlocTable, match=r"f:\d+: ") as info:
        parse_bloc_table(text, source="f")
    assert fragment in str(info.value)


def test_two_allied_countries_are_one_bloc() -> None:
    de, nz, ch = peer(1, "10.1.0.1", "DE"), peer(2, "10.2.0.1", "NZ"), peer(3, "10.3.0.1", "CH")
    assert choose_holders(CHUNK, [de, nz, ch]) == [de, nz]
    assert choose_holders(CHUNK, [de, nz, ch], blocs=TABLE.mapping()) == [de, ch]
    assert not meets_rule([de, nz], blocs=TABLE.mapping())
    assert plan_repair(CHUNK, [de, nz], [ch], blocs=TABLE.mapping()) == [ch]
    with pytest.raises(PlacementImpossible):
        choose_holders(CHUNK, [de, nz], blocs=TABLE.mapping())


_COUNTRIES = ["DE", "NZ", "IS", "CH", "US", None]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[Candidate], int, int, dict[str, str]]:
    count = draw(st.integers(0, 7))
    ranks = draw(st.lists(st.integers(1, 4096), min_size=count, max_size=count, unique=True))
    peers = [
        peer(rank, f"10.{draw(st.integers(1, 6))}.0.{i + 1}", draw(st.sampled_from(_COUNTRIES)))
        for i, rank in enumerate(ranks)
    ]
    groups = draw(st.lists(st.integers(0, 2), min_size=5, max_size=5))
    blocs = {
        c: f"BLOC{g}" for c, g in zip(["DE", "NZ", "IS", "CH", "US"], groups, strict=True) if g
    }
    replicas = draw(st.integers(1, 4))
    return peers, replicas, draw(st.integers(1, replicas)), blocs


def brute(
    ordered: Sequence[Candidate], replicas: int, min_blocs: int, blocs: dict[str, str]
) -> list[Candidate] | None:
    for combo in itertools.combinations(ordered, replicas):
        nets = [network(c) for c in combo]
        spanned = {blocs.get(c.country, c.country) for c in combo if c.country is not None}
        if len(set(nets)) == replicas and len(spanned) >= min_blocs:
            return list(combo)
    return None


@settings(max_examples=300, deadline=None)
@given(world=worlds())
def test_bloc_rule_matches_brute_force(
    world: tuple[list[Candidate], int, int, dict[str, str]],
) -> None:
    peers, replicas, min_blocs, blocs = world
    expected = brute(by_distance(peers), replicas, min_blocs, blocs)
    if expected is None:
        with pytest.raises(PlacementImpossible):
            choose_holders(CHUNK, peers, replicas=replicas, min_countries=min_blocs, blocs=blocs)
        assert not meets_rule(peers, replicas=replicas, min_countries=min_blocs, blocs=blocs)
        return
    chosen = choose_holders(CHUNK, peers, replicas=replicas, min_countries=min_blocs, blocs=blocs)
    assert chosen == expected
    assert all(c in peers for c in chosen)  # the caller's candidates, not relabelled twins
    assert meets_rule(chosen, replicas=replicas, min_countries=min_blocs, blocs=blocs)
