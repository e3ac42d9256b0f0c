"""The commands that run peers: ``seed``, ``bootstrap``, ``testnet`` and the ``demo``.

No ``from __future__ import annotations``: typer reads these annotations at run time (see base.py).
"""

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from p2pmega import defaults
from p2pmega.cli.base import (
    DEFAULT_COUNTRIES,
    DEFAULT_GC_INTERVAL,
    DEFAULT_PORT,
    DEFAULT_QUOTA_BYTES,
    DEFAULT_REANNOUNCE_INTERVAL,
    DEFAULT_REPAIR_INTERVAL,
    BlocsOpt,
    BootstrapOpt,
    DataDirOpt,
    GeoOpt,
    _Command,
    _echo,
    _err,
    _fail,
    _run,
    app,
)
from p2pmega.errors import P2PMegaError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from p2pmega.api.check import CheckResult
    from p2pmega.api.seed import SeedOptions
    from p2pmega.api.share import ShareResult
    from p2pmega.core.placement import Candidate


def _long_running(
    *,
    host: str,
    port: int,
    bootstrap: list[str] | None,
    data_dir: Path | None,
    lan: bool,
    seed: "SeedOptions | None",
) -> None:
    from p2pmega.api.service import run_node
    from p2pmega.config import resolve_bootstrap, resolve_data_dir
    from p2pmega.node import NodeSettings

    def report(line: str) -> None:
        _err(line)

    async def go() -> str:
        settings = NodeSettings(
            geo=seed.geo if seed else None,
            host=host,
            port=port,
            data_dir=resolve_data_dir(data_dir),
            bootstrap=tuple(resolve_bootstrap(bootstrap or [])),
            holder=seed is not None,
            quota_bytes=seed.quota_bytes if seed else DEFAULT_QUOTA_BYTES,
            source_limits=seed.source_limits if seed else None,
            lan=lan,
        )
        return await run_node(settings, report=report, duties=seed.duties if seed else None)

    last = _run(go())
    _err(f"stopped: {last}")


