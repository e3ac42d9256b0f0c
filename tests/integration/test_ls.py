"""``p2pmega ls``: the files shared from a data dir and their health, against a real ``p2pmega testnet``;
keep-alive and forget (api/ls.py), which the web app's buttons call."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pmega.api.common import NetSettings
from p2pmega.api.ls import forget, keep_alive
from p2pmega.config import resolve_bootstrap, resolve_geo_table
from p2pmega.core.chunking import ChunkId
from p2pmega.core.magnet import ReadCap, format_link, parse_link
from p2pmega.storage.links import LinkEntry, record_link
from tests.integration.cli_helpers import RunningTestnet, run, running_testnet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DAY_S = 86400


@dataclass
class Shared:
    net: RunningTestnet
    data_dir: Path
    links: dict[str, str]  # name -> read link


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """Two files shared from one data dir: ``long.bin`` for 30 days, ``short.bin`` (newer) for one day."""
    base = tmp_path_factory.mktemp("ls")
    with running_testnet(base / "net") as net:
        data_dir = base / "client"
        links = {}
        for name, extra in (("long.bin", ()), ("short.bin", ("--lease-days", "1"))):
            src = base / name
            src.write_bytes(os.urandom(3 * 1024 * 1024))
            done = run("share", str(src), "--data-dir", str(data_dir), *extra, env=net.env)
            assert done.returncode == 0, done.stderr
            links[name] = done.stdout.strip()
            time.sleep(0.01)  # distinct shared_at, so "newest first" is decided
        yield Shared(net, data_dir, links)


def _ls(
    shared: Shared, *extra: str, data_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run("ls", "--data-dir", str(data_dir or shared.data_dir), *extra, env=shared.net.env)


def _net(shared: Shared) -> NetSettings:
    env = shared.net.env
    return NetSettings(
        bootstrap=resolve_bootstrap([], env),
        data_dir=shared.data_dir,
        geo=resolve_geo_table(None, env),
    )


def test_ls_of_an_empty_data_dir_says_so_and_exits_0(shared: Shared, tmp_path: Path) -> None:
    listed = _ls(shared, data_dir=tmp_path / "nothing")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == ""
    assert listed.stderr == "no files shared from this data dir yet\n"
    as_json = _ls(shared, "--json", data_dir=tmp_path / "nothing")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == []


def test_ls_lists_every_share_newest_first_with_health_and_lease(shared: Shared) -> None:
    listed = _ls(shared, "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert [f["name"] for f in doc] == ["short.bin", "long.bin"]
    for f in doc:
        assert f["health"] == "healthy", f
        assert f["size"] == 3 * 1024 * 1024
        assert f["chunks"] == 3  # two data chunks and the manifest
        assert f["chunks_short"] == f["chunks_missing"] == 0
        assert len(f["countries"]) >= 2
        assert f["link"] == shared.links[f["name"]]
        assert parse_link(f["link"]).root.hex() == f["root"]
    lease = {f["name"]: f["lease_left_s"] for f in doc}
    assert 0 < lease["short.bin"] <= DAY_S
    assert 29 * DAY_S < lease["long.bin"] <= 30 * DAY_S

    table = _ls(shared)
    assert table.returncode == 0, table.stderr
    assert "short.bin" in table.stdout
    assert "long.bin" in table.stdout
    assert table.stdout.count("healthy") == 2
    assert "magnet:" not in table.stdout, "the table must not print keys"


def test_ls_exits_6_when_a_file_is_below_the_rule(shared: Shared) -> None:
    # Shared on 2 holders in 2 countries: below a rule of 3 in 3.
    listed = _ls(shared, "--replicas", "3", "--min-countries", "3")
    assert listed.returncode == 6, listed.stderr
    assert listed.stderr.splitlines()[-1] == (
        "p2pmega: error: 2 files have chunks below 3 holders in 3 countries"
    )
    assert listed.stdout.count("short") == 2


def test_ls_exits_4_when_no_holder_has_a_file(shared: Shared, tmp_path: Path) -> None:
    data_dir = tmp_path / "client"
    record_link(
        data_dir, LinkEntry(shared.links["long.bin"], _root(shared, "long.bin"), "long.bin", 1, 1.0)
    )
    # A file nobody stored, whose link names a live seed (which does not have it) as its holder.
    seed = shared.net.peers[0]
    host, port = seed["address"].rsplit(":", 1)
    gone = ReadCap(
        ChunkId(os.urandom(32)), os.urandom(32), name="gone.bin", peers=((host, int(port)),)
    )
    record_link(data_dir, LinkEntry(format_link(gone), gone.root.hex(), "gone.bin", 5, 2.0))
    listed = _ls(shared, "--json", data_dir=data_dir)
    assert listed.returncode == 4, listed.stderr
    assert listed.stderr.splitlines()[-1] == (
        "p2pmega: error: 1 file has chunks on no live holder; they cannot be fetched whole"
    )
    health = {f["name"]: f for f in json.loads(listed.stdout)}
    assert health["gone.bin"]["health"] == "missing"
    assert health["gone.bin"]["problem"]
    assert health["long.bin"]["health"] == "healthy"


def _root(shared: Shared, name: str) -> str:
    return parse_link(shared.links[name]).root.hex()


def test_keep_alive_renews_every_lease_and_forget_drops_the_file(shared: Shared) -> None:
    renewed = asyncio.run(
        keep_alive(shared.links["short.bin"], net=_net(shared), lease_s=10 * DAY_S)
    )
    assert renewed.chunks == 3
    assert renewed.healthy == 3
    assert renewed.renewed >= 6  # every chunk on at least two holders
    doc = json.loads(_ls(shared, "--json").stdout)
    lease = {f["name"]: f["lease_left_s"] for f in doc}
    # A signed renewal names a whole-second expiry (core/renewal.py), so up to a second more than asked.
    assert 9 * DAY_S < lease["short.bin"] <= 10 * DAY_S + 1

    assert asyncio.run(forget(shared.data_dir, _root(shared, "short.bin"))) is True
    assert asyncio.run(forget(shared.data_dir, _root(shared, "short.bin"))) is False
    doc = json.loads(_ls(shared, "--json").stdout)
    assert [f["name"] for f in doc] == ["long.bin"]
