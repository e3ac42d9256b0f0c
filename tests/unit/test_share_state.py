"""share's resume state on disk, and how share words a rule the storage peers cannot meet."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from p2pmega.core.chunking import ChunkId
from p2pmega.core.placement import Candidate, PoolSummary
from p2pmega.errors import StorageError
from p2pmega.replicate.shortfall import shortfall
from p2pmega.storage.share_state import (
    Completed,
    FileIdentity,
    PlacedChunk,
    ShareState,
    StateWriter,
    load_state,
    state_path,
)

KEY = bytes(range(32))


def a_state(tmp_path: Path, *, completed: bool) -> ShareState:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 100)
    identity = FileIdentity.of(src.resolve(), src.stat())
    holders = (
        Candidate(node_id=b"\x01" * 20, host="127.1.1.1", port=4001, country="DE"),
        Candidate(node_id=b"\x02" * 20, host="::1", port=4002, country=None),
    )
    chunks = {
        0: PlacedChunk(ChunkId(bytes(32)), holders),
        2: PlacedChunk(ChunkId(b"\x01" * 32), ()),
    }
    done = Completed(
        read_link="magnet:?xt=urn:p2pmega:abc",
        keep_link="magnet:?xt=urn:p2pmega-keep:abc",
        manifest=(PlacedChunk(ChunkId(b"\x02" * 32), holders),),
        replicas=2,
        min_countries=2,
        lease_expires_at=1.5e9,
    )
    return ShareState(identity, KEY, 64, chunks, done if completed else None)


@pytest.mark.parametrize("completed", [False, True])
def test_state_round_trips_and_is_private(tmp_path: Path, completed: bool) -> None:
    state = a_state(tmp_path, completed=completed)
    path = state_path(tmp_path / "data", Path(state.file.path))
    StateWriter(path).save(state, state.chunks)
    assert load_state(path) == state
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name], "a temporary file was left"


def test_one_state_per_path(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert state_path(data, tmp_path / "a") == state_path(data, tmp_path / "a")
    assert state_path(data, tmp_path / "a") != state_path(data, tmp_path / "b")
    assert state_path(data, tmp_path / "a").parent == data / "shares"


@pytest.mark.parametrize(
    "spoil",
    [
        lambda doc: doc.update(version=1),
        lambda doc: doc.update(key="00" * 31),
        lambda doc: doc["chunks"].append([3, "zz", []]),
        lambda doc: doc["chunks"].append([3, "00" * 32, [["127.0.0.1", 0, None, "01" * 20]]]),
        lambda doc: doc["chunks"].append([3, "00" * 32, [["127.0.0.1", 1, "de", "01" * 20]]]),
        lambda doc: doc["chunks"].append([3, "00" * 32, [["127.0.0.1", 1, None, "01" * 19]]]),
        lambda doc: doc["chunks"].append([3, "00" * 32, [["127.0.0.1", 1, None]]]),
        lambda doc: doc["file"].pop("inode"),
        lambda doc: doc.update(completed={"read_link": 1}),
    ],
    ids=["version", "key", "id", "port", "country", "node-id", "v1-holder", "field", "completed"],
)
def test_a_state_it_cannot_use_is_ignored(tmp_path: Path, spoil: object) -> None:
    state = a_state(tmp_path, completed=False)
    path = tmp_path / "state.json"
    StateWriter(path).save(state, state.chunks)
    doc = json.loads(path.read_text())
    spoil(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))
    assert load_state(path) is None


def test_missing_or_garbled_state_is_none(tmp_path: Path) -> None:
    assert load_state(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_bytes(b"\xff{")
    assert load_state(tmp_path / "bad.json") is None


def test_identity_changes_with_the_content(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"one")
    before = FileIdentity.of(src.resolve(), src.stat())
    assert FileIdentity.of(src.resolve(), src.stat()) == before
    src.write_bytes(b"two")
    # Same size; even with the old mtime put back, the ctime differs.
    os.utime(src, ns=(before.mtime_ns, before.mtime_ns))
    assert FileIdentity.of(src.resolve(), src.stat()) != before


def test_an_unwritable_data_dir_is_a_storage_error(tmp_path: Path) -> None:
    state = a_state(tmp_path, completed=False)
    (tmp_path / "shares").write_bytes(b"a file where the directory should be")
    with pytest.raises(StorageError, match="--data-dir"):
        StateWriter(tmp_path / "shares" / "x.json").save(state, state.chunks)


def summary(
    peers: int, networks: int, countries: tuple[str, ...], unknown: int, best: int
) -> PoolSummary:
    return PoolSummary(peers, networks, countries, unknown, best)


def test_too_few_peers_names_replicas() -> None:
    text = shortfall(summary(4, 4, ("CH", "DE", "IS", "NZ"), 0, 4), 5, 2, geo_table=True)
    assert "found 4 storage peers in CH, DE, IS, NZ" in text
    assert text.endswith("lower --replicas to 4 or add storage peers")
    assert "--min-countries" not in text


def test_too_few_countries_names_min_countries() -> None:
    text = shortfall(summary(2, 2, ("DE",), 0, 1), 2, 2, geo_table=True)
    assert text.endswith("lower --min-countries to 1 or add storage peers in other countries")
    assert "--replicas" not in text


def test_unknown_countries_point_to_the_geo_table() -> None:
    text = shortfall(summary(4, 4, (), 4, 0), 2, 2, geo_table=False)
    assert "found 4 storage peers, all of unknown country" in text
    assert "--geo-table" in text
    assert "--min-countries" not in text
    partly = shortfall(summary(3, 3, ("DE",), 2, 1), 2, 2, geo_table=False)
    assert "found 3 storage peers in DE and 2 of unknown country" in partly
    assert "--geo-table" in partly
    assert "lower --min-countries to 1" in partly
    table = shortfall(summary(3, 3, ("DE",), 2, 1), 2, 2, geo_table=True)
    assert "add their networks to the geo table" in table


def test_no_storage_peer_at_all() -> None:
    text = shortfall(summary(0, 0, (), 0, 0), 2, 2, geo_table=True)
    assert "found no storage peer" in text
    assert "p2pmega seed" in text


def test_shared_networks_are_named() -> None:
    text = shortfall(summary(4, 2, ("DE", "NZ"), 0, 2), 3, 2, geo_table=True)
    assert "found 4 storage peers on 2 distinct networks in DE, NZ" in text
    assert "lower --replicas to 2" in text


def test_removing_the_states_of_a_root_leaves_other_files_and_unfinished_shares(
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from p2pmega.core.magnet import ReadCap, format_link
    from p2pmega.storage.share_state import remove_states_of

    data = tmp_path / "data"
    roots = [ChunkId(bytes([n]) * 32) for n in (7, 8)]
    paths = []
    for n, root in enumerate(roots):
        state = a_state(tmp_path, completed=True)
        assert state.completed is not None
        link = format_link(ReadCap(root, KEY))
        state.completed = replace(state.completed, read_link=link)
        paths.append(state_path(data, Path(f"/shared/{n}")))
        StateWriter(paths[-1]).save(state, state.chunks)
    unfinished = state_path(data, Path("/shared/unfinished"))
    StateWriter(unfinished).save(a_state(tmp_path, completed=False), {})

    assert remove_states_of(data, roots[0].hex()) == 1
    assert sorted(data.joinpath("shares").iterdir()) == sorted([paths[1], unfinished])
    assert remove_states_of(data, roots[0].hex()) == 0
    assert remove_states_of(tmp_path / "no data dir yet", roots[0].hex()) == 0
