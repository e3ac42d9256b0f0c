"""The module layout of ARCHITECTURE.md, enforced by reading the source (AST only; nothing is imported).

Walks every module under p2pmega/, so modules added later are checked as soon as they exist.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "p2pmega"

# Third-party (and dangerous stdlib) top-level modules, and the only files allowed to import them.
# The wrapped libraries stay behind one module each, so their types and exceptions never leak.
# net/dht.py (the node API callers import) and the machinery it is split into.
_DHT_MODULES = frozenset(
    f"p2pmega/net/{name}.py"
    for name in (
        "dht",
        "routing",
        "kademlia_protocol",
        "kademlia_serve",
        "dht_wire",
        "crawl",
        "kademlia_server",
    )
)
# The command line, the only package that prints or imports typer and rich.
CLI_FILES = frozenset(
    f"p2pmega/cli/{name}.py" for name in ("__init__", "base", "files", "peers", "ui")
)
ONLY_IN: dict[str, frozenset[str]] = {
    "nacl": frozenset({"p2pmega/core/crypto.py"}),
    "kademlia": _DHT_MODULES,
    "rpcudp": _DHT_MODULES,
    "umsgpack": _DHT_MODULES | {"p2pmega/core/record.py"},
    "asyncio_dgram": frozenset({"p2pmega/net/lan.py"}),
    "iptocc": frozenset({"p2pmega/core/geo.py"}),
    # The web app's HTTP server stays in the web package, which never prints (the CLI prints its URL).
    "aiohttp": frozenset(
        {"p2pmega/web/server.py", "p2pmega/web/guard.py", "p2pmega/web/launch.py"}
    ),
    "typer": CLI_FILES,
    "rich": CLI_FILES,
    # Never unpickle anything that crossed the network or the disk (STYLE.md section 5).
    "pickle": frozenset(),
    "_pickle": frozenset(),
    "shelve": frozenset(),
}

# p2pmega/core/ is pure: bytes and values in, bytes and values out. These give it I/O, a clock,
# processes or concurrency. hashlib, ipaddress, struct, dataclasses, typing, json, re... are fine.
CORE_FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "time",
        "threading",
        "subprocess",
        "sqlite3",
        "os",
        "pathlib",
        "shutil",
        "tempfile",
        "signal",
        "select",
        "selectors",
        "multiprocessing",
        "concurrent",
        "fcntl",
        "mmap",
        "ssl",
        "http",
        "urllib.request",
        "glob",
    }
)
# Explicit exceptions, each with the reason it does not break purity.
CORE_ALLOWED: dict[tuple[str, str], str] = {
    ("p2pmega/core/manifest.py", "threading"): (
        "FileEncoder.encode_chunk is thread-safe by contract (ARCHITECTURE.md): a Lock, no I/O"
    ),
}

PRINT_ALLOWED = CLI_FILES


@dataclass(frozen=True)
class Import:
    """One imported module name, resolved to an absolute dotted name."""

    name: str
    line: int
    type_checking_only: bool


def module_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "p2pmega").rglob("*.py"))


def relative(path: Path, root: Path = ROOT) -> str:
    return path.relative_to(root).as_posix()


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` bodies (annotation-only imports)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                end = statement.end_lineno or statement.lineno
                lines.update(range(statement.lineno, end + 1))
    return lines


def imports_of(path: Path, root: Path = ROOT) -> Iterator[Import]:
    """Every module ``path`` imports: statements, relative ones resolved, and constant
    ``importlib.import_module("x")`` / ``__import__("x")`` calls. ``from a import b`` yields both
    ``a`` and ``a.b``, since ``b`` may be a submodule."""
    tree = parse(path)
    guarded = _type_checking_lines(tree)
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
                isinstance(func, ast.Attribute) and func.attr == "import_module"
            )
            first = node.args[0]
            if dynamic and isinstance(first, ast.Constant) and isinstance(first.value, str):
                names = [first.value]
        if not names:
            continue
        assert isinstance(node, ast.stmt | ast.expr)
        for name in names:
            yield Import(name=name, line=node.lineno, type_checking_only=node.lineno in guarded)


def _covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def load_layers() -> list[tuple[list[str], bool]]:
    """The import-linter layers from pyproject.toml, top first: (members, members independent)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    layered = [c for c in contracts if c.get("type") == "layers"]
    assert layered, "pyproject.toml has no import-linter layers contract to mirror"
    layers: list[tuple[list[str], bool]] = []
    for entry in layered[0]["layers"]:
        independent = ":" not in entry
        separator = "|" if independent else ":"
        layers.append(([member.strip() for member in entry.split(separator)], independent))
    return layers


