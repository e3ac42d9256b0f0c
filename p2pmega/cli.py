"""The ``p2pmega`` command line: the only module that prints, reads argv or exits.

stdout carries only results (a link, a path, a report); progress, logs and errors go to stderr. Exit codes come
from the exception tree in errors.py; 130 means interrupted.

Every command pays for what this module imports before it parses its arguments, so it imports only typer and
errors.py: each command imports its use case (and asyncio, rich, json...) when it runs.
tests/unit/test_startup.py holds that line. No ``from __future__ import annotations`` here: typer would then
eval every command's annotations from strings on each run (~30 ms of compiling per command, measured); names
only imported for type checking are quoted instead.
"""

import contextlib
import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

# typer 0.28 (pinned) vendors click as typer._click and re-exports no UsageError; main() catches it.
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperCommand

from p2pmega import __version__, defaults
from p2pmega.errors import NotFoundError, P2PMegaError, PlacementImpossible

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence

    from rich.progress import Progress

    from p2pmega.api.check import CheckResult
    from p2pmega.api.common import NetSettings
    from p2pmega.api.seed import SeedOptions
    from p2pmega.api.share import ShareResult
    from p2pmega.core.placement import Candidate

T = TypeVar("T")

DEFAULT_PORT = 7847
# Defaults that --help shows. The modules that own them pull in the whole node (asyncio, the DHT, the store), which
# no command needs before its arguments are parsed, so they are repeated here; tests/unit/test_startup.py checks
# each one still equals its source.
DEFAULT_COUNTRIES = ("DE", "NZ", "IS", "CH")  # api.testnet.DEFAULT_COUNTRIES
DEFAULT_QUOTA_BYTES = 10 * 1000**3  # storage.DEFAULT_QUOTA_BYTES
# The defaults.*_S durations as --help shows them (core.duration.format_duration).
DEFAULT_REPAIR_INTERVAL = "10m"
DEFAULT_REANNOUNCE_INTERVAL = "12h"
DEFAULT_GC_INTERVAL = "10m"


class _Command(TyperCommand):
    """A command whose usage line names its arguments plainly: `share [OPTIONS] FILE`.

    typer 0.28 writes a required argument as `{FILE}`, which reads like a literal brace placeholder.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


app = typer.Typer(
    name="p2pmega",
    # Rich tracebacks can print local variables, i.e. keys: plain tracebacks only, and only for bugs.
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    # Plain click help and usage errors: typer's rich formatting imports rich and its markdown parser, which
    # made `--help` (and every usage error) cost 0.18 s more CPU than the command's own start-up.
    rich_markup_mode=None,
    help="Peer-to-peer encrypted file store: every chunk on two peers in two countries, no central server.",
)

_state = {"debug": False, "verbose": 0}

BootstrapOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--bootstrap",
        "-b",
        help="Entry node HOST:PORT (repeatable; any one suffices). Default: $P2PMEGA_BOOTSTRAP (comma-separated).",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where identity, saved contacts and stored chunks live. Default: $P2PMEGA_DATA_DIR or the user data dir.",
    ),
]
GeoOpt = Annotated[
    Path | None,
    typer.Option(
        "--geo-table",
        help="Country override table ('CIDR CC' per line). Default: $P2PMEGA_GEO_TABLE.",
    ),
]
HostOpt = Annotated[
    str | None,
    typer.Option(
        "--host",
        help="Local address to bind. Default: the address that routes to the bootstrap node.",
    ),
]


def _fail(exc: P2PMegaError) -> NoReturn:
    """One stderr line and the error's exit code (a traceback only with --debug)."""
    if _state["debug"]:
        raise exc
    _err(f"p2pmega: error: {exc}")
    raise typer.Exit(exc.exit_code) from None


def _configure_logging() -> None:
    """Logs go to stderr at the level -v/-vv asked for (set up only once a use case runs)."""
    import logging

    verbose = _state["verbose"]
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="p2pmega: %(name)s: %(message)s")
    # kademlia/rpcudp log keys and values at INFO; ours wrap them, so theirs stay quiet unless debugging.
    for noisy in ("kademlia", "rpcudp"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 3 else logging.CRITICAL)


