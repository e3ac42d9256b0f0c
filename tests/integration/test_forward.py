"""Pipelined replication with real holders on loopback: a sharer uploads a chunk once and its first holder forwards it.

Countries: 127.51.x DE, 127.52.x NZ, 127.53.x IS, each peer on its own /24. The sharer (127.50.1.1) places chunks
with a Placer over exactly two holders, so both are asked and one forwards to the other; a stranger is 127.50.2.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pmega import errors
from p2pmega.api.share_peers import storage_peers
from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.geo import GeoTable, parse_geo_table
from p2pmega.core.node_id import network_of
from p2pmega.core.wire import MessageType, codec
from p2pmega.net.forward_requests import Target, forwarded_store, store_forward
from p2pmega.net.transfer_client import TransferClient
from p2pmega.node import Node, NodeSettings
from p2pmega.replicate import forward, pipeline
from p2pmega.replicate.forward import Forwarder
from p2pmega.replicate.holder import HolderDuties, holder_node
from p2pmega.replicate.peers import candidate_of
from p2pmega.replicate.pipeline import Pipeline
from p2pmega.replicate.placer import Placer
from tests.chunk_bytes import chunk_bytes

pytestmark = pytest.mark.integration

STEP_S = 30.0
GEO = "127.50.0.0/16 DE\n127.51.0.0/16 DE\n127.52.0.0/16 NZ\n127.53.0.0/16 IS\n"
PEERS = {"de": "127.51.1.1", "nz": "127.52.1.1", "is": "127.53.1.1"}
SHARER, STRANGER = "127.50.1.1", "127.50.2.1"
LEASE_S = 3600.0
RENEW_KEY = bytes(range(32))


@dataclass
class Net:
    geo: GeoTable
    holders: dict[str, Node]
    sharer: Node

    def placer(self, *names: str) -> Placer:
        pool = [
            candidate_of(self.holders[n].dht_node.node_id, self.holders[n].address, self.geo)
            for n in names
        ]
        placing = Placer(self.sharer, pool, self.geo, 2, 2, LEASE_S)
        placing.renew_key = RENEW_KEY
        placing.pipeline = Pipeline(
            placing, RENEW_KEY, loopback=True
        )  # every peer is on loopback here
        return placing

    def holding(self, chunk_id: ChunkId) -> set[str]:
        return {
            name
            for name, node in self.holders.items()
            if node.store is not None and node.store.has_many([chunk_id]) == [True]
        }

    def forwarder(self, name: str) -> Forwarder:
        found = [d for d in self.holders[name]._running if isinstance(d, Forwarder)]
        assert len(found) == 1
        return found[0]


@contextlib.asynccontextmanager
async def network(tmp_path: Path) -> AsyncIterator[Net]:
    geo = parse_geo_table(GEO)
    async with contextlib.AsyncExitStack() as stack, asyncio.timeout(STEP_S):
        holders: dict[str, Node] = {}
        for name, host in PEERS.items():
            settings = NodeSettings(
                host=host, data_dir=tmp_path / name, holder=True, rpc_timeout_s=1.0, geo=geo
            )
            node, _ = holder_node(settings, HolderDuties(geo=geo, repair=None))
            holders[name] = await stack.enter_async_context(node)
        sharer = Node(
            NodeSettings(
                host=SHARER, data_dir=tmp_path / "sharer", persistent_identity=False, geo=geo
            )
        )
        await stack.enter_async_context(sharer)
        yield Net(geo, holders, sharer)


async def fetched(node: Node, chunk_id: ChunkId) -> bytes:
    async with TransferClient(local_host=STRANGER) as client:
        return bytes(await client.fetch(node.address, chunk_id))


async def test_the_sharer_uploads_once_and_the_second_copy_is_its_own(tmp_path: Path) -> None:
    data = chunk_bytes(200_000)
    chunk_id = chunk_id_of(data)
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        placing = net.placer("de", "nz")
        holders = await placing.place(chunk_id, data)
        assert len(holders) == 2
        assert placing.bytes_sent == len(data), "one upload: the first holder forwarded the other"
        assert placing.forwarded == 1
        assert net.holding(chunk_id) == {"de", "nz"}
        for node in net.holders.values():
            if node.store is not None and node.store.has_many([chunk_id]) == [True]:
                assert await fetched(node, chunk_id) == data
                # Both copies are the sharer's: its renewal key, its lease, its network's quota.
                assert node.store.renew_key(chunk_id) == RENEW_KEY
                expiry = node.store.lease_expiry(chunk_id)
                assert expiry is not None
                assert node.store.source_bytes(network_of(SHARER)) == len(data)
        forwarders = [net.forwarder(n) for n in ("de", "nz")]
        assert sorted(f.forwarded for f in forwarders) == [0, 1]
        # The forwarder's network was charged nothing at the holder it forwarded to.
        first = next(n for n, f in zip(("de", "nz"), forwarders, strict=True) if f.forwarded)
        other = net.holders["nz" if first == "de" else "de"].store
        assert other is not None
        assert other.source_bytes(network_of(PEERS[first])) == 0


class Dropping(Forwarder):
    async def _forward(self, job: forward._Job) -> None:
        return None  # says it will forward, then never does


class Corrupting(Forwarder):
    async def _forward(self, job: forward._Job) -> None:
        assert self.node.store is not None
        assert self._client is not None
        data = bytearray(self.node.store.get(job.chunk_id))
        data[len(data) // 2] ^= 0x01
        await forwarded_store(self._client, job.addr, job.chunk_id, bytes(data), job.lease_s)


class Delaying(Forwarder):
    async def _forward(self, job: forward._Job) -> None:
        await asyncio.sleep(3.0)  # far past the sharer's wait (FORWARD_WAIT_MIN_S, shortened below)
        await super()._forward(job)


@pytest.mark.parametrize("bad", [Dropping, Corrupting, Delaying], ids=lambda c: c.__name__)
async def test_a_forward_that_fails_is_detected_and_the_sharer_uploads_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: type[Forwarder]
) -> None:
    monkeypatch.setattr(pipeline, "FORWARD_WAIT_MIN_S", 0.5)
    monkeypatch.setattr("p2pmega.replicate.holder.Forwarder", bad)  # every holder misbehaves
    data = chunk_bytes(150_000)
    chunk_id = chunk_id_of(data)
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        placing = net.placer("de", "nz")
        await placing.place(chunk_id, data)
        assert placing.forwarded == 0
        assert placing.bytes_sent == 2 * len(data), "the sharer uploaded the second copy itself"
        assert placing.pipeline is not None
        assert len(placing.pipeline.slow_forwarders) == 1, (
            "and asks that forwarder to forward no more"
        )
        assert net.holding(chunk_id) == {"de", "nz"}
        for name in ("de", "nz"):
            assert await fetched(net.holders[name], chunk_id) == data, "never a wrong byte"
            store = net.holders[name].store
            assert store is not None
            assert store.renew_key(chunk_id) == RENEW_KEY
        # A second chunk goes to both directly, without waiting on the failed forwarder again.
        more = chunk_bytes(1000, seed=7)
        await placing.place(chunk_id_of(more), more)
        assert placing.bytes_sent == 2 * len(data) + 2 * len(more)


async def test_a_holder_asked_to_forward_by_a_stranger_refuses(tmp_path: Path) -> None:
    data = chunk_bytes(100_000)
    chunk_id = chunk_id_of(data)
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        await net.placer("de", "nz").place(chunk_id, data)
        target = net.holders["is"]
        to_is = Target(target.dht_node.node_id, *target.address)
        async with TransferClient(local_host=STRANGER) as stranger:
            # The stranger has the bytes (anyone can fetch them) and asks a holder to forward them again.
            for name in ("de", "nz"):
                reply = await store_forward(
                    stranger,
                    net.holders[name].address,
                    chunk_id,
                    data,
                    LEASE_S,
                    renew_key=bytes(32),
                    target=to_is,
                )
                assert (reply.newly_stored, reply.forwarding) == (False, False)
            # A forwarded store nobody announced is refused by the holder it is sent to.
            with pytest.raises(errors.ForwardNotExpected):
                await forwarded_store(stranger, target.address, chunk_id, data, int(LEASE_S))
            # A new chunk the stranger stores and asks to forward is forwarded once, and refused there: the
            # stranger cannot make one holder store at another on its own account.
            other = chunk_bytes(50_000, seed=3)
            other_id = chunk_id_of(other)
            reply = await store_forward(
                stranger,
                net.holders["de"].address,
                other_id,
                other,
                LEASE_S,
                renew_key=bytes(32),
                target=to_is,
            )
            assert (reply.newly_stored, reply.forwarding) == (True, True)
            forwarder = net.forwarder("de")
            while forwarder.failed == 0:  # noqa: ASYNC110 - the count is all there is to wait on
                await asyncio.sleep(0.02)
            assert net.holding(other_id) == {"de"}
            assert net.holding(chunk_id) == {"de", "nz"}


async def test_on_loopback_a_share_uploads_both_copies_itself(tmp_path: Path) -> None:
    """Every peer on one machine: no link to save, so no pipeline (and none of its latency)."""
    data = chunk_bytes(60_000)
    chunk_id = chunk_id_of(data)
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        placing = net.placer("de", "nz")
        assert placing.pipeline is not None
        placing.pipeline.loopback = False
        await placing.place(chunk_id, data)
        assert placing.bytes_sent == 2 * len(data)
        assert (placing.forwarded, [net.forwarder(n).forwarded for n in ("de", "nz")]) == (
            0,
            [0, 0],
        )
        assert net.holding(chunk_id) == {"de", "nz"}


async def test_a_holder_without_a_forwarder_makes_the_sharer_upload_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a holder that takes no forwards (an older one refuses the request, a busy one says no)."""
    data = chunk_bytes(80_000)
    chunk_id = chunk_id_of(data)
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        for node in net.holders.values():
            assert node.server is not None
            monkeypatch.setattr(node.server, "_on_forward", None)
        placing = net.placer("de", "nz")
        await placing.place(chunk_id, data)
        assert placing.bytes_sent == 2 * len(data)
        assert placing.forwarded == 0
        assert net.holding(chunk_id) == {"de", "nz"}


