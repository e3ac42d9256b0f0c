"""Share and fetch on testnets of growing size, healthy and with a fifth of the seeds SIGKILLed, in one run.

Usage: python bench/scale.py [--seeds 8,60,200] [--sizes 1KiB,64MiB] [--repeat 3] [--kill-fraction 0.2]
                             [--settle-s 20] [--no-warm]

For each network size (8 = 4 countries x 2, 60 = 12 x 5, 200 = 10 x 20, else 10 countries): the testnet's start-up
time and memory per seed; then per file size the wall time of ``share`` and of ``fetch`` as commands (process
start included, median of --repeat, peak RSS of the slowest), and the messages one in-process share and fetch of
that size sent per chunk (DHT requests + transfer requests; connections opened, each a channel handshake, beside
them). Then --kill-fraction of the seeds (spread over every country, a seeded choice) get SIGKILL and the same is
measured again: a fetch of a file shared while all were up, and new shares and fetches. At the end, the crawls the
seeds' announcements ran (each seed's last summary line, at its stop; a SIGKILLed seed says nothing) per chunk
copy they announced, and so per share of each size. Issue 19's targets:
200-seed share/fetch within 1.3x the 8-seed times, within 1.5x of the healthy 200-seed figures once 20 % are
killed; messages per chunk during share at 200 seeds <= 1.5x those at 8.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from share_fetch import _compile_package, run_plain, run_with_rss, write_random

from p2pmega.api.common import NetSettings, client_node
from p2pmega.api.fetch import fetch_on
from p2pmega.api.share import ShareResult, share_on
from p2pmega.api.testnet import Peer, TestNet
from p2pmega.replicate.duties import ANNOUNCE_JITTER, ANNOUNCE_QUIET_S

TOPOLOGIES = {8: (4, 2), 60: (12, 5), 200: (10, 20)}
CODES = ("DE", "NZ", "IS", "CH", "FR", "NL", "SE", "NO", "FI", "DK", "AT", "BE", "ES", "PT", "IT")
_SIZE = re.compile(r"^(\d+)(KiB|MiB)$")
# A seed's last summary line (replicate/duties.py Summary), printed as it stops.
_ANNOUNCED = re.compile(r"^stopped: .*?(\d+) announcements?(?: \((\d+) crawls?\))?", re.MULTILINE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise SystemExit(f"--sizes: {text!r} is not like 1KiB or 64MiB")
    return int(match[1]) << (10 if match[2] == "KiB" else 20)


@dataclass
class Cost:
    """What one in-process command sent, per chunk of its file (manifest chunks included)."""

    chunks: int
    dht: int  # every DHT request, the id proofs included
    proofs: int  # of them, id proofs: challenges to nodes met for the first time (net/kademlia_protocol.py)
    transfer: int
    connections: int

    def per_chunk(self) -> str:
        n = max(self.chunks, 1)
        return (
            f"{(self.dht + self.transfer) / n:6.1f} msg/chunk (dht {self.dht / n:5.1f} of which id proofs "
            f"{self.proofs / n:4.1f}, transfer {self.transfer / n:5.1f}; {self.connections} connections)"
        )


# Every holder of a share announces its new chunks ANNOUNCE_QUIET_S to twice that after the share's last store: at
# 200 seeds ~66 crawls for 64 MiB, run by ~10 seed processes on the cores the next command runs on (in the field,
# on the holders' own machines). A series of commands starts once that is over and the machine is idle.
AFTER_SHARE_S = ANNOUNCE_QUIET_S * (1 + ANNOUNCE_JITTER) + 3.0
IDLE_FRACTION = 0.9


def _cpu_times() -> tuple[int, int]:
    """(busy, idle) jiffies of the whole machine so far."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, idle


async def quiet(since_share: float, *, limit_s: float = 60.0) -> tuple[float, bool]:
    """Wait until AFTER_SHARE_S passed since ``since_share`` (perf_counter) and the machine is idle.

    Returns:
        The seconds waited, and whether the machine went idle (False: it gave up after ``limit_s``).
    """
    start = time.perf_counter()
    await asyncio.sleep(max(0.0, since_share + AFTER_SHARE_S - start))
    while time.perf_counter() - start < limit_s:
        busy0, idle0 = _cpu_times()
        await asyncio.sleep(1.0)
        busy1, idle1 = _cpu_times()
        if idle1 - idle0 >= IDLE_FRACTION * (busy1 - busy0 + idle1 - idle0):
            return time.perf_counter() - start, True
    return time.perf_counter() - start, False


