"""Share and fetch over a shaped network: every peer in its own network namespace, upload rates set with tc.

Run as root on Linux with iproute2 (ip, tc), from the repository root:
``python bench/wan.py [--mib 64] [--runs 2] [--scenarios fast,slow,mix,uplink] [--python PATH] [--keep]``.

The network: a bridge with no address (the host takes no part), and a bootstrap node, 8 seeds (2 in each of 4
countries) and a client, each in its own namespace with one veth on the bridge, all in 10.77.0.0/16. Seed N of
country C is 10.77.{16*C+N}.1 (its own /24) and a geo table maps 10.77.{16*C}.0/20 to the country; the bootstrap
is 10.77.0.1 and the client 10.77.200.1, of no country. What a namespace sends is limited by a token bucket
(``tc tbf``) on its veth; what it receives is not, so each peer's upload is the only limit. Between scenarios
only the rates change.

Every scenario shares a fresh random file from the client (``p2pmega share --json``, which names every chunk's
holders) and then fetches it ``--runs`` times, each through the real console script in the client's namespace
(``ip netns exec``), timed as wall time of the whole command. Scenarios:

- fast: every seed uploads at 200 Mbit/s, the client at 1 Gbit/s;
- slow: one seed at 2 Mbit/s, seven at 200 Mbit/s (every chunk of the slow seed also sits on a fast one);
- mix: seeds at 10, 50 and 200 Mbit/s;
- uplink: seeds at 200 Mbit/s, the client (the sharer) at 50 Mbit/s.

Each time is printed as a ratio of its physical limit (limit / time; 1.0 is the best possible):

- fetch: the shortest time in which the holders, each at its own upload rate, can together send every chunk,
  given which holders hold which chunks and that a chunk comes whole from one holder (exact, by bisection on
  the time with an integral max flow from chunks to holders); the looser bound with chunks split between their
  holders is printed beside it. A fetch also pays a fixed cost (process start, joining, the manifest), so each
  scenario fetches a 1 KiB file too, and the ratio net of that is printed as well;
- share: one copy of the file over the client's uplink.

tbf counts Ethernet frames, so TCP's headers cost about 5 %: a ratio of 0.95 is already the wire's limit.
Stores and outputs go to --work-dir (default: a directory in /dev/shm), so the disk is not what is measured.
The namespaces, the bridge and every process are removed on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
MBIT = 1_000_000  # tc's "mbit" is 10^6 bits per second
COUNTRIES = ("DE", "NZ", "IS", "CH")
SEEDS_PER_COUNTRY = 2
PORT = 7847
BOOTSTRAP_HOST = "10.77.0.1"
CLIENT_HOST = "10.77.200.1"
PREFIX_LEN = 16
START_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 900.0
# The client's uplink when a scenario does not limit it: far above what the seeds send, so it never decides.
CLIENT_FAST_MBIT = 1000.0
# The bucket: at least 10 ms at the rate (one jiffy of the slowest timer) and at least two 64 KiB GSO segments,
# which a smaller bucket would have to split or drop.
MIN_BURST_BYTES = 128 << 10
QUEUE_LATENCY_MS = 100


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    seed_mbit: tuple[float, ...]  # one rate per seed, in seed order
    client_mbit: float = CLIENT_FAST_MBIT


def scenarios(seeds: int) -> dict[str, Scenario]:
    mix = (10.0, 50.0, 200.0)
    return {
        "fast": Scenario("fast", "all seeds at 200 Mbit/s", (200.0,) * seeds),
        "slow": Scenario(
            "slow", "one seed at 2 Mbit/s, the others at 200", (2.0,) + (200.0,) * (seeds - 1)
        ),
        "mix": Scenario(
            "mix", "seeds at 10/50/200 Mbit/s", tuple(mix[i % len(mix)] for i in range(seeds))
        ),
        "uplink": Scenario(
            "uplink", "seeds at 200 Mbit/s, sharer's uplink at 50", (200.0,) * seeds, 50.0
        ),
    }


@dataclass
class Host:
    """One namespace with one veth on the bridge, and the process running in it."""

    name: str
    namespace: str
    veth: str
    address: str
    country: str | None = None
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path = Path()
    log_path: Path = Path()

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{PORT}"


@dataclass
class Network:
    tag: str
    work: Path
    bridge: str
    hosts: list[Host] = field(default_factory=list)
    made_bridge: bool = False

    @property
    def bootstrap(self) -> Host:
        return self.hosts[0]

    @property
    def client(self) -> Host:
        return self.hosts[-1]

    @property
    def seeds(self) -> list[Host]:
        return self.hosts[1:-1]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def build(net: Network) -> None:
    """The bridge, one namespace per peer, addresses and a geo table (no shaping yet); ``net`` records each
    piece as it is made, so a failure half way is torn down too."""
    tag, work = net.tag, net.work
    plan: list[tuple[str, str, str | None]] = [("boot", BOOTSTRAP_HOST, None)]
    for c, code in enumerate(COUNTRIES, start=1):
        for n in range(1, SEEDS_PER_COUNTRY + 1):
            plan.append((f"{code.lower()}{n}", f"10.77.{16 * c + n}.1", code))
    plan.append(("client", CLIENT_HOST, None))
    net.made_bridge = True  # before the attempt: removing one never made is harmless
    sh("ip", "link", "add", net.bridge, "type", "bridge")
    sh("ip", "link", "set", net.bridge, "up")
    for i, (name, address, country) in enumerate(plan):
        host = Host(
            name=name,
            namespace=f"p2pw{tag}-{name}",
            veth=f"pw{tag}h{i}",
            address=address,
            country=country,
            data_dir=work / "peers" / name,
            log_path=work / "logs" / f"{name}.log",
        )
        sh("ip", "netns", "add", host.namespace)
        net.hosts.append(host)
        sh(
            "ip",
            "link",
            "add",
            host.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.namespace,
        )
        sh("ip", "link", "set", host.veth, "master", net.bridge, "up")
        inside = ("ip", "netns", "exec", host.namespace)
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0")
        sh(*inside, "ip", "link", "set", "eth0", "up")
        host.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    lines = ["# bench/wan.py: country C is 10.77.{16*C}.0/20"]
    lines += [f"10.77.{16 * c}.0/20 {code}" for c, code in enumerate(COUNTRIES, start=1)]
    (work / "geo-table.txt").write_text("\n".join(lines) + "\n", "utf-8")


def shape(host: Host, mbit: float) -> None:
    """Limit what ``host`` sends to ``mbit`` (a token bucket on its veth's egress)."""
    rate_bytes_s = mbit * MBIT / 8
    burst = max(MIN_BURST_BYTES, int(rate_bytes_s / 100))
    sh(
        "ip", "netns", "exec", host.namespace, "tc", "qdisc", "replace", "dev", "eth0", "root",
        "tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", f"{QUEUE_LATENCY_MS}ms",
    )  # fmt: skip


def teardown(net: Network) -> None:
    """Stop every process we started, then remove the namespaces (their veths go with them) and the bridge."""
    for host in net.hosts:
        proc = host.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
    for host in net.hosts:
        proc = host.process
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for host in net.hosts:
        sh("ip", "netns", "del", host.namespace, check=False)
    if net.made_bridge:
        sh("ip", "link", "del", net.bridge, check=False)


def p2pmega(python: str, host: Host, *args: str) -> list[str]:
    # -P: the installed p2pmega is imported, not a checkout in the working directory (as bench/share_fetch.py).
    return ["ip", "netns", "exec", host.namespace, python, "-P", "-m", "p2pmega", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}


def start_peers(net: Network, python: str) -> None:
    geo = str(net.work / "geo-table.txt")
    common = ["--port", str(PORT), "--no-lan"]
    boot = net.bootstrap
    spawn(boot, p2pmega(python, boot, "bootstrap", "--host", boot.address, *common,
                        "--data-dir", str(boot.data_dir)))  # fmt: skip
    wait_listening([boot])
    for seed in net.seeds:
        args = ["seed", "--host", seed.address, *common, "--data-dir", str(seed.data_dir)]
        args += ["--bootstrap", boot.endpoint, "--geo-table", geo]
        spawn(seed, p2pmega(python, seed, *args))
    wait_listening(net.seeds)


def spawn(host: Host, cmd: list[str]) -> None:
    with host.log_path.open("ab") as log:
        host.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=clean_env(),
            cwd=host.data_dir,
            start_new_session=True,  # Ctrl-C reaches the bench, which stops them in order
        )


