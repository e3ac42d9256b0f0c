"""Immortal files on real processes (issue 14): a bootstrap node and 4 countries x 2 seeds, each seed checking
its chunks every 2 s. Files survive two seizures in a row with no sharer running, survive churn, and expire
unless someone keeps them alive."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from p2pmega.api.check import CheckResult, check
from p2pmega.api.common import NetSettings
from p2pmega.api.fetch import fetch
from p2pmega.api.share import ShareResult, share
from p2pmega.api.testnet import TestNet
from p2pmega.core.magnet import ReadCap, parse_link
from p2pmega.errors import NotFoundError
from tests.integration.cli_helpers import clean_env, run, stored_chunk_files

pytestmark = pytest.mark.integration

MIB = 1 << 20
# Repair rounds every 2 s (jittered by 20 %): a repair shows within a few rounds.
REPAIR = ["--repair-interval", "2s"]
REPAIR_WAIT_S = 60.0
TEST_TIMEOUT_S = 240.0


@asynccontextmanager
async def running(tmp_path: Path, *seed_args: str) -> AsyncIterator[tuple[TestNet, NetSettings]]:
    async with TestNet(base_dir=tmp_path / "net", seed_args=[*REPAIR, *seed_args]) as net:
        yield net, net.client_settings(tmp_path / "client")


async def share_bytes(
    tmp_path: Path, settings: NetSettings, name: str, data: bytes, **kwargs: float
) -> ShareResult:
    path = tmp_path / name
    await asyncio.to_thread(path.write_bytes, data)
    return await share(path, net=settings, **kwargs)  # type: ignore[arg-type]


async def fetched(shared: ShareResult, settings: NetSettings, out: Path) -> bytes:
    await asyncio.to_thread(out.unlink, missing_ok=True)
    result = await fetch(shared.read_link, net=settings, output=out)
    return await asyncio.to_thread(result.path.read_bytes)


async def wait_healthy(link: str, settings: NetSettings) -> CheckResult:
    """``check`` until the file meets the rule, within REPAIR_WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPAIR_WAIT_S
    while True:
        result = await check(link, net=settings)
        if result.healthy:
            return result
        assert loop.time() < deadline, f"{result.below} chunks still below the rule"
        await asyncio.sleep(0.5)


def most_held(results: list[CheckResult], among: list[str]) -> str:
    counts = Counter(h.country for r in results for c in r.chunks for h in c.holders)
    return max(among, key=lambda country: counts[country])


async def test_files_survive_two_seizures_with_repair_in_between(tmp_path: Path) -> None:
    sizes = [0, 1, MIB - 1, 3 * MIB + 12345, 20 * MIB]
    async with asyncio.timeout(TEST_TIMEOUT_S), running(tmp_path) as (net, settings):
        files = {size: os.urandom(size) for size in sizes}
        shared = {
            size: await share_bytes(tmp_path, settings, f"f{size}", data)
            for size, data in files.items()
        }
        first = most_held(
            [await check(s.keep_link, net=settings) for s in shared.values()], list(net.countries)
        )
        await net.kill(net.peers_in(first))
        for size, s in shared.items():
            assert await fetched(s, settings, tmp_path / "out") == files[size]

        # No sharer runs from here on: the holders repair on their own.
        repaired = [await wait_healthy(s.keep_link, settings) for s in shared.values()]
        left = [c for c in net.countries if c != first]
        assert all({h.country for c in r.chunks for h in c.holders} <= set(left) for r in repaired)
        env = clean_env(**net.environment())
        for s in shared.values():
            done = await asyncio.to_thread(
                run, "check", s.keep_link, "--json", "--data-dir", str(tmp_path / "cli"), env=env
            )
            assert done.returncode == 0, done.stderr
            for chunk in json.loads(done.stdout)["chunks"]:
                assert chunk["live_holders"] >= 2
                assert len(chunk["countries"]) >= 2
                # Repaired copies carry the lease the chunk had left: under the 30 days it was shared with.
                leases = [h["lease_remaining_s"] for h in chunk["holders"]]
                assert all(0 < left <= 30 * 86400 for left in leases), leases

        second = most_held(repaired, left)
        await net.kill(net.peers_in(second))
        for size, s in shared.items():
            got = await fetched(s, settings, tmp_path / "out")
            assert hashlib.sha256(got).digest() == hashlib.sha256(files[size]).digest()


