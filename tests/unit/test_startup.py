"""What a ``p2pmega`` command imports before it does its job: only what that command needs.

Python start-up and imports were most of a short command's time (issue 5), so the CLI imports each use case
inside the command that runs it. These tests run the real entry point in a fresh interpreter and assert on the
modules it loaded, never on timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pmega import cli

# Imported by the use cases, never needed to parse arguments, print help or the version.
HEAVY = (
    "asyncio",
    "rich",
    "sqlite3",
    "json",
    "logging",
    "nacl",
    "kademlia",
    "rpcudp",
    "umsgpack",
    "asyncio_dgram",
    "iptocc",
    "platformdirs",
    "p2pmega.api",
    "p2pmega.node",
    "p2pmega.net",
    "p2pmega.storage",
    "p2pmega.core",
    "p2pmega.config",
    "p2pmega.identity",
    "p2pmega.web",
    "aiohttp",
    "segno",
)
# Use cases each command must not drag in: share, fetch and check run on their own.
OTHER_USE_CASES = ("p2pmega.api.testnet", "p2pmega.api.demo", "p2pmega.api.service")

# Runs the console entry point (as `python -m p2pmega ARGS`) and writes the loaded module names to a file, also
# when the command exits with an error.
_DRIVER = """
import os, runpy, sys
out, args = sys.argv[1], sys.argv[2:]
sys.argv = ["p2pmega", *args]
code = 0


def leave(status):  # cli.main ends with os._exit; this driver has more to do
    raise SystemExit(status)


os._exit = leave
try:
    runpy.run_module("p2pmega", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
modules = sorted(sys.modules)  # before the json import below
import json
with open(out, "w") as f:
    json.dump({"code": code, "modules": modules}, f)
"""


def _env() -> dict[str, str]:
    # Wide enough that help lines are not wrapped.
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}
    return env | {"COLUMNS": "200"}


def _modules_after(tmp_path: Path, *args: str) -> tuple[int, set[str], str]:
    """Run ``p2pmega ARGS`` in a new interpreter: exit code, modules loaded by the end, stdout."""
    out = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_env(),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert out.exists(), proc.stderr
    doc = json.loads(out.read_text())
    return doc["code"], set(doc["modules"]), proc.stdout


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (packages count with their submodules) are among ``modules``."""
    return sorted(m for m in modules for n in names if m == n or m.startswith(n + "."))


def _modules_after_importing(names: str) -> set[str]:
    """Every module a fresh interpreter has loaded after ``import NAMES``."""
    code = f"import sys, {names}; print('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=_env(),
    )
    return set(proc.stdout.split())


def test_importing_the_cli_loads_no_use_case_and_no_heavy_library() -> None:
    modules = _modules_after_importing("p2pmega.cli")
    assert "p2pmega.cli" in modules
    assert _loaded(modules, HEAVY) == []


def test_version_loads_no_use_case(tmp_path: Path) -> None:
    code, modules, stdout = _modules_after(tmp_path, "--version")
    assert code == 0
    assert stdout.startswith("p2pmega ")
    assert _loaded(modules, HEAVY) == []


@pytest.mark.parametrize(
    "args",
    [
        ["share", "--help"],
        ["fetch", "--help"],
        ["testnet", "--help"],
        ["ui", "--help"],
        ["ls", "--help"],
        ["--help"],
    ],
    ids=["share", "fetch", "testnet", "ui", "ls", "top"],
)
def test_help_loads_no_use_case(tmp_path: Path, args: list[str]) -> None:
    code, modules, stdout = _modules_after(tmp_path, *args)
    assert code == 0
    assert stdout.startswith("Usage: ")
    # Plain help (rich_markup_mode=None): typer's rich help would import rich and its markdown parser.
    assert _loaded(modules, HEAVY) == []


def test_a_usage_error_loads_no_use_case(tmp_path: Path) -> None:
    code, modules, stdout = _modules_after(tmp_path, "share")  # missing FILE
    assert code == 2
    assert stdout == ""
    assert _loaded(modules, HEAVY) == []


def test_help_shows_the_defaults_of_the_use_cases(tmp_path: Path) -> None:
    _, _, share_help = _modules_after(tmp_path, "share", "--help")
    assert "--lease-days" in share_help
    assert "30.0" in share_help
    _, _, seed_help = _modules_after(tmp_path, "seed", "--help")
    assert "(default 10 GB)" in " ".join(seed_help.split())
    _, _, testnet_help = _modules_after(tmp_path, "testnet", "--help")
    assert "DE,NZ,IS,CH" in testnet_help


