"""Hostile peers: malformed replies, malformed requests, floods. Honest work must go on, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncio_dgram
import pytest
import umsgpack

from p2pmega.core.record import ProviderLimits
from p2pmega.errors import BootstrapFailed
from p2pmega.net.dht import DHTLimits, DHTNode
from tests.conftest import peer_address
from tests.integration.dht_helpers import FakeKey, parse_request, request

pytestmark = pytest.mark.integration

COUNTRY = 31
TIMEOUT_S = 0.5

MALFORMED_REPLIES: list[Any] = [
    5,
    None,
    {"value": 1},
    {"x": 1},
    [[1, 2]],
    [[os.urandom(19), "127.0.0.1", 5]],
    [[os.urandom(20), "evil.example", 5]],
    [[os.urandom(20), "127.0.0.1", 0]],
    [[os.urandom(20), "127.0.0.1", 5]] * 50,
    [1, [[1, os.urandom(20), "127.0.0.1", 5, -1]], []],
    [1, [[1, os.urandom(20), "0.0.0.0", 5, 60]], []],
    [1, [[1, os.urandom(20), "127.0.0.1", 5, 60]] * 500, []],
    [7, [], []],
    "x" * 3000,
    b"\x00" * 19,
]


@asynccontextmanager
async def hostile_peer(targets: list[tuple[str, int]]) -> AsyncIterator[tuple[str, int]]:
    """A peer that gets into the targets' tables, then answers every RPC with a malformed reply."""
    host = peer_address(COUNTRY, 200)
    sock = await asyncio_dgram.bind((host, 0))
    # It proves its id to the targets (so it gets into their tables, issue 16), then answers
    # everything else badly.
    key = FakeKey(host)
    for target in targets:
        await sock.send(request("ping", [key.node_id]), target)
    replies = iter(MALFORMED_REPLIES * 1000)

    async def serve() -> None:
        while True:
            data, addr = await sock.recv()
            source: Any = addr
            if data[:1] == b"\x00":
                name, args = parse_request(data)
                # Only to the targets: to anyone else, even its id proof is garbage.
                proves = name == "id_proof" and (source[0], source[1]) in targets
                reply = key.proof(args) if proves else next(replies)
                bad = umsgpack.packb(reply)
                await sock.send(b"\x01" + data[1:21] + bad, addr)

    task = asyncio.create_task(serve())
    try:
        yield sock.sockname[:2]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


@asynccontextmanager
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Collects what the event loop's exception handler sees (unhandled task exceptions)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(None)


async def test_malformed_replies_never_break_join_announce_or_lookup(caplog) -> None:
    caplog.set_level(logging.WARNING)
    nodes = [DHTNode(host=peer_address(COUNTRY, i), rpc_timeout_s=TIMEOUT_S) for i in range(1, 9)]
    newcomer = DHTNode(host=peer_address(COUNTRY, 50), rpc_timeout_s=TIMEOUT_S)
    async with loop_errors() as errors:
        try:
            for node in [*nodes, newcomer]:
                await node.start()
            async with asyncio.timeout(30):
                for node in nodes[1:]:
                    await node.join([(nodes[0].host, nodes[0].port)])
                async with hostile_peer([(n.host, n.port) for n in nodes]) as bad:
                    await asyncio.sleep(0.1)
                    assert any(p.host == bad[0] for p in nodes[0].contacts())
                    with pytest.raises(BootstrapFailed):
                        await newcomer.join([bad])
                    assert await newcomer.join([bad, (nodes[0].host, nodes[0].port)]) >= 8
                    for i in range(20):
                        holder, seeker = nodes[i % 8], [newcomer, *nodes][(i * 3 + 1) % 9]
                        chunk_id = os.urandom(32)
                        assert await holder.announce_many([chunk_id], 3000 + i) >= 1
                        found = await seeker.find_providers(chunk_id)
                        if seeker is holder:
                            continue
                        assert [(p.node_id, p.port) for p in found] == [(holder.node_id, 3000 + i)]
                        peers = await seeker.find_peers(chunk_id[:20])
                        assert bad[0] not in {p.host for p in peers}
                    assert newcomer.stats.bad_replies > 0
        finally:
            for node in [*nodes, newcomer]:
                await node.stop()
    assert errors == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def v3(name: str, args: list[Any]) -> bytes:
    return umsgpack.packb([3, name, args, b""])  # type: ignore[no-any-return]


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


