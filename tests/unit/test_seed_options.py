"""seed's options: durations, keep links and keep files are checked before the peer starts; the link list."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.api.seed import read_keep_file, seed_options
from p2pmega.core.chunking import ChunkId
from p2pmega.core.duration import format_duration, parse_duration
from p2pmega.core.magnet import KeepCap, ReadCap, format_link
from p2pmega.errors import BadBlocTable, BadLink, BadOption, StorageError
from p2pmega.storage.links import LinkEntry, load_links, record_link
from p2pmega.storage.sources import SourceLimits


def read_link(seed: int = 1) -> str:
    return format_link(ReadCap(ChunkId(bytes([seed]) * 32), bytes([seed + 1]) * 32, name="a.txt"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("2s", 2.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1.5d", 129600.0),
        (" 3M ", 180.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, option="--x") == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-1s", "1w", "ten", "1e3", "367d", "1 h 2"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(BadOption, match="--repair-interval"):
        parse_duration(text, option="--repair-interval")


@given(st.floats(min_value=1.0, max_value=300 * 86400.0))
def test_a_formatted_duration_parses_back_close(seconds: float) -> None:
    back = parse_duration(format_duration(seconds), option="--x")
    assert abs(back - seconds) <= 0.05 * seconds + 0.5


def options(tmp_path: Path, **kwargs: object) -> object:
    base: dict[str, object] = {
        "geo_table": None,
        "quota": None,
        "repair_interval": "10m",
        "reannounce": "12h",
        "gc_interval": "10m",
        "keep": [],
        "keep_file": None,
        "keep_mine": False,
        "lease_days": 30.0,
        "data_dir": tmp_path,
    }
    base.update(kwargs)
    return seed_options(**base)  # type: ignore[arg-type]


def test_keep_links_become_keep_caps_only(tmp_path: Path) -> None:
    got = options(tmp_path, keep=[read_link(1), read_link(1), read_link(3)])
    caps = got.duties.keep  # type: ignore[attr-defined]
    assert [type(c) for c in caps] == [KeepCap, KeepCap], (
        "duplicates collapse, read keys are dropped"
    )
    assert got.duties.repair.interval_s == 600.0  # type: ignore[attr-defined]


def test_a_bad_keep_link_is_named(tmp_path: Path) -> None:
    with pytest.raises(BadLink, match=r"--keep link 2 is not a p2pmega link"):
        options(tmp_path, keep=[read_link(), "magnet:?xt=nonsense"])


def test_a_keep_file_skips_comments_and_names_a_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text(f"# mine\n\n{read_link(1)}\n  {read_link(5)}  \n", "utf-8")
    assert len(read_keep_file(good)) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{read_link(1)}\nnot a link\n", "utf-8")
    with pytest.raises(BadLink, match=r"bad.txt line 2"):
        read_keep_file(bad)


def test_keep_mine_reads_the_link_list_which_is_private(tmp_path: Path) -> None:
    record_link(tmp_path, LinkEntry(read_link(1), "01" * 32, "a.txt", 3, 1.0))
    record_link(tmp_path, LinkEntry(read_link(7), "07" * 32, "b.txt", 4, 2.0))
    record_link(tmp_path, LinkEntry(read_link(1), "01" * 32, "a.txt", 3, 3.0))  # shared again
    assert [e.name for e in load_links(tmp_path)] == ["b.txt", "a.txt"]
    assert stat.S_IMODE((tmp_path / "links.json").stat().st_mode) == 0o600
    got = options(tmp_path, keep_mine=True)
    assert len(got.duties.keep) == 2  # type: ignore[attr-defined]


def test_a_corrupt_link_list_is_named(tmp_path: Path) -> None:
    (tmp_path / "links.json").write_text('{"version": 9, "links": []}', "utf-8")
    with pytest.raises(StorageError, match=r"links\.json is not a p2pmega link list"):
        load_links(tmp_path)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--keep", "nonsense"], "--keep link 1"),
        (["--keep-file", "missing-file.txt"], "--keep-file missing-file.txt"),
        (["--repair-interval", "soon"], "--repair-interval"),
    ],
)
def test_seed_refuses_bad_keep_input_before_starting(
    tmp_path: Path, args: list[str], named: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pmega",
            "seed",
            "--host",
            "127.66.1.1",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "d"),
            "--no-lan",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("p2pmega: error:")
    assert named in lines[0]
    assert "listening" not in done.stderr
    assert not (tmp_path / "d" / "store").exists(), "the seed must not start half-configured"


def test_share_and_seed_refuse_a_lease_longer_than_holders_grant(tmp_path: Path) -> None:
    import asyncio

    from p2pmega.api.common import NetSettings
    from p2pmega.api.share import share

    net = NetSettings(data_dir=tmp_path / "d")
    with pytest.raises(BadOption, match=r"--lease-days 91: give more than 0 and at most 90"):
        asyncio.run(share(tmp_path / "never-read", net=net, lease_s=91 * 86400))
    with pytest.raises(BadOption, match=r"--lease-days 120: give more than 0 and at most 90"):
        options(tmp_path, lease_days=120.0)


def test_network_share_and_rate_reach_the_store_limits(tmp_path: Path) -> None:
    chosen = options(tmp_path, network_share=0.5, network_rate="64MiB")
    assert chosen.source_limits == SourceLimits(network_share=0.5, rate_bytes_per_min=64 << 20)  # type: ignore[attr-defined]
    default = options(tmp_path)
    assert default.source_limits == SourceLimits()  # type: ignore[attr-defined]


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5, float("nan")])
def test_a_network_share_outside_0_to_1_is_refused(tmp_path: Path, share: float) -> None:
    with pytest.raises(BadOption, match="network share"):
        options(tmp_path, network_share=share)


def test_repair_counts_the_blocs_of_the_table_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("P2PMEGA_BLOCS", raising=False)
    shipped = options(tmp_path)
    assert shipped.duties.repair.blocs["NZ"] == "FIVE-EYES"  # type: ignore[attr-defined]
    table = tmp_path / "blocs.txt"
    table.write_text("ALLIES: DE NZ\n", "utf-8")
    given = options(tmp_path, blocs=table)
    assert given.duties.repair.blocs == {"DE": "ALLIES", "NZ": "ALLIES"}  # type: ignore[attr-defined]
    table.write_text("ALLIES DE\n", "utf-8")
    with pytest.raises(BadBlocTable, match=r"blocs\.txt:1"):
        options(tmp_path, blocs=table)