def _run(coro: "Coroutine[Any, Any, T]", *, on_interrupt: "Callable[[], str] | None" = None) -> T:
    """Run a use case; turn our errors into one stderr line and their exit code.

    ``on_interrupt()`` is added to the Ctrl-C line: what was kept and how to go on.
    """
    import asyncio

    from p2pmega.allocator import tune_allocator

    # Chunk-sized buffers stay warm (p2pmega/allocator.py). Process-wide, so only the CLI does it, and only
    # for commands that move chunks (not --help or a usage error).
    tune_allocator()
    # entry.main turned the cycle collector off while the command's modules loaded: their objects
    # live as long as the process, and collecting them over and over cost ~14 ms a command here. Keep
    # them out of every later collection, and collect what the command itself leaves behind.
    gc.freeze()
    gc.enable()

    _configure_logging()
    try:
        return asyncio.run(coro)
    except P2PMegaError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _err(f"p2pmega: interrupted{'; ' + on_interrupt() if on_interrupt else ''}")
        raise typer.Exit(130) from None


def _net(
    bootstrap: list[str] | None, data_dir: Path | None, geo_table: Path | None, host: str | None
) -> "NetSettings":
    from p2pmega.api.common import NetSettings
    from p2pmega.config import resolve_bootstrap, resolve_data_dir, resolve_geo_table

    return NetSettings(
        bootstrap=resolve_bootstrap(bootstrap or []),
        data_dir=resolve_data_dir(data_dir),
        geo=resolve_geo_table(geo_table),
        host=host,
    )


def _echo(text: str) -> None:
    typer.echo(text)


def _err(text: str) -> None:
    typer.echo(text, err=True)


