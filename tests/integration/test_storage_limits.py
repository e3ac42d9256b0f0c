"""Storage is not a free dump (issue 16 item 4), on real seed processes: a holder stores only well-formed chunks
and never announces anything else, one /24 cannot fill a seed, and only the file's keepers can renew its chunks.

The attackers are TransferClients on their own loopback /24s (127.200-202.x.x), as an outsider on the internet.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from p2pmega import errors
from p2pmega.api.common import client_node
from p2pmega.api.fetch import fetch
from p2pmega.api.share import share
from p2pmega.api.testnet import TestNet
from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.crypto import new_key
from p2pmega.core.magnet import parse_link
from p2pmega.core.renewal import RenewCredential
from p2pmega.defaults import MAX_LEASE_S, NETWORK_SHARE
from p2pmega.net.transfer_client import TransferClient
from tests.chunk_bytes import shaped
from tests.integration.cli_helpers import stored_chunk_files

pytestmark = pytest.mark.integration

MIB = 1 << 20
QUOTA_BYTES = 64 * MIB
TEST_TIMEOUT_S = 120.0
ATTACKER = "127.200.1.1"
ATTACKER_NEIGHBOUR = "127.200.1.2"  # the same /24 as ATTACKER
OTHER_NETWORK = "127.201.1.1"
STRANGER = "127.202.1.1"
DAY_S = 86400


@asynccontextmanager
async def network(tmp_path: Path) -> AsyncIterator[TestNet]:
    async with TestNet(
        base_dir=tmp_path / "net", countries=("DE", "NZ"), peers_per_country=2, quota="64MiB"
    ) as net:
        yield net


def junk_chunks() -> list[bytes]:
    """Bytes that are no p2pmega chunk: empty, text, an unknown version, an unknown kind, too short for v2."""
    return [
        b"",
        b"this is not a chunk, just a file someone wants hosted for free\n" * 200,
        bytes((9, 0)) + os.urandom(4000),
        bytes((2, 7)) + os.urandom(4000),
        bytes((2, 0)) + os.urandom(50),
    ]


async def test_non_chunks_are_refused_and_never_announced(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S), network(tmp_path) as net:
        junk = junk_chunks()
        ids = [chunk_id_of(data) for data in junk]
        async with TransferClient(local_host=ATTACKER) as client:
            for seed in net.seeds:
                addr = (seed.host, seed.port)
                for chunk_id, data in zip(ids, junk, strict=True):
                    with pytest.raises(errors.BadChunk, match="not shaped like a stored chunk"):
                        await client.store(addr, chunk_id, data, 3600)
                assert await client.has(addr, ids) == [False] * len(ids)
        assert stored_chunk_files(net.base_dir) == []
        # A seed announces only what it stored: the DHT names no provider for any of them.
        async with client_node(net.client_settings(tmp_path / "client")) as node:
            for chunk_id in ids:
                assert await node.dht_node.find_providers(chunk_id) == []


async def fill_from(client: TransferClient, addr: tuple[str, int]) -> tuple[int, Exception]:
    """Store 1 MiB chunks until the holder refuses one; the bytes it took and the refusal."""
    stored = 0
    for _ in range(QUOTA_BYTES // MIB + 2):
        data = shaped(os.urandom(MIB))
        try:
            await client.store(addr, chunk_id_of(data), data, 3600)
        except errors.QuotaExceeded as exc:
            return stored, exc
        stored += len(data)
    raise AssertionError(f"the holder took {stored} bytes, its whole quota, and refused nothing")


async def test_one_network_cannot_fill_a_seed(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S), network(tmp_path) as net:
        seed = net.seeds[0]
        addr = (seed.host, seed.port)
        async with TransferClient(local_host=ATTACKER) as attacker:
            stored, refusal = await fill_from(attacker, addr)
        # Refused for its network's share, long before the quota: the seed has room for everyone else.
        assert isinstance(refusal, errors.SourceLimitExceeded)
        assert QUOTA_BYTES * NETWORK_SHARE - MIB < stored <= QUOTA_BYTES * NETWORK_SHARE
        # Another address of the same /24 is the same network.
        async with TransferClient(local_host=ATTACKER_NEIGHBOUR) as neighbour:
            data = shaped(os.urandom(MIB))
            with pytest.raises(errors.SourceLimitExceeded):
                await neighbour.store(addr, chunk_id_of(data), data, 3600)
        # Another /24 still stores there...
        async with TransferClient(local_host=OTHER_NETWORK) as other:
            data = shaped(os.urandom(MIB))
            assert await other.store(addr, chunk_id_of(data), data, 3600)
        # ...and an honest share completes and fetches.
        settings = net.client_settings(tmp_path / "client")
        source = tmp_path / "honest.bin"
        content = os.urandom(3 * MIB + 17)
        source.write_bytes(content)
        shared = await share(source, net=settings)
        fetched = await fetch(shared.read_link, net=settings, output=tmp_path / "out.bin")
        assert fetched.path.read_bytes() == content


async def test_only_the_files_keepers_renew_its_chunks(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S), network(tmp_path) as net:
        settings = net.client_settings(tmp_path / "client")
        source = tmp_path / "theirs.bin"
        source.write_bytes(os.urandom(MIB))
        shared = await share(source, net=settings, lease_s=DAY_S)
        placement = next(c for c in shared.chunks if len(c.holders) >= 2)
        chunk_id: ChunkId = placement.chunk_id
        first, second = placement.holders[:2]
        a, b = first.address, second.address

        async with TransferClient(local_host=STRANGER) as stranger:
            before = (await stranger.leases(a, [chunk_id]))[0]
            assert 0 < before <= DAY_S
            # An unsigned renewal from another network renews nothing.
            assert await stranger.renew(a, [chunk_id], MAX_LEASE_S) == [False]
            # Neither does one signed with a key that is not the file's.
            mine = RenewCredential.from_verify_key(new_key())
            far = math.ceil(time.time() + MAX_LEASE_S)
            assert await stranger.renew_signed(
                a, [chunk_id], holder_id=first.node_id, expiry_s=far, credential=mine
            ) == [False]
            # Nor storing the chunk again (anyone can fetch it): the lease stays as it was.
            data = bytes(await stranger.fetch(a, chunk_id))
            assert await stranger.store(a, chunk_id, data, MAX_LEASE_S) is False
            assert (await stranger.leases(a, [chunk_id]))[0] <= before

            # The keeper's credential (from the keep-alive link, which cannot read) renews.
            keeper = RenewCredential.of(parse_link(shared.keep_link))
            wanted = math.ceil(time.time() + 60 * DAY_S)
            assert await stranger.renew_signed(
                a, [chunk_id], holder_id=first.node_id, expiry_s=wanted, credential=keeper
            ) == [True]
            # (whole seconds, rounded up: the expiry is whole seconds, the holder's clock is not)
            assert 59 * DAY_S < (await stranger.leases(a, [chunk_id]))[0] <= 60 * DAY_S + 1

            # The same signed renewal replayed at another holder of the chunk is refused there.
            b_before = (await stranger.leases(b, [chunk_id]))[0]
            with pytest.raises(errors.BadSignature, match="does not verify"):
                await stranger.renew_signed(
                    b, [chunk_id], holder_id=first.node_id, expiry_s=wanted, credential=keeper
                )
            assert (await stranger.leases(b, [chunk_id]))[0] <= b_before
