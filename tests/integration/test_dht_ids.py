"""Issue 16 item 2 in process: a contact enters a routing table only after proving its id, false proofs evict,
and one network fills at most a few slots."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncio_dgram
import pytest
import umsgpack

from p2pmega.core.crypto import new_signing_seed
from p2pmega.core.id_proof import make_id_proof
from p2pmega.core.node_id import network_of
from p2pmega.net.dht import DHTNode
from p2pmega.net.dht_wire import DHTLimits
from tests.conftest import peer_address
from tests.integration.dht_attack import ask, parse_any_request, sybils
from tests.integration.dht_helpers import FakeKey, request

pytestmark = pytest.mark.integration

COUNTRY = 81


@dataclass
class Peer:
    """A raw peer: answers find_node with ``contacts``; its id_proof is true, false (another key) or silent."""

    key: FakeKey
    sock: Any = None
    proof: str = "true"
    contacts: list[list[Any]] = field(default_factory=list)
    asked: Counter[str] = field(default_factory=Counter)

    @property
    def address(self) -> tuple[str, int]:
        return self.key.host, self.sock.sockname[1]

    def contact(self) -> list[Any]:
        return [self.key.node_id, *self.address]

    async def serve(self) -> None:
        while True:
            data, addr = await self.sock.recv()
            name, args = parse_any_request(data)
            self.asked[name] += 1
            reply: Any = None
            if name == "id_proof" and self.proof == "true":
                reply = self.key.proof(args)
            elif name == "id_proof" and self.proof == "false":
                reply = make_id_proof(new_signing_seed(), self.key.node_id, args[1], args[0])
            elif name in ("find_node", "ro_find_node"):
                reply = self.contacts
            elif name.endswith("ping"):
                reply = self.key.node_id
            if reply is not None:
                await self.sock.send(b"\x01" + data[1:21] + umsgpack.packb(reply), addr)


@contextlib.asynccontextmanager
async def peers(*proofs: str) -> AsyncIterator[list[Peer]]:
    made = []
    for i, proof in enumerate(proofs):
        key = FakeKey(peer_address(COUNTRY, 10 + i))
        made.append(Peer(key, await asyncio_dgram.bind((key.host, 0)), proof))
    tasks = [asyncio.create_task(p.serve()) for p in made]
    try:
        yield made
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in made:
            p.sock.close()


async def test_contacts_from_lookups_are_asked_but_enter_the_table_only_once_proven() -> None:
    node = DHTNode(host=peer_address(COUNTRY, 1), rpc_timeout_s=0.3)
    await node.start()
    try:
        async with peers("true", "silent", "false") as (honest, silent, liar), asyncio.timeout(10):
            honest.contacts = [silent.contact(), liar.contact()]
            assert await node.add_contact(*honest.address)
            await node.find_peers(os.urandom(20))
            await node.server._proto().settle_proofs(1.0)
            # Both were asked in the lookup (and challenged), but only the honest peer is in the table.
            assert [(p.host, p.port) for p in node.contacts()] == [honest.address]
            assert silent.asked["find_node"] == 1
            assert liar.asked["find_node"] == 1
            assert liar.asked["id_proof"] == 1
            # A contact whose proof turns false is evicted at once, not after three misses.
            honest.proof = "false"
            assert await node.server._proto().prove(honest.address) is None
            assert node.contacts() == []
            assert node.stats.proofs_failed >= 3
    finally:
        await node.stop()


async def test_forty_proven_ids_on_one_address_fill_two_slots_per_bucket_and_eight_per_table() -> (
    None
):
    node = DHTNode(host=peer_address(COUNTRY, 2), rpc_timeout_s=0.5)
    await node.start()
    try:
        async with sybils(peer_address(COUNTRY, 200)) as swarm, asyncio.timeout(10):
            await swarm.ping([(node.host, node.port)])
            proto = node.server._proto()
            # Datagrams to one socket are handled in order: once this is answered, every ping was handled.
            await ask(peer_address(COUNTRY, 201), (node.host, node.port), "ro_ping", [])
            assert proto.stats.proofs_sent >= 40
            await proto.settle_proofs(2.0)
            network = network_of(swarm.host)
            per_bucket = [
                sum(1 for n in b.get_nodes() if network_of(n.ip) == network)
                for b in proto.router.buckets
            ]
            assert max(per_bucket) <= 2
            assert 1 <= sum(per_bucket) <= 8
    finally:
        await node.stop()


async def test_id_proofs_cost_their_signature_per_network_and_overall() -> None:
    # Each proof makes the node sign: one /24 buys at most burst / id_proof_cost of them at once, and all /24s
    # together at most proofs_per_s (the review's flood: 8 /24s at 600/s each made a seed sign 2,600 a second).
    limits = DHTLimits(request_burst=100.0, requests_per_s=1.0, proofs_per_s=15.0)
    node = DHTNode(host=peer_address(57, 1), limits=limits)
    await node.start()
    socks = [await asyncio_dgram.bind((peer_address(58 + i, 1), 0)) for i in range(4)]
    try:
        answered = []
        for sock in socks:  # all 120 requests first, so the overall budget barely refills meanwhile
            for _ in range(30):
                await sock.send(request("id_proof", [b"", os.urandom(32)]), (node.host, node.port))
        for sock in socks:
            got = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    await asyncio.wait_for(sock.recv(), timeout=0.5)
                    got += 1
            answered.append(got)
        assert answered[0] == 10  # 100 tokens at 10 a proof, all 30 sent at once
        assert (
            sum(answered) <= 15 + 2
        )  # the overall budget (plus what refilled meanwhile), not 4 x 10
    finally:
        for sock in socks:
            sock.close()
        await node.stop()
