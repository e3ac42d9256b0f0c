"""share's Placer on a failing store (issue 21): what may pass is retried, a holder is dropped only
when it refuses connections or keeps failing. The network is a fake client; no sockets."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import pytest

from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.placement import Candidate
from p2pmega.errors import (
    ChunkHashMismatch,
    P2PMegaError,
    PeerRefused,
    PeerUnreachable,
    PlacementImpossible,
    SourceLimitExceeded,
    TransferTimeout,
)
from p2pmega.node import Node
from p2pmega.replicate import placer as placer_module
from p2pmega.replicate.placer import MAX_HOLDER_FAILURES, STORE_ATTEMPTS, Placer

Address = tuple[str, int]
DE = Candidate(node_id=b"\x01" * 20, host="127.1.1.1", port=4001, country="DE")
NZ = Candidate(node_id=b"\x02" * 20, host="127.2.1.1", port=4002, country="NZ")
NZ2 = Candidate(node_id=b"\x03" * 20, host="127.2.2.1", port=4003, country="NZ")


@dataclass
class FakeClient:
    """Stores succeed unless ``script`` has failures queued for that address."""

    script: dict[Address, list[P2PMegaError]] = field(default_factory=dict)
    calls: Counter[Address] = field(default_factory=Counter)

    keys: list[bytes | None] = field(default_factory=list)

    async def store(
        self,
        addr: Address,
        chunk_id: ChunkId,
        data: bytes,
        lease_s: float,
        *,
        renew_key: bytes | None = None,
    ) -> bool:
        self.calls[addr] += 1
        self.keys.append(renew_key)
        queued = self.script.get(addr)
        if queued:
            raise queued.pop(0)
        return True


@dataclass
class FakeNode:
    client: FakeClient


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placer_module, "STORE_RETRY_DELAY_S", 0.0)


def placer(client: FakeClient, pool: list[Candidate]) -> Placer:
    return Placer(cast(Node, FakeNode(client)), pool, None, 2, 2, 60.0)


def addr(cand: Candidate) -> Address:
    return (cand.host, cand.port)


CHUNK = chunk_id_of(b"chunk")


async def test_a_timeout_is_retried_on_the_same_holder() -> None:
    # The only NZ holder times out twice (a slow link's hiccup): dropping it would make the chunk
    # impossible to place.
    client = FakeClient({addr(NZ): [TransferTimeout("t1"), PeerUnreachable("lost")]})
    p = placer(client, [DE, NZ])
    assert sorted(c.country or "" for c in await p.place(CHUNK, b"data")) == ["DE", "NZ"]
    assert client.calls[addr(NZ)] == 3
    assert not p.dead


async def test_a_refused_connection_drops_the_holder_at_once() -> None:
    client = FakeClient({addr(NZ): [PeerRefused("nothing listens")]})
    p = placer(client, [DE, NZ, NZ2])
    stored = await p.place(CHUNK, b"data")
    assert {addr(c) for c in stored} == {addr(DE), addr(NZ2)}
    assert client.calls[addr(NZ)] == 1
    assert p.dead == {addr(NZ)}


async def test_a_holder_refusing_our_network_is_treated_as_full_and_replaced() -> None:
    # SOURCE_LIMIT: our /24 used its share of that holder (issue 16); another holder takes the chunk.
    client = FakeClient({addr(NZ): [SourceLimitExceeded("share used")]})
    p = placer(client, [DE, NZ, NZ2])
    p.renew_key = b"k" * 32
    stored = await p.place(CHUNK, b"data")
    assert {addr(c) for c in stored} == {addr(DE), addr(NZ2)}
    assert client.calls[addr(NZ)] == 1
    assert p.full == {addr(NZ)}
    assert not p.dead
    # Every store carried the file's renewal key.
    assert client.keys == [b"k" * 32] * 3


async def test_a_holder_that_keeps_failing_is_replaced_then_dropped() -> None:
    failures: list[P2PMegaError] = [TransferTimeout("t")] * (STORE_ATTEMPTS * MAX_HOLDER_FAILURES)
    client = FakeClient({addr(NZ): list(failures)})
    p = placer(client, [DE, NZ, NZ2])
    # Placement picks the closer of the two NZ holders per chunk: place until NZ was tried enough.
    for n in range(100):
        stored = await p.place(chunk_id_of(bytes([n])), b"data")
        assert {addr(c) for c in stored} == {addr(DE), addr(NZ2)}
        if p.dead:
            break
    assert p.dead == {addr(NZ)}
    assert client.calls[addr(NZ)] == STORE_ATTEMPTS * MAX_HOLDER_FAILURES
    for n in range(20):
        await p.place(chunk_id_of(b"later %d" % n), b"data")
    assert client.calls[addr(NZ)] == STORE_ATTEMPTS * MAX_HOLDER_FAILURES  # never asked again


async def test_a_holder_that_failed_a_chunk_is_asked_again_when_no_other_can_take_it() -> None:
    # Its attempts on the first round all fail; with no other NZ holder the next round tries it again.
    client = FakeClient({addr(NZ): [TransferTimeout("t")] * STORE_ATTEMPTS})
    p = placer(client, [DE, NZ])
    assert len(await p.place(CHUNK, b"data")) == 2
    assert client.calls[addr(NZ)] == STORE_ATTEMPTS + 1


async def test_a_holder_that_is_gone_makes_the_rule_impossible() -> None:
    client = FakeClient({addr(NZ): [PeerRefused("nothing listens")]})
    with pytest.raises(PlacementImpossible):
        await placer(client, [DE, NZ]).place(CHUNK, b"data")


async def test_a_refusal_that_is_not_a_network_error_is_not_retried() -> None:
    client = FakeClient({addr(NZ): [ChunkHashMismatch("holder says the bytes differ")]})
    p = placer(client, [DE, NZ, NZ2])
    stored = await p.place(CHUNK, b"data")
    assert {addr(c) for c in stored} == {addr(DE), addr(NZ2)}
    assert client.calls[addr(NZ)] == 1


CH = Candidate(node_id=b"\x04" * 20, host="127.3.1.1", port=4004, country="CH")
ALLIES = {"DE": "ALLIES", "NZ": "ALLIES"}


async def test_two_blocs_are_preferred_when_the_peers_allow() -> None:
    client = FakeClient()
    placing = Placer(cast(Node, FakeNode(client)), [DE, NZ, CH], None, 2, 2, 60.0, blocs=ALLIES)
    holders = await placing.place(chunk_id_of(b"x"), b"x")
    assert {h.country for h in holders} & {"CH"}
    assert len(holders) == 2


async def test_one_bloc_is_enough_unless_blocs_are_required() -> None:
    client = FakeClient()
    preferring = Placer(cast(Node, FakeNode(client)), [DE, NZ], None, 2, 2, 60.0, blocs=ALLIES)
    assert {h.country for h in await preferring.place(chunk_id_of(b"x"), b"x")} == {"DE", "NZ"}
    requiring = Placer(
        cast(Node, FakeNode(client)), [DE, NZ], None, 2, 2, 60.0, blocs=ALLIES, min_blocs=2
    )
    with pytest.raises(PlacementImpossible):
        await requiring.place(chunk_id_of(b"x"), b"x")


async def test_a_chunk_on_one_bloc_gets_a_copy_in_another_when_repaired() -> None:
    client = FakeClient()
    placing = Placer(cast(Node, FakeNode(client)), [DE, NZ, CH], None, 2, 2, 60.0, blocs=ALLIES)
    holders = await placing.place(chunk_id_of(b"x"), b"x", holding=[DE, NZ])
    assert holders == [DE, NZ, CH]
    assert client.calls == Counter({CH.address: 1})


@dataclass
class PrestoredClient(FakeClient):
    """The holder at ``prestored`` already has every chunk, stored by someone else with ``left_s`` to live."""

    prestored: Address = ("", 0)
    left_s: int = 0

    async def store(
        self, addr: Address, chunk_id: ChunkId, data: bytes, lease_s: float, **_: object
    ) -> bool:
        self.calls[addr] += 1
        return addr != self.prestored

    async def leases(self, addr: Address, ids: list[ChunkId]) -> list[int]:
        return [self.left_s if addr == self.prestored else 3600 for _ in ids]


async def test_a_copy_someone_stored_first_with_a_short_lease_is_not_counted() -> None:
    # Anyone with the ciphertext can store it first with a one-hour lease (a re-store never extends a lease):
    # counting that copy would leave the chunk on one holder within the hour.
    client = PrestoredClient(prestored=NZ.address, left_s=3600)
    placing = Placer(cast(Node, FakeNode(client)), [DE, NZ, NZ2], None, 2, 2, 30 * 86400.0)
    holders = await placing.place(chunk_id_of(b"x"), b"x")
    assert NZ not in holders
    assert NZ2 in holders
    long_lived = PrestoredClient(prestored=NZ.address, left_s=30 * 86400)
    placing = Placer(cast(Node, FakeNode(long_lived)), [DE, NZ], None, 2, 2, 30 * 86400.0)
    assert NZ in await placing.place(chunk_id_of(b"x"), b"x")


async def test_chunks_placed_near_one_key_share_one_search() -> None:
    """A share's run of chunks (issue 19): the candidates near a key are searched once, however many chunks of
    the run are placed at once, and a peer that failed is left out of the run's candidates from then on."""
    searched: list[bytes] = []
    gate = asyncio.Event()

    async def finder(key: bytes) -> list[Candidate]:
        searched.append(key)
        await gate.wait()  # every chunk asks while the search runs
        return [DE, NZ, NZ2]

    client = FakeClient(script={addr(NZ): [PeerRefused("nothing listens")]})
    p = placer(client, [])
    p.finder = finder
    run_key, other_key = b"\x0a" * 20, b"\x0b" * 20
    chunks = [chunk_id_of(bytes([i])) for i in range(6)]
    placing = [asyncio.create_task(p.place(c, b"x", near=run_key)) for c in chunks]
    await asyncio.sleep(0)
    gate.set()
    placed = await asyncio.gather(*placing)
    assert searched == [run_key]
    assert all({h.country for h in holders} == {"DE", "NZ"} for holders in placed)
    assert NZ not in await p.candidates_for(chunks[0], run_key)
    await p.place(chunk_id_of(b"next run"), b"y", near=other_key)
    assert searched == [run_key, other_key]
    await p.close()