def wait_listening(hosts: Sequence[Host]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = list(hosts)
    while pending:
        for host in list(pending):
            text = host.log_path.read_text("utf-8", errors="replace")
            if f"listening on {host.address}" in text:
                pending.remove(host)
            elif host.process is not None and host.process.poll() is not None:
                raise SystemExit(f"{host.name} exited: {text.strip()[-300:]}")
        if pending and time.monotonic() > deadline:
            raise SystemExit(f"{pending[0].name} did not start; see {pending[0].log_path}")
        time.sleep(0.05)


def run(net: Network, python: str, *args: str, log_to: Path | None = None) -> tuple[float, str]:
    """Run a client command in the client's namespace; (wall seconds, stdout). With ``log_to``, at -vv and
    its stderr saved there."""
    client = net.client
    cmd = p2pmega(python, client, *(["-vv"] if log_to else []), *args)
    cmd += ["--bootstrap", net.bootstrap.endpoint, "--geo-table", str(net.work / "geo-table.txt")]
    cmd += ["--host", client.address]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=clean_env(),
        cwd=client.data_dir,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    wall = time.perf_counter() - start
    if log_to is not None:
        log_to.write_bytes(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"p2pmega {args[0]} failed: {proc.stderr.decode()[-500:]}")
    return wall, proc.stdout.decode().strip()


def best_fetch_s(
    chunks: Sequence[tuple[int, Sequence[str]]], rate_of: dict[str, float], *, whole: bool
) -> float:
    """The shortest time the holders can send every chunk in, each at its rate (bytes/s).

    ``whole``: each chunk comes whole from one holder (as the protocol sends it), every chunk counted at the
    largest chunk's size; else chunks are divisible between their holders (a looser bound). Bisection on the
    time T: T is enough iff a flow source -> chunk -> holder -> sink (what it sends in T) carries every chunk.
    With whole chunks the capacities are whole numbers of chunks, so the max flow is whole too (integral flow
    theorem) and the bound is exact. Chunks with the same holders are merged first, so the graph stays tiny.
    """
    unit = max(size for size, _ in chunks)
    groups: dict[tuple[str, ...], int] = {}
    for size, holders in chunks:
        key = tuple(sorted(holders))
        groups[key] = groups.get(key, 0) + (1 if whole else size)
    total = sum(groups.values())
    lo, hi = 0.0, len(chunks) * unit / min(rate_of.values())
    for _ in range(60):
        mid = (lo + hi) / 2
        if whole:
            capacity = {h: float(int(r * mid / unit + 1e-9)) for h, r in rate_of.items()}
        else:
            capacity = {h: r * mid for h, r in rate_of.items()}
        if _max_flow(groups, capacity) >= total * (1 - 1e-9):
            hi = mid
        else:
            lo = mid
    return hi


def _max_flow(groups: dict[tuple[str, ...], int], capacity: dict[str, float]) -> float:
    """Max flow through a bipartite graph (groups of chunks -> holders), by augmenting paths (BFS)."""
    nodes = ["s", *(f"g{i}" for i in range(len(groups))), *capacity, "t"]
    cap: dict[tuple[str, str], float] = {}
    for i, (holders, size) in enumerate(groups.items()):
        cap[("s", f"g{i}")] = float(size)
        for h in holders:
            cap[(f"g{i}", h)] = float("inf")
    for h, c in capacity.items():
        cap[(h, "t")] = c
    adj: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in list(cap):
        adj[a].append(b)
        adj[b].append(a)
        cap.setdefault((b, a), 0.0)
    flow = 0.0
    while True:
        parent: dict[str, str] = {"s": "s"}
        queue = ["s"]
        while queue and "t" not in parent:
            a = queue.pop(0)
            for b in adj[a]:
                if b not in parent and cap[(a, b)] > 1e-9:
                    parent[b] = a
                    queue.append(b)
        if "t" not in parent:
            return flow
        path, b = [], "t"
        while b != "s":
            path.append((parent[b], b))
            b = parent[b]
        push = min(cap[e] for e in path)
        for a, b in path:
            cap[(a, b)] -= push
            cap[(b, a)] += push
        flow += push


@dataclass
class Result:
    scenario: Scenario
    share_s: float
    share_limit_s: float
    fetch_s: list[float]
    fetch_limit_s: float  # whole chunks
    fluid_limit_s: float  # chunks divisible between holders
    startup_s: float  # a 1 KiB fetch in the same network


def run_scenario(
    net: Network, python: str, sc: Scenario, mib: int, runs: int, debug_log: bool = False
) -> Result:
    for seed, mbit in zip(net.seeds, sc.seed_mbit, strict=True):
        shape(seed, mbit)
    shape(net.client, sc.client_mbit)
    shape(net.bootstrap, 200.0)
    src = net.work / f"{sc.name}.bin"
    src.write_bytes(os.urandom(mib * MIB))
    share_s, out = run(
        net, python, "share", str(src), "--json", "--data-dir", str(net.client.data_dir)
    )
    doc = json.loads(out)
    src.unlink()
    rate_of = {
        seed.endpoint: mbit * MBIT / 8 for seed, mbit in zip(net.seeds, sc.seed_mbit, strict=True)
    }
    chunk_size = 2 * MIB
    chunks = []
    for c in doc["chunks"]:
        if c["kind"] != "data":
            continue
        size = min(chunk_size, doc["size"] - c["index"] * chunk_size)
        chunks.append((size, [h["address"] for h in c["holders"]]))
    fetch_limit = best_fetch_s(chunks, rate_of, whole=True)
    fluid_limit = best_fetch_s(chunks, rate_of, whole=False)
    share_limit = mib * MIB / (sc.client_mbit * MBIT / 8)
    times = []
    for r in range(runs):
        dest = net.work / f"out-{sc.name}-{r}"
        log_to = net.work / "logs" / f"fetch-{sc.name}-{r}.log" if debug_log else None
        fetch_s, _ = run(
            net, python, "fetch", doc["read_link"], "-o", str(dest), "--force", log_to=log_to
        )
        if dest.stat().st_size != doc["size"]:
            raise SystemExit(f"fetch wrote {dest.stat().st_size} bytes, not {doc['size']}")
        dest.unlink()
        times.append(fetch_s)
    # What a fetch costs beyond moving the bytes (process start, joining, the manifest): a 1 KiB file's fetch.
    tiny = net.work / f"{sc.name}-tiny.bin"
    tiny.write_bytes(os.urandom(1024))
    _, out = run(net, python, "share", str(tiny), "--json", "--data-dir", str(net.client.data_dir))
    tiny_dest = net.work / f"out-{sc.name}-tiny"
    startup_s, _ = run(net, python, "fetch", json.loads(out)["read_link"], "-o", str(tiny_dest))
    tiny_dest.unlink()
    return Result(sc, share_s, share_limit, times, fetch_limit, fluid_limit, startup_s)


def report(results: Sequence[Result], mib: int) -> None:
    fast = next((r for r in results if r.scenario.name == "fast"), None)
    print(
        f"{mib} MiB, {len(results[0].fetch_s)} fetch runs per scenario; ratio = physical limit / time"
    )
    for r in results:
        print(f"\n{r.scenario.name}: {r.scenario.title}")
        print(
            f"  share  {r.share_s:6.2f} s  {mib / r.share_s:7.1f} MiB/s  "
            f"limit {r.share_limit_s:6.2f} s (one copy up)  ratio {r.share_limit_s / r.share_s:.2f}  "
            f"time/limit {r.share_s / r.share_limit_s:.2f}x"
        )
        print(
            f"  fetch limit {r.fetch_limit_s:.2f} s (best schedule of whole chunks; "
            f"{r.fluid_limit_s:.2f} s if chunks could be split), 1 KiB fetch {r.startup_s:.2f} s"
        )
        for t in r.fetch_s:
            vs_fast = f"  vs fast median {t / statistics.median(fast.fetch_s):.2f}x" if fast else ""
            net_s = max(t - r.startup_s, 1e-3)
            print(
                f"  fetch  {t:6.2f} s  {mib / t:7.1f} MiB/s  ratio {r.fetch_limit_s / t:.2f}  "
                f"net of the 1 KiB fetch {r.fetch_limit_s / net_s:.2f}{vs_fast}"
            )


@contextlib.contextmanager
def interrupts_as_exit() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt (even where SIGINT was ignored, as in a background
    job), so the network is always torn down."""

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main() -> int:
    names = list(scenarios(len(COUNTRIES) * SEEDS_PER_COUNTRY))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2, help="fetches per scenario")
    parser.add_argument("--scenarios", default=",".join(names), help=f"of {','.join(names)}")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose p2pmega runs")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument(
        "--debug-log",
        action="store_true",
        help="fetch with -vv; its stderr goes to logs/fetch-*.log",
    )
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := [s for s in chosen if s not in names]:
        parser.error(f"unknown scenarios {unknown}; choose from {names}")
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        print(
            "bench/wan.py: needs root and iproute2 (ip, tc) to build network namespaces",
            file=sys.stderr,
        )
        return 1
    shm = Path("/dev/shm")  # noqa: S108 (a private mkdtemp inside it, as the docstring says)
    base = args.work_dir or (shm if shm.is_dir() else Path(tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="p2pmega-wan-", dir=base))
    net: Network | None = None
    results: list[Result] = []
    try:
        with interrupts_as_exit():
            tag = str(os.getpid() % 100000)
            net = Network(tag=tag, work=work, bridge=f"p2pw{tag}")
            build(net)
            start_peers(net, args.python)
            table = scenarios(len(net.seeds))
            for name in chosen:
                results.append(
                    run_scenario(net, args.python, table[name], args.mib, args.runs, args.debug_log)
                )
                print(f"[{name} done]", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("bench/wan.py: interrupted; removing the network", file=sys.stderr)
        return 130
    finally:
        signal.signal(
            signal.SIGINT, signal.SIG_IGN
        )  # a second Ctrl-C must not leave namespaces behind
        if net is not None:
            teardown(net)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}", file=sys.stderr)
    report(results, args.mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