def malformed_requests(rng: random.Random, good_id: bytes) -> list[bytes]:
    """One datagram of each kind of garbage, all with the request type byte and a message id."""
    bodies = [
        rng.randbytes(40),
        v3("find_node", [good_id, os.urandom(20)])[:-7],  # truncated
        v3("find_node", [good_id, 12345]),  # wrong argument type
        v3("find_node", ["id", os.urandom(20)]),
        v3("ping", [os.urandom(19)]),  # 19-byte id
        v3("find_providers", [os.urandom(21), os.urandom(20)]),  # 21-byte id
        v3("add_provider", [good_id, os.urandom(20), 70000]),
        v3("add_provider", [good_id, os.urandom(20), True]),
        v3("stun", []),  # unknown to us (kademlia has it)
        v3("__init__", [good_id]),
        v3("ping", [good_id, "extra"]),
        umsgpack.packb({"ping": good_id}),
        umsgpack.packb(["ping", [good_id]]),  # protocol 1 or 2: refused (issue 16)
        umsgpack.packb([2, "ping", [good_id], b""]),  # another version
        v3("id_proof", [b"", os.urandom(31)]),  # short nonce
        v3("id_proof", [os.urandom(7), os.urandom(32)]),
        nested(5000),
        v3("store", [good_id, os.urandom(20), b"v" * 4000]),  # oversized value
        v3("store", [good_id, os.urandom(20), [1, 2, 3]]),
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 billion items
        v3("ro_find_node", [good_id, os.urandom(20)]),  # ro_ carries no node id
        v3("ro_ping", [good_id]),
        v3("ro_store", [os.urandom(20), b"v"]),  # there is no read-only store
        v3("add_providers", [good_id, [os.urandom(20)] * 257, 9]),  # over 256 keys
        v3("add_providers", [good_id, [], 9]),
        v3("add_providers", [good_id, [os.urandom(19)], 9]),
        v3("add_providers", [good_id, os.urandom(20), 9]),
    ]
    datagrams = [b"\x00" + os.urandom(20) + body for body in bodies]
    datagrams += [b"", b"\x00", b"\x02" + os.urandom(30), b"\x01" + os.urandom(30)]
    datagrams.append(b"\x00" + os.urandom(20) + os.urandom(60_000))  # oversized datagram
    return datagrams


async def test_malformed_requests_and_a_flood_leave_the_node_answering_and_bounded(caplog) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(7)
    limits = DHTLimits(providers=ProviderLimits(max_per_network=100), max_values=100)
    target = DHTNode(
        host=peer_address(COUNTRY, 101),
        rpc_timeout_s=TIMEOUT_S,
        limits=limits,
    )
    honest = DHTNode(host=peer_address(COUNTRY, 102), rpc_timeout_s=TIMEOUT_S)
    async with loop_errors() as errors:
        await target.start()
        await honest.start()
        attacker = await asyncio_dgram.bind((peer_address(COUNTRY, 103), 0))
        try:
            address = (target.host, target.port)
            async with asyncio.timeout(60):
                await honest.join([address])
                proto = target.server._proto()
                tracemalloc.start()
                before = tracemalloc.get_traced_memory()[0]
                for datagram in malformed_requests(rng, os.urandom(20)):
                    await attacker.send(datagram, address)
                for i in range(10_000):
                    kind = i % 5
                    if kind == 0:
                        body = rng.randbytes(rng.randrange(1, 200))
                    elif kind == 1:
                        body = umsgpack.packb(["ping", [os.urandom(20)]])  # a fresh id each time
                    elif kind == 2:
                        body = umsgpack.packb(["add_provider", [os.urandom(20), os.urandom(20), 9]])
                    elif kind == 3:
                        body = umsgpack.packb(["store", [os.urandom(20), os.urandom(20), b"v"]])
                    else:
                        keys = [os.urandom(20) for _ in range(8)]
                        body = umsgpack.packb(["add_providers", [os.urandom(20), keys, 9]])
                    await attacker.send(b"\x00" + os.urandom(20) + body, address)
                    if i % 50 == 49:
                        # Yield now and then: a loopback burst faster than that only measures
                        # the kernel's receive buffer, which drops honest and hostile alike.
                        await asyncio.sleep(0.01)
                    if i % 1000 == 999:
                        await asyncio.sleep(0.05)  # let the target drain the burst first
                        assert await honest.add_contact(target.host, target.port)
                await asyncio.sleep(0.2)
                grown = tracemalloc.get_traced_memory()[0] - before
                tracemalloc.stop()

                assert await honest.add_contact(target.host, target.port)
                chunk_id = os.urandom(32)
                assert await honest.announce_many([chunk_id], 4444) == 1
                found = await honest.find_providers(chunk_id)
                assert [(p.node_id, p.port) for p in found] == [(honest.node_id, 4444)]
            stats = target.stats
            assert stats.dropped_datagrams > 1000
            assert stats.dropped_datagrams + stats.requests_served > 5000  # most of it got through
            assert len(proto._outstanding) == 0
            assert len(proto._tasks) <= 2
            assert (
                len(target.contacts()) <= 2
            )  # the honest node and one id of the attacker's address
            assert len(target.server.providers) <= 100 + 1
            assert len(target.server.storage.data) <= 100
            assert grown < 4_000_000, grown
        finally:
            attacker.close()
            await honest.stop()
            await target.stop()
    assert errors == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
