"""The commands that work on files: ``share``, ``fetch``, ``check``, and how their results are printed.

No ``from __future__ import annotations``: typer reads these annotations at run time (see base.py).
"""

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from p2pmega import defaults
from p2pmega.cli.base import (
    BlocsOpt,
    BootstrapOpt,
    DataDirOpt,
    GeoOpt,
    HostOpt,
    _Bar,
    _Command,
    _echo,
    _err,
    _fail,
    _net,
    _run,
    app,
)
from p2pmega.errors import BadLink, BadOption, NotFoundError, PlacementImpossible

if TYPE_CHECKING:
    from p2pmega.api.check import CheckResult
    from p2pmega.api.share import ShareResult


@app.command(cls=_Command, name="share")
def share_cmd(
    file: Annotated[
        Path,
        typer.Argument(
            help="The file or folder to share, or - to read stdin.",
            metavar="FILE",
            show_default=False,
        ),
    ],
    replicas: Annotated[int, typer.Option("--replicas", help="Copies of every chunk.")] = 2,
    min_countries: Annotated[
        int, typer.Option("--min-countries", help="Distinct countries per chunk.")
    ] = 2,
    min_blocs: Annotated[
        int,
        typer.Option(
            "--min-blocs",
            help="Jurisdiction blocs every chunk must span (see --blocs). Default 1: as many blocs as "
            "countries whenever the storage peers allow it, else countries alone.",
        ),
    ] = 1,
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
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="The name stored for - (stdin); default: stdin.", show_default=False
        ),
    ] = None,
    qr: Annotated[
        bool,
        typer.Option(
            "--qr", help="Also draw the read link as a QR code (on stderr; stdout keeps the link)."
        ),
    ] = False,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
    geo_table: GeoOpt = None,
    blocs: BlocsOpt = None,
    host: HostOpt = None,
) -> None:
    """Encrypt FILE (or a whole folder, or stdin), store every chunk on holders in different countries, print the read link.

    A folder is shared as one link: its names and tree are inside the encrypted manifest, empty folders
    included; symbolic links and special files are skipped with a warning. Exits 0 only once every chunk and the manifest are confirmed stored on --replicas holders spanning
    --min-countries countries, no two in the same /24. Exit 6, before storing anything, if the storage peers
    found cannot meet that. Run again on the unchanged file, an interrupted share resumes and a finished one
    prints the same link without uploading (the state is kept in the data dir).
    """

    from p2pmega.api.share import share
    from p2pmega.api.share_pipe import share_stream

    from_stdin = str(file) == "-"
    if name is not None and not from_stdin:
        _fail(BadOption("--name names what - (stdin) is shared as; a file keeps its own name"))

    async def go() -> "ShareResult":
        net = _net(bootstrap, data_dir, geo_table, host, blocs)
        with _Bar("sharing") as bar:
            if from_stdin:
                return await share_stream(
                    sys.stdin.buffer,
                    name=name or "stdin",
                    net=net,
                    replicas=replicas,
                    min_countries=min_countries,
                    min_blocs=min_blocs,
                    lease_s=lease_days * 86400,
                    progress=bar.update,
                )
            return await share(
                file,
                net=net,
                replicas=replicas,
                min_countries=min_countries,
                min_blocs=min_blocs,
                lease_s=lease_days * 86400,
                progress=bar.update,
                new=new,
            )

    def kept() -> str:
        if from_stdin:
            return "stdin cannot be read again: nothing is kept"
        return "the chunks stored so far are kept: run the same command again to resume"

    result = _run(go(), on_interrupt=kept)
    if result.skipped:
        shown = ", ".join(repr(path) for path in result.skipped[:3])
        more = f" and {len(result.skipped) - 3} more" if len(result.skipped) > 3 else ""
        _err(
            f"p2pmega: warning: skipped {len(result.skipped)} symbolic links or special files "
            f"({shown}{more}): only folders and regular files are shared"
        )
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
        files = "" if result.files is None else f"{counted(result.files, 'file')} in "
        _err(
            f"shared {files}{result.size:,} bytes as {counted(result.chunk_count, 'data chunk')} and "
            f"{counted(manifest, 'manifest chunk')} on holders in "
            f"{counted(len(countries), 'country', 'countries')} ({', '.join(countries)})"
        )
        _echo(result.read_link)
    if qr:
        _err(qr_text(result.read_link))


def qr_text(link: str) -> str:
    """``link`` as a QR code drawn with half-block characters, light modules drawn (for dark terminals).

    segno (pure Python, no dependencies) encodes it; error correction L keeps a ~250-character link at
    version 10 or below, small enough for an 80-column terminal.
    """
    import io

    import segno

    out = io.StringIO()
    segno.make_qr(link, error="l", boost_error=False).terminal(out=out, compact=True)
    return out.getvalue().rstrip("\n")


