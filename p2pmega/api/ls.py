"""My shares: the links this data dir made (``links.json``), each file's health, keep-alive and forget.

The list behind ``p2pmega ls`` and the web app's "my files". Health is ``check`` run for every file on one
client node; keep-alive is one round of the keeper (replicate/keeper.py); forget drops a line from the list and
the file's share state (its key). The ``*_on`` forms run on a node the caller keeps (the web app's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pmega.api.check import CheckResult, check_on
from p2pmega.api.common import NetSettings, client_node
from p2pmega.core.geo import GeoTable
from p2pmega.core.ids import Address
from p2pmega.core.magnet import KeepCap, ReadCap, parse_link
from p2pmega.defaults import LEASE_S
from p2pmega.errors import BadLink, IntegrityError, NotFoundError
from p2pmega.node import Node
from p2pmega.replicate.keeper import Keeper
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.manifest import walk_manifest
from p2pmega.storage.links import LinkEntry, forget_link, load_links
from p2pmega.storage.share_state import remove_state, remove_states_of

# A file's health: every chunk (manifest included) on enough live holders in enough countries; some chunk below
# that (or of holders whose countries are unknown); some chunk, or the manifest, on no live holder at all.
HEALTHY = "healthy"
SHORT = "short"
MISSING = "missing"
# Files checked at once on the shared node: each check is a few batched questions per holder, so a handful
# keeps every holder busy without a burst of hundreds of connections for a long list.
CHECK_CONCURRENCY = 4


@dataclass(frozen=True)
class FileHealth:
    """What ``check`` found for one of my files, summed up for a list."""

    root: str  # hex, the key of the link list's entry
    health: str  # HEALTHY, SHORT or MISSING
    chunks: int = 0  # data and manifest chunks (0 when the manifest was not found)
    chunks_short: int = 0  # below the rule, live holders or not
    chunks_missing: int = 0  # on no live holder
    countries: tuple[str, ...] = ()  # where at least one chunk lives
    countries_unknown: bool = (
        False  # short only for want of known countries (a geo table would tell)
    )
    lease_left_s: int | None = (
        None  # the shortest lease a live holder reported: when the first copy lapses
    )
    problem: str | None = None  # why MISSING without a chunk list (the manifest's error)


@dataclass(frozen=True)
class KeepAliveResult:
    renewed: int  # (chunk, holder) leases renewed
    chunks: int
    healthy: int  # chunks meeting the rule after the renewal


async def my_files(data_dir: Path) -> list[LinkEntry]:
    """The links shared from this data dir (by CLI or web app), newest first.

    Raises:
        StorageError: the link list cannot be read.
    """
    entries = await asyncio.to_thread(load_links, data_dir)
    return sorted(entries, key=lambda e: e.shared_at, reverse=True)


def summarize_check(root: str, result: CheckResult) -> FileHealth:
    """One line of the list from a check's chunk-by-chunk answer."""
    if result.missing:
        health = MISSING
    elif result.healthy:
        health = HEALTHY
    else:
        health = SHORT
    leases = [s for c in result.chunks for s in c.leases_s if s is not None]
    return FileHealth(
        root=root,
        health=health,
        chunks=len(result.chunks),
        chunks_short=sum(1 for c in result.chunks if not c.meets_rule),
        chunks_missing=result.missing,
        countries=tuple(sorted({h.country for c in result.chunks for h in c.holders if h.country})),
        countries_unknown=not result.healthy and not result.below and not result.missing,
        lease_left_s=min(leases) if leases else None,
    )


async def health_of(
    entries: Sequence[LinkEntry], *, net: NetSettings, replicas: int = 2, min_countries: int = 2
) -> list[FileHealth]:
    """Check every entry's file on one client node, CHECK_CONCURRENCY at a time; results in ``entries`` order.

    A file whose manifest no holder has (or whose recorded link is damaged) is MISSING with its ``problem``;
    only a failure to reach the network at all fails the whole list.

    Raises:
        BootstrapFailed: no way into the network.
    """
    if not entries:
        return []
    caps = [_cap_or_error(e) for e in entries]
    hints: list[Address] = []
    for cap in caps:
        if not isinstance(cap, BadLink):
            hints.extend(h for h in cap.peers if h not in hints)
    async with client_node(net, hints=hints) as node:
        return await _health_on(
            node, entries, caps, geo=net.geo, replicas=replicas, min_countries=min_countries
        )


