"""The ``p2pmega`` app and what every command shares: options, running a use case, errors, output, progress.

Every command pays for what the cli package imports before it parses its arguments, so it imports only typer and
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

from p2pmega import __version__
from p2pmega.errors import P2PMegaError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from rich.progress import Progress

    from p2pmega.api.common import NetSettings

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
BlocsOpt = Annotated[
    Path | None,
    typer.Option(
        "--blocs",
        help="Jurisdiction blocs ('NAME: CC CC ...' per line) that count as one for placement. "
        "Default: $P2PMEGA_BLOCS, else the shipped table (Five Eyes, EU/EEA; docs/JURISDICTIONS.md).",
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
    bootstrap: list[str] | None,
    data_dir: Path | None,
    geo_table: Path | None,
    host: str | None,
    blocs: Path | None = None,
) -> "NetSettings":
    from p2pmega.api.common import NetSettings
    from p2pmega.config import (
        resolve_bloc_table,
        resolve_bootstrap,
        resolve_data_dir,
        resolve_geo_table,
    )

    return NetSettings(
        bootstrap=resolve_bootstrap(bootstrap or []),
        data_dir=resolve_data_dir(data_dir),
        geo=resolve_geo_table(geo_table),
        blocs=resolve_bloc_table(blocs),
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
            # Bytes done of a total of 0 means the total is unknown yet (share - reads a pipe): no bar.
            unknown = total == 0 and done > 0
            self.progress.update(self.task, completed=done, total=None if unknown else total)


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


def main() -> None:
    """Console-script entry point: run the command, then leave without tearing the interpreter down.

    Tearing down (clearing every module, freeing what is left) took ~55 ms here, a sixth of a short
    share or fetch's round trip. Skipping it loses nothing: a command returns only once
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
