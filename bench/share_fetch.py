"""Share and fetch through the real console script on a local testnet (8 seeds in 4 countries).

Usage: python bench/share_fetch.py [--sizes-mib 256,1024] [--keep DIR] [--net-dir DIR] [--out-dir DIR]

Reports, per file size: share MiB/s and fetch MiB/s (wall time of the whole command, process start included), the
peak RSS of each command, and the time from starting `share` of a 1 KiB file to having it fetched. Beside them, the
machine's raw hash and cipher rates measured in the same run. Targets (issue 5): fetch >= 300 MiB/s and
share >= 150 MiB/s for 256 MiB, peak RSS <= 150 MiB at any size, 1 KiB round trip <= 0.5 s.

Every seed of the testnet stores on the same disk, and every stored chunk is fsynced (docs/STORAGE.md), so the
bench also measures that disk's durable write rate: share cannot beat it divided by the replica count (each
byte is written durably twice), nor fetch beat it (the output is fsynced before it is renamed into place).
``--net-dir /dev/shm/x --out-dir /dev/shm/y`` puts the seeds' stores and the fetched file on tmpfs instead,
which shows what the software does when the disk is not the limit, as with one disk per real peer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from p2pmega.api.fetch import fetch
from p2pmega.api.share import share
from p2pmega.api.testnet import TestNet
from p2pmega.core import crypto
from p2pmega.core.chunking import DEFAULT_CHUNK_SIZE

MIB = 1 << 20
# -P: the commands import the p2pmega this interpreter has installed, as the testnet's peers do (api/testnet.py),
# not a checkout in the directory the bench runs from.
P2PMEGA = [sys.executable, "-P", "-m", "p2pmega"]


def run_with_rss(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run a p2pmega command; return (wall seconds, peak RSS MiB, stdout).

    The peak is the child's own VmHWM, polled from /proc: wait4's ru_maxrss would also count this (large) bench
    process, whose memory high-water mark Linux hands on to children created with vfork.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [*P2PMEGA, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        peak_kib = 0
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kib = max(peak_kib, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(0.01)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"p2pmega {args[0]} failed: {err.read().decode()[-500:]}")
        return wall, peak_kib / 1024, out.read().decode().strip()


def run_plain(args: list[str], env: dict[str, str]) -> str:
    """Run a p2pmega command and return its stdout (no RSS polling: timing only)."""
    proc = subprocess.run(
        [*P2PMEGA, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"p2pmega {args[0]} failed: {proc.stderr[-500:]}")
    return proc.stdout.strip()


def raw_rates(data: bytes) -> tuple[float, float]:
    """MiB/s of the chunk hash and of sealing (AEGIS-256, format v2), 1 MiB at a time, on ``data``."""
    key = crypto.new_key()
    mib = len(data) / MIB
    view = memoryview(data)
    t = time.perf_counter()
    for off in range(0, len(data), DEFAULT_CHUNK_SIZE):
        crypto.hash_bytes(view[off : off + DEFAULT_CHUNK_SIZE])
    hash_rate = mib / (time.perf_counter() - t)
    chunks = [
        data[off : off + DEFAULT_CHUNK_SIZE] for off in range(0, len(data), DEFAULT_CHUNK_SIZE)
    ]
    t = time.perf_counter()
    for chunk in chunks:
        crypto.seal(key, chunk, b"bench")
    seal_rate = mib / (time.perf_counter() - t)
    return hash_rate, seal_rate


def chunk_write_rate(directory: Path, total: int = 256 * MIB) -> float:
    """MiB/s of 1 MiB files each fsynced, two writers at once (as two holders store chunks)."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)

    def files(prefix: str, count: int) -> None:
        for i in range(count):
            path = directory / f"{prefix}-{i}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
            path.unlink()

    start = time.perf_counter()
    writers = [threading.Thread(target=files, args=(f"w{n}", total // MIB // 2)) for n in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    return total / MIB / (time.perf_counter() - start)


def file_write_rate(directory: Path, total: int = 256 * MIB) -> float:
    """MiB/s of one file written and fsynced once (as fetch writes its output)."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)
    path = directory / "sequential"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(total // MIB):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    rate = total / MIB / (time.perf_counter() - start)
    path.unlink()
    return rate


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 16 * MIB)
            f.write(os.urandom(n))
            left -= n


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mib", default="256,1024")
    parser.add_argument("--keep", type=Path, help="keep the work directory here")
    parser.add_argument(
        "--net-dir", type=Path, help="where the seeds store (default: the work directory)"
    )
    parser.add_argument(
        "--out-dir", type=Path, help="where fetch writes (default: the work directory)"
    )
    parser.add_argument(
        "--dead-country",
        action="store_true",
        help="then SIGKILL one country's seeds and measure the 1 KiB round trip and a fetch again (issue 15)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="p2pmega-bench-"))
    extra_dirs: list[Path] = []
    work.mkdir(parents=True, exist_ok=True)
    try:
        hash_rate, seal_rate = raw_rates(os.urandom(256 * MIB))
        print(f"raw chunk hash (sha256)   {hash_rate:8.1f} MiB/s")
        print(f"raw AEGIS-256 seal        {seal_rate:8.1f} MiB/s")
        # Fresh subdirectories of --net-dir/--out-dir, removed at the end (never the given directory itself).
        net_dir = (
            args.net_dir / f"p2pmega-bench-net-{os.getpid()}" if args.net_dir else work / "net"
        )
        out_dir = args.out_dir / f"p2pmega-bench-out-{os.getpid()}" if args.out_dir else work
        extra_dirs.extend(d for d in (net_dir, out_dir) if not d.is_relative_to(work))
        out_dir.mkdir(parents=True, exist_ok=True)
        chunk_rate = await asyncio.to_thread(chunk_write_rate, net_dir / "disk-probe")
        print(
            f"durable writes where seeds store: {chunk_rate:.1f} MiB/s as fsynced 1 MiB chunk files "
            f"(share ceiling with 2 replicas: {chunk_rate / 2:.1f} MiB/s)"
        )
        out_file = await asyncio.to_thread(file_write_rate, out_dir / "disk-probe")
        print(
            f"durable writes where fetch writes: {out_file:.1f} MiB/s as one fsynced file (fetch ceiling)"
        )
        async with TestNet(base_dir=net_dir) as net:
            env = {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}
            env.update(net.environment())
            # Commands start as an installed p2pmega does: with bytecode caches. (Some environments set
            # PYTHONDONTWRITEBYTECODE, which makes every command recompile its sources: ~110 ms each here.)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            await asyncio.to_thread(_compile_package)
            if _installed_editable():
                print(
                    "p2pmega is installed in editable mode (pip install -e): every command also loads "
                    "the editable finder (~35 ms here); `pip install .` is what a user has"
                )
            client = ["--data-dir", str(work / "client")]
            small = work / "small.bin"
            small.write_bytes(os.urandom(1024))
            # First, on a network at rest: after the large files the seeds spend seconds writing back
            # and announcing gigabytes, and a 1 KiB round trip then measured 0.7-0.9 s instead of ~0.6.
            healthy_rt = await round_trips(small, work, client, env)
            print(
                f"1 KiB share start -> fetched, two commands: median {healthy_rt:.3f} s "
                "(each command includes Python start-up and imports)"
            )
            net_settings = net.client_settings(work / "client-api")
            rounds = []
            for i in range(5):
                t = time.perf_counter()
                shared = await share(small, net=net_settings, new=True)
                await fetch(shared.read_link, net=net_settings, output=work / f"api-{i}.bin")
                rounds.append(time.perf_counter() - t)
            rounds.sort()
            print(
                f"1 KiB share start -> fetched, in one process (api.share, api.fetch; each joins "
                f"the DHT anew): median {rounds[2]:.3f} s, best {rounds[0]:.3f} s"
            )
            for mib in sizes:
                src = work / f"file-{mib}.bin"
                await asyncio.to_thread(write_random, src, mib * MIB)
                s_wall, s_rss, link = await asyncio.to_thread(
                    run_with_rss, ["share", str(src), *client], env
                )
                out = out_dir / f"out-{mib}.bin"
                f_wall, f_rss, _ = await asyncio.to_thread(
                    run_with_rss, ["fetch", link, "-o", str(out), *client], env
                )
                same = await asyncio.to_thread(_same, src, out)
                print(
                    f"{mib:5d} MiB: share {mib / s_wall:7.1f} MiB/s ({s_wall:6.2f} s, peak RSS "
                    f"{s_rss:5.1f} MiB)  fetch {mib / f_wall:7.1f} MiB/s ({f_wall:6.2f} s, peak RSS "
                    f"{f_rss:5.1f} MiB)  identical={same}"
                )
                out.unlink()
                src.unlink()
            if args.dead_country:
                await dead_country(net, work, out_dir, client, env, healthy_rt, max(sizes))
    finally:
        if args.keep is None:
            for directory in (work, *extra_dirs):
                shutil.rmtree(directory, ignore_errors=True)


async def round_trips(
    small: Path, work: Path, client: list[str], env: dict[str, str], *, fresh: bool = False
) -> float:
    """Median of 7 1 KiB round trips (share then fetch, two commands); ``fresh``: a new data dir each time."""
    rounds = []
    for i in range(7):
        args = ["--data-dir", str(work / f"fresh-{os.urandom(4).hex()}")] if fresh else client
        t = time.perf_counter()
        # --new: the same unchanged file would otherwise give back its first link, uploading nothing.
        link = await asyncio.to_thread(run_plain, ["share", str(small), "--new", *args], env)
        await asyncio.to_thread(
            run_plain, ["fetch", link, "-o", str(work / f"small-{i}.bin"), "--force", *args], env
        )
        rounds.append(time.perf_counter() - t)
    return sorted(rounds)[3]


async def dead_country(
    net: TestNet,
    work: Path,
    out_dir: Path,
    client: list[str],
    env: dict[str, str],
    healthy_rt: float,
    mib: int,
) -> None:
    """The same file fetched before and after one country's seeds are SIGKILLed; 1 KiB round trips after."""
    src = work / "dead-country.bin"
    await asyncio.to_thread(write_random, src, mib * MIB)
    _wall, _rss, link = await asyncio.to_thread(run_with_rss, ["share", str(src), *client], env)
    out = out_dir / "dead-country-out.bin"
    before, _rss, _ = await asyncio.to_thread(
        run_with_rss, ["fetch", link, "-o", str(out), *client], env
    )
    out.unlink()
    victims = net.peers_in(net.countries[0])
    await net.kill(victims)
    after, _rss, _ = await asyncio.to_thread(
        run_with_rss, ["fetch", link, "-o", str(out), *client], env
    )
    out.unlink()
    src.unlink()
    small = work / "small.bin"
    dead_rt = await round_trips(small, work, client, env)
    fresh_rt = await round_trips(small, work, client, env, fresh=True)
    print(f"after SIGKILL of {net.countries[0]}'s {len(victims)} seeds:")
    print(
        f"  {mib} MiB fetch {mib / after:7.1f} MiB/s, healthy {mib / before:7.1f} MiB/s: {before / after:.2f}x the rate"
    )
    print(
        f"  1 KiB round trip median {dead_rt:.3f} s ({dead_rt / healthy_rt:.2f}x healthy {healthy_rt:.3f} s)"
    )
    print(
        f"  1 KiB round trip, fresh client data dir each time: median {fresh_rt:.3f} s ({fresh_rt / healthy_rt:.2f}x)"
    )


def _compile_package() -> None:
    import compileall

    import p2pmega

    compileall.compile_dir(Path(p2pmega.__file__).parent, quiet=1)


def _installed_editable() -> bool:
    """Whether this interpreter loaded pip's editable finder for p2pmega at start-up (a .pth file)."""
    return any(name.startswith("__editable__") and "p2pmega" in name for name in sys.modules)


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(16 * MIB), fb.read(16 * MIB)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    asyncio.run(main())