@app.command(cls=_Command, name="seed")
def seed_cmd(
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (UDP for the DHT, TCP for chunks).")
    ],
    port: Annotated[
        int, typer.Option("--port", help="Port for both the DHT (UDP) and transfers (TCP).")
    ] = DEFAULT_PORT,
    quota: Annotated[
        str | None,
        typer.Option(
            "--quota",
            help=(
                "Disk space for others' chunks, e.g. 10GB or 512MiB "
                f"(default {DEFAULT_QUOTA_BYTES // 1000**3} GB)."
            ),
        ),
    ] = None,
    network_share: Annotated[
        float,
        typer.Option(
            "--network-share",
            metavar="FRACTION",
            help=(
                "Most of the quota one sender's /24 (IPv6 /48) may fill, e.g. 0.25; "
                "1 lets one network fill it."
            ),
        ),
    ] = defaults.NETWORK_SHARE,
    network_rate: Annotated[
        str | None,
        typer.Option(
            "--network-rate",
            metavar="SIZE",
            help="Most bytes one /24 (/48) may store a minute, e.g. 1GiB (the default); 0: no limit.",
        ),
    ] = None,
    lan: Annotated[
        bool, typer.Option("--lan/--no-lan", help="Find peers on the local network by broadcast.")
    ] = True,
    repair_interval: Annotated[
        str,
        typer.Option(
            "--repair-interval",
            metavar="DURATION",
            help=(
                "How often to check that every held chunk still has 2 live holders in 2 countries, and repair it "
                "if not (and renew kept files); e.g. 2s, 10m, 1h. Jittered by 20%."
            ),
        ),
    ] = DEFAULT_REPAIR_INTERVAL,
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep",
            metavar="LINK",
            help=(
                "Keep this file alive: renew its chunks' leases on every holder and repair them (repeatable). "
                "A read or keep-alive link; only the keep-alive part is kept, so this seed never reads the file."
            ),
        ),
    ] = None,
    keep_file: Annotated[
        Path | None,
        typer.Option(
            "--keep-file",
            metavar="F",
            help="Keep alive every link in F, one per line (# comments).",
        ),
    ] = None,
    keep_mine: Annotated[
        bool,
        typer.Option(
            "--keep-mine", help="Keep alive every file shared from this data dir (its links.json)."
        ),
    ] = False,
    lease_days: Annotated[
        float, typer.Option("--lease-days", help="Lease to renew kept files' chunks to, in days.")
    ] = defaults.LEASE_DAYS,
    reannounce: Annotated[
        str,
        typer.Option(
            "--reannounce-interval",
            metavar="DURATION",
            help="How often held chunks are announced again.",
        ),
    ] = DEFAULT_REANNOUNCE_INTERVAL,
    gc_interval: Annotated[
        str,
        typer.Option(
            "--gc-interval", metavar="DURATION", help="How often expired chunks are removed."
        ),
    ] = DEFAULT_GC_INTERVAL,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
    geo_table: GeoOpt = None,
    blocs: BlocsOpt = None,
) -> None:
    """Run a storage peer until Ctrl-C/SIGTERM: hold others' encrypted chunks, serve them, announce them, and
    repair them back to two countries when holders vanish. With --keep/--keep-file/--keep-mine it also keeps
    those files alive past their lease."""
    from p2pmega.api.seed import seed_options

    try:
        options = seed_options(
            geo_table=geo_table,
            quota=quota,
            repair_interval=repair_interval,
            reannounce=reannounce,
            gc_interval=gc_interval,
            keep=keep or [],
            keep_file=keep_file,
            keep_mine=keep_mine,
            lease_days=lease_days,
            data_dir=data_dir,
            network_share=network_share,
            network_rate=network_rate,
            blocs=blocs,
        )
    except P2PMegaError as exc:
        _fail(exc)
    _long_running(
        host=host, port=port, bootstrap=bootstrap, data_dir=data_dir, lan=lan, seed=options
    )


