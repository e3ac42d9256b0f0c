"""A swarm of real DHT nodes on loopback, and raw protocol-3 datagrams, shared by the DHT integration tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import umsgpack

from p2pmega.core.crypto import new_signing_seed, public_key_of
from p2pmega.core.id_proof import make_id_proof
from p2pmega.core.node_id import node_id_for
from p2pmega.net.dht import DHTNode
from tests.conftest import peer_address

DHT_PROTOCOL_VERSION = 3
"""p2pmega.net.kademlia_protocol.DHT_PROTOCOL_VERSION, pinned: raw test datagrams are the wire."""


@asynccontextmanager
async def swarm(country: int, n: int, **kwargs: object) -> AsyncIterator[list[DHTNode]]:
    """``n`` started nodes at 127.C.N.1, nodes 1..n-1 joined through node 0; all stopped at exit."""
    nodes = [
        DHTNode(host=peer_address(country, i + 1), **kwargs)  # type: ignore[arg-type]
        for i in range(n)
    ]
    try:
        for node in nodes:
            await node.start()
        async with asyncio.timeout(30):
            for node in nodes[1:]:
                assert await node.join([(nodes[0].host, nodes[0].port)]) >= 1
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


@dataclass
class FakeKey:
    """The key of a raw UDP test peer at ``host``: its bound node id, and its id_proof answers."""

    host: str
    seed: bytes = field(default_factory=new_signing_seed)

    @property
    def node_id(self) -> bytes:
        return node_id_for(public_key_of(self.seed), self.host)

    def proof(self, args: list[Any]) -> list[object]:
        """The reply to an id_proof request with arguments ``[challenger, nonce]``."""
        return make_id_proof(self.seed, self.node_id, args[1], args[0])


def request(name: str, args: list[Any], padding: bytes = b"") -> bytes:
    """A protocol-3 request datagram (kind 0, a random message id, [3, name, args, padding])."""
    body: bytes = umsgpack.packb([DHT_PROTOCOL_VERSION, name, args, padding])
    return b"\x00" + os.urandom(20) + body


def parse_request(data: bytes) -> tuple[str, list[Any]]:
    """(name, args) of a protocol-3 request datagram."""
    _, name, args, _ = umsgpack.unpackb(data[21:])
    return name, args
