"""The console script on first contact (issue 21): reruns give the same link, and errors name the option to change.

A real ``p2pmega testnet`` with a bootstrap node and one seed in each of DE and NZ.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import RunningTestnet, run, running_testnet, stored_chunk_files

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTestnet]:
    base = tmp_path_factory.mktemp("testnet")
    with running_testnet(base, "--countries", "DE,NZ", "--peers-per-country", "1") as running:
        yield running


def _share(
    net: RunningTestnet, path: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run(
        "share", str(path), "--data-dir", str(path.parent / "client"), *extra, env=env or net.env
    )


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("p2pmega: error: ")
    return lines[0]


def test_rerun_prints_the_same_link_and_new_a_new_one(net: RunningTestnet, tmp_path: Path) -> None:
    src = tmp_path / "twice.bin"
    src.write_bytes(os.urandom(300_000))
    first = _share(net, src)
    assert first.returncode == 0, first.stderr
    stored = set(stored_chunk_files(net.base_dir))

    again = _share(net, src)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert "already shared and unchanged since: same link" in again.stderr
    assert set(stored_chunk_files(net.base_dir)) == stored, "the rerun stored chunks"

    fresh = _share(net, src, "--new")
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.startswith("magnet:?xt=urn:p2pmega:")
    assert fresh.stdout != first.stdout


def test_replicas_beyond_the_seeds_exits_6_naming_replicas(
    net: RunningTestnet, tmp_path: Path
) -> None:
    src = tmp_path / "three.bin"
    src.write_bytes(os.urandom(300_000))
    before = set(stored_chunk_files(net.base_dir))
    proc = _share(net, src, "--replicas", "3")
    assert proc.returncode == 6
    line = _error_line(proc)
    assert "found 2 storage peers in DE, NZ" in line
    assert "lower --replicas to 2" in line
    assert set(stored_chunk_files(net.base_dir)) == before


def test_without_a_geo_table_share_and_check_point_to_it(
    net: RunningTestnet, tmp_path: Path
) -> None:
    src = tmp_path / "where.bin"
    src.write_bytes(os.urandom(300_000))
    shared = _share(net, src)
    assert shared.returncode == 0, shared.stderr
    no_geo = {k: v for k, v in net.env.items() if k != "P2PMEGA_GEO_TABLE"}

    checked = run("check", shared.stdout.strip(), "--data-dir", str(tmp_path / "c"), env=no_geo)
    assert checked.returncode == 6
    line = _error_line(checked)
    assert line.startswith("p2pmega: error: countries unknown: ")
    assert "--geo-table" in line
    assert "countries unknown;" in checked.stdout
    assert "UNHEALTHY" not in checked.stdout

    refused = _share(net, tmp_path / "where.bin", "--new", env=no_geo)
    assert refused.returncode == 6
    line = _error_line(refused)
    assert "all of unknown country" in line
    assert "--geo-table" in line
    assert "--min-countries" not in line