@app.command(cls=_Command, name="bootstrap")
def bootstrap_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to bind (UDP).")],
    port: Annotated[int, typer.Option("--port", help="UDP port of the DHT.")] = DEFAULT_PORT,
    lan: Annotated[
        bool, typer.Option("--lan/--no-lan", help="Find peers on the local network by broadcast.")
    ] = True,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run a DHT-only entry node until Ctrl-C/SIGTERM; it holds no chunks."""
    _long_running(host=host, port=port, bootstrap=bootstrap, data_dir=data_dir, lan=lan, seed=None)


def _remove_temp_dir(base: Path, *, keep_logs: bool) -> None:
    """Remove a command's temporary folder; with ``keep_logs``, leave its ``*.log`` files.

    A test network's error names a peer's log, and the log says why the peer failed: after a failure it must
    outlive the folder the peers ran in.
    """
    import shutil

    if not keep_logs:
        shutil.rmtree(base, ignore_errors=True)
        return
    # Children sort after their folder, so in reverse each folder (``base`` last) comes after its contents.
    for path in sorted([base, *base.rglob("*")], reverse=True):
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):  # it holds a log
                path.rmdir()
        elif path.suffix != ".log":
            path.unlink(missing_ok=True)


@app.command(cls=_Command, name="testnet")
def run_testnet_cmd(
    countries: Annotated[
        str,
        typer.Option("--countries", help="Comma-separated country codes, one 127.C.0.0/16 each."),
    ] = ",".join(DEFAULT_COUNTRIES),
    peers_per_country: Annotated[
        int, typer.Option("--peers-per-country", help="Storage peers per country.")
    ] = 2,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Keep the network's files here (default: a temp dir, removed)."
        ),
    ] = None,
) -> None:
    """Start a local multi-country network (real processes on 127.C.N.1) until Ctrl-C.

    Prints the export lines to paste in another terminal, so share/fetch/check use it.
    """
    import shlex
    import tempfile

    from p2pmega.api.service import wait_for_stop_signal
    from p2pmega.api.testnet import TestNet, parse_countries

    try:
        codes = parse_countries(countries)
    except P2PMegaError as exc:
        _fail(exc)
    base = data_dir or Path(tempfile.mkdtemp(prefix="p2pmega-testnet-"))

    async def go() -> None:
        async with TestNet(
            base_dir=base, countries=codes, peers_per_country=peers_per_country
        ) as net:
            env = net.environment()
            _echo("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
            _err(
                f"testnet: bootstrap {net.bootstrap_address}, {len(net.seeds)} peers in "
                f"{', '.join(codes)}; logs in {base / 'logs'}; Ctrl-C stops everything"
            )
            await wait_for_stop_signal()
            _err("testnet: stopping every peer")

    failed = True
    try:
        _run(go())
        failed = False
    except typer.Exit as exc:
        failed = exc.exit_code != 130  # Ctrl-C is not a failure
        raise
    finally:
        if data_dir is None:
            # Each seed's store has 256 fan-out folders: 200 seeds leave ~50,000 entries, a minute or more to
            # remove on a slow disk, so say what the wait is.
            _err(f"testnet: removing {base}")
            _remove_temp_dir(base, keep_logs=failed)


@app.command(cls=_Command, name="demo")
def demo_cmd() -> None:
    """Show the whole idea in under a minute on a local 4-country network, then clean up.

    Shares a generated file, shows which countries hold each chunk, seizes every peer of one country, fetches the
    file back byte-identical, waits for the holders to repair every chunk back to two countries, seizes a second
    country and fetches the file byte-identical again.
    """
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from p2pmega.api.demo import DemoHooks, run_demo

    work = Path(tempfile.mkdtemp(prefix="p2pmega-demo-"))
    current = ["starting the test network"]

    def step(text: str) -> None:
        current[0] = text
        _echo(f"* {text}")

    def table(title: str, rows: list[tuple[str, str]]) -> None:
        grid = Table(title=title)
        grid.add_column("chunk")
        grid.add_column("holders (country)")
        for row in rows:
            grid.add_row(*row)
        Console(soft_wrap=True).print(grid)

    def holders(found: "Sequence[Candidate]") -> str:
        return ", ".join(f"{h.label()} ({h.country or '??'})" for h in found)

    def shown(result: "ShareResult") -> None:
        current[0] = "after sharing"
        table(
            "where each chunk lives",
            [(f"{c.kind} {c.index}", holders(c.holders)) for c in result.chunks],
        )

    def checked(title: str, result: "CheckResult") -> None:
        table(
            f"where each chunk lives {title}",
            [(f"{c.kind} {c.index}", holders(c.holders)) for c in result.chunks],
        )

    failed = True
    try:
        report = _run(run_demo(work, DemoHooks(step=step, shared=shown, checked=checked)))
        failed = False
    except typer.Exit as exc:
        failed = exc.exit_code != 130  # Ctrl-C is not a failure
        if exc.exit_code:
            kept = f"; the peers' logs are kept in {work}" if failed else ""
            _err(f"p2pmega: demo failed at step: {current[0]}{kept}")
        raise
    finally:
        _remove_temp_dir(work, keep_logs=failed)
    first, second = report.seized
    _echo(
        f"What happened: the file was encrypted on this machine and every chunk stored on 2 peers in 2 "
        f"different countries. Every peer in {first} was seized, yet all {report.fetched_bytes:,} bytes came "
        f"back intact from the other countries. With no sharer running, the holders copied every chunk that "
        f"had lost its {first} copy to a peer in another country ({report.repair_s:.1f} s), so when {second} "
        "was seized too, the file came back intact again."
    )
