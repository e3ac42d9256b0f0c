"""Share over an uplink shaped to 1 Mbit/s (tc on loopback), against real seed processes.

Issue 21: a timeout over a whole request, 8 stores in flight and marking a holder dead on its first
timeout made share fail on home uplinks. The transfer timeout here is short (3 s), so a timeout
that counts size instead of idle time fails within seconds; the network has exactly one holder per
country, so marking a single live holder dead makes placement impossible.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pmega.api.fetch import fetch
from p2pmega.api.share import share
from p2pmega.api.testnet import TestNet
from tests.shaping import SHAPED_HOST, shaped_uplink, shaping_unavailable

pytestmark = pytest.mark.integration

RATE_KBIT = 1000
# 6 data chunks of 128 KiB, two copies each: about 1.5 MiB up, 13 s at 1 Mbit/s. A whole store
# takes 8 s or more while 8 share the link, far over the 3 s transfer timeout.
FILE_BYTES = 768 << 10
CHUNK_BYTES = 128 << 10
TRANSFER_TIMEOUT_S = 3.0
SHARE_TIMEOUT_S = 120.0
FETCHER_HOST = "127.251.1.1"


@pytest.fixture
def slow_uplink() -> Iterator[str]:
    """SHAPED_HOST, with its uplink at RATE_KBIT; in CI shaping must work (fail, never skip)."""
    reason = shaping_unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the slow-uplink test shaped: {reason}")
        pytest.skip(reason)
    with shaped_uplink(SHAPED_HOST, RATE_KBIT):
        yield SHAPED_HOST


async def test_share_over_a_1_mbit_uplink_keeps_slow_holders_and_fetches_back(
    tmp_path: Path, slow_uplink: str
) -> None:
    src = tmp_path / "photos.tar"
    data = os.urandom(FILE_BYTES)
    src.write_bytes(data)
    async with TestNet(
        base_dir=tmp_path / "net", countries=("DE", "NZ"), peers_per_country=1
    ) as net:
        sharer = dataclasses.replace(
            net.client_settings(tmp_path / "sharer"),
            host=slow_uplink,
            transfer_timeout_s=TRANSFER_TIMEOUT_S,
        )
        async with asyncio.timeout(SHARE_TIMEOUT_S):
            shared = await share(src, net=sharer, chunk_size=CHUNK_BYTES)
        assert shared.chunk_count == FILE_BYTES // CHUNK_BYTES
        # Both seeds hold every chunk: none was dropped for being slow.
        seeds = {(p.host, p.port) for p in net.seeds}
        assert all({h.address for h in c.holders} == seeds for c in shared.chunks)
        fetcher = dataclasses.replace(net.client_settings(tmp_path / "fetcher"), host=FETCHER_HOST)
        async with asyncio.timeout(SHARE_TIMEOUT_S):
            await fetch(shared.read_link, net=fetcher, output=tmp_path / "back.tar")
    assert (tmp_path / "back.tar").read_bytes() == data
