"""Repair after a seizure: time until every chunk is back on 2 holders in 2 countries, and the bytes it moved.

Usage: python bench/repair.py [--mib 100] [--interval 2s] [--net-dir DIR]

A local testnet (8 seeds in 4 countries, each checking its chunks every --interval) gets one file of --mib MiB;
then every seed of the country holding the most copies is SIGKILLed, and `check` (the API call the CLI makes) is
repeated until the file meets the rule again, with no sharer running. Reports:

- seizure -> healthy: seconds from the SIGKILL to the first `check` that finds every chunk healthy;
- bytes moved: what the surviving holders copied (their repair log lines), over the minimum, which is every
  copy the seized seeds held (each left its chunk one copy short), measured on their disks.

Targets (issue 14): <= 30 s on a loopback testnet with a 2 s interval; <= 1.1x the minimum bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

from p2pmega.api.check import check
from p2pmega.api.share import share
from p2pmega.api.testnet import TestNet

MIB = 1 << 20
_PUSHED = re.compile(r"repair: .* \((\d+) bytes\)")


def chunk_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "store" / "chunks").rglob("*") if p.is_file())


async def bench(mib: int, interval: str, base: Path) -> None:
    async with TestNet(
        base_dir=base / "net", seed_args=["--repair-interval", interval], verbose=True
    ) as net:
        settings = net.client_settings(base / "client")
        source = base / "file.bin"
        source.write_bytes(os.urandom(mib * MIB))
        t = time.perf_counter()
        shared = await share(source, net=settings)
        print(f"shared {mib} MiB in {time.perf_counter() - t:.1f} s ({len(shared.chunks)} chunks)")
        counts = Counter(h.country for c in shared.chunks for h in c.holders)
        seized = max(net.countries, key=lambda country: counts[country])
        victims = net.peers_in(seized)
        minimum = sum(chunk_bytes(p.data_dir) for p in victims)
        survivors = [p for p in net.seeds if p not in victims]
        offsets = {p.name: p.log_path.stat().st_size for p in survivors}
        await net.kill(victims)
        seized_at = time.perf_counter()
        checks = 0
        while True:
            result = await check(shared.keep_link, net=settings)
            checks += 1
            if result.healthy:
                break
            await asyncio.sleep(0.25)
        healed_s = time.perf_counter() - seized_at
        # The rounds that repaired have logged by now; give a round in flight its line.
        await asyncio.sleep(1.0)
        moved = 0
        for p in survivors:
            with p.log_path.open("rb") as f:
                f.seek(offsets[p.name])
                moved += sum(int(m) for m in _PUSHED.findall(f.read().decode("utf-8", "replace")))
    print(f"seized {seized} ({len(victims)} seeds, {minimum / MIB:.1f} MiB of copies)")
    print(f"seizure -> healthy: {healed_s:.1f} s ({checks} checks)")
    print(f"bytes moved: {moved / MIB:.1f} MiB = {moved / minimum:.3f}x the minimum")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--interval", default="2s")
    parser.add_argument(
        "--net-dir", type=Path, default=None, help="where the testnet keeps its files"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.net_dir) as tmp:
        asyncio.run(bench(args.mib, args.interval, Path(tmp)))


if __name__ == "__main__":
    main()
