"""PoolFinder: a run stays among the peers nearest its key when they meet the rule (issue 19)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import pytest

from p2pmega.api import share_pool
from p2pmega.api.common import NetSettings
from p2pmega.api.share_peers import Probe
from p2pmega.api.share_pool import PoolFinder
from p2pmega.core.blocs import DEFAULT_BLOCS
from p2pmega.core.placement import Candidate
from p2pmega.net.crawl import Peer
from p2pmega.node import Node


def cand(n: int, country: str) -> Candidate:
    return Candidate(bytes([n]) * 20, f"127.{n}.1.1", 4000, country)


NEAR = [cand(1, "DE"), cand(2, "FR"), cand(3, "SE")]  # two countries and more, one bloc (EU-EEA)
WIDE = [cand(9, "NZ")]  # the second bloc is only in the wide pool


class FakeDHT:
    def __init__(self, near: list[Candidate]) -> None:
        self.near = near

    async def find_peers(self, key: bytes) -> list[Peer]:
        return [Peer(c.node_id, c.host, c.port) for c in self.near]


class FakeNode:
    def __init__(self, near: list[Candidate]) -> None:
        self.dht_node = FakeDHT(near)


def finder(
    min_blocs: int,
    monkeypatch: pytest.MonkeyPatch,
    wide_searches: list[int],
    near: list[Candidate] = NEAR,
    probed: list[list[Candidate]] | None = None,
    free: dict[str, int] | None = None,
) -> PoolFinder:
    by_host = {c.host: c for c in [*near, *WIDE]}

    async def probe(_node: Any, found: list[Candidate], _rng: Any, **_kw: Any) -> Probe:
        if probed is not None:
            probed.append(found)
        room = {(c.host, c.port): (free or {})[c.host] for c in found if c.host in (free or {})}
        return Probe(live=[by_host[c.host] for c in found], silent=[], full=[], space=room)

    async def wide_pool(*_args: Any) -> list[Candidate]:
        wide_searches.append(1)
        return [*NEAR, *WIDE]

    monkeypatch.setattr(share_pool, "storage_peers", probe)
    monkeypatch.setattr(share_pool, "candidate_pool", wide_pool)
    monkeypatch.setattr(share_pool, "candidate_of", lambda node_id, addr, geo: by_host[addr[0]])
    net = NetSettings(data_dir=Path("/nonexistent"))
    return PoolFinder(
        cast(Node, FakeNode(near)),
        net,
        "f",
        random.Random(1),
        2,
        2,
        min_blocs,
        (2, DEFAULT_BLOCS.mapping()),
        set(),
    )


async def test_preferred_blocs_do_not_take_a_run_away_from_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy on a wide-pool peer is found by no search near the run, only by a record that comes 10-20 s later."""
    searches: list[int] = []
    found = await finder(1, monkeypatch, searches)(b"k" * 20)
    assert sorted(str(c.country) for c in found) == ["DE", "FR", "SE"]
    assert searches == []


async def test_required_blocs_still_search_the_wide_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    searches: list[int] = []
    found = await finder(2, monkeypatch, searches)(b"k" * 20)
    assert "NZ" in {c.country for c in found}
    assert searches == [1]


# Twenty peers as find_peers returns them, closest first: countries as given, one /24 each.
def nearest(countries: str) -> list[Candidate]:
    return [cand(n + 100, cc) for n, cc in enumerate(countries.split())]


async def test_a_run_is_placed_among_its_ten_closest_peers_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each holder costs a share a connection and a handshake: the fan-out stays RUN_PEERS at any network size."""
    near = nearest("DE FR SE NZ JP DE FR SE NZ JP " * 2)
    probed: list[list[Candidate]] = []
    found = await finder(1, monkeypatch, [], near, probed)(b"k" * 20)
    assert probed == [near[:10]]
    assert sorted(c.host for c in found) == sorted(c.host for c in near[:10])


async def test_a_run_goes_wider_when_its_ten_closest_cannot_meet_the_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    near = nearest("DE " * 10 + "DE NZ " * 5)
    probed: list[list[Candidate]] = []
    found = await finder(1, monkeypatch, [], near, probed)(b"k" * 20)
    assert probed == [near[:10], near[10:]]
    assert sorted(c.host for c in found) == sorted(c.host for c in near)


async def test_a_run_goes_wider_when_its_ten_closest_have_little_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """They would fill up during the run, and the peers beyond the ten are not asked then."""
    near = nearest("DE FR SE NZ JP " * 4)
    little = {
        c.host: 3 for c in near[:10]
    }  # room for 3 chunks each (chunk_bytes 1): 30 against a run's 64 x 2
    probed: list[list[Candidate]] = []
    found = await finder(1, monkeypatch, [], near, probed, little)(b"k" * 20)
    assert probed == [near[:10], near[10:]]
    assert len(found) == 20
    plenty = {c.host: 1 << 30 for c in near}
    probed.clear()
    found = await finder(1, monkeypatch, [], near, probed, plenty)(b"k" * 20)
    assert probed == [near[:10]]


async def test_a_run_goes_wider_when_its_other_countries_have_little_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every chunk needs a copy outside DE: one nearly full NZ peer among nine roomy DE ones would fail the run."""
    near = nearest("DE " * 9 + "NZ " + "NZ JP SE FR NO " * 2)
    free = {c.host: 1 << 30 for c in near} | {near[9].host: 10}
    probed: list[list[Candidate]] = []
    await finder(1, monkeypatch, [], near, probed, free)(b"k" * 20)
    assert probed == [near[:10], near[10:]]
