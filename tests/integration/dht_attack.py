"""Raw UDP attackers of a running testnet (issue 16): an add_providers flood, Sybil sockets, and probes.

They speak every DHT request shape a node may understand (protocol 1-2 ``[name, args]`` and protocol 3
``[3, name, args, padding]``), as an attacker would, so one test shows the attack working against an
old node and failing against a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncio_dgram
import umsgpack

from tests.integration.dht_helpers import FakeKey

Address = tuple[str, int]
PROTOCOL_3 = 3


def datagrams(name: str, args: list[Any], padding: bytes = b"") -> list[bytes]:
    """The request in both shapes: protocol 1-2, then protocol 3 (a node drops the one it does not speak)."""
    return [
        b"\x00" + os.urandom(20) + umsgpack.packb([name, args]),
        b"\x00" + os.urandom(20) + umsgpack.packb([PROTOCOL_3, name, args, padding]),
    ]


def parse_any_request(data: bytes) -> tuple[str, list[Any]]:
    body = umsgpack.unpackb(data[21:])
    if len(body) == 4 and body[0] == PROTOCOL_3:
        return body[1], body[2]
    return body[0], body[1]


def address_of(text: str) -> Address:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def rss_bytes(pid: int) -> int:
    """The resident set size of a process (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def ask(
    host: str, target: Address, name: str, args: list[Any], *, padding: bytes = b""
) -> tuple[int, int, Any]:
    """Send one request (both shapes) from a fresh socket at ``host``: (request bytes, reply bytes, reply body).

    The request counted is the shape that was answered (told apart by message id).

    Raises:
        TimeoutError: no answer within 2 s.
    """
    sock = await asyncio_dgram.bind((host, 0))
    try:
        sent = datagrams(name, args, padding)
        sizes = {d[1:21]: len(d) for d in sent}
        for d in sent:
            await sock.send(d, target)
        async with asyncio.timeout(2):
            while True:
                data, _ = await sock.recv()
                if data[:1] == b"\x01" and data[1:21] in sizes:
                    return sizes[data[1:21]], len(data), umsgpack.unpackb(data[21:])
    finally:
        sock.close()


async def flood(
    attackers: Sequence[str],
    targets: Sequence[Address],
    *,
    total: int,
    keys_per_datagram: int = 256,
) -> int:
    """``total`` add_providers requests of random keys, spread over attacker addresses and targets; returns bytes sent.

    Each attacker uses an id of its own network, so the cheap id filter does not stop it.
    """
    socks = [await asyncio_dgram.bind((host, 0)) for host in attackers]
    keys = [FakeKey(host) for host in attackers]
    sent = 0
    try:
        for i in range(total):
            a = i % len(socks)
            target = targets[(i // len(socks)) % len(targets)]
            batch = [os.urandom(20) for _ in range(keys_per_datagram)]
            for d in datagrams("add_providers", [keys[a].node_id, batch, 9000]):
                await socks[a].send(d, target)
                sent += len(d)
            if i % 64 == 0:
                await asyncio.sleep(0)  # let the Sybils' tasks run too
    finally:
        for s in socks:
            s.close()
    return sent


@dataclass
class Sybils:
    """``count`` sockets on one address. Each claims ``ids[i]`` in its pings and answers every lookup with the
    other Sybils, every find_providers with no record, every announcement with True (and forgets it)."""

    host: str
    count: int
    ids: list[bytes] = field(default_factory=list)
    socks: list[Any] = field(default_factory=list)
    keys: list[FakeKey] = field(default_factory=list)

    def contacts(self) -> list[list[Any]]:
        return [[i, self.host, s.sockname[1]] for i, s in zip(self.ids, self.socks, strict=True)][
            :20
        ]

    async def serve_one(self, index: int) -> None:
        sock, key = self.socks[index], self.keys[index]
        while True:
            data, addr = await sock.recv()
            if data[:1] != b"\x00":
                continue
            with contextlib.suppress(Exception):
                name, args = parse_any_request(data)
                reply: Any = None
                if name.endswith("ping"):
                    reply = self.ids[index]
                elif name == "id_proof":
                    reply = key.proof(
                        args
                    )  # a true proof of its key: its claimed id may still not match
                elif name.endswith("find_providers"):
                    reply = [1, [], self.contacts()]
                elif "find_" in name:
                    reply = self.contacts()
                elif name == "add_providers":
                    reply = [True] * len(args[1])
                elif name in ("add_provider", "store"):
                    reply = True
                if reply is not None:
                    await sock.send(b"\x01" + data[1:21] + umsgpack.packb(reply), addr)

    async def ping(self, targets: Sequence[Address]) -> None:
        """Each Sybil pings each target, claiming its id."""
        for sock, node_id in zip(self.socks, self.ids, strict=True):
            for target in targets:
                for d in datagrams("ping", [node_id]):
                    await sock.send(d, target)


@contextlib.asynccontextmanager
async def sybils(
    host: str, ids: Sequence[bytes] | None = None, count: int = 40
) -> AsyncIterator[Sybils]:
    """Start ``count`` Sybil sockets at ``host`` claiming ``ids`` (default: the true ids of their keys)."""
    swarm = Sybils(host, count)
    try:
        for i in range(count):
            swarm.socks.append(await asyncio_dgram.bind((host, 0)))
            swarm.keys.append(FakeKey(host))
            swarm.ids.append(ids[i] if ids is not None else swarm.keys[-1].node_id)
        tasks = [asyncio.create_task(swarm.serve_one(i)) for i in range(count)]
        try:
            yield swarm
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for s in swarm.socks:
            s.close()


def near(key: bytes, i: int) -> bytes:
    """An id next to ``key``: it differs in the last bytes only."""
    return key[:16] + (int.from_bytes(key[16:], "big") ^ (i + 1)).to_bytes(4, "big")
