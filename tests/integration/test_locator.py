"""HolderLocator: a link's peer hints are asked before the DHT is searched."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from p2pmega.core.chunking import chunk_id_of
from p2pmega.errors import ChunkUnavailable
from p2pmega.net.dht import Peer
from p2pmega.node import Node, NodeSettings
from p2pmega.replicate.locator import HolderLocator
from tests.integration.test_node_announce import holder, recorder, store_chunks

pytestmark = pytest.mark.integration

STEP_S = 20.0


async def test_hinted_holder_serves_without_a_dht_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with recorder() as dht, asyncio.timeout(STEP_S):
        # No announcement goes out during the test: the DHT has no provider record to find.
        node, _duties = holder(tmp_path, dht, announce_delay_s=600, announce_quiet_s=600)
        async with node:
            [chunk_id] = await store_chunks(node, 1)
            client_settings = NodeSettings(
                host="127.71.4.1",
                data_dir=tmp_path / "client",
                bootstrap=[(dht.host, dht.port)],
                persistent_identity=False,
                rpc_timeout_s=1.0,
            )
            async with Node(client_settings) as client:
                lookups: list[bytes] = []
                real = client.dht_node.find_providers

                async def spy(key: bytes) -> object:
                    lookups.append(key)
                    return await real(key)

                monkeypatch.setattr(client.dht_node, "find_providers", spy)
                hinted = HolderLocator(client, hints=[node.address])
                data = bytes(await hinted.fetch(chunk_id))
                assert chunk_id_of(data) == chunk_id
                assert lookups == []
                # Without the hint the same chunk is looked up in the DHT first.
                other = os.urandom(32)
                blind = HolderLocator(client)
                with pytest.raises(ChunkUnavailable, match="no reachable holder"):
                    await blind.fetch(other)  # type: ignore[arg-type]
                assert lookups, "a chunk with no hinted holder should be searched in the DHT"


async def test_a_fetch_widens_its_search_when_lookups_name_no_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: with provider records flooded away and Sybils answering lookups (no record, liars as the closest
    nodes), the locator still finds a holder among its own table's proven contacts."""
    async with recorder() as dht, asyncio.timeout(STEP_S):
        node, _duties = holder(tmp_path, dht, announce_delay_s=600, announce_quiet_s=600)
        async with node:
            [chunk_id] = await store_chunks(node, 1)
            client_settings = NodeSettings(
                host="127.71.5.1",
                data_dir=tmp_path / "client",
                bootstrap=[(dht.host, dht.port)],
                persistent_identity=False,
                rpc_timeout_s=1.0,
            )
            async with Node(client_settings) as client:
                # The holder is known to the client's DHT table (it joined through the same node).
                await client.dht_node.find_peers(os.urandom(20))
                assert node.address in {(p.host, p.port) for p in client.dht_node.contacts()}

                async def nothing(_key: bytes) -> list[object]:
                    return []

                monkeypatch.setattr(client.dht_node, "find_providers", nothing)
                monkeypatch.setattr(client.dht_node, "find_peers", nothing)
                data = bytes(await HolderLocator(client).fetch(chunk_id))
                assert chunk_id_of(data) == chunk_id


async def test_a_node_id_the_dht_names_is_a_hint_the_channel_replaces(tmp_path: Path) -> None:
    # Anyone can name an honest holder's address under an id of its own (a provider record, a crawl reply): that
    # must neither make the holder unreachable nor be the id renewals and placement use. The channel proves one.
    async with recorder() as dht, asyncio.timeout(STEP_S):
        node, _duties = holder(tmp_path, dht, announce_delay_s=600, announce_quiet_s=600)
        async with node:
            [chunk_id] = await store_chunks(node, 1)
            client_settings = NodeSettings(
                host="127.71.5.1",
                data_dir=tmp_path / "client",
                bootstrap=[(dht.host, dht.port)],
                persistent_identity=False,
                rpc_timeout_s=1.0,
            )
            async with Node(client_settings) as client:
                lied = HolderLocator(client, hints=[node.address])
                forged = os.urandom(20)
                lied._learn_ids([Peer(forged, *node.address)])
                assert chunk_id_of(bytes(await lied.fetch(chunk_id))) == chunk_id
                await lied.confirm([chunk_id])
                assert lied.node_ids[node.address] == node.dht_node.node_id
                [candidate] = lied.candidates(chunk_id, None)
                assert candidate.node_id == node.dht_node.node_id
                lied._learn_ids(
                    [Peer(forged, *node.address)]
                )  # a later lie does not undo the proof
                assert lied.node_ids[node.address] == node.dht_node.node_id
