"""Long-running peers: ``seed`` (a holder) and ``bootstrap`` (a DHT-only entry node), until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

from p2pmega.node import Node, NodeSettings
from p2pmega.replicate.holder import Duties, HolderDuties


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """While inside, SIGINT and SIGTERM set the returned event instead of killing the process.

    Installed before a node starts, so a signal that arrives during start-up still gives a clean stop.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def wait_for_stop_signal() -> None:
    """Return when SIGINT or SIGTERM arrives (a clean stop, exit 0, not an interruption)."""
    with stop_signals() as stop:
        await stop.wait()


async def run_node(
    settings: NodeSettings, *, report: Callable[[str], None], duties: HolderDuties | None = None
) -> str:
    """Run a peer until SIGINT/SIGTERM; ``report`` gets ``listening on ADDR:PORT`` and the minute summaries.

    A holder (``settings.holder``) runs ``duties`` (the production defaults when None); a bootstrap node only
    reports its summary.

    Returns:
        The node's last summary line, for the caller to log at exit.

    Raises:
        NetworkError: the address cannot be bound, or the network cannot be joined.
    """
    with stop_signals() as stop:
        made = Duties((duties or HolderDuties()) if settings.holder else None, report)
        async with Node(settings, duties=made) as node:
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            report(f"listening on {host}:{node.port}")
            await stop.wait()
            return made.line()
