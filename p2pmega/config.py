"""Settings that come from options or the environment: data dir, bootstrap list, geo table, sizes.

Every function takes the option value (``None`` when not given) and falls back to the environment variable and
then to a default; nothing here touches the network except resolving a bootstrap host name.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from p2pmega.core.blocs import DEFAULT_BLOCS, BlocTable, parse_bloc_table
from p2pmega.core.geo import GeoTable, parse_geo_table
from p2pmega.core.ids import Address
from p2pmega.errors import BadBlocTable, BadGeoTable, BadOption, UsageError

ENV_DATA_DIR = "P2PMEGA_DATA_DIR"
ENV_BOOTSTRAP = "P2PMEGA_BOOTSTRAP"
ENV_GEO_TABLE = "P2PMEGA_GEO_TABLE"
ENV_BLOCS = "P2PMEGA_BLOCS"

# A geo table is a short text file of CIDR lines; 4 MiB is far beyond any sane table and bounds what we read.
MAX_GEO_TABLE_BYTES = 4 << 20


def default_data_dir() -> Path:
    """The platform's per-user data directory for p2pmega (e.g. ``~/.local/share/p2pmega``)."""
    # Imported here: it costs a command about 10 ms (it imports tempfile and shutil), and --data-dir or
    # $P2PMEGA_DATA_DIR make it unnecessary.
    import platformdirs

    return Path(platformdirs.user_data_dir("p2pmega", appauthor=False))


def resolve_data_dir(option: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    """``--data-dir``, else ``$P2PMEGA_DATA_DIR``, else the platform default."""
    if option is not None:
        return option.expanduser()
    if env.get(ENV_DATA_DIR):
        return Path(env[ENV_DATA_DIR]).expanduser()
    return default_data_dir()


def parse_host_port(text: str, *, what: str = "address") -> Address:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``; a host name is resolved to one IP address.

    Raises:
        BadOption: the text is not a host and a port in 1-65535, or the name does not resolve.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
        if ":" in host:
            raise BadOption(f"{what} {text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadOption(f"{what} {text!r} is not HOST:PORT with a port in 1-65535")
    return _resolve(host, what=what, text=text), int(port_text)


def _resolve(host: str, *, what: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise BadOption(
            f"{what} {text!r}: host name does not resolve ({exc}); use an IP address"
        ) from exc
    return str(infos[0][4][0])


def resolve_bootstrap(options: Sequence[str], env: Mapping[str, str] = os.environ) -> list[Address]:
    """``--bootstrap`` values (repeatable), else the comma-separated ``$P2PMEGA_BOOTSTRAP``.

    Raises:
        BadOption: an entry is not HOST:PORT.
    """
    entries = list(options)
    if not entries and env.get(ENV_BOOTSTRAP):
        entries = [e for e in env[ENV_BOOTSTRAP].split(",") if e.strip()]
    seen: list[Address] = []
    for entry in entries:
        addr = parse_host_port(entry, what="bootstrap")
        if addr not in seen:
            seen.append(addr)
    return seen


def resolve_geo_table(option: Path | None, env: Mapping[str, str] = os.environ) -> GeoTable | None:
    """Read ``--geo-table``, else ``$P2PMEGA_GEO_TABLE``; ``None`` when neither is set.

    Raises:
        BadGeoTable: the file is missing, too large, not UTF-8, or has a bad line.
    """
    path = _table_path(option, env, ENV_GEO_TABLE)
    if path is None:
        return None
    return parse_geo_table(_read_table(path, "geo table", BadGeoTable), source=str(path))


def resolve_bloc_table(option: Path | None, env: Mapping[str, str] = os.environ) -> BlocTable:
    """Read ``--blocs``, else ``$P2PMEGA_BLOCS``; the shipped table (core.blocs) when neither is set.

    Raises:
        BadBlocTable: the file is missing, too large, not UTF-8, or has a bad line.
    """
    path = _table_path(option, env, ENV_BLOCS)
    if path is None:
        return DEFAULT_BLOCS
    return parse_bloc_table(_read_table(path, "bloc table", BadBlocTable), source=str(path))


def _table_path(option: Path | None, env: Mapping[str, str], variable: str) -> Path | None:
    if option is not None:
        return option
    return Path(env[variable]) if env.get(variable) else None


def _read_table(path: Path, what: str, error: type[UsageError]) -> str:
    """The text of a small table file, read at most MAX_GEO_TABLE_BYTES.

    Raises:
        ``error``: the file cannot be read, is larger than the limit, or is not UTF-8.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_GEO_TABLE_BYTES + 1)
    except OSError as exc:
        raise error(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from exc
    if len(raw) > MAX_GEO_TABLE_BYTES:
        raise error(f"{what} {str(path)!r} is larger than {MAX_GEO_TABLE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {str(path)!r} is not UTF-8 text") from exc


def local_address_towards(remote: Address) -> str:
    """The local IP address the OS would use to reach ``remote`` (no packet is sent).

    Used when the user gives no ``--host``: we still bind explicitly, to the address the other side will see.
    """
    family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(remote)
        except OSError:
            return "127.0.0.1" if family == socket.AF_INET else "::1"
        return str(probe.getsockname()[0])