def _share_json(result: "ShareResult") -> dict[str, Any]:
    from p2pmega.core.chunking import format_id

    folder = (
        {} if result.files is None else {"files": result.files, "skipped": list(result.skipped)}
    )
    return {
        "read_link": result.read_link,
        "keep_link": result.keep_link,
        "size": result.size,
        **folder,
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


# A link read from stdin: one line, far longer than any link (a link with many peer hints is ~1 KiB).
MAX_LINK_BYTES = 64 * 1024


def _link_from(arg: str) -> str:
    """``arg``, or with ``-`` the first non-blank line of stdin (so the key is never in the process list)."""
    if arg != "-":
        return arg
    text = sys.stdin.read(MAX_LINK_BYTES)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    _fail(BadLink("LINK is -, but stdin held no link; pipe it in, e.g. p2pmega fetch - < link.txt"))


@app.command(cls=_Command, name="fetch")
def fetch_cmd(
    link: Annotated[
        str,
        typer.Argument(
            help=(
                "The read link (magnet:?xt=urn:p2pmega:...), or - to read it from stdin, which keeps the key out "
                "of the process list (/proc/PID/cmdline)."
            ),
            metavar="LINK",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the file or folder (default: ./NAME); - writes the file to stdout.",
        ),
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
    command again after an interruption and it resumes where it stopped. A folder is recreated under -o DIR
    (default ./NAME); a path in it that could land outside is refused (exit 5) before anything is written.
    With -o - the file goes to stdout in order as it arrives (nothing else goes there; not for folders). With no --bootstrap, no
    P2PMEGA_BOOTSTRAP and no saved contacts, the holders named in the link are the way into the network.
    """

    from p2pmega.api.fetch import fetch

    link = _link_from(link)
    part: list[Path] = []
    to_stdout = output is not None and str(output) == "-"

    async def go() -> Any:
        net = _net(bootstrap, data_dir, geo_table, host)
        with _Bar("fetching") as bar:
            return await fetch(
                link,
                net=net,
                output=None if to_stdout else output,
                force=force,
                progress=bar.update,
                on_part=part.append,
                stream=sys.stdout.buffer if to_stdout else None,
            )

    def kept() -> str:
        # Asked when Ctrl-C comes, by which time fetch has named its partial file (or not begun one).
        if not part:
            return "nothing was written yet"
        return f"the partial file {str(part[0])!r} is kept: run the same command again to resume"

    try:
        result = _run(go(), on_interrupt=kept)
    except BrokenPipeError:
        # The reader of -o - went away (`| head`): end quietly, as a writer killed by SIGPIPE would.
        raise typer.Exit(BROKEN_PIPE_EXIT) from None
    files = "" if result.files is None else f" in {result.files:,} files"
    _err(
        f"fetched {result.chunks_fetched} of {result.chunks_total} chunks "
        f"({result.chunks_resumed} already present), {result.size:,} bytes{files}, all verified"
    )
    if not to_stdout:
        _echo(str(result.path))


# What a shell reports for a process killed by SIGPIPE (128 + 13): `fetch -o - | head` ends like `cat | head`.
BROKEN_PIPE_EXIT = 141


@app.command(cls=_Command, name="check")
def check_cmd(
    link: Annotated[
        str,
        typer.Argument(
            help="A read link or a keep-alive link, or - to read it from stdin.",
            metavar="LINK",
            show_default=False,
        ),
    ],
    replicas: Annotated[
        int, typer.Option("--replicas", help="Copies every chunk should have.")
    ] = 2,
    min_countries: Annotated[
        int, typer.Option("--min-countries", help="Countries every chunk should span.")
    ] = 2,
    min_blocs: Annotated[
        int,
        typer.Option(
            "--min-blocs", help="Jurisdiction blocs every chunk should span (see --blocs)."
        ),
    ] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every chunk's live holders as JSON.")
    ] = False,
    bootstrap: BootstrapOpt = None,
    data_dir: DataDirOpt = None,
    geo_table: GeoOpt = None,
    blocs: BlocsOpt = None,
    host: HostOpt = None,
) -> None:
    """List every chunk's live holders and their countries; exit 0 only if every chunk meets the rule.

    Exit 4 if some chunk has no live holder at all, 6 if some chunk is below the placement rule, or if its
    holders' countries are unknown (unknown never counts; pass --geo-table). With no --bootstrap, no
    P2PMEGA_BOOTSTRAP and no saved contacts, the holders named in the link are the way into the network.
    """

    from p2pmega.api.check import check

    link = _link_from(link)

    async def go() -> "CheckResult":
        return await check(
            link,
            net=_net(bootstrap, data_dir, geo_table, host, blocs),
            replicas=replicas,
            min_countries=min_countries,
            min_blocs=min_blocs,
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
    if result.min_blocs > 1:
        line += f" and {counted(result.min_blocs, 'bloc')}"
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
                "live_holders": len(c.holders),
                "countries": sorted({h.country for h in c.holders if h.country}),
                "blocs": list(c.blocs),
                "holders": [
                    {"address": h.label(), "country": h.country, "lease_remaining_s": left}
                    for h, left in zip(
                        c.holders, c.leases_s or [None] * len(c.holders), strict=True
                    )
                ],
            }
            for c in result.chunks
        ],
    }


def _lease_left(leases_s: "tuple[int | None, ...]") -> str:
    """The shortest lease left among a chunk's holders, as people read it (``29d``, ``3h``); ``?`` if none said."""
    from p2pmega.core.duration import format_duration

    known = [s for s in leases_s if s is not None]
    return format_duration(min(known)) if known else "?"


def _print_check(result: "CheckResult") -> None:
    from rich.console import Console
    from rich.table import Table

    from p2pmega.core.chunking import short_id

    table = Table(title=f"file {short_id(result.root)}", show_lines=False)
    table.add_column("chunk")
    table.add_column("holders")
    table.add_column("countries")
    table.add_column("blocs")
    table.add_column("lease left")
    table.add_column("ok")
    for c in result.chunks:
        table.add_row(
            f"{c.kind} {c.index} {short_id(c.chunk_id)}",
            " ".join(h.label() for h in c.holders) or "-",
            ",".join(sorted({h.country or "??" for h in c.holders})) or "-",
            ",".join(c.blocs) or "-",
            _lease_left(c.leases_s),
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
