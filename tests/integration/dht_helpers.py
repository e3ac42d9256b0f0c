"""A swarm of real DHT nodes on loopback, shared by the DHT integration tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from p2pmega.net.dht import DHTNode
from tests.conftest import peer_address


@asynccontextmanager
async def swarm(country: int, n: int, **kwargs: object) -> AsyncIterator[list[DHTNode]]:
    """``n`` started nodes at 127.C.N.1, nodes 1..n-1 joined through node 0; all stopped at exit."""
    nodes = [
        DHTNode(host=peer_address(country, i + 1), node_id=os.urandom(20), **kwargs)  # type: ignore[arg-type]
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
