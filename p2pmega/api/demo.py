"""``demo``: a 4-country testnet, a shared file, one country seized, the file fetched back intact."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2pmega.api.check import CheckResult, check
from p2pmega.api.fetch import fetch
from p2pmega.api.share import ShareResult, share
from p2pmega.api.testnet import TestNet
from p2pmega.core.chunking import DEFAULT_CHUNK_SIZE
from p2pmega.core.words import counted
from p2pmega.errors import IntegrityError

DEMO_FILE_BYTES = 6 * DEFAULT_CHUNK_SIZE + 12345  # a few chunks and a ragged end


@dataclass(frozen=True)
class DemoReport:
    """What the demo saw, for the CLI to show."""

    shared: ShareResult
    seized: str
    seized_peers: int
    after: CheckResult
    fetched_bytes: int


class DemoHooks:
    """Callbacks through which the demo tells the CLI what is happening (api never prints)."""

    def __init__(
        self,
        step: Callable[[str], None],
        shared: Callable[[ShareResult], None],
    ) -> None:
        self.step = step
        self.shared = shared


async def run_demo(work_dir: Path, hooks: DemoHooks) -> DemoReport:
    """Run the whole demo inside ``work_dir``; every peer it starts is stopped before it returns.

    Raises:
        P2PMegaError: the step that failed (the CLI names it).
    """
    async with TestNet(base_dir=work_dir / "testnet") as net:
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

        counts = Counter(h.country for c in shared.chunks for h in c.holders if h.country)
        seized = counts.most_common(1)[0][0]
        victims = net.peers_in(seized)
        await net.kill(victims)
        hooks.step(
            f"seizure: every peer in {seized} ({counted(len(victims), 'peer')}, holding copies of "
            f"{sum(1 for c in shared.chunks if any(h.country == seized for h in c.holders))} of "
            f"{len(shared.chunks)} chunks) was killed"
        )

        out = work_dir / "fetched.bin"
        result = await fetch(shared.read_link, net=settings, output=out)
        fetched = await asyncio.to_thread(result.path.read_bytes)
        if hashlib.sha256(fetched).digest() != hashlib.sha256(data).digest():
            raise IntegrityError("demo: the fetched file differs from the shared one")
        hooks.step(
            f"fetched the file back from the remaining {len(net.countries) - 1} countries: "
            f"{len(fetched):,} bytes, byte-identical (sha256 {hashlib.sha256(fetched).hexdigest()[:16]}…)"
        )
        after = await check(shared.keep_link, net=settings)
        hooks.step("stopping every peer")
    return DemoReport(shared, seized, len(victims), after, len(fetched))