class _Bar:
    """A rich progress bar on a terminal; nothing (no control characters, and no rich import) otherwise."""

    def __init__(self, label: str) -> None:
        self.progress: Progress | None = None
        if not sys.stderr.isatty():
            return
        from rich import progress as rich_progress
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = rich_progress.Progress(
            TextColumn(label),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task(label, total=None)

    def __enter__(self) -> "_Bar":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total)


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logs on stderr (-vv: debug).")
    ] = 0,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of p2pmega errors.")
    ] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Peer-to-peer encrypted file store: every chunk on two peers in two countries, no central server."""
    if version:
        _echo(f"p2pmega {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        _echo(ctx.get_help())
        raise typer.Exit(0)
    _state["debug"] = debug
    _state["verbose"] = verbose


@app.command(cls=_Command, name="share")
def share_cmd(
    file: Annotated[
        Path, typer.Argument(help="The file to share.", metavar="FILE", show_default=False)
    ],
    replicas: Annotated[int, typer.Option("--replicas", help="Copies of every chunk.")] = 2,
    min_countries: Annotated[
        int, typer.Option("--min-countries", help="Distinct countries per chunk.")
    ] = 2,
    lease_days: Annotated[
        float, typer.Option("--lease-days", help="How long holders keep the chunks.")
    ] = defaults.LEASE_DAYS,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print links, sizes and every chunk's holders as JSON.")
    ] = False,
    new: Annotated[
        bool,
        typer.Option(
            "--new",
            help="Share again under a new key (a new link), even if FILE was shared unchanged.",
        ),
    ] = False,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
    geo_table: GeoOpt = None,
    host: HostOpt = None,
) -> None:
    """Encrypt FILE, store every chunk on holders in different countries, print the read link.

    Exits 0 only once every chunk and the manifest are confirmed stored on --replicas holders spanning
    --min-countries countries, no two in the same /24. Exit 6, before storing anything, if the storage peers
    found cannot meet that. Run again on the unchanged file, an interrupted share resumes and a finished one
    prints the same link without uploading (the state is kept in the data dir).
    """

    from p2pmega.api.share import share

    async def go() -> "ShareResult":
        net = _net(bootstrap, data_dir, geo_table, host)
        with _Bar("sharing") as bar:
            return await share(
                file,
                net=net,
                replicas=replicas,
                min_countries=min_countries,
                lease_s=lease_days * 86400,
                progress=bar.update,
                new=new,
            )

    def kept() -> str:
        return "the chunks stored so far are kept: run the same command again to resume"

    result = _run(go(), on_interrupt=kept)
    if result.status == "unchanged":
        _err(
            "already shared and unchanged since: same link, nothing uploaded (--new shares it again)"
        )
    elif result.status == "resumed":
        _err(
            f"resumed: {result.chunks_resumed} of {result.chunk_count} data chunks were already stored"
        )
    if as_json:
        import json

        _echo(json.dumps(_share_json(result), indent=2))
    else:
        from p2pmega.core.words import counted

        countries = sorted({h.country or "??" for c in result.chunks for h in c.holders})
        manifest = len(result.chunks) - result.chunk_count
        # chunk_count is the data chunks, as --json's "chunk_count"; the manifest's are named apart.
        _err(
            f"shared {result.size:,} bytes as {counted(result.chunk_count, 'data chunk')} and "
            f"{counted(manifest, 'manifest chunk')} on holders in "
            f"{counted(len(countries), 'country', 'countries')} ({', '.join(countries)})"
        )
        _echo(result.read_link)


def _share_json(result: "ShareResult") -> dict[str, Any]:
    from p2pmega.core.chunking import format_id

    return {
        "read_link": result.read_link,
        "keep_link": result.keep_link,
        "size": result.size,
        "chunk_count": result.chunk_count,
        "chunks": [
            {
                "id": format_id(c.chunk_id),
                "kind": c.kind,
                "index": c.index,
                "holders": [{"address": h.label(), "country": h.country} for h in c.holders],
            }
            for c in result.chunks
        ],
    }


@app.command(cls=_Command, name="fetch")
def fetch_cmd(
    link: Annotated[
        str,
        typer.Argument(
            help="The read link (magnet:?xt=urn:p2pmega:...).", metavar="LINK", show_default=False
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the file (default: ./NAME)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing output file.")
    ] = False,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
    geo_table: GeoOpt = None,
    host: HostOpt = None,
) -> None:
    """Download, verify and decrypt the file of LINK; print the path written.

    Chunks come in parallel from every holder, with failover. The file appears only when complete; run the same
    command again after an interruption and it resumes where it stopped. With no --bootstrap, no
    P2PMEGA_BOOTSTRAP and no saved contacts, the holders named in the link are the way into the network.
    """

    from p2pmega.api.fetch import fetch

    part: list[Path] = []

    async def go() -> Any:
        net = _net(bootstrap, data_dir, geo_table, host)
        with _Bar("fetching") as bar:
            return await fetch(
                link, net=net, output=output, force=force, progress=bar.update, on_part=part.append
            )

    def kept() -> str:
        # Asked when Ctrl-C comes, by which time fetch has named its partial file (or not begun one).
        if not part:
            return "nothing was written yet"
        return f"the partial file {str(part[0])!r} is kept: run the same command again to resume"

    result = _run(go(), on_interrupt=kept)
    _err(
        f"fetched {result.chunks_fetched} of {result.chunks_total} chunks "
        f"({result.chunks_resumed} already present), {result.size:,} bytes, all verified"
    )
    _echo(str(result.path))


@app.command(cls=_Command, name="check")
def check_cmd(
    link: Annotated[
        str,
        typer.Argument(
            help="A read link or a keep-alive link.", metavar="LINK", show_default=False
        ),
    ],
    replicas: Annotated[
        int, typer.Option("--replicas", help="Copies every chunk should have.")
    ] = 2,
    min_countries: Annotated[
        int, typer.Option("--min-countries", help="Countries every chunk should span.")
    ] = 2,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every chunk's live holders as JSON.")
    ] = False,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
    geo_table: GeoOpt = None,
    host: HostOpt = None,
) -> None:
    """List every chunk's live holders and their countries; exit 0 only if every chunk meets the rule.

    Exit 4 if some chunk has no live holder at all, 6 if some chunk is below the placement rule, or if its
    holders' countries are unknown (unknown never counts; pass --geo-table). With no --bootstrap, no
    P2PMEGA_BOOTSTRAP and no saved contacts, the holders named in the link are the way into the network.
    """

    from p2pmega.api.check import check

    async def go() -> "CheckResult":
        return await check(
            link,
            net=_net(bootstrap, data_dir, geo_table, host),
            replicas=replicas,
            min_countries=min_countries,
        )

    result = _run(go())
    if as_json:
        import json

        _echo(json.dumps(_check_json(result), indent=2))
    else:
        _print_check(result)
    if result.missing:
        from p2pmega.core.words import counted

        _err(
            f"p2pmega: error: {counted(result.missing, 'chunk')} {'has' if result.missing == 1 else 'have'} no live holder; "
            "the file cannot be fetched whole"
        )
        raise typer.Exit(NotFoundError.exit_code)
    if not result.healthy:
        _err(f"p2pmega: error: {_below_rule(result)}")
        raise typer.Exit(PlacementImpossible.exit_code)


def _below_rule(result: "CheckResult") -> str:
    """Why check fails the rule: chunks short of holders, and chunks whose holders' countries are unknown."""
    from p2pmega.core.words import counted

    total = len(result.chunks)
    unknown = result.countries_unknown
    # Unknown never counts as a country: without a table, loopback and private addresses have none.
    hint = (
        "add their networks to the geo table"
        if result.geo_table
        else "pass --geo-table FILE (or set P2PMEGA_GEO_TABLE) mapping their addresses to countries"
    )
    if not result.below:
        return (
            f"countries unknown: {unknown} of {total} chunks have {result.replicas} or more holders, but too few "
            f"of known country to confirm {result.min_countries} countries; {hint}"
        )
    line = (
        f"{result.below} of {counted(total, 'chunk')} {'is' if result.below == 1 else 'are'} below "
        f"{counted(result.replicas, 'holder')} in {counted(result.min_countries, 'country', 'countries')}"
    )
    if unknown:
        line += f"; {unknown} more have enough holders, but too few of known country: {hint}"
    return line


