"""Placement by capacity on real seed processes (issue 18, item 2): seeds say their free space (SPACE), a full
seed gets no chunk and is never why a share fails, a nearly full one is weighted down, and a seed with twice
the room gets about twice the chunks.

A ``TestNet`` of real ``p2pmega seed`` processes with different ``--quota``; the sharer runs in-process so that
it can use small chunks (many chunks, little data). A seed offers one sharer's network a quarter of its quota.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import pytest

from p2pmega.api.share import share
from p2pmega.api.testnet import Peer, TestNet
from p2pmega.errors import PlacementImpossible

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

KIB = 1 << 10
CHUNK_BYTES = 128 * KIB
CHUNKS = 512
TEST_TIMEOUT_S = 400.0


def chunk_files(peer: Peer) -> int:
    return sum(1 for p in (peer.data_dir / "store" / "chunks").glob("**/*") if p.is_file())


async def test_placement_follows_the_free_space_seeds_report(tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(CHUNKS * CHUNK_BYTES))
    async with (
        asyncio.timeout(TEST_TIMEOUT_S),
        TestNet(
            base_dir=tmp_path / "net",
            countries=("DE", "NZ", "IS", "CH"),
            peers_per_country=2,
            quota="40GB",  # 10 GB for the sharer: weight 4 each
        ) as net,
    ):
        big = await net.add_seed("IS", "--quota", "80GB")  # 20 GB for the sharer: twice the room
        near = await net.add_seed("CH", "--quota", "4MiB")  # 1 MiB for the sharer: 7 chunks fit
        full = await net.add_seed("DE", "--quota", "256KiB")  # 64 KiB for the sharer: not one chunk
        # One country is enough here: the rule then only keeps two copies off one network, and the load
        # shows the weights alone (with two countries, the big seed's own country caps it too).
        result = await share(
            src,
            net=net.client_settings(tmp_path / "client"),
            chunk_size=CHUNK_BYTES,
            min_countries=1,
        )
    assert result.chunk_count >= CHUNKS
    load = Counter(h.host for c in result.chunks for h in c.holders)
    normal = [s for s in net.seeds if s not in (big, near, full)]
    mean = sum(load[s.host] for s in normal) / len(normal)
    # Weights 8 against 4: 1.85x expected (a seed holds at most one copy of a chunk); equal weights give
    # 0.66-1.39 at this many chunks, so this fails without capacity weights.
    assert 1.4 <= load[big.host] / mean <= 2.8, (load, mean)
    # The nearly full seed weighs 1/256 against 4 (about 0.1 copies expected); without weights it would
    # have been picked ~100 times and filled its 7 chunks. The full one is never a candidate.
    assert load[near.host] <= 2, load
    assert load[full.host] == 0, load
    assert chunk_files(near) == load[near.host]
    assert chunk_files(full) == 0


async def test_a_share_on_full_seeds_only_says_they_are_full(tmp_path: Path) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(os.urandom(300 * KIB))
    async with (
        asyncio.timeout(TEST_TIMEOUT_S),
        TestNet(
            base_dir=tmp_path / "net", countries=("DE", "NZ"), peers_per_country=1, quota="256KiB"
        ) as net,
    ):
        with pytest.raises(PlacementImpossible) as info:
            await share(src, net=net.client_settings(tmp_path / "client"))
        assert "every storage peer found is full: 2 peers" in str(info.value)
        assert all(s.host in str(info.value) for s in net.seeds)
        assert not any(chunk_files(s) for s in net.seeds)
