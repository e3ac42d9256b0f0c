"""Shape the uplink of one loopback address with tc, as a slow home connection (Linux, root, iproute2).

Packets *from* the shaped address leave ``lo`` through an HTB class limited to the given rate, with a
queue of about one second, as a home router has; every other packet on ``lo`` bypasses the classes
(HTB's direct queue, unshaped), so other peers and other tests are not slowed down. Traffic *to*
the address is not shaped: only the uplink is slow, as on ADSL or cable.

Loopback's MTU is 64 KiB, so a 1 Mbit/s link would move in half-second lumps of one packet; a route
to the shaped address with ``advmss 1460`` makes its peers ask for Ethernet-sized segments instead,
as on a real link (advmss is what a host advertises in its SYN, so it must be on the way back).

Used by tests/integration/test_slow_uplink.py and bench/uplink.py. If a run was killed and left its
qdisc behind, remove it with ``tc qdisc del dev lo root`` and the route with
``ip route del local ADDRESS/32 dev lo table local``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

# Distinct from the peers' 127.C.N.1 (C <= 50 in a testnet), so nothing else sends from it.
SHAPED_HOST = "127.250.1.1"
_QUEUE_S = 1.0
_MIN_QUEUE_BYTES = 128 << 10  # loopback still sends GSO packets of up to ~64 KiB: room for two


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)


def shaping_unavailable() -> str | None:
    """Why loopback cannot be shaped here, or None if it can."""
    if os.geteuid() != 0:
        return "shaping the uplink needs root (tc qdisc on lo)"
    tc, ip = _tool("tc"), _tool("ip")
    if tc is None or ip is None:
        return "shaping the uplink needs tc and ip (iproute2)"
    shown = _run(tc, "qdisc", "show", "dev", "lo")
    if shown.returncode != 0:
        return f"tc qdisc show failed: {shown.stderr.strip()}"
    roots = [line for line in shown.stdout.splitlines() if " root " in f" {line} "]
    if any(not line.startswith("qdisc noqueue") for line in roots):
        return f"lo already has a root qdisc ({roots[0].strip()}); not touching someone else's"
    return None


@contextlib.contextmanager
def shaped_uplink(host: str, rate_kbit: int) -> Iterator[None]:
    """Limit what ``host`` (a loopback address) sends to ``rate_kbit`` kbit/s, until exit.

    Raises:
        RuntimeError: shaping is unavailable (see shaping_unavailable) or a tc command failed.
    """
    reason = shaping_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    tc, ip = _tool("tc"), _tool("ip")
    if tc is None or ip is None:
        raise RuntimeError("tc or ip disappeared")
    queue_bytes = max(int(rate_kbit * 1000 / 8 * _QUEUE_S), _MIN_QUEUE_BYTES)
    route = f"route {{}} local {host}/32 dev lo table local"
    steps = [
        f"{ip} {route.format('add')} mtu lock 1500 advmss 1460",
        f"{tc} qdisc add dev lo root handle 1: htb direct_qlen 10000",
        f"{tc} class add dev lo parent 1: classid 1:10 htb rate {rate_kbit}kbit ceil {rate_kbit}kbit",
        f"{tc} qdisc add dev lo parent 1:10 handle 10: bfifo limit {queue_bytes}",
        f"{tc} filter add dev lo parent 1: protocol ip prio 1 u32 match ip src {host}/32 flowid 1:10",
    ]
    done = 0
    try:
        for step in steps:
            result = _run(*step.split())
            if result.returncode != 0:
                raise RuntimeError(f"{step} failed: {result.stderr.strip()}")
            done += 1
        yield
    finally:
        # The qdisc goes with its class and filter; only what this call added is removed.
        if done >= 2:
            _run(tc, "qdisc", "del", "dev", "lo", "root")
        if done >= 1:
            _run(ip, *route.format("del").split())