async def test_a_holder_older_than_space_is_still_a_storage_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older holder refuses SPACE as unknown (BAD_REQUEST): the probe asks `has` instead, as before forwarding.

    Review finding: BAD_REQUEST once became PeerIncompatible, and the probe then called such holders silent.
    """

    def unknown(request_id: int, body: memoryview, data: bool = True) -> object:
        raise codec.bad("unknown message type 0x08", request_id)

    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        monkeypatch.setitem(codec.DECODERS, MessageType.SPACE, unknown)  # only holders decode SPACE
        nz = net.holders["nz"]
        with pytest.raises(errors.RequestUnknown, match="BAD_REQUEST unknown message type 0x08"):
            await net.sharer.client.space(nz.address)
        pool = [candidate_of(nz.dht_node.node_id, nz.address, net.geo)]
        probe = await storage_peers(net.sharer, pool, random.Random(1))
        assert [c.host for c in probe.live] == [nz.settings.host]
        assert not probe.silent


async def test_a_late_expect_does_not_cost_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: EXPECT reaching the target after a small chunk's forward made the sharer wait and upload."""
    from p2pmega.net.forward_requests import expect as real_expect

    async def late(*args: object, **kwargs: object) -> list[bool]:
        await asyncio.sleep(0.1)  # as over a longer path from the sharer to the target than from A
        return await real_expect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "expect", late)
    data = chunk_bytes(2000)
    chunk_id = chunk_id_of(data)
    async with network(tmp_path) as net, asyncio.timeout(STEP_S):
        placing = net.placer("de", "nz")
        await placing.place(chunk_id, data)
        assert (placing.forwarded, placing.bytes_sent) == (1, len(data))
        assert placing.pipeline is not None
        assert placing.pipeline.no_forward == placing.pipeline.slow_forwarders == set()
        assert net.holding(chunk_id) == {"de", "nz"}


