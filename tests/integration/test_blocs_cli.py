"""Jurisdiction blocs on a real testnet (issue 18): two allied countries count as one for placement.

A ``p2pmega testnet`` with one seed in each of DE, NZ, IS and CH, and bloc tables written by the test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import RunningTestnet, run, running_testnet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHUNK_BYTES = 2 << 20


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTestnet]:
    base = tmp_path_factory.mktemp("testnet")
    with running_testnet(base, "--countries", "DE,NZ,IS,CH", "--peers-per-country", "1") as running:
        yield running


def _table(tmp_path: Path, text: str) -> str:
    path = tmp_path / "blocs.txt"
    path.write_text(text, "utf-8")
    return str(path)


def test_every_chunk_spans_two_blocs_when_two_countries_are_allied(
    net: RunningTestnet, tmp_path: Path
) -> None:
    # 20 data chunks: were blocs ignored, each would land on DE+NZ with probability 1/6, so some chunk would.
    src = tmp_path / "file.bin"
    src.write_bytes(os.urandom(20 * CHUNK_BYTES))
    blocs = _table(tmp_path, "ALLIES: DE NZ\n")
    client = str(tmp_path / "client")
    shared = run("share", str(src), "--data-dir", client, "--blocs", blocs, env=net.env)
    assert shared.returncode == 0, shared.stderr
    link = shared.stdout.strip()

    checked = run("check", link, "--json", "--data-dir", client, "--blocs", blocs, env=net.env)
    assert checked.returncode == 0, checked.stderr
    chunks = json.loads(checked.stdout)["chunks"]
    assert len(chunks) >= 21
    for chunk in chunks:
        assert len(chunk["blocs"]) >= 2, chunk
        assert set(chunk["blocs"]) <= {"ALLIES", "IS", "CH"}

    # The same file judged against a table that makes all four one bloc: on one bloc, so exit 6.
    one = _table(tmp_path / "..", "EVERYONE: DE NZ IS CH\n")
    strict = run(
        "check", link, "--data-dir", client, "--blocs", one, "--min-blocs", "2", env=net.env
    )
    assert strict.returncode == 6, strict.stderr
    assert "and 2 blocs" in strict.stderr


def test_min_blocs_2_with_one_bloc_of_peers_exits_6_naming_it(
    net: RunningTestnet, tmp_path: Path
) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(os.urandom(100_000))
    blocs = _table(tmp_path, "EVERYONE: DE NZ IS CH\n")
    proc = run(
        "share",
        str(src),
        "--data-dir",
        str(tmp_path / "c"),
        "--blocs",
        blocs,
        "--min-blocs",
        "2",
        env=net.env,
    )
    assert proc.returncode == 6
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--min-blocs 2" in lines[0]
    assert "span 1: EVERYONE (CH, DE, IS, NZ)" in lines[0]


def test_a_bad_bloc_table_is_a_usage_error(net: RunningTestnet, tmp_path: Path) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 1000)
    blocs = _table(tmp_path, "ALLIES: DE\nOTHERS: DE NZ\n")
    proc = run("share", str(src), "--data-dir", str(tmp_path / "c"), "--blocs", blocs, env=net.env)
    assert proc.returncode == 2, proc.stderr
    assert "blocs.txt:2: DE is already in bloc ALLIES (line 1)" in proc.stderr


def test_check_names_min_blocs_when_it_is_out_of_range(net: RunningTestnet, tmp_path: Path) -> None:
    link = "magnet:?xt=urn:p2pmega-keep:" + "a" * 52 + "&x.vk=" + "b" * 52
    proc = run("check", link, "--min-blocs", "3", "--data-dir", str(tmp_path / "c"), env=net.env)
    assert proc.returncode == 2, proc.stderr
    assert "--min-blocs 3: give 1" in proc.stderr
