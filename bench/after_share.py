"""A fetch right after its share, against the same fetch once the holders are quiet, on one testnet.

Usage: python bench/after_share.py [--seeds 60] [--size 64MiB] [--rounds 5] [--quiet-s 30]

Each round: ``share --new`` (a command), at once ``fetch`` of its link (a command: "right after"), then --quiet-s of
nothing (the holders' announcements of that share run and end), then the same ``fetch`` again ("alone"). The ratio
of the two medians is what the holders' announcements cost a command run right after a share, with the machine's
other load in both. At the end, each seed's stop line gives the announcements it made and, where it says so, the
crawls they took. An A/B against another version of the code: put that version first on PYTHONPATH (the testnet's
seeds and the commands inherit it), e.g. ``git archive REV p2pmega | tar -x -C /tmp/old`` then
``PYTHONPATH=/tmp/old python bench/after_share.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

from scale import CODES, announce_crawls, parse_size
from share_fetch import _compile_package, run_with_rss, write_random

import p2pmega
from p2pmega.api.testnet import TestNet


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quiet-s", type=float, default=30.0)
    args = parser.parse_args()
    await asyncio.to_thread(_compile_package)
    per = max(1, args.seeds // 10)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores; p2pmega from {p2pmega.__file__}"
    )
    with tempfile.TemporaryDirectory(prefix="p2pmega-after-share-") as tmp:
        work = Path(tmp)
        src, out = work / "file.bin", work / "out.bin"
        await asyncio.to_thread(write_random, src, parse_size(args.size))
        async with TestNet(
            base_dir=work / "net", countries=CODES[:10], peers_per_country=per
        ) as net:
            await asyncio.sleep(2.0)  # the seeds' joins settle
            env = {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}
            env.update(net.environment())
            client = ["--data-dir", str(work / "client")]
            right_after, alone = [], []
            for n in range(args.rounds):
                _, _, link = await asyncio.to_thread(
                    run_with_rss, ["share", str(src), "--new", *client], env
                )
                fetch = ["fetch", link, "-o", str(out), "--force", *client]
                wall, _, _ = await asyncio.to_thread(run_with_rss, fetch, env)
                right_after.append(wall)
                await asyncio.sleep(args.quiet_s)
                wall, _, _ = await asyncio.to_thread(run_with_rss, fetch, env)
                alone.append(wall)
                print(
                    f"round {n + 1}: fetch right after the share {right_after[-1]:.2f} s, "
                    f"{args.quiet_s:.0f} s later {alone[-1]:.2f} s",
                    flush=True,
                )
        a, b = statistics.median(right_after), statistics.median(alone)
        print(
            f"{len(net.seeds)} seeds, {args.size}: fetch right after its share median {a:.2f} s, "
            f"alone {b:.2f} s ({a / b:.2f}x)"
        )
        reporting, announced, crawls = announce_crawls(net)
        print(
            f"{reporting} seeds announced {announced} chunk copies"
            + (f" with {crawls} crawls" if crawls else " (crawls not reported by this version)")
        )


if __name__ == "__main__":
    asyncio.run(main())