async def test_one_network_cannot_fill_a_holders_forward_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: a stranger's forwards to a target that never answers held every place in the queue."""
    monkeypatch.setattr(
        forward, "FORWARD_MIN_S", 20.0
    )  # as from a slow sharer: they would wait long
    silent_host = "127.53.9.1"
    accepted: list[asyncio.StreamWriter] = []

    async def never_speaks(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    listener = await asyncio.start_server(never_speaks, silent_host, 0)
    silent = Target(bytes(20), silent_host, listener.sockets[0].getsockname()[1])
    try:
        async with network(tmp_path) as net, asyncio.timeout(STEP_S):
            de = net.holders["de"]
            async with TransferClient(local_host=STRANGER) as stranger:
                answers = []
                for n in range(forward.FORWARDS_PER_NETWORK + 2):
                    small = chunk_bytes(200, seed=100 + n)
                    reply = await store_forward(
                        stranger,
                        de.address,
                        chunk_id_of(small),
                        small,
                        LEASE_S,
                        renew_key=bytes(32),
                        target=silent,
                    )
                    answers.append(reply.forwarding)
            assert answers == [True] * forward.FORWARDS_PER_NETWORK + [False, False]
            # A sharer of another network still gets its chunk forwarded by that holder.
            data = chunk_bytes(20_000)
            placing = net.placer("de", "nz")
            de_first, nz_second = placing.pool
            assert placing.pipeline is not None
            pipeline = placing.pipeline
            assert await pipeline.store_pair(de_first, nz_second, chunk_id_of(data), data) == (
                True,
                True,
            )
            assert (placing.bytes_sent, placing.forwarded) == (len(data), 1)
    finally:
        listener.close()
        for writer in accepted:
            writer.close()
        await listener.wait_closed()
