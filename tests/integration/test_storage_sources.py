"""ChunkStore's defences (issue 16 item 4): only chunk-shaped bytes, per-network caps and store rates, renewal
only with the file's key, and the upgrade of a version-1 index (source unknown, leases capped, junk dropped)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from p2pmega.core.chunking import LEGACY_VERSION, ChunkId, chunk_id_of
from p2pmega.core.node_id import network_of
from p2pmega.defaults import MAX_LEASE_S
from p2pmega.errors import BadChunk, QuotaExceeded, SourceLimitExceeded
from p2pmega.storage import ChunkStore
from p2pmega.storage.files import chunk_path
from p2pmega.storage.sources import SourceLimits, describe_source
from tests.chunk_bytes import shaped

MIB = 1 << 20
NET_A = network_of("203.0.113.7")
NET_B = network_of("198.51.100.7")
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def chunk(size: int = MIB) -> tuple[ChunkId, bytes]:
    data = shaped(os.urandom(size))
    return chunk_id_of(data), data


def open_store(
    root: Path,
    *,
    quota: int = 10 * MIB,
    limits: SourceLimits = SourceLimits(network_share=0.25, rate_bytes_per_min=0),  # noqa: B008
    clock: Clock | None = None,
    rate_clock: Clock | None = None,
) -> ChunkStore:
    return ChunkStore(
        root,
        quota_bytes=quota,
        limits=limits,
        clock=clock or Clock(),
        rate_clock=rate_clock or Clock(),
        direct_io=False,
    )


def test_describe_source() -> None:
    assert describe_source(NET_A) == "203.0.113.0/24"
    assert describe_source(network_of("2001:db8:1:2::9")) == "2001:db8:1::/48"
    assert describe_source(b"") == "unknown"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x02",
        b"plain text that someone wants hosted for free" * 10,
        bytes((4, 0)) + bytes(100),  # a format version that does not exist
        bytes((2, 3)) + bytes(100),  # KIND_META travels inside a root, never on its own
        bytes((2, 9)) + bytes(100),
        bytes((2, 0)) + bytes(60),  # shorter than v2's header, nonce and tag
    ],
)
def test_what_is_no_chunk_is_refused_and_leaves_nothing(tmp_path: Path, data: bytes) -> None:
    with open_store(tmp_path) as store:
        with pytest.raises(BadChunk):
            store.put(chunk_id_of(data), data, lease_s=60, source=NET_A)
        assert store.used_bytes == 0
        assert store.ids() == []


def test_every_readable_version_and_stored_kind_is_accepted(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        for version in (LEGACY_VERSION, 2):
            for kind in (0, 1, 2):
                data = bytes((version, kind)) + os.urandom(200)
                assert store.put(chunk_id_of(data), data, lease_s=60, source=NET_A)


def test_one_network_holds_at_most_its_share_of_the_quota(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path, clock=clock) as store:  # 10 MiB, a quarter each: 2.5 MiB
        first, second, third = chunk(), chunk(), chunk()
        for chunk_id, data in (first, second):
            assert store.put(chunk_id, data, lease_s=60, source=NET_A)
        with pytest.raises(SourceLimitExceeded, match=r"203\.0\.113\.0/24 holds"):
            store.put(*third, lease_s=60, source=NET_A)
        assert store.source_bytes(NET_A) == 2 * MIB
        # Another network stores, and so does this machine (no source), while NET_A is full.
        assert store.put(*third, lease_s=60, source=NET_B)
        assert store.put(*chunk(), lease_s=60)
        assert store.source_bytes(NET_B) == MIB
        # Once NET_A's chunks expire it has room again (they are collected to make it).
        clock.now += 61
        assert store.put(*chunk(), lease_s=60, source=NET_A)
        assert store.source_bytes(NET_A) == MIB


def test_the_quota_still_refuses_when_the_networks_fill_it(tmp_path: Path) -> None:
    limits = SourceLimits(network_share=0.5, rate_bytes_per_min=0)
    with open_store(tmp_path, quota=4 * MIB, limits=limits) as store:
        for source in (NET_A, NET_A, NET_B, NET_B):
            assert store.put(*chunk(), lease_s=60, source=source)
        with pytest.raises(QuotaExceeded) as info:
            store.put(*chunk(), lease_s=60, source=network_of("192.0.2.1"))
        assert not isinstance(info.value, SourceLimitExceeded)


def test_a_network_stores_at_most_its_rate(tmp_path: Path) -> None:
    rate_clock = Clock(0.0)
    limits = SourceLimits(network_share=1.0, rate_bytes_per_min=8 * MIB)
    with open_store(tmp_path, quota=100 * MIB, limits=limits, rate_clock=rate_clock) as store:
        # A full bucket holds a minute's worth: 8 MiB at once, then nothing.
        for _ in range(8):
            assert store.put(*chunk(), lease_s=60, source=NET_A)
        refused = chunk()
        with pytest.raises(SourceLimitExceeded, match="bytes a minute"):
            store.put(*refused, lease_s=60, source=NET_A)
        assert store.has_many([refused[0]]) == [False]
        # Another network has its own bucket.
        assert store.put(*chunk(), lease_s=60, source=NET_B)
        # The bucket refills at 8 MiB a minute: 1 MiB every 7.5 s.
        rate_clock.now += 7.5
        assert store.put(*refused, lease_s=60, source=NET_A)
        with pytest.raises(SourceLimitExceeded):
            store.put(*chunk(), lease_s=60, source=NET_A)


def test_storing_again_from_the_network_does_not_extend_the_lease(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path, clock=clock) as store:
        chunk_id, data = chunk(1000)
        assert store.put(chunk_id, data, lease_s=100, source=NET_A, renew_key=KEY)
        assert (
            store.put(chunk_id, data, lease_s=MAX_LEASE_S, source=NET_B, renew_key=OTHER_KEY)
            is False
        )
        assert store.leases([chunk_id]) == [100]
        assert store.renew_key(chunk_id) == KEY
        # An expired copy is stored afresh, for its new source and key.
        clock.now += 101
        assert store.put(chunk_id, data, lease_s=50, source=NET_B, renew_key=OTHER_KEY)
        assert (store.leases([chunk_id]), store.renew_key(chunk_id)) == ([50], OTHER_KEY)
        assert store.source_bytes(NET_A) == 0
        assert store.source_bytes(NET_B) == 1000
        # A local put (this machine's own duties) still extends it.
        assert store.put(chunk_id, data, lease_s=500) is False
        assert store.leases([chunk_id]) == [500]


def test_only_the_renewal_key_extends_a_keyed_chunk(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path, clock=clock) as store:
        keyed, _ = chunk_id, data = chunk(1000)
        store.put(chunk_id, data, lease_s=100, source=NET_A, renew_key=KEY)
        assert store.renew_unsigned([keyed], lease_s=1000, source=NET_A) == [False]
        assert store.renew_signed([keyed], renew_key=OTHER_KEY, expiry=clock.now + 1000) == [False]
        assert store.leases([keyed]) == [100]
        assert store.renew_signed([keyed], renew_key=KEY, expiry=clock.now + 1000) == [True]
        assert store.leases([keyed]) == [1000]
        # An earlier expiry never shortens it; a later one than the longest lease is cut to it.
        assert store.renew_signed([keyed], renew_key=KEY, expiry=clock.now + 10) == [True]
        assert store.leases([keyed]) == [1000]
        store.renew_signed([keyed], renew_key=KEY, expiry=clock.now + 10 * MAX_LEASE_S)
        assert store.leases([keyed]) == [int(MAX_LEASE_S)]


def test_a_chunk_without_key_is_renewed_only_by_its_own_network(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        chunk_id, data = chunk(1000)
        store.put(chunk_id, data, lease_s=100, source=NET_A)
        assert store.renew_signed([chunk_id], renew_key=KEY, expiry=2e6) == [False]
        assert store.renew_unsigned([chunk_id], lease_s=1000, source=NET_B) == [False]
        assert store.leases([chunk_id]) == [100]
        assert store.renew_unsigned([chunk_id], lease_s=1000, source=NET_A) == [True]
        assert store.leases([chunk_id]) == [1000]


# The schema of index version 1, as p2pmega wrote it before issue 16.
V1_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "INSERT INTO schema_version VALUES (1)",
    """CREATE TABLE chunks (
        id BLOB PRIMARY KEY CHECK (length(id) = 32),
        size INTEGER NOT NULL CHECK (size >= 0),
        stored_at REAL NOT NULL,
        lease_expiry REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX chunks_by_expiry ON chunks (lease_expiry)",
    """CREATE TABLE usage (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        used_bytes INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL
    )""",
    "INSERT INTO usage VALUES (1, 0, 0)",
    """CREATE TRIGGER chunks_added AFTER INSERT ON chunks BEGIN
        UPDATE usage SET used_bytes = used_bytes + NEW.size, chunk_count = chunk_count + 1;
    END""",
    """CREATE TRIGGER chunks_removed AFTER DELETE ON chunks BEGIN
        UPDATE usage SET used_bytes = used_bytes - OLD.size, chunk_count = chunk_count - 1;
    END""",
)