LAYERS = load_layers()
LAYER_CHAIN = " -> ".join(" | ".join(members) for members, _ in LAYERS)


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, top first; the member) of a module, by longest matching member."""
    best: tuple[int, str] | None = None
    for index, (members, _) in enumerate(LAYERS):
        for member in members:
            if _covers(member, name) and (best is None or len(member) > len(best[1])):
                best = (index, member)
    return best


# Each check returns one line per problem, so a failure names the file, the line and the fix.


def wrapped_library_problems(path: Path, root: Path = ROOT) -> list[str]:
    where = relative(path, root)
    return [
        f"{where}:{imp.line} imports {imp.name}; only {sorted(allowed) or 'no module'} may"
        for imp in imports_of(path, root)
        for top, allowed in ONLY_IN.items()
        if imp.name.split(".")[0] == top and where not in allowed
    ]


def core_purity_problems(path: Path, root: Path = ROOT) -> list[str]:
    where = relative(path, root)
    if not where.startswith("p2pmega/core/"):
        return []
    return [
        f"{where}:{imp.line} imports {imp.name}; core/ does no I/O, keeps no clock, runs no tasks"
        for imp in imports_of(path, root)
        for forbidden in CORE_FORBIDDEN
        if _covers(forbidden, imp.name) and (where, forbidden) not in CORE_ALLOWED
    ]


def layer_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Mirrors the import-linter layers contract in pyproject.toml.

    Imports under ``if TYPE_CHECKING:`` are exempt: they exist for annotations only and create no
    runtime dependency (net/transfer_server.py names storage.ChunkStore in a signature that way).
    """
    where = relative(path, root)
    source = layer_of(module_name(path, root))
    problems = []
    for imp in imports_of(path, root):
        if imp.name.split(".")[0] == "bootstrap":
            problems.append(f"{where}:{imp.line} imports {imp.name}; nothing imports bootstrap/")
        target = layer_of(imp.name)
        # p2pmega/__init__.py and __main__.py sit outside the layers, above cli.
        if source is None or target is None or imp.type_checking_only:
            continue
        (source_index, source_member), (target_index, target_member) = source, target
        upward = target_index < source_index
        sideways = (
            target_index == source_index
            and target_member != source_member
            and LAYERS[source_index][1]
        )
        if upward or sideways:
            problems.append(
                f"{where}:{imp.line} ({source_member}) imports {imp.name} ({target_member});"
                f" imports point down: {LAYER_CHAIN}"
            )
    return problems


def print_problems(path: Path, root: Path = ROOT) -> list[str]:
    where = relative(path, root)
    if where in PRINT_ALLOWED:
        return []
    return [
        f"{where}:{node.lineno} calls print(); return values and let the cli package print"
        for node in ast.walk(parse(path))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]


def test_walk_finds_the_package() -> None:
    files = {relative(path) for path in module_files()}
    assert "p2pmega/errors.py" in files
    assert "p2pmega/core/geo.py" in files
    assert any(members == ["p2pmega.core"] for members, _ in LAYERS)


@pytest.mark.parametrize("path", module_files(), ids=relative)
def test_wrapped_libraries_stay_in_their_module(path: Path) -> None:
    assert wrapped_library_problems(path) == []


@pytest.mark.parametrize("path", module_files(), ids=relative)
def test_core_is_pure(path: Path) -> None:
    assert core_purity_problems(path) == []


@pytest.mark.parametrize("path", module_files(), ids=relative)
def test_imports_point_down_the_layers(path: Path) -> None:
    assert layer_problems(path) == []