# A seed's first stores cost it more than later ones (fresh heap pages, first runs of the store path): measured at
# 200 fresh seeds, 5,000-30,000 minor page faults and 45-150 jiffies of seed CPU a 64 MiB share, against ~50 and
# 30-40 at 8 seeds, whose seeds are warm after the first share. In the field a seed pays that once in its life; on
# a fresh 200-seed testnet every share lands on seeds that never stored. --warm shares 64 MiB files first until
# this share of the seeds hold a chunk, so both networks are measured as networks in use.
# The warm-up's files stay: 5-10 GiB of copies at 200 seeds, which the seeds' repair rounds (every ~10 min) look
# after from then on, as they would on a network in use; the announcement tally at the end counts them too.
WARM_FRACTION = 0.95
WARM_MAX_SHARES = 80


def holding(net: TestNet) -> float:
    """The share of the live seeds that hold at least one chunk."""

    def holds(peer: Peer) -> bool:
        chunks = peer.data_dir / "store" / "chunks"
        return any(p.is_file() for p in chunks.glob("**/*")) if chunks.exists() else False

    seeds = [p for p in net.seeds if p.process is not None and p.process.returncode is None]
    return sum(holds(p) for p in seeds) / max(len(seeds), 1)


async def warm(
    net: TestNet, src: Path, client: list[str], env: dict[str, str]
) -> tuple[int, float]:
    """Share ``src`` until WARM_FRACTION of the seeds hold a chunk; (shares made, share holding)."""
    shares = 0
    while (
        held := await asyncio.to_thread(holding, net)
    ) < WARM_FRACTION and shares < WARM_MAX_SHARES:
        await asyncio.to_thread(run_plain, ["share", str(src), "--new", *client], env)
        shares += 1
    return shares, held


def _add(quieted: tuple[float, bool], waited: float, busy_starts: int) -> tuple[float, int]:
    return waited + quieted[0], busy_starts + (not quieted[1])


async def measured_share_fetch(
    net: NetSettings, src: Path, out: Path
) -> tuple[ShareResult, Cost, Cost]:
    """One share and one fetch of ``src`` in this process, each on its own joined node; their costs.

    The join is not counted (every command pays it once, whatever the file); what follows it is.
    """
    async with client_node(net) as node:
        stats = node.dht_node.stats
        dht0, proofs0, tr0 = stats.requests_sent, stats.proofs_sent, node.client.requests_sent
        conn0 = node.client.connections_opened
        result = await share_on(node, src, net=net, new=True)
        chunks = len(result.chunks)
        share_cost = Cost(
            chunks,
            stats.requests_sent - dht0,
            stats.proofs_sent - proofs0,
            node.client.requests_sent - tr0,
            node.client.connections_opened - conn0,
        )
    async with client_node(net) as node:
        stats = node.dht_node.stats
        dht0, proofs0, tr0 = stats.requests_sent, stats.proofs_sent, node.client.requests_sent
        await fetch_on(node, result.read_link, output=out, force=True)
        fetch_cost = Cost(
            chunks,
            stats.requests_sent - dht0,
            stats.proofs_sent - proofs0,
            node.client.requests_sent - tr0,
            node.client.connections_opened,
        )
    await asyncio.to_thread(out.unlink)
    return result, share_cost, fetch_cost


async def commands(
    src: Path, out: Path, client: list[str], env: dict[str, str], repeat: int
) -> tuple[float, float, float, float, str]:
    """Median wall times of ``share --new`` and ``fetch`` commands, the peak RSS of each, the last link."""
    shares, fetches, s_peak, f_peak, link = [], [], 0.0, 0.0, ""
    for _ in range(repeat):
        wall, rss, link = await asyncio.to_thread(
            run_with_rss, ["share", str(src), "--new", *client], env
        )
        shares.append(wall)
        s_peak = max(s_peak, rss)
        wall, rss, _ = await asyncio.to_thread(
            run_with_rss, ["fetch", link, "-o", str(out), "--force", *client], env
        )
        fetches.append(wall)
        f_peak = max(f_peak, rss)
        await asyncio.to_thread(out.unlink)
    return statistics.median(shares), statistics.median(fetches), s_peak, f_peak, link


