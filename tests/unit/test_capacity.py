"""core.capacity (issue 18, item 2): a peer's placement weight from the free space it reports, and the
Placer using it: full peers get nothing, a peer with twice the room about twice the chunks, a liar at most
the cap. Pure functions and a fake client; no sockets."""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from p2pmega.api.share_peers import full_note, storage_peers
from p2pmega.core.capacity import (
    MAX_WEIGHT,
    MIN_WEIGHT,
    REFERENCE_FREE_BYTES,
    capacity_weight,
    is_full,
)
from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.placement import Candidate, choose_holders
from p2pmega.core.wire import SpaceReply
from p2pmega.errors import PeerRefused, PeerUnreachable
from p2pmega.node import Node
from p2pmega.replicate.peers import ask_space
from p2pmega.replicate.placer import Placer
from tests.unit.test_placer import FakeClient, FakeNode

free_bytes = st.integers(min_value=-(2**64), max_value=2**70)


@given(free_bytes)
def test_the_weight_is_deterministic_positive_and_bounded(free: int) -> None:
    weight = capacity_weight(free)
    assert weight == capacity_weight(free)
    assert MIN_WEIGHT <= weight <= MAX_WEIGHT


@given(free_bytes, free_bytes)
def test_the_weight_never_falls_as_free_space_grows(a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert capacity_weight(low) <= capacity_weight(high)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_the_weight_is_proportional_between_floor_and_cap(free: int) -> None:
    exact = free / REFERENCE_FREE_BYTES
    if MIN_WEIGHT <= exact <= MAX_WEIGHT:
        assert capacity_weight(free) == exact
        if 2 * exact <= MAX_WEIGHT:
            assert capacity_weight(2 * free) == 2 * capacity_weight(free)


def test_the_reference_seed_weighs_one_and_a_liar_no_more_than_the_cap() -> None:
    assert capacity_weight(REFERENCE_FREE_BYTES) == 1.0  # as much as a peer whose space is unknown
    assert capacity_weight(10 * 10**15) == MAX_WEIGHT  # "10 PB free"
    assert capacity_weight(2**64 - 1) == MAX_WEIGHT
    assert capacity_weight(0) == capacity_weight(1) == MIN_WEIGHT


@given(st.integers(0, 2**64), st.integers(1, 2**23))
def test_full_means_less_room_than_the_chunk(free: int, chunk: int) -> None:
    assert is_full(free, chunk) is (free < chunk)


def _peer(i: int, country: str, weight: float = 1.0) -> Candidate:
    return Candidate(os.urandom(20), f"127.{i}.1.1", 4000 + i, country, weight)


def _loads(pool: list[Candidate], chunks: int, replicas: int = 2) -> Counter[str]:
    load: Counter[str] = Counter()
    for n in range(chunks):
        chunk_id = hashlib.sha256(n.to_bytes(4, "big")).digest()
        for holder in choose_holders(chunk_id, pool, replicas=replicas, min_countries=1):
            load[holder.host] += 1
    return load


def test_twice_the_free_space_gets_about_twice_the_chunks() -> None:
    base = REFERENCE_FREE_BYTES // 10
    countries = ["DE", "NZ", "IS", "CH", "FR", "SE", "NO", "FI"]
    pool = [_peer(i, c, capacity_weight(base)) for i, c in enumerate(countries, start=1)]
    big = Candidate(os.urandom(20), "127.9.1.1", 4009, "US", capacity_weight(2 * base))
    load = _loads([*pool, big], 4000)
    mean = sum(load[c.host] for c in pool) / len(pool)
    assert (
        1.6 <= load[big.host] / mean <= 2.3
    )  # 1.88 expected: two copies of nine, never one peer twice


def test_a_liar_gets_at_most_the_cap_however_much_it_claims() -> None:
    pool = [_peer(i, "DE" if i % 2 else "NZ") for i in range(1, 61)]  # 60 reference seeds, weight 1
    liar = Candidate(os.urandom(20), "127.99.1.1", 4099, "IS", capacity_weight(10 * 10**15))
    # One copy per chunk, so the liar's share is exactly its weight's: 16 / (60 + 16) of the chunks.
    load = _loads([*pool, liar], 3000, replicas=1)
    mean = sum(load[c.host] for c in pool) / len(pool)
    assert load[liar.host] / mean <= MAX_WEIGHT * 1.25
    assert load[liar.host] <= 1.25 * 3000 * MAX_WEIGHT / (60 + MAX_WEIGHT)  # about a fifth, not all


DATA = b"\x02\x00" + bytes(1000)  # what the fake client stores; only its length matters here
DE = Candidate(b"\x01" * 20, "127.1.1.1", 4001, "DE")
NZ = Candidate(b"\x02" * 20, "127.2.1.1", 4002, "NZ")
IS = Candidate(b"\x03" * 20, "127.3.1.1", 4003, "IS")


def _addr(c: Candidate) -> tuple[str, int]:
    return (c.host, c.port)


async def test_the_placer_weighs_candidates_by_their_reported_space() -> None:
    placer = Placer(cast(Node, FakeNode(FakeClient())), [DE, NZ, IS], None, 2, 2, 60.0)
    placer.space = {_addr(DE): REFERENCE_FREE_BYTES // 2, _addr(NZ): 10**18}
    weights = {c.host: c.weight for c in await placer.candidates_for(ChunkId(bytes(32)))}
    assert weights == {DE.host: 0.5, NZ.host: MAX_WEIGHT, IS.host: 1.0}  # IS: unknown space


async def test_the_placer_stores_nothing_on_a_peer_without_room_for_the_chunk() -> None:
    client = FakeClient()
    placer = Placer(cast(Node, FakeNode(client)), [DE, NZ, IS], None, 2, 2, 60.0)
    placer.space = {_addr(DE): len(DATA) - 1, _addr(NZ): len(DATA), _addr(IS): 10**12}
    for n in range(30):
        holders = await placer.place(chunk_id_of(DATA + bytes([n])), DATA)
        assert {h.host for h in holders} == {NZ.host, IS.host}
    assert client.calls[_addr(DE)] == 0


class ProbedClient:
    """SPACE and HAS answers by address: a free-byte count, an exception, or "old" (refuses SPACE as unknown)."""

    def __init__(self, space: dict[tuple[str, int], int | str | Exception]) -> None:
        self.answers = space

    async def space(self, addr: tuple[str, int]) -> SpaceReply:
        answer = self.answers[addr]
        if answer == "old":
            raise PeerUnreachable(
                f"peer {addr} refused request: BAD_REQUEST unknown message type 0x08"
            )
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, int)
        return SpaceReply(1, answer, max(answer, 10**12))

    async def has(self, addr: tuple[str, int], ids: list[ChunkId]) -> list[bool]:
        answer = self.answers[addr]
        if isinstance(answer, Exception):
            raise answer
        return [False] * len(ids)


async def test_the_probe_weighs_storage_peers_and_leaves_full_ones_out() -> None:
    fresh, nearly, full = DE, NZ, IS
    old = Candidate(b"\x04" * 20, "127.4.1.1", 4004, "CH")
    dht_only = Candidate(b"\x05" * 20, "127.5.1.1", 4005, "FR")
    client = ProbedClient(
        {
            _addr(fresh): REFERENCE_FREE_BYTES,
            _addr(nearly): 3 * len(DATA),
            _addr(full): len(DATA) - 1,
            _addr(old): "old",
            _addr(dht_only): PeerRefused("nothing listens"),
        }
    )
    node = cast(Node, FakeNode(cast(FakeClient, client)))
    probe = await storage_peers(
        node, [fresh, nearly, full, old, dht_only], random.Random(1), chunk_bytes=len(DATA)
    )
    weights = {c.host: c.weight for c in probe.live}
    # An older holder answers `has` instead: a storage peer whose space is unknown, weighing as a fresh seed.
    assert weights == {fresh.host: 1.0, nearly.host: MIN_WEIGHT, old.host: 1.0}
    assert probe.full == [full]
    assert probe.silent == [dht_only]
    assert probe.space == {
        _addr(fresh): REFERENCE_FREE_BYTES,
        _addr(nearly): 3 * len(DATA),
        _addr(full): len(DATA) - 1,
    }
    assert "left out as full: 1 peer (127.3.1.1:4003)" in full_note(probe, len(DATA))


async def test_repair_and_keep_alive_learn_the_space_of_the_peers_that_answer() -> None:
    client = ProbedClient(
        {_addr(DE): 5 * 10**9, _addr(NZ): "old", _addr(IS): PeerRefused("nothing listens")}
    )
    node = cast(Node, FakeNode(cast(FakeClient, client)))
    # Only answers count; the others keep the weight of unknown space (1.0) in the Placer.
    assert await ask_space(node, [DE, NZ, IS]) == {_addr(DE): 5 * 10**9}
