"""Long-running peers: ``seed`` (a holder) and ``bootstrap`` (a DHT-only entry node), until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from p2pmega.node import Node, NodeSettings


async def wait_for_stop_signal() -> None:
    """Return when SIGINT or SIGTERM arrives (a clean stop, exit 0, not an interruption)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_node(settings: NodeSettings, *, report: Callable[[str], None]) -> str:
    """Run a peer until SIGINT/SIGTERM; ``report`` gets ``listening on ADDR:PORT`` and the minute summaries.

    Returns:
        The node's last summary line, for the caller to log at exit.

    Raises:
        NetworkError: the address cannot be bound, or the network cannot be joined.
    """
    async with Node(settings, report=report) as node:
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        report(f"listening on {host}:{node.port}")
        await wait_for_stop_signal()
        return node.summary()
