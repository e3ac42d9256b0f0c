"""A local multi-country network of real ``p2pmega`` processes on loopback, and the demo that uses it.

Peer N of country C listens on 127.C.N.1 (its own /24); a generated geo table maps 127.C.0.0/16 to the country.
The bootstrap node listens on 127.0.0.1, an address of no country.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p2pmega.api.common import NetSettings
from p2pmega.config import resolve_geo_table
from p2pmega.errors import BadOption, NetworkError, PeerStartFailed
from p2pmega.net.service import Service

DEFAULT_COUNTRIES = ("DE", "NZ", "IS", "CH")
# Loopback has room for 255 "countries" of 255 peers; the CLI keeps well inside that.
MAX_COUNTRIES = 50
MAX_PEERS_PER_COUNTRY = 50
# How long one peer may take from its spawn to listening. At most STARTING_AT_ONCE peers start at a time, so a
# 200-seed network on 2 cores gives each the same time as a small one (every start imports Python and p2pmega:
# ~0.4 s of CPU each, measured; all 200 at once took each far past this).
START_TIMEOUT_S = 30.0
STARTING_AT_ONCE = 8 * (os.cpu_count() or 1)
STOP_TIMEOUT_S = 10.0
BOOTSTRAP_HOST = "127.0.0.1"

_COUNTRY = re.compile(r"^[A-Z]{2}$")


def parse_countries(text: str) -> tuple[str, ...]:
    """``DE,NZ,IS`` -> ("DE", "NZ", "IS").

    Raises:
        BadOption: not 1-50 distinct two-letter codes.
    """
    codes = tuple(c.strip().upper() for c in text.split(",") if c.strip())
    if not codes or len(codes) > MAX_COUNTRIES or len(set(codes)) != len(codes):
        raise BadOption(
            f"--countries {text!r}: give 1 to {MAX_COUNTRIES} distinct codes, e.g. DE,NZ"
        )
    for code in codes:
        if not _COUNTRY.match(code):
            raise BadOption(f"--countries: {code!r} is not a two-letter country code")
    return codes


def free_port(host: str) -> int:
    """A port number free for both UDP and TCP on ``host`` (peers use one number for DHT and transfer)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise NetworkError(f"no free port on {host}")


