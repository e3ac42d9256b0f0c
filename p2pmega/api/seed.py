"""``seed``'s options checked and resolved before the peer starts: a bad keep link stops it, not half-configures it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p2pmega.config import resolve_bloc_table, resolve_data_dir, resolve_geo_table
from p2pmega.core.duration import parse_duration
from p2pmega.core.geo import GeoTable
from p2pmega.core.magnet import KeepCap, parse_link
from p2pmega.defaults import MAX_LEASE_DAYS, NETWORK_RATE_BYTES_PER_MIN, NETWORK_SHARE
from p2pmega.errors import BadLink, BadOption, InputFileError
from p2pmega.replicate.holder import HolderDuties
from p2pmega.replicate.repair import RepairPolicy
from p2pmega.storage import DEFAULT_QUOTA_BYTES, parse_size
from p2pmega.storage.links import load_links
from p2pmega.storage.sources import SourceLimits

# A keep file is read whole at start; far more links than one seed keeps alive.
MAX_KEEP_FILE_BYTES = 16 * 1024 * 1024
DEFAULT_LIMITS = SourceLimits()


@dataclass(frozen=True)
class SeedOptions:
    geo: GeoTable | None
    quota_bytes: int
    duties: HolderDuties
    source_limits: SourceLimits = DEFAULT_LIMITS


def seed_options(
    *,
    geo_table: Path | None,
    quota: str | None,
    repair_interval: str,
    reannounce: str,
    gc_interval: str,
    keep: list[str],
    keep_file: Path | None,
    keep_mine: bool,
    lease_days: float,
    data_dir: Path | None,
    network_share: float = NETWORK_SHARE,
    network_rate: str | None = None,
    blocs: Path | None = None,
) -> SeedOptions:
    """Parse and check everything ``seed`` was given.

    Raises:
        BadOption: a duration, the lease, the network share or rate is malformed.
        BadLink: a ``--keep`` link or a ``--keep-file`` line is not a link (naming which).
        InputFileError: the keep file cannot be read.
        StorageError: ``--keep-mine`` and the data dir's link list is unreadable.
        BadGeoTable: the geo table is malformed.
        BadBlocTable: the bloc table is malformed.
    """
    if not 0 < lease_days <= MAX_LEASE_DAYS:
        raise BadOption(
            f"--lease-days {lease_days:g}: give more than 0 and at most {MAX_LEASE_DAYS:g} (the longest lease "
            "a holder grants)"
        )
    geo = resolve_geo_table(geo_table)
    caps: dict[bytes, KeepCap] = {}
    for n, link in enumerate(keep, start=1):
        cap = _keep_cap(link.strip(), f"--keep link {n}")
        caps.setdefault(cap.root, cap)
    if keep_file is not None:
        for cap in read_keep_file(keep_file):
            caps.setdefault(cap.root, cap)
    if keep_mine:
        for entry in load_links(resolve_data_dir(data_dir)):
            cap = _keep_cap(entry.link, f"link of {entry.name or entry.root[:12]} in links.json")
            caps.setdefault(cap.root, cap)
    duties = HolderDuties(
        geo=geo,
        gc_interval_s=parse_duration(gc_interval, option="--gc-interval"),
        reannounce_s=parse_duration(reannounce, option="--reannounce-interval"),
        repair=RepairPolicy(
            interval_s=parse_duration(repair_interval, option="--repair-interval"),
            blocs=resolve_bloc_table(blocs).mapping(),
        ),
        keep=tuple(caps.values()),
        keep_lease_s=lease_days * 86400,
    )
    rate = parse_size(network_rate) if network_rate else NETWORK_RATE_BYTES_PER_MIN
    limits = SourceLimits(network_share=network_share, rate_bytes_per_min=rate)
    return SeedOptions(geo, parse_size(quota) if quota else DEFAULT_QUOTA_BYTES, duties, limits)


def read_keep_file(path: Path) -> list[KeepCap]:
    """The links in ``path``, one per line; blank lines and ``#`` comments are skipped.

    Raises:
        InputFileError: the file cannot be read, or is too large.
        BadLink: a line is not a link (naming the file and line).
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEEP_FILE_BYTES + 1)
    except OSError as exc:
        raise InputFileError(f"--keep-file {path}: {exc.strerror}") from exc
    if len(data) > MAX_KEEP_FILE_BYTES:
        raise InputFileError(
            f"--keep-file {path} is over {MAX_KEEP_FILE_BYTES >> 20} MiB; split it"
        )
    caps = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            caps.append(_keep_cap(text, f"--keep-file {path} line {n}"))
    return caps


def _keep_cap(link: str, where: str) -> KeepCap:
    """The keep-alive capability of a read or keep-alive link: a read link's key is dropped here."""
    try:
        cap = parse_link(link)
    except BadLink as exc:
        raise BadLink(f"{where} is not a p2pmega link: {exc}") from exc
    return cap if isinstance(cap, KeepCap) else cap.keep_cap()