async def health_on(
    node: Node,
    entries: Sequence[LinkEntry],
    *,
    geo: GeoTable | None,
    replicas: int = 2,
    min_countries: int = 2,
) -> list[FileHealth]:
    """``health_of`` on a node already joined (the web app's), which it leaves running.

    Raises:
        BootstrapFailed: the node's join failed.
    """
    caps = [_cap_or_error(e) for e in entries]
    return await _health_on(
        node, entries, caps, geo=geo, replicas=replicas, min_countries=min_countries
    )


def _cap_or_error(entry: LinkEntry) -> ReadCap | KeepCap | BadLink:
    try:
        return parse_link(entry.link)
    except BadLink as exc:
        return exc


async def _health_on(
    node: Node,
    entries: Sequence[LinkEntry],
    caps: Sequence[ReadCap | KeepCap | BadLink],
    *,
    geo: GeoTable | None,
    replicas: int,
    min_countries: int,
) -> list[FileHealth]:
    sem = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def one(entry: LinkEntry, cap: ReadCap | KeepCap | BadLink) -> FileHealth:
        if isinstance(cap, BadLink):
            return FileHealth(entry.root, MISSING, problem=f"the recorded link is damaged: {cap}")
        async with sem:
            try:
                result = await check_on(
                    node, cap, geo=geo, replicas=replicas, min_countries=min_countries
                )
            except (NotFoundError, IntegrityError) as exc:
                return FileHealth(entry.root, MISSING, problem=str(exc))
        return summarize_check(entry.root, result)

    return list(await asyncio.gather(*(one(e, c) for e, c in zip(entries, caps, strict=True))))


async def keep_alive(link: str, *, net: NetSettings, lease_s: float = LEASE_S) -> KeepAliveResult:
    """Renew now, for ``lease_s``, every live holder's lease on the file's chunks: one round of the keeper.

    Raises:
        BadLink: the link is malformed.
        BootstrapFailed: no way into the network.
        ManifestNotFound: no holder has the manifest, so there is nothing to renew.
    """
    cap = parse_link(link)
    keep = cap.keep_cap() if isinstance(cap, ReadCap) else cap
    async with client_node(net, hints=keep.peers) as node:
        return await _keep_alive_on(node, keep, geo=net.geo, lease_s=lease_s)


async def keep_alive_on(
    node: Node, link: str, *, geo: GeoTable | None, lease_s: float = LEASE_S
) -> KeepAliveResult:
    """``keep_alive`` on a node already joined (the web app's), which it leaves running.

    Raises:
        BadLink: the link is malformed.
        BootstrapFailed: the node's join failed.
        ManifestNotFound: no holder has the manifest, so there is nothing to renew.
    """
    cap = parse_link(link)
    keep = cap.keep_cap() if isinstance(cap, ReadCap) else cap
    return await _keep_alive_on(node, keep, geo=geo, lease_s=lease_s)


async def _keep_alive_on(
    node: Node, keep: KeepCap, *, geo: GeoTable | None, lease_s: float
) -> KeepAliveResult:
    keeper = Keeper(node, [keep], geo, lease_s=lease_s)
    locator = HolderLocator(node, hints=keep.peers)
    try:
        # Walked here, not in the round: a round only logs a missing manifest and tries again next time.
        keeper.files[0].manifest = await walk_manifest(locator, keep)
    finally:
        await locator.close()
    (report,) = await keeper.round()
    return KeepAliveResult(keeper.renewed, report.examined, report.healthy)


async def forget(data_dir: Path, root: str) -> bool:
    """Drop file ``root`` from the link list and delete its share state; False if neither was there.

    So the file's key leaves the data dir (it stays wherever its link was given or kept). Holders keep its chunks
    until their leases end: forgetting stops this machine keeping it alive (``seed --keep-mine``) and listing it,
    and a new share of the same file starts afresh under a new key (a new link).

    Raises:
        StorageError: the link list cannot be read or written, or a share state cannot be removed.
    """
    listed = await asyncio.to_thread(forget_link, data_dir, root)
    removed = await asyncio.to_thread(remove_states_of, data_dir, root)
    return listed or removed > 0


async def discard_share_state(data_dir: Path, path: Path) -> None:
    """Delete the state of a share of ``path``, a file that is about to go (the web app's uploads).

    Its state could never resume or repeat a share, and holds the file's key: the link list keeps the link.

    Raises:
        StorageError: the state exists but cannot be removed.
    """
    await asyncio.to_thread(remove_state, data_dir, path)