@pytest.mark.parametrize(
    ("args", "needs", "not_needed"),
    [
        (
            ["fetch", "magnet:?xt=urn:p2pmega:notbase32!!", "-o", "out.bin"],
            "p2pmega.api.fetch",
            ("p2pmega.api.share", "p2pmega.api.check", *OTHER_USE_CASES),
        ),
        (
            ["share", "does-not-exist.bin"],
            "p2pmega.api.share",
            ("p2pmega.api.fetch", "p2pmega.api.check", *OTHER_USE_CASES),
        ),
        (["check", "magnet:?xt=urn:p2pmega:notbase32!!"], "p2pmega.api.check", OTHER_USE_CASES),
    ],
    ids=["fetch", "share", "check"],
)
def test_a_command_loads_its_own_use_case_only(
    tmp_path: Path, args: list[str], needs: str, not_needed: tuple[str, ...]
) -> None:
    code, modules, stdout = _modules_after(tmp_path, *args)
    assert code == 2  # a usage error, before any network traffic
    assert stdout == ""
    assert needs in modules
    # stderr is not a terminal here, so there is no progress bar and nothing imports rich.
    assert _loaded(modules, ("rich", *not_needed)) == []


def test_share_and_fetch_load_nothing_they_do_not_use() -> None:
    modules = _modules_after_importing("p2pmega.api.share, p2pmega.api.fetch")
    assert "p2pmega.api.fetch" in modules
    # kademlia.network (HardenedServer no longer derives from its Server) imports pickle; platformdirs is only
    # for the default data dir; typer and rich belong to the CLI.
    unused = ("pickle", "kademlia.network", "platformdirs", "typer", "rich", *OTHER_USE_CASES)
    # A holder's parts (its store, transfer server and LAN discovery) load only when a holder starts.
    holder = ("sqlite3", "p2pmega.storage.store", "p2pmega.net.transfer_server", "p2pmega.net.lan")
    assert _loaded(modules, (*unused, *holder, "p2pmega.api.check")) == []


def test_the_cli_defaults_equal_the_ones_of_the_modules_that_own_them() -> None:
    from p2pmega import defaults
    from p2pmega.api.testnet import DEFAULT_COUNTRIES
    from p2pmega.core.duration import format_duration
    from p2pmega.storage import DEFAULT_QUOTA_BYTES
    from p2pmega.storage.sizes import parse_size
    from p2pmega.web.server import DEFAULT_MAX_UPLOAD_BYTES

    assert cli.DEFAULT_COUNTRIES == DEFAULT_COUNTRIES
    assert format_duration(defaults.REPAIR_INTERVAL_S) == cli.DEFAULT_REPAIR_INTERVAL
    assert format_duration(defaults.REANNOUNCE_INTERVAL_S) == cli.DEFAULT_REANNOUNCE_INTERVAL
    assert format_duration(defaults.GC_INTERVAL_S) == cli.DEFAULT_GC_INTERVAL
    assert cli.DEFAULT_QUOTA_BYTES == DEFAULT_QUOTA_BYTES
    assert parse_size(cli.ui.DEFAULT_MAX_UPLOAD) == DEFAULT_MAX_UPLOAD_BYTES


def test_the_entry_point_collects_no_cycles_until_the_command_runs() -> None:
    """entry.main turns the cycle collector off while the CLI loads; cli._run turns it back on."""
    code = (
        "import gc, sys\n"
        "from p2pmega.cli import base as cli\n"
        "seen = []\n"
        "async def command():\n"
        "    seen.append(gc.isenabled())\n"
        "gc.disable()\n"
        "cli._run(command())\n"
        "print(seen[0], gc.isenabled(), gc.get_freeze_count() > 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.split() == ["True", "True", "True"]
    entry = subprocess.run(
        [sys.executable, "-c", "import gc; from p2pmega import entry; print(gc.isenabled())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert entry.stdout.strip() == "True"  # importing the entry module changes nothing


def test_the_console_script_enters_through_entry_main() -> None:
    """The installed ``p2pmega`` script runs entry.main (which turns the collector off first)."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="p2pmega")
    assert script.value == "p2pmega.entry:main"
    installed = Path(sys.executable).parent / "p2pmega"
    assert installed.exists(), "pip install -e '.[test]' puts the script next to the interpreter"
    proc = subprocess.run(
        [str(installed), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("p2pmega ")