async def test_fetches_finish_through_churn_and_repair_restores_the_rule(tmp_path: Path) -> None:
    rng = random.Random(14)
    async with asyncio.timeout(TEST_TIMEOUT_S), running(tmp_path) as (net, settings):
        data = os.urandom(6 * MIB + 777)
        shared = await share_bytes(tmp_path, settings, "churned", data)
        churn_done = asyncio.Event()

        async def churn() -> None:
            # 30 % of the seeds, one after another: killed, down for a while, restarted with their data.
            for peer in rng.sample(net.seeds, k=round(0.3 * len(net.seeds))):
                await asyncio.sleep(rng.uniform(0.2, 0.8))
                await net.kill([peer])
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                await net.restart([peer])
            churn_done.set()

        async def one_fetch(i: int) -> bytes:
            await asyncio.sleep(0.3 * i)
            return await fetched(shared, settings, tmp_path / f"out{i}")

        churning = asyncio.create_task(churn())
        results = await asyncio.gather(*(one_fetch(i) for i in range(10)))
        await churning
        assert churn_done.is_set()
        assert all(r == data for r in results)
        after = await wait_healthy(shared.keep_link, settings)
        assert all(len({h.country for h in c.holders}) >= 2 for c in after.chunks)


async def test_a_file_nobody_keeps_expires_and_a_kept_one_outlives_its_lease(
    tmp_path: Path,
) -> None:
    lease_s = 12.0
    async with (
        asyncio.timeout(TEST_TIMEOUT_S),
        running(tmp_path, "--gc-interval", "1s") as (
            net,
            settings,
        ),
    ):
        dropped = await share_bytes(tmp_path, settings, "dropped", os.urandom(MIB), lease_s=lease_s)
        kept_data = os.urandom(MIB + 5)
        kept = await share_bytes(tmp_path, settings, "kept", kept_data, lease_s=lease_s)
        keeper = await net.add_seed(
            net.countries[0], "--keep", kept.keep_link, "--lease-days", f"{120 / 86400:.8f}"
        )
        dropped_ids = {c.chunk_id.hex() for c in dropped.chunks}
        kept_ids = {c.chunk_id.hex() for c in kept.chunks}

        def on_disk() -> set[str]:
            return {p.name for p in stored_chunk_files(net.base_dir)}

        assert dropped_ids <= on_disk()
        assert kept_ids <= on_disk()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lease_s + 30
        while dropped_ids & on_disk():
            assert loop.time() < deadline, "expired chunks must be removed from every holder's disk"
            await asyncio.sleep(0.5)
        assert kept_ids <= on_disk(), "the kept file's chunks outlive their lease"
        health = await check(kept.keep_link, net=settings)
        leases = [left for c in health.chunks for left in c.leases_s]
        assert leases
        # Renewed to 120 s (+1: the holder rounds up), well past the 12 s the file was shared with.
        assert all(left is not None and lease_s < left <= 121 for left in leases), leases
        with pytest.raises(NotFoundError):
            await fetched(dropped, settings, tmp_path / "gone")
        assert await fetched(kept, settings, tmp_path / "alive") == kept_data

        # The keeper seed was only ever given the keep-alive link: the file key is nowhere in its files.
        cap = parse_link(kept.read_link)
        assert isinstance(cap, ReadCap)
        key_text = re.search(r"x\.key=([^&]+)", kept.read_link)
        assert key_text is not None
        for path in [keeper.log_path, *keeper.data_dir.rglob("*")]:
            if path.is_file():
                blob = path.read_bytes()
                assert cap.key not in blob, path
                assert key_text.group(1).encode() not in blob, path
