"""Options and environment: bootstrap addresses, data dir, geo table."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pmega.config import (
    ENV_BOOTSTRAP,
    ENV_DATA_DIR,
    ENV_GEO_TABLE,
    MAX_GEO_TABLE_BYTES,
    parse_host_port,
    resolve_bootstrap,
    resolve_data_dir,
    resolve_geo_table,
)
from p2pmega.core.geo import country_of
from p2pmega.errors import BadGeoTable, BadOption


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7847", ("127.0.0.1", 7847)),
        (" 10.1.2.3:1 ", ("10.1.2.3", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
    ],
)
def test_host_port_accepts_ip_literals(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "127.0.0.1", "127.0.0.1:", ":80", "127.0.0.1:0", "127.0.0.1:65536", "h:x", "::1:80"],
)
def test_host_port_rejects_with_the_text_in_one_line(text: str) -> None:
    with pytest.raises(BadOption) as caught:
        parse_host_port(text, what="bootstrap")
    message = str(caught.value)
    assert message.startswith("bootstrap ")
    assert "\n" not in message


def test_bootstrap_options_win_over_the_environment_and_repeat_once() -> None:
    env = {ENV_BOOTSTRAP: "127.0.0.2:2,127.0.0.3:3"}
    assert resolve_bootstrap(["127.0.0.1:1", "127.0.0.1:1"], env) == [("127.0.0.1", 1)]
    assert resolve_bootstrap([], env) == [("127.0.0.2", 2), ("127.0.0.3", 3)]
    assert resolve_bootstrap([], {ENV_BOOTSTRAP: " , "}) == []
    assert resolve_bootstrap([], {}) == []


def test_data_dir_option_then_environment_then_default(tmp_path: Path) -> None:
    assert resolve_data_dir(tmp_path / "opt", {ENV_DATA_DIR: "/elsewhere"}) == tmp_path / "opt"
    assert resolve_data_dir(None, {ENV_DATA_DIR: str(tmp_path / "env")}) == tmp_path / "env"
    assert resolve_data_dir(None, {}).name == "p2pmega"


def test_geo_table_from_option_or_environment(tmp_path: Path) -> None:
    table = tmp_path / "geo.txt"
    table.write_text("# test countries\n127.1.0.0/16 DE\n", "utf-8")
    from_option = resolve_geo_table(table, {})
    from_env = resolve_geo_table(None, {ENV_GEO_TABLE: str(table)})
    assert from_option is not None
    assert from_env is not None
    assert country_of("127.1.5.1", from_option) == "DE"
    assert country_of("127.1.5.1", from_env) == "DE"
    assert resolve_geo_table(None, {}) is None


def test_geo_table_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(BadGeoTable, match="cannot be read"):
        resolve_geo_table(tmp_path / "missing.txt", {})
    bad = tmp_path / "bad.txt"
    bad.write_text("127.1.0.0/16 DE\nnot-a-cidr NZ\n", "utf-8")
    with pytest.raises(BadGeoTable, match=r"bad\.txt:2"):
        resolve_geo_table(bad, {})
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BadGeoTable, match="not UTF-8"):
        resolve_geo_table(binary, {})
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"#" * (MAX_GEO_TABLE_BYTES + 1))
    with pytest.raises(BadGeoTable, match="larger than"):
        resolve_geo_table(huge, {})