async def round_trip(small: Path, out: Path, client: list[str], env: dict[str, str]) -> float:
    """A 1 KiB file shared then fetched, two commands: the wall time of both."""
    t = time.perf_counter()
    link = await asyncio.to_thread(run_plain, ["share", str(small), "--new", *client], env)
    await asyncio.to_thread(run_plain, ["fetch", link, "-o", str(out), "--force", *client], env)
    return time.perf_counter() - t


def choose_victims(net: TestNet, kept: list[ShareResult], fraction: float, seed: int) -> list[Peer]:
    """``fraction`` of the seeds, at random, such that every chunk of ``kept`` keeps a live holder.

    With two copies a chunk, a random fifth of the seeds would hold both copies of some chunk of a 64 MiB file
    most of the time, and that file would be lost whatever the software did; this keeps it fetchable and still
    kills one holder of many of its chunks.
    """
    rng = random.Random(seed)
    holders = [{h.address for h in c.holders} for r in kept for c in r.chunks]
    wanted = round(len(net.seeds) * fraction)
    victims: list[Peer] = []
    dead: set[tuple[str, int]] = set()
    for peer in rng.sample(net.seeds, len(net.seeds)):
        if len(victims) == wanted:
            break
        address = (peer.host, peer.port)
        if all(h - dead - {address} for h in holders):
            victims.append(peer)
            dead.add(address)
    return victims


def announce_crawls(net: TestNet) -> tuple[int, int, int]:
    """Over the seeds that stopped cleanly: how many, the chunk copies they announced, the crawls that took."""
    seeds = announced = crawls = 0
    for peer in net.seeds:
        text = peer.log_path.read_text(errors="replace")[peer.log_offset :]
        found = _ANNOUNCED.findall(text)
        if found:
            seeds += 1
            announced += int(found[-1][0])
            crawls += int(found[-1][1] or 0)  # a version before the count says nothing
    return seeds, announced, crawls


