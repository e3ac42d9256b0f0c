"""The commands over my shares: ``ui`` (the local web app) and ``ls`` (the list and its health).

No ``from __future__ import annotations``: typer reads these annotations at run time (see base.py).
"""

from typing import TYPE_CHECKING, Annotated, Any

import typer

from p2pmega.cli.base import (
    BlocsOpt,
    BootstrapOpt,
    DataDirOpt,
    GeoOpt,
    HostOpt,
    _Command,
    _echo,
    _err,
    _net,
    _run,
    app,
)
from p2pmega.errors import NotFoundError, PlacementError

if TYPE_CHECKING:
    from p2pmega.api.ls import FileHealth
    from p2pmega.storage.links import LinkEntry
    from p2pmega.web.launch import Served

# web.server.DEFAULT_MAX_UPLOAD_BYTES as --help shows it (tests/unit/test_startup.py checks they agree).
DEFAULT_MAX_UPLOAD = "8GB"


@app.command(cls=_Command, name="ui")
def ui_cmd(
    port: Annotated[
        int,
        typer.Option("--port", help="Port on 127.0.0.1 (default: a free one).", show_default=False),
    ] = 0,
    no_open: Annotated[
        bool, typer.Option("--no-open", help="Do not open the page in a browser.")
    ] = False,
    max_upload: Annotated[
        str,
        typer.Option(
            "--max-upload",
            help="Largest file the page takes (it is copied into the data dir to be shared).",
        ),
    ] = DEFAULT_MAX_UPLOAD,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
    geo_table: GeoOpt = None,
    blocs: BlocsOpt = None,
    host: HostOpt = None,
) -> None:
    """Run a client node and the web app on 127.0.0.1, print its URL (the only line on stdout); stop with Ctrl-C.

    The page shares (pick or drop a file), fetches (paste a link, press Enter: your browser saves the file) and
    lists my files with their health, as share, fetch and ls do. Keys stay on this machine: the page talks only
    to this process, which needs the URL's random per-run token, and nothing is loaded from the internet.
    """
    from p2pmega.storage.sizes import parse_size
    from p2pmega.web.launch import serve

    def ready(served: "Served") -> None:
        _echo(served.url)
        import sys

        sys.stdout.flush()
        if not no_open:
            import threading
            import webbrowser

            # The browser opens a private file that redirects to the URL, so the token is not in its argv;
            # in a thread, since a console browser would otherwise hold the app up.
            threading.Thread(
                target=webbrowser.open, args=(served.opener.as_uri(),), daemon=True
            ).start()

    async def go() -> None:
        await serve(
            _net(bootstrap, data_dir, geo_table, host, blocs),
            port=port,
            max_upload_bytes=parse_size(max_upload),
            on_ready=ready,
        )

    _run(go())


@app.command(cls=_Command, name="ls")
def ls_cmd(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the list as JSON, read links included (they hold the keys: keep the output private).",
        ),
    ] = False,
    replicas: Annotated[
        int, typer.Option("--replicas", help="Copies every chunk should have.")
    ] = 2,
    min_countries: Annotated[
        int, typer.Option("--min-countries", help="Countries every chunk should span.")
    ] = 2,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
    geo_table: GeoOpt = None,
    blocs: BlocsOpt = None,
    host: HostOpt = None,
) -> None:
    """List the files shared from this data dir, with their health; exit 0 only if all are healthy.

    Healthy: every chunk, manifest included, is on --replicas live holders in --min-countries countries, as
    check says of one link.
    Exit 4 if some file has a chunk on no live holder, 6 if some file is below the rule or its holders'
    countries are unknown (pass --geo-table).
    """
    from p2pmega.api.ls import MISSING, SHORT, health_of, my_files

    async def go() -> "tuple[list[LinkEntry], list[FileHealth]]":
        net = _net(bootstrap, data_dir, geo_table, host, blocs)
        entries = await my_files(net.data_dir)
        return entries, await health_of(
            entries, net=net, replicas=replicas, min_countries=min_countries
        )

    entries, found = _run(go())
    if as_json:
        import json

        _echo(json.dumps(_ls_json(entries, found), indent=2))
    elif not entries:
        _err("no files shared from this data dir yet")
    else:
        _print_ls(entries, found)
    missing = [h for h in found if h.health == MISSING]
    short = [h for h in found if h.health == SHORT]
    if missing:
        _err(
            f"p2pmega: error: {_files(len(missing))} chunks on no live holder; "
            "they cannot be fetched whole"
        )
        raise typer.Exit(NotFoundError.exit_code)
    if short:
        from p2pmega.core.words import counted

        _err(
            f"p2pmega: error: {_files(len(short))} chunks below "
            f"{counted(replicas, 'holder')} in {counted(min_countries, 'country', 'countries')}"
        )
        raise typer.Exit(PlacementError.exit_code)


def _files(n: int) -> str:
    return "1 file has" if n == 1 else f"{n} files have"


def _ls_json(entries: "list[LinkEntry]", found: "list[FileHealth]") -> list[dict[str, Any]]:
    from datetime import UTC, datetime

    return [
        {
            "root": e.root,
            "name": e.name,
            "size": e.size,
            "shared_at": datetime.fromtimestamp(e.shared_at, UTC).isoformat(timespec="seconds"),
            "health": h.health,
            "chunks": h.chunks,
            "chunks_short": h.chunks_short,
            "chunks_missing": h.chunks_missing,
            "countries": list(h.countries),
            "countries_unknown": h.countries_unknown,
            "lease_left_s": h.lease_left_s,
            "problem": h.problem,
            "link": e.link,
        }
        for e, h in zip(entries, found, strict=True)
    ]


def _print_ls(entries: "list[LinkEntry]", found: "list[FileHealth]") -> None:
    from datetime import datetime

    from rich import box
    from rich.console import Console
    from rich.table import Table

    from p2pmega.core.duration import format_duration

    # Light borders and no wrapping but in names: a line per file, also in 80 columns.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", overflow="fold")
    for column in ("size", "shared", "health", "lease left", "countries"):
        table.add_column(column, no_wrap=True)
    for e, h in zip(entries, found, strict=True):
        health = h.health
        if h.chunks_short and h.chunks:
            health += f" ({h.chunks_short}/{h.chunks} chunks)"
        table.add_row(
            e.name or "-",
            f"{e.size:,}" if e.size is not None else "?",
            datetime.fromtimestamp(e.shared_at).strftime("%Y-%m-%d %H:%M"),
            health,
            format_duration(h.lease_left_s) if h.lease_left_s is not None else "?",
            ",".join(h.countries) or "-",
        )
    Console(soft_wrap=True).print(table)