def test_a_version_1_index_is_upgraded(tmp_path: Path) -> None:
    """Old chunks get an unknown source and no key, leases are cut to 90 days, and junk a v1 holder took goes."""
    clock = Clock()
    good_id, good = chunk(5000)
    junk = b"not a chunk at all, but a v1 holder took it" * 100
    junk_id = chunk_id_of(junk)
    (tmp_path / "chunks").mkdir()
    (tmp_path / "tmp").mkdir()
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    for statement in V1_SCHEMA:
        db.execute(statement)
    for chunk_id, data in ((good_id, good), (junk_id, junk)):
        path = chunk_path(tmp_path / "chunks", chunk_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        # A lease of 2**32 - 1 s, as a stranger asked of a version-1 holder: it ends in 2163.
        db.execute(
            "INSERT INTO chunks VALUES (?, ?, ?, ?)",
            (chunk_id, len(data), clock.now, clock.now + 2**32 - 1),
        )
    db.commit()
    db.close()
    with open_store(tmp_path, clock=clock) as store:
        assert store.ids() == [good_id]
        assert not chunk_path(tmp_path / "chunks", junk_id).exists()
        assert (store.used_bytes, store.chunk_count) == (len(good), 1)
        assert store.leases([good_id]) == [int(MAX_LEASE_S)]
        # Unknown source, no key: nobody renews it over the network; it lives out its (capped) lease.
        assert store.renew_key(good_id) is None
        assert store.source_bytes(b"") == len(good)
        assert store.renew_unsigned([good_id], lease_s=60, source=NET_A) == [False]
        assert store.renew_signed([good_id], renew_key=KEY, expiry=clock.now + 1e9) == [False]
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    assert db.execute("SELECT max(version) FROM schema_version").fetchone() == (2,)
    db.close()
    # Opening again changes nothing more.
    with open_store(tmp_path, clock=clock) as store:
        assert store.ids() == [good_id]


def test_free_bytes_is_the_room_left_for_the_asking_network(tmp_path: Path) -> None:
    # What a SPACE request answers (issue 18): the quota's room, bounded by the asker's share of it, with
    # expired chunks counted as free (a store collects them when it needs the room).
    clock = Clock()
    with open_store(tmp_path, quota=10 * MIB, clock=clock) as store:
        cap = int(10 * MIB * 0.25)
        assert store.free_bytes() == 10 * MIB
        assert store.free_bytes(NET_A) == store.free_bytes(NET_B) == cap
        a_id, a_data = chunk()
        store.put(a_id, a_data, lease_s=60, source=NET_A)
        assert store.free_bytes(NET_A) == cap - len(a_data)
        assert store.free_bytes(NET_B) == cap
        local_id, local_data = chunk(4 * MIB)
        store.put(local_id, local_data, lease_s=3600)
        assert store.free_bytes() == 10 * MIB - len(a_data) - len(local_data)
        clock.now += 61  # NET_A's chunk expired: its room is free again, for everyone
        assert store.free_bytes(NET_A) == cap
        assert store.free_bytes() == 10 * MIB - len(local_data)
    with open_store(tmp_path / "small", quota=MIB) as store:
        assert (
            store.free_bytes(NET_A) == MIB // 4
        )  # less than one chunk of 2 MiB: this seed is full