def seed_rss_mib(net: TestNet) -> float:
    total, count = 0, 0
    for peer in net.seeds:
        if peer.process is None or peer.process.returncode is not None:
            continue
        for line in Path(f"/proc/{peer.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                count += 1
    return total / 1024 / max(count, 1)


async def one_network(
    seeds: int,
    sizes: list[int],
    repeat: int,
    kill_fraction: float,
    work: Path,
    settle_s: float,
    warm_up: bool,
) -> None:
    countries, per = TOPOLOGIES.get(seeds, (10, max(1, seeds // 10)))
    base = work / f"net-{seeds}"
    t = time.perf_counter()
    async with TestNet(base_dir=base, countries=CODES[:countries], peers_per_country=per) as net:
        started_s = time.perf_counter() - t
        # The seeds' joins settle (their first table refreshes and id proofs): measured right after 200 started,
        # the same share took 0.59 s in one run and 1.30 s in the next, on 2 cores they all share.
        await asyncio.sleep(settle_s)
        print(
            f"\n== {len(net.seeds)} seeds ({countries} countries x {per}): started in {started_s:.1f} s, "
            f"{seed_rss_mib(net):.1f} MiB RSS per seed",
            flush=True,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}
        env.update(net.environment())
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        client = ["--data-dir", str(work / f"client-{seeds}")]
        settings = net.client_settings(work / f"api-{seeds}")
        files = {}
        for size in sizes:
            files[size] = work / f"file-{size}.bin"
            if not files[size].exists():
                await asyncio.to_thread(write_random, files[size], size)
        out = work / "out.bin"
        kept: dict[int, ShareResult] = {}
        copies: dict[int, int] = {}
        last_share = -AFTER_SHARE_S
        waited = 0.0
        busy_starts = 0  # series started on a machine that never went idle
        if warm_up:
            t = time.perf_counter()
            warm_src = work / "file-warm.bin"
            if not warm_src.exists():
                await asyncio.to_thread(write_random, warm_src, 64 << 20)
            made, held = await warm(net, warm_src, client, env)
            last_share = time.perf_counter()
            print(
                f"   warmed: {made} shares of 64 MiB in {last_share - t:.0f} s; {held:.0%} of the seeds hold chunks",
                flush=True,
            )
        for phase in ("healthy", "killed"):
            if phase == "killed":
                waited, busy_starts = _add(await quiet(last_share), waited, busy_starts)
                victims = choose_victims(net, list(kept.values()), kill_fraction, seeds)
                await net.kill(victims)
                print(
                    f"-- SIGKILLed {len(victims)} of {len(net.seeds)} seeds (each chunk of the files shared "
                    "before keeps one live holder)",
                    flush=True,
                )
                for size, shared in kept.items():
                    link = shared.read_link
                    wall, rss, _ = await asyncio.to_thread(
                        run_with_rss, ["fetch", link, "-o", str(out), "--force", *client], env
                    )
                    await asyncio.to_thread(out.unlink)
                    print(
                        f"{_label(size):>7} shared before the kill: fetch {wall:6.2f} s "
                        f"(peak RSS {rss:5.1f} MiB)",
                        flush=True,
                    )
            for size in sizes:
                waited, busy_starts = _add(await quiet(last_share), waited, busy_starts)
                share_s, fetch_s, s_rss, f_rss, link = await commands(
                    files[size], out, client, env, repeat
                )
                shared, s_cost, f_cost = await measured_share_fetch(settings, files[size], out)
                last_share = time.perf_counter()
                kept.setdefault(size, shared)
                copies[size] = sum(len(c.holders) for c in shared.chunks)
                print(
                    f"{_label(size):>7} {phase}: share {share_s:6.2f} s (RSS {s_rss:5.1f} MiB) "
                    f"fetch {fetch_s:6.2f} s (RSS {f_rss:5.1f} MiB)\n"
                    f"          share {s_cost.per_chunk()}\n          fetch {f_cost.per_chunk()}",
                    flush=True,
                )
            small = files[min(sizes)]
            waited, busy_starts = _add(await quiet(last_share), waited, busy_starts)
            trips = [await round_trip(small, out, client, env) for _ in range(max(repeat, 3))]
            print(
                f"   1 KiB round trip {phase} (share then fetch, two commands): median "
                f"{statistics.median(trips):.2f} s",
                flush=True,
            )
        print(
            f"   waited {waited:.0f} s in all for the announcements and an idle machine", flush=True
        )
        t = time.perf_counter()
    print(f"   stopped in {time.perf_counter() - t:.1f} s", flush=True)
    reporting, announced, crawls = await asyncio.to_thread(announce_crawls, net)
    per_copy = crawls / max(announced, 1)
    print(
        f"   announcements: {reporting} seeds announced {announced} chunk copies with {crawls} crawls "
        f"({per_copy:.2f} a copy: "
        + ", ".join(f"{_label(size)} share ~{per_copy * n:.0f}" for size, n in copies.items())
        + ")",
        flush=True,
    )


def _label(size: int) -> str:
    return f"{size >> 20}MiB" if size >= 1 << 20 else f"{size >> 10}KiB"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="8,60,200")
    parser.add_argument("--sizes", default="1KiB,64MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kill-fraction", type=float, default=0.2)
    parser.add_argument("--keep", type=Path, help="keep the work directory here")
    parser.add_argument(
        "--settle-s", type=float, default=20.0, help="wait after the network started (default 20)"
    )
    parser.add_argument(
        "--no-warm",
        dest="warm",
        action="store_false",
        help="measure on fresh seeds (by default 64 MiB files are shared first until 95 %% of the seeds hold chunks)",
    )
    args = parser.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    work = args.keep or Path(tempfile.mkdtemp(prefix="p2pmega-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(_compile_package)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; sizes {args.sizes}")
    try:
        for seeds in (int(s) for s in args.seeds.split(",")):
            await one_network(
                seeds, sizes, args.repeat, args.kill_fraction, work, args.settle_s, args.warm
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