def _check_json(result: "CheckResult") -> dict[str, Any]:
    from p2pmega.core.chunking import format_id

    return {
        "root": format_id(result.root),
        "healthy": result.healthy,
        "survives_loss_of_any_country": result.survives_country_loss,
        "chunks": [
            {
                "id": format_id(c.chunk_id),
                "kind": c.kind,
                "index": c.index,
                "meets_rule": c.meets_rule,
                "countries_unknown": c.countries_unknown,
                "holders": [{"address": h.label(), "country": h.country} for h in c.holders],
            }
            for c in result.chunks
        ],
    }


def _print_check(result: "CheckResult") -> None:
    from rich.console import Console
    from rich.table import Table

    from p2pmega.core.chunking import short_id

    table = Table(title=f"file {short_id(result.root)}", show_lines=False)
    table.add_column("chunk")
    table.add_column("holders")
    table.add_column("countries")
    table.add_column("ok")
    for c in result.chunks:
        table.add_row(
            f"{c.kind} {c.index} {short_id(c.chunk_id)}",
            " ".join(h.label() for h in c.holders) or "-",
            ",".join(sorted({h.country or "??" for h in c.holders})) or "-",
            "yes" if c.meets_rule else "unknown" if c.countries_unknown else "NO",
        )
    Console(soft_wrap=True).print(table)
    if not result.healthy and not result.below:
        _echo(
            "countries unknown; whether the file meets the rule and survives the loss of any one country "
            "cannot be told"
        )
        return
    survive = "survives" if result.survives_country_loss else "does NOT survive"
    _echo(
        f"{'healthy' if result.healthy else 'UNHEALTHY'}; the file {survive} the loss of any one country"
    )


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


def main() -> None:
    """Console-script entry point: run the command, then leave without tearing the interpreter down.

    Tearing down (clearing every module, freeing what is left) took ~55 ms here, a sixth of a short
    share or fetch (issue 5's round trip). Skipping it loses nothing: a command returns only once
    its sockets are closed, its threads joined and what it wrote fsynced; logging writes straight
    to stderr; stdout and stderr are flushed here. A bug's traceback still takes the normal way.
    """
    gc.disable()  # as entry.main does, for callers that come here directly; _run turns it back on
    code: object
    try:
        # Not standalone: usage errors come back as exceptions, so they are worded like every other
        # error (one `p2pmega: error:` line, then where to look), not in click's own style.
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:  # plain `p2pmega`: its help, as `p2pmega --help` gives
        _echo(exc.format_message())
        code = 0
    except UsageError as exc:
        _err(f"p2pmega: error: {exc.format_message()}")
        if exc.ctx is not None:
            _err(f"Try '{exc.ctx.command_path} --help'.")
        code = exc.exit_code
    except typer.Abort:  # Ctrl-C outside a use case (click turns KeyboardInterrupt into Abort)
        _err("p2pmega: interrupted")
        code = 130
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        _err(str(code))
        code = 1
    try:
        sys.stdout.flush()
    except OSError:
        code = code or 120  # as Python exits when stdout cannot take the result (a closed pipe)
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)