@dataclass
class Peer:
    """One process of the test network."""

    name: str
    country: str | None
    host: str
    port: int
    data_dir: Path
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    args: list[str] = field(default_factory=list)  # the command it was started with, for a restart
    log_offset: int = 0  # where this run's lines start in its log (a restarted peer appends)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class TestNet(Service):
    """Starts a bootstrap node and ``peers_per_country`` seeds per country as real processes; stops them all."""

    __test__ = False  # not a pytest test class

    base_dir: Path
    countries: Sequence[str] = DEFAULT_COUNTRIES
    peers_per_country: int = 2
    quota: str | None = None
    seed_args: Sequence[str] = ()
    verbose: bool = False  # seeds log at INFO (repair rounds, GC) instead of WARNING
    bootstrap: Peer | None = None
    seeds: list[Peer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.peers_per_country <= MAX_PEERS_PER_COUNTRY:
            raise BadOption(
                f"--peers-per-country {self.peers_per_country}: give 1 to {MAX_PEERS_PER_COUNTRY}"
            )
        self.geo_table = self.base_dir / "geo-table.txt"

    @property
    def bootstrap_address(self) -> str:
        if self.bootstrap is None:
            raise RuntimeError("testnet not started")
        return self.bootstrap.address

    def client_settings(self, data_dir: Path) -> NetSettings:
        """How an in-process client (the demo, a benchmark) joins this network."""
        if self.bootstrap is None:
            raise RuntimeError("testnet not started")
        return NetSettings(
            bootstrap=[(self.bootstrap.host, self.bootstrap.port)],
            data_dir=data_dir,
            geo=resolve_geo_table(self.geo_table),
        )

    def environment(self) -> dict[str, str]:
        """What a client needs to use this network."""
        return {
            "P2PMEGA_BOOTSTRAP": self.bootstrap_address,
            "P2PMEGA_GEO_TABLE": str(self.geo_table),
        }

    async def start(self) -> None:
        """Start the bootstrap node, then every seed, and wait until each one listens.

        Raises:
            PeerStartFailed: a peer exited, or did not listen within START_TIMEOUT_S (its log is named).
        """
        await asyncio.to_thread(self._prepare)
        raise_open_files_limit()
        self.bootstrap = self._peer("bootstrap", None, BOOTSTRAP_HOST)
        await self._spawn(self.bootstrap, ["bootstrap"])
        await self._wait_listening([self.bootstrap])
        for c, code in enumerate(self.countries, start=1):
            for n in range(1, self.peers_per_country + 1):
                peer = self._peer(f"{code.lower()}{n}", code, f"127.{c}.{n}.1")
                self.seeds.append(peer)
        await self._start_all([(p, self._seed_command()) for p in self.seeds])
        await asyncio.to_thread(self._write_peer_list)

    async def _start_all(self, runs: Sequence[tuple[Peer, list[str]]]) -> None:
        """Spawn each peer with its arguments, STARTING_AT_ONCE at a time, each until it listens.

        Raises:
            PeerStartFailed: a peer exited, or did not listen within START_TIMEOUT_S of its spawn.
        """
        starting = asyncio.Semaphore(STARTING_AT_ONCE)

        async def one(peer: Peer, args: list[str]) -> None:
            async with starting:
                await self._spawn(peer, args)
                await self._wait_listening([peer])

        tasks = [asyncio.create_task(one(peer, args)) for peer, args in runs]
        try:
            await asyncio.gather(*tasks)
        finally:
            # The first failure ends the start: the peers not spawned yet are not spawned at all.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _seed_command(self, *extra: str) -> list[str]:
        args = ["seed", "--bootstrap", self.bootstrap_address, "--geo-table", str(self.geo_table)]
        if self.quota:
            args += ["--quota", self.quota]
        return [*args, *self.seed_args, *extra]

    async def add_seed(self, country: str, *extra: str) -> Peer:
        """Start one more seed in ``country`` (one of the network's), with extra ``seed`` options.

        Raises:
            PeerStartFailed: it exited, or did not listen within START_TIMEOUT_S.
        """
        c = self.countries.index(country) + 1
        n = 1 + max((int(p.host.split(".")[2]) for p in self.peers_in(country)), default=0)
        peer = self._peer(f"{country.lower()}{n}", country, f"127.{c}.{n}.1")
        self.seeds.append(peer)
        await self._spawn(peer, self._seed_command(*extra))
        await self._wait_listening([peer])
        await asyncio.to_thread(self._write_peer_list)
        return peer

    def _write_peer_list(self) -> None:
        """``peers.json``: every process of the network, so scripts and tests can stop single peers."""
        doc = {
            "version": 1,
            "bootstrap": self.bootstrap_address,
            "geo_table": str(self.geo_table),
            "peers": [
                {
                    "name": p.name,
                    "country": p.country,
                    "address": p.address,
                    "pid": p.process.pid if p.process else None,
                    "data_dir": str(p.data_dir),
                }
                for p in [*([self.bootstrap] if self.bootstrap else []), *self.seeds]
            ],
        }
        (self.base_dir / "peers.json").write_text(json.dumps(doc, indent=2) + "\n", "utf-8")

    def _prepare(self) -> None:
        (self.base_dir / "logs").mkdir(parents=True, exist_ok=True)
        lines = ["# p2pmega testnet: country C is 127.C.0.0/16"]
        lines += [f"127.{c}.0.0/16 {code}" for c, code in enumerate(self.countries, start=1)]
        self.geo_table.write_text("\n".join(lines) + "\n", "utf-8")

    def _peer(self, name: str, country: str | None, host: str) -> Peer:
        return Peer(
            name=name,
            country=country,
            host=host,
            port=free_port(host),
            data_dir=self.base_dir / "peers" / name,
            log_path=self.base_dir / "logs" / f"{name}.log",
        )

    async def restart(self, peers: Sequence[Peer]) -> None:
        """Start stopped (killed) peers again with their data dirs and commands, and wait until they listen.

        Raises:
            PeerStartFailed: a peer exited, or did not listen within START_TIMEOUT_S.
        """
        await self._start_all([(p, p.args) for p in peers])
        await asyncio.to_thread(self._write_peer_list)

    async def _spawn(self, peer: Peer, args: list[str]) -> None:
        # -P: the caller's working directory is not put on sys.path, so a p2pmega.py or p2pmega/ folder where the
        # user runs `demo` is never imported in place of the installed package; the child also runs in its own
        # data dir, not the caller's directory.
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "p2pmega",
            *(["-v"] if self.verbose else []),
            *args,
            "--host",
            peer.host,
            "--port",
            str(peer.port),
            "--data-dir",
            str(peer.data_dir),
            "--no-lan",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}
        await asyncio.to_thread(peer.data_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        peer.args = args
        log = await asyncio.to_thread(peer.log_path.open, "ab")
        try:
            peer.log_offset = log.tell()
            peer.process = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=peer.data_dir,
                start_new_session=True,  # Ctrl-C in the terminal reaches the testnet, which stops its peers
            )
        finally:
            log.close()

    async def _wait_listening(self, peers: Sequence[Peer]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        pending = list(peers)
        while pending:
            for peer in list(pending):
                text = await asyncio.to_thread(_read_text, peer.log_path, peer.log_offset)
                if f"listening on {peer.address}" in text:
                    pending.remove(peer)
                elif peer.process is not None and peer.process.returncode is not None:
                    last = text.strip().splitlines()[-1:] or ["(no output)"]
                    raise PeerStartFailed(
                        f"testnet peer {peer.name} exited with {peer.process.returncode}: {last[0]}; "
                        f"see {peer.log_path}"
                    )
            if pending and loop.time() > deadline:
                raise PeerStartFailed(
                    f"testnet peer {pending[0].name} did not start in {START_TIMEOUT_S:.0f} s; "
                    f"see {pending[0].log_path}"
                )
            if pending:
                await asyncio.sleep(0.05)

    async def kill(self, peers: Sequence[Peer]) -> None:
        """Stop peers abruptly (SIGKILL), as a seizure would."""
        for peer in peers:
            if peer.process is not None and peer.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    peer.process.send_signal(signal.SIGKILL)
        for peer in peers:
            if peer.process is not None:
                await peer.process.wait()

    def peers_in(self, country: str) -> list[Peer]:
        return [p for p in self.seeds if p.country == country]

    async def stop(self) -> None:
        """SIGTERM every peer, wait for clean exits, SIGKILL whatever is still running after STOP_TIMEOUT_S."""
        everyone = [*self.seeds, *([self.bootstrap] if self.bootstrap else [])]
        running = [
            p.process for p in everyone if p.process is not None and p.process.returncode is None
        ]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


def raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit; the peers it spawns inherit it.

    A client that shares to hundreds of seeds keeps a connection to each holder, and each seed one to each
    peer that stores on it; a soft limit of 1024 (common) is then near. The hard limit is what the system
    allows without privileges, so nothing is asked for that the user could not set with ``ulimit -n``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if (
        soft != hard
    ):  # on macOS an unlimited hard limit is refused (ValueError): keep the soft one then
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _read_text(path: Path, offset: int = 0) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
