"""What share, fetch and check have in common: how a short-lived command joins the network as a client node."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pmega.config import local_address_towards
from p2pmega.core.blocs import DEFAULT_BLOCS, BlocTable
from p2pmega.core.geo import GeoTable
from p2pmega.core.ids import Address
from p2pmega.defaults import RPC_TIMEOUT_S, TRANSFER_TIMEOUT_S
from p2pmega.errors import BadOption, BootstrapFailed
from p2pmega.net.dht import load_contacts
from p2pmega.node import Node, NodeSettings


@dataclass(frozen=True, kw_only=True)
class NetSettings:
    """How a short-lived command (share, fetch, check) joins the network."""

    bootstrap: Sequence[Address] = ()
    data_dir: Path
    geo: GeoTable | None = None
    blocs: BlocTable = (
        DEFAULT_BLOCS  # jurisdiction blocs: placement prefers two, check reports them
    )
    host: str | None = None
    rpc_timeout_s: float = RPC_TIMEOUT_S
    transfer_timeout_s: float = (
        TRANSFER_TIMEOUT_S  # idle time: a transfer fails when no data moved for this long
    )
    lan: bool = False


def check_min_blocs(replicas: int, min_countries: int, min_blocs: int) -> None:
    """Raises: BadOption: ``min_blocs`` is neither 1 nor from ``min_countries`` to ``replicas``.

    Distinct blocs are distinct countries, so N blocs imply N countries; fewer blocs than countries (but more
    than one) would need both counted at once, which the placement rule does not do (docs/JURISDICTIONS.md).
    """
    if not (min_blocs == 1 or min_countries <= min_blocs <= replicas):
        raise BadOption(
            f"--min-blocs {min_blocs}: give 1 (prefer as many blocs as countries when the peers allow) or "
            f"from --min-countries ({min_countries}) to --replicas ({replicas})"
        )


def client_host(net: NetSettings) -> str:
    """The address a client binds: ``--host``, else the local address that routes to the first bootstrap node."""
    if net.host:
        return net.host
    if net.bootstrap:
        return local_address_towards(net.bootstrap[0])
    return "127.0.0.1"


@contextlib.asynccontextmanager
async def client_node(
    net: NetSettings, *, hints: Sequence[Address] = (), join_in_background: bool = False
) -> AsyncIterator[Node]:
    """A DHT-only node with a throwaway identity, joined to the network, stopped on exit.

    With ``join_in_background`` it is returned at once, joining while the caller starts on what needs no DHT
    (a link's hinted holders); every DHT lookup waits for the join.

    With no bootstrap node given, it joins through ``hints`` (a link's peer hints: holders, whose DHT port is
    their transfer port), then the saved contacts, so a link alone is enough to fetch or check a file even
    when the data dir remembers another network.

    Raises:
        BootstrapFailed: no bootstrap node, hint, saved contact or LAN peer answered (the join names them).
    """
    entry = tuple(net.bootstrap) or tuple(hints)
    if not entry and not await asyncio.to_thread(load_contacts, net.data_dir / "contacts.json"):
        raise BootstrapFailed(
            "no bootstrap node given; pass --bootstrap HOST:PORT or set P2PMEGA_BOOTSTRAP"
        )
    net = dataclasses.replace(net, bootstrap=entry)
    await asyncio.to_thread(net.data_dir.mkdir, parents=True, exist_ok=True)
    settings = NodeSettings(
        host=client_host(net),
        data_dir=net.data_dir,
        bootstrap=entry,
        holder=False,
        persistent_identity=False,
        lan=net.lan,
        rpc_timeout_s=net.rpc_timeout_s,
        transfer_timeout_s=net.transfer_timeout_s,
        join_in_background=join_in_background,
    )
    async with Node(settings) as node:
        yield node