@pytest.mark.parametrize("path", module_files(), ids=relative)
def test_only_cli_prints(path: Path) -> None:
    assert print_problems(path) == []


# The checks above must be able to fail: run them on a small fake tree.


def fake(tmp_path: Path, where: str, source: str) -> Path:
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")
    return path


def test_imports_are_resolved(tmp_path: Path) -> None:
    path = fake(
        tmp_path,
        "p2pmega/core/x.py",
        "from typing import TYPE_CHECKING\n"
        "import nacl.signing\n"
        "from . import crypto\n"
        "from ..net import dht\n"
        "import importlib\n"
        "m = importlib.import_module('pickle')\n"
        "if TYPE_CHECKING:\n"
        "    from p2pmega.storage import ChunkStore\n",
    )
    found = {(imp.name, imp.line, imp.type_checking_only) for imp in imports_of(path, tmp_path)}
    assert ("nacl.signing", 2, False) in found
    assert ("p2pmega.core.crypto", 3, False) in found
    assert ("p2pmega.net.dht", 4, False) in found
    assert ("pickle", 6, False) in found
    assert ("p2pmega.storage.ChunkStore", 8, True) in found


def test_checks_catch_violations(tmp_path: Path) -> None:
    core = fake(
        tmp_path,
        "p2pmega/core/bad.py",
        "import time\nfrom os import path\nimport nacl\nfrom p2pmega.net import dht\nprint(1)\n",
    )
    assert core_purity_problems(core, tmp_path) == [
        "p2pmega/core/bad.py:1 imports time; core/ does no I/O, keeps no clock, runs no tasks",
        "p2pmega/core/bad.py:2 imports os; core/ does no I/O, keeps no clock, runs no tasks",
        "p2pmega/core/bad.py:2 imports os.path; core/ does no I/O, keeps no clock, runs no tasks",
    ]
    assert wrapped_library_problems(core, tmp_path) == [
        "p2pmega/core/bad.py:3 imports nacl; only ['p2pmega/core/crypto.py'] may"
    ]
    assert layer_problems(core, tmp_path) == [
        f"p2pmega/core/bad.py:4 (p2pmega.core) imports p2pmega.net (p2pmega.net);"
        f" imports point down: {LAYER_CHAIN}",
        f"p2pmega/core/bad.py:4 (p2pmega.core) imports p2pmega.net.dht (p2pmega.net);"
        f" imports point down: {LAYER_CHAIN}",
    ]
    assert print_problems(core, tmp_path) == [
        "p2pmega/core/bad.py:5 calls print(); return values and let the cli package print"
    ]


def test_sibling_layers_are_independent_and_pickle_is_banned(tmp_path: Path) -> None:
    net = fake(
        tmp_path,
        "p2pmega/net/t.py",
        "import pickle\nfrom p2pmega.identity import Identity\nimport bootstrap.run\n",
    )
    assert wrapped_library_problems(net, tmp_path) == [
        "p2pmega/net/t.py:1 imports pickle; only no module may"
    ]
    problems = layer_problems(net, tmp_path)
    assert problems[0].startswith("p2pmega/net/t.py:2 (p2pmega.net) imports p2pmega.identity (")
    assert "p2pmega/net/t.py:3 imports bootstrap.run; nothing imports bootstrap/" in problems
    cli = fake(tmp_path, "p2pmega/cli/base.py", "import typer\nprint('ok')\n")
    assert wrapped_library_problems(cli, tmp_path) == []
    assert print_problems(cli, tmp_path) == []


def test_layer_lookup() -> None:
    core = layer_of("p2pmega.core.geo")
    net = layer_of("p2pmega.net.dht")
    storage = layer_of("p2pmega.storage")
    cli = layer_of("p2pmega.cli")
    assert core is not None
    assert net is not None
    assert storage is not None
    assert cli is not None
    assert cli[0] < net[0] < core[0]
    assert net[0] < storage[0] < core[0], "storage sits below net, identity and config"
    assert layer_of("p2pmega") is None
    assert layer_of("p2pmegax.core") is None
