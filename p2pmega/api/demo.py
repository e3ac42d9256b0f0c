"""``demo``: a 4-country testnet, a shared file, one country seized, the file fetched back intact, the holders
repairing it back to two countries, a second country seized, the file fetched intact again."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from p2pmega.api.check import CheckResult, ChunkHealth, check
from p2pmega.api.common import NetSettings
from p2pmega.api.fetch import fetch
from p2pmega.api.share import ChunkPlacement, ShareResult, share
from p2pmega.api.testnet import TestNet
from p2pmega.core.chunking import DEFAULT_CHUNK_SIZE
from p2pmega.core.words import counted
from p2pmega.errors import IntegrityError, RepairTimedOut

DEMO_FILE_BYTES = 6 * DEFAULT_CHUNK_SIZE + 12345  # a few chunks and a ragged end


# The demo's seeds check their chunks this often, so repair is seen within seconds (the default is 10 minutes).
DEMO_REPAIR_INTERVAL = "1s"
# How long the demo waits for the holders to repair after a seizure before it calls the step failed.
REPAIR_WAIT_S = 30.0


@dataclass(frozen=True)
class DemoReport:
    """What the demo saw, for the CLI to show."""

    shared: ShareResult
    seized: tuple[str, str]
    seized_peers: int
    repaired: CheckResult
    after: CheckResult
    fetched_bytes: int
    repair_s: float


class DemoHooks:
    """Callbacks through which the demo tells the CLI what is happening (api never prints)."""

    def __init__(
        self,
        step: Callable[[str], None],
        shared: Callable[[ShareResult], None],
        checked: Callable[[str, CheckResult], None],
    ) -> None:
        self.step = step
        self.shared = shared
        self.checked = checked


async def run_demo(work_dir: Path, hooks: DemoHooks) -> DemoReport:
    """Run the whole demo inside ``work_dir``; every peer it starts is stopped before it returns.

    Raises:
        P2PMegaError: the step that failed (the CLI names it).
    """
    seed_args = ["--repair-interval", DEMO_REPAIR_INTERVAL]
    async with TestNet(base_dir=work_dir / "testnet", seed_args=seed_args) as net:
        countries = ", ".join(net.countries)
        hooks.step(
            f"started a test network: 1 bootstrap node and {len(net.seeds)} storage peers in "
            f"{len(net.countries)} countries ({countries}), as separate processes on 127.C.N.1"
        )
        settings = net.client_settings(work_dir / "client")
        source = work_dir / "demo-file.bin"
        data = os.urandom(DEMO_FILE_BYTES)
        await asyncio.to_thread(source.write_bytes, data)
        hooks.step(f"sharing {source.name} ({len(data):,} bytes of random data)")
        shared = await share(source, net=settings)
        hooks.shared(shared)

        first = _most_held(shared.chunks)
        victims = net.peers_in(first)
        await net.kill(victims)
        hooks.step(
            f"seizure: every peer in {first} ({counted(len(victims), 'peer')}, holding copies of "
            f"{sum(1 for c in shared.chunks if any(h.country == first for h in c.holders))} of "
            f"{len(shared.chunks)} chunks) was killed"
        )
        out = work_dir / "fetched.bin"
        fetched = await _fetch_same(shared, settings, out, data)
        hooks.step(
            f"fetched the file back from the remaining {len(net.countries) - 1} countries: "
            f"{fetched:,} bytes, byte-identical (sha256 {hashlib.sha256(data).hexdigest()[:16]}…)"
        )

        hooks.step(
            "waiting for the holders to repair every chunk back to 2 countries (no sharer running)"
        )
        started = time.monotonic()
        repaired = await _wait_healthy(shared.keep_link, settings)
        repair_s = time.monotonic() - started
        hooks.checked(f"after the repair ({repair_s:.1f} s)", repaired)

        second = _most_held(repaired.chunks)
        more = net.peers_in(second)
        await net.kill(more)
        hooks.step(
            f"second seizure: every peer in {second} ({counted(len(more), 'peer')}) was killed"
        )
        fetched = await _fetch_same(shared, settings, out, data)
        hooks.step(
            f"fetched the file again from the 2 countries left: {fetched:,} bytes, byte-identical"
        )
        after = await check(shared.keep_link, net=settings)
        hooks.step("stopping every peer")
    return DemoReport(
        shared, (first, second), len(victims) + len(more), repaired, after, fetched, repair_s
    )


def _most_held(chunks: Iterable[ChunkPlacement | ChunkHealth]) -> str:
    """The country holding the most copies: the seizure that hurts most."""
    counts = Counter(h.country for c in chunks for h in c.holders if h.country)
    return counts.most_common(1)[0][0]


async def _fetch_same(shared: ShareResult, settings: NetSettings, out: Path, data: bytes) -> int:
    """Fetch the shared file to ``out`` (replacing it) and check it is ``data``; returns its size.

    Raises:
        IntegrityError: the fetched file differs.
    """
    await asyncio.to_thread(out.unlink, missing_ok=True)
    result = await fetch(shared.read_link, net=settings, output=out)
    fetched = await asyncio.to_thread(result.path.read_bytes)
    if hashlib.sha256(fetched).digest() != hashlib.sha256(data).digest():
        raise IntegrityError("demo: the fetched file differs from the shared one")
    return len(fetched)


async def _wait_healthy(link: str, settings: NetSettings) -> CheckResult:
    """``check`` until every chunk meets the rule again.

    Raises:
        RepairTimedOut: not within REPAIR_WAIT_S (naming how many chunks are still short).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPAIR_WAIT_S
    while True:
        result = await check(link, net=settings)
        if result.healthy:
            return result
        if loop.time() > deadline:
            raise RepairTimedOut(
                f"after {REPAIR_WAIT_S:.0f} s, {result.below} of {len(result.chunks)} chunks are still "
                "below 2 holders in 2 countries; see the peers' logs"
            )
        await asyncio.sleep(0.5)
