"""ChunkStore on a real disk: sizes, leases, quota under threads, rot, crash repair, kill -9."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from p2pmega.core.chunking import (
    MAX_SEALED_CHUNK_BYTES,
    MIN_SEALED_CHUNK_BYTES,
    ChunkId,
    chunk_id_of,
    short_id,
)
from p2pmega.defaults import MAX_LEASE_S
from p2pmega.errors import (
    BadChunk,
    BadOption,
    ChunkHashMismatch,
    ChunkNotStored,
    QuotaExceeded,
    StorageError,
    StoreCorrupt,
)
from p2pmega.storage import ChunkStore
from p2pmega.storage import files as storage_files
from tests.chunk_bytes import shaped

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# The smallest chunk a holder takes: a header and a seal, nothing shorter is a chunk.
MIN = MIN_SEALED_CHUNK_BYTES


def make_chunk(size: int, seed: int = 0) -> tuple[ChunkId, bytes]:
    data = shaped(random.Random(seed).randbytes(size))
    return chunk_id_of(data), data


def chunk_path(root: Path, chunk_id: bytes) -> Path:
    name = chunk_id.hex()
    return root / "chunks" / name[:2] / name


def files_on_disk(root: Path) -> dict[bytes, bytes]:
    """Every chunk file under root/chunks, by the id its name claims, with its content."""
    return {
        bytes.fromhex(path.name): path.read_bytes()
        for path in (root / "chunks").glob("*/*")
        if path.is_file()
    }


def index_rows(root: Path) -> dict[bytes, int]:
    with sqlite3.connect(root / "index.sqlite3") as db:
        rows = dict(db.execute("SELECT id, size FROM chunks").fetchall())
    db.close()
    return rows


def assert_consistent(store: ChunkStore) -> None:
    """No temp file, no orphan, no row without file, every file intact, usage adds up."""
    root = store.root
    assert list((root / "tmp").iterdir()) == []
    files = files_on_disk(root)
    rows = index_rows(root)
    assert set(files) == set(rows)
    for chunk_id, data in files.items():
        assert hashlib.sha256(data).digest() == chunk_id
        assert rows[chunk_id] == len(data)
    assert store.used_bytes == sum(rows.values())
    assert store.chunk_count == len(rows)


# File systems where O_DIRECT is refused or meaningless (no page cache to bypass, or none of its own).
_NO_DIRECT_FS = {"tmpfs", "ramfs", "overlay", "fuse", "9p", "nfs", "nfs4", "cifs"}


def _fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on: the longest mount point in /proc/mounts over it."""
    best, kind = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            mount_point, fs_type = line.split()[1:3]
            mount_point = mount_point.replace("\\040", " ")
            inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) > len(best):
                best, kind = mount_point, fs_type
    return kind


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory on a file system that takes O_DIRECT: tmp_path if it does, else one under
    /var/tmp or the repository. pytest's tmp_path is often tmpfs, which refuses O_DIRECT, and the
    tests using this fixture would then test nothing. In CI (CI=true) finding none is a failure."""
    repo = Path(__file__).resolve().parents[2]
    # /var/tmp: by FHS a disk-backed temp dir; each test gets its own fresh directory under it.
    for base in (tmp_path, Path("/var/tmp"), repo):  # noqa: S108
        if not base.is_dir() or not os.access(base, os.W_OK) or not os.path.exists("/proc/mounts"):
            continue
        if _fs_type(base.resolve()) in _NO_DIRECT_FS:
            continue
        path = Path(tempfile.mkdtemp(prefix="p2pmega-direct-", dir=base))
        if not storage_files.direct_io_works(str(path)):
            shutil.rmtree(path)
            continue
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    reason = f"no O_DIRECT-capable directory (tried {tmp_path}, /var/tmp, {repo})"
    if os.environ.get("CI", "").lower() in {"true", "1"}:
        pytest.fail(f"{reason}; CI must run the O_DIRECT tests")
    pytest.skip(reason)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock):
    with ChunkStore(tmp_path / "store", quota_bytes=64 << 20, clock=clock) as opened:
        yield opened


def test_short_reads_do_not_make_a_good_chunk_look_rotten(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read may return less than asked (network file systems, signals): read on, do not delete."""
    chunk_id, data = make_chunk(100_000, seed=7)
    store.put(chunk_id, data, lease_s=60)
    real_read, real_readv = os.read, os.readv

    def short_read(fd: int, n: int) -> bytes:
        return real_read(fd, min(n, 4096))

    def short_readv(fd: int, buffers: list[memoryview]) -> int:
        return real_readv(fd, [buffers[0][:4096]])

    monkeypatch.setattr(os, "read", short_read)
    monkeypatch.setattr(os, "readv", short_readv)
    assert store.get(chunk_id) == data
    assert chunk_path(store.root, chunk_id).exists()
    assert store.chunk_count == 1


@pytest.mark.parametrize("size", [MIN, MIN + 1, 255, 4096, 1 << 20, MAX_SEALED_CHUNK_BYTES])
def test_put_then_get_returns_exact_bytes(store: ChunkStore, size: int) -> None:
    chunk_id, data = make_chunk(size, seed=size)
    assert store.put(chunk_id, data, lease_s=60) is True
    assert store.get(chunk_id) == data
    assert chunk_path(store.root, chunk_id).read_bytes() == data
    assert store.used_bytes == size
    assert store.chunk_count == 1
    assert store.ids() == [chunk_id]
    assert store.has_many([chunk_id]) == [True]
    assert_consistent(store)


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_and_page_cache_writes_store_exact_bytes(
    request: pytest.FixtureRequest, tmp_path: Path, direct_io: bool
) -> None:
    """Sizes around the 4096-byte O_DIRECT alignment: the padding never reaches the file."""
    root = request.getfixturevalue("direct_dir") if direct_io else tmp_path
    sizes = [MIN, MIN + 1, 4095, 4096, 4097, 8191, (1 << 20) + 41, MAX_SEALED_CHUNK_BYTES]
    chunks = [make_chunk(size, seed=size) for size in sizes]
    with ChunkStore(root, quota_bytes=64 << 20, direct_io=direct_io) as store:
        for chunk_id, data in chunks:
            assert store.put(chunk_id, data, lease_s=60) is True
        assert store.direct_io is direct_io
        for chunk_id, data in chunks:
            assert chunk_path(root, chunk_id).read_bytes() == data
            assert store.get(chunk_id) == data
        assert_consistent(store)
    with ChunkStore(root, quota_bytes=64 << 20) as reopened:
        assert not reopened.repair_report.repaired
        assert reopened.has_many([c for c, _ in chunks]) == [True] * len(chunks)


def test_a_filesystem_refusing_direct_writes_gets_page_cache_writes(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_DIRECT accepted at open but refused on write (EINVAL): the chunk is written anyway, and
    the store stops trying."""

    def refuse(fd: int, data: object) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    chunks = [make_chunk(5000, seed=i) for i in range(2)]
    with ChunkStore(direct_dir, quota_bytes=1 << 20, direct_io=True) as store:
        started_direct = store.direct_io
        assert started_direct
        monkeypatch.setattr(storage_files, "_write_direct", refuse)
        for chunk_id, data in chunks:
            assert store.put(chunk_id, data, lease_s=60) is True
            assert store.get(chunk_id) == data
        assert store.direct_io is False
        assert_consistent(store)


def test_direct_reads_fill_no_page_cache(direct_dir: Path) -> None:
    """A holder reads chunks with O_DIRECT too: serving a chunk leaves none of it in the page cache."""
    chunk_id, data = make_chunk((1 << 20) + 41, seed=7)
    with ChunkStore(direct_dir, quota_bytes=8 << 20, direct_io=True) as store:
        store.put(chunk_id, data, lease_s=60)
        assert store.direct_io
        assert store.get(chunk_id) == data
        fd = os.open(chunk_path(direct_dir, chunk_id), os.O_RDONLY)
        try:
            # RWF_NOWAIT reads only what is cached; EAGAIN says the first page is not.
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            pass
        except OSError as exc:  # pragma: no cover - a filesystem without RWF_NOWAIT
            pytest.skip(f"no RWF_NOWAIT here: {exc}")
        else:
            pytest.fail("the chunk's first page is in the page cache after a direct read")
        finally:
            os.close(fd)


@pytest.mark.parametrize("size", [MIN, 4095, 4096, 4097, (1 << 20) + 41])
def test_a_room_placed_on_a_direct_io_boundary_is_read_into_without_a_bounce_buffer(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """The holder's path: read_into a pooled buffer at direct_io_offset, straight from the disk."""
    chunk_id, data = make_chunk(size, seed=size)
    head = 45  # like a ChunkData frame header in front of the data
    with ChunkStore(direct_dir, quota_bytes=8 << 20, direct_io=True) as store:
        store.put(chunk_id, data, lease_s=60)
        assert store.direct_io

        def no_bounce(size: int) -> object:
            raise AssertionError("an aligned room was read through the bounce buffer")

        monkeypatch.setattr(storage_files, "_thread_buffer", no_bounce)
        buffer = bytearray(b"\xee" * (head + size + ChunkStore.ROOM_SPARE_BYTES))
        start = store.room_offset(buffer, head)
        assert 0 <= start < storage_files.DIRECT_ALIGN
        got = store.read_into(chunk_id, lambda need: memoryview(buffer)[start + head :])
        assert got == size
        assert buffer[start + head : start + head + size] == data
        assert buffer[: start + head] == b"\xee" * (start + head)  # nothing before it touched
        monkeypatch.undo()
        # The same room one byte off the boundary still gets the chunk, through the bounce buffer.
        got = store.read_into(chunk_id, lambda need: memoryview(buffer)[start + head + 1 :])
        assert buffer[start + head + 1 : start + head + 1 + size] == data


def test_a_filesystem_refusing_direct_reads_gets_page_cache_reads(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, view: object, want: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    chunks = [make_chunk(size, seed=size) for size in (MIN, 5000, (1 << 20) + 3)]
    with ChunkStore(direct_dir, quota_bytes=8 << 20, direct_io=True) as store:
        for chunk_id, data in chunks:
            store.put(chunk_id, data, lease_s=60)
        monkeypatch.setattr(storage_files, "_read_direct", refuse)
        for chunk_id, data in chunks:
            assert store.get(chunk_id) == data
        assert_consistent(store)


def test_no_o_direct_means_page_cache_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_files, "_O_DIRECT", 0)  # as off Linux
    with ChunkStore(tmp_path, quota_bytes=1 << 20) as store:
        assert store.direct_io is False
        chunk_id, data = make_chunk(5000)
        assert store.put(chunk_id, data, lease_s=60) is True
        assert store.get(chunk_id) == data
        assert_consistent(store)


def test_put_of_stored_chunk_returns_false_and_never_shortens_lease(
    store: ChunkStore, clock: FakeClock
) -> None:
    chunk_id, data = make_chunk(1000)
    assert store.put(chunk_id, data, lease_s=100) is True
    assert store.put(chunk_id, data, lease_s=10) is False
    assert store.lease_expiry(chunk_id) == clock.now + 100
    clock.now += 50
    assert store.put(chunk_id, data, lease_s=500) is False
    assert store.lease_expiry(chunk_id) == clock.now + 500
    assert store.used_bytes == 1000
    assert store.chunk_count == 1


def test_put_with_wrong_id_is_rejected_and_leaves_nothing(store: ChunkStore) -> None:
    chunk_id, data = make_chunk(5000)
    tampered = data[:10] + bytes([data[10] ^ 1]) + data[11:]
    with pytest.raises(ChunkHashMismatch):
        store.put(chunk_id, tampered, lease_s=60)
    assert store.has_many([chunk_id, chunk_id_of(tampered)]) == [False, False]
    assert store.used_bytes == 0
    assert files_on_disk(store.root) == {}
    assert_consistent(store)


def test_put_larger_than_any_chunk_is_refused_as_bad_chunk(store: ChunkStore) -> None:
    chunk_id, data = make_chunk(MAX_SEALED_CHUNK_BYTES + 1)
    with pytest.raises(BadChunk, match=str(MAX_SEALED_CHUNK_BYTES)):
        store.put(chunk_id, data, lease_s=60)
    assert store.used_bytes == 0


@pytest.mark.parametrize("lease_s", [0, -1, float("nan"), float("inf"), True])
def test_bad_lease_is_refused(store: ChunkStore, lease_s: float) -> None:
    chunk_id, data = make_chunk(MIN)
    with pytest.raises(BadOption, match="lease"):
        store.put(chunk_id, data, lease_s=lease_s)
    with pytest.raises(BadOption, match="lease"):
        store.renew([chunk_id], lease_s=lease_s)


def test_get_of_unknown_chunk_raises_not_stored(store: ChunkStore) -> None:
    chunk_id, _ = make_chunk(MIN)
    with pytest.raises(ChunkNotStored, match=short_id(chunk_id)[:12]):
        store.get(chunk_id)
    assert store.lease_expiry(chunk_id) is None
    assert store.has_many([chunk_id]) == [False]


def test_quota_refuses_a_chunk_that_does_not_fit(tmp_path: Path, clock: FakeClock) -> None:
    with ChunkStore(tmp_path, quota_bytes=3000, clock=clock) as store:
        chunks = [make_chunk(1000, seed) for seed in range(4)]
        for chunk_id, data in chunks[:3]:
            assert store.put(chunk_id, data, lease_s=60)
        with pytest.raises(QuotaExceeded, match="3000-byte quota") as info:
            store.put(*chunks[3], lease_s=60)
        assert info.value.exit_code == 7
        assert "\n" not in str(info.value)
        assert store.used_bytes == 3000
        assert store.has_many([chunks[3][0]]) == [False]
        # A chunk already stored is still accepted (lease renewal) when the store is full.
        assert store.put(*chunks[0], lease_s=120) is False
        assert_consistent(store)


def test_full_store_collects_expired_chunks_to_make_room(tmp_path: Path, clock: FakeClock) -> None:
    with ChunkStore(tmp_path, quota_bytes=2000, clock=clock) as store:
        old = make_chunk(1000, 1)
        kept = make_chunk(1000, 2)
        new = make_chunk(1000, 3)
        store.put(*old, lease_s=10)
        store.put(*kept, lease_s=100)
        clock.now += 20
        assert store.put(*new, lease_s=10) is True
        assert store.has_many([old[0], kept[0], new[0]]) == [False, True, True]
        assert not chunk_path(tmp_path, old[0]).exists()
        assert store.used_bytes == 2000
        assert_consistent(store)


def test_concurrent_puts_cannot_together_exceed_quota(tmp_path: Path) -> None:
    size = 64 << 10
    fits = 10
    threads_n, per_thread = 8, 5
    with ChunkStore(tmp_path, quota_bytes=fits * size + size // 2) as store:
        chunks = [make_chunk(size, seed) for seed in range(threads_n * per_thread)]
        barrier = threading.Barrier(threads_n)
        stored: list[bytes] = []
        refused: list[bytes] = []
        failures: list[BaseException] = []
        record = threading.Lock()

        def worker(mine: list[tuple[ChunkId, bytes]]) -> None:
            barrier.wait()
            for chunk_id, data in mine:
                try:
                    store.put(chunk_id, data, lease_s=60)
                except QuotaExceeded:
                    with record:
                        refused.append(chunk_id)
                except BaseException as exc:
                    with record:
                        failures.append(exc)
                else:
                    with record:
                        stored.append(chunk_id)

        threads = [
            threading.Thread(target=worker, args=(chunks[i * per_thread : (i + 1) * per_thread],))
            for i in range(threads_n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert failures == []
        assert len(stored) == fits
        assert len(refused) == len(chunks) - fits
        assert store.used_bytes == fits * size <= store.quota_bytes
        assert sorted(store.ids()) == sorted(stored)
        assert_consistent(store)


def test_concurrent_puts_of_one_chunk_store_it_once(tmp_path: Path) -> None:
    chunk_id, data = make_chunk(256 << 10)
    with ChunkStore(tmp_path, quota_bytes=1 << 20) as store:
        barrier = threading.Barrier(8)
        results: list[bool] = []

        def worker() -> None:
            barrier.wait()
            results.append(store.put(chunk_id, data, lease_s=60))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(results) == [False] * 7 + [True]
        assert store.used_bytes == len(data)
        assert_consistent(store)


def test_concurrent_puts_are_visible_on_return_and_durable_after_reopen(tmp_path: Path) -> None:
    threads_n, per_thread = 16, 6
    chunks = [make_chunk((64 << 10) + seed, seed) for seed in range(threads_n * per_thread)]
    failures: list[BaseException] = []
    with ChunkStore(tmp_path, quota_bytes=1 << 30) as store:
        barrier = threading.Barrier(threads_n)

        def worker(mine: list[tuple[ChunkId, bytes]]) -> None:
            barrier.wait()
            try:
                for chunk_id, data in mine:
                    assert store.put(chunk_id, data, lease_s=60) is True
                    # Acknowledged means stored: readable at once, from this thread or any other.
                    assert store.has_many([chunk_id]) == [True]
                    assert store.get(chunk_id) == data
            except BaseException as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=worker, args=(chunks[i::threads_n],)) for i in range(threads_n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert failures == []
        assert store.chunk_count == len(chunks)
        assert_consistent(store)
    with ChunkStore(tmp_path, quota_bytes=1 << 30) as store:
        assert not store.repair_report.repaired
        assert sorted(store.ids()) == sorted(chunk_id for chunk_id, _ in chunks)
        assert store.used_bytes == sum(len(data) for _, data in chunks)
        for chunk_id, data in chunks:
            assert store.get(chunk_id) == data
        assert_consistent(store)


def test_expired_chunks_are_not_served_then_collected(store: ChunkStore, clock: FakeClock) -> None:
    short = make_chunk(700, 1)
    long = make_chunk(900, 2)
    store.put(*short, lease_s=10)
    store.put(*long, lease_s=100)
    assert store.collect_garbage() == 0
    clock.now += 10  # a lease ending exactly now has expired
    assert store.has_many([short[0], long[0]]) == [False, True]
    assert store.ids() == [long[0]]
    assert store.lease_expiry(short[0]) is None
    with pytest.raises(ChunkNotStored):
        store.get(short[0])
    assert store.renew([short[0], long[0]], lease_s=200) == [False, True]
    assert store.used_bytes == 1600  # expired bytes still occupy the disk until collected
    assert store.collect_garbage() == 1
    assert not chunk_path(store.root, short[0]).exists()
    assert store.used_bytes == 900
    assert store.chunk_count == 1
    assert store.get(long[0]) == long[1]
    assert store.lease_expiry(long[0]) == clock.now + 200
    clock.now += 200
    assert store.collect_garbage() == 1
    assert store.used_bytes == 0
    assert store.ids() == []
    assert_consistent(store)


def test_renew_keeps_the_longer_lease(store: ChunkStore, clock: FakeClock) -> None:
    chunk_id, data = make_chunk(100)
    store.put(chunk_id, data, lease_s=1000)
    assert store.renew([chunk_id, chunk_id], lease_s=10) == [True, True]
    assert store.lease_expiry(chunk_id) == clock.now + 1000
    assert store.renew([], lease_s=10) == []


def test_rotted_chunk_is_detected_deleted_reported_and_not_served(
    store: ChunkStore, caplog: pytest.LogCaptureFixture
) -> None:
    chunk_id, data = make_chunk(10_000)
    other_id, other = make_chunk(10_000, seed=1)
    store.put(chunk_id, data, lease_s=60)
    store.put(other_id, other, lease_s=60)
    path = chunk_path(store.root, chunk_id)
    rotten = bytearray(path.read_bytes())
    rotten[5000] ^= 0x40
    path.write_bytes(rotten)
    with (
        caplog.at_level(logging.WARNING, logger="p2pmega.storage"),
        pytest.raises(ChunkHashMismatch, match="deleted") as info,
    ):
        store.get(chunk_id)
    assert short_id(chunk_id)[:12] in str(info.value)
    assert any(short_id(chunk_id)[:12] in record.getMessage() for record in caplog.records)
    assert not any(data[:16].hex() in record.getMessage() for record in caplog.records)
    assert not path.exists()
    assert store.has_many([chunk_id, other_id]) == [False, True]
    assert store.used_bytes == len(other)
    with pytest.raises(ChunkNotStored):
        store.get(chunk_id)
    assert store.put(chunk_id, data, lease_s=60) is True  # a good copy can be stored again
    assert store.get(chunk_id) == data
    assert_consistent(store)


def lend(buffer: bytearray, offset: int, asked: list[int]) -> Callable[[int], memoryview]:
    """A read_into room callback lending ``buffer[offset:]`` and recording what was asked for."""

    def room(size: int) -> memoryview:
        asked.append(size)
        return memoryview(buffer)[offset:]

    return room


def test_read_into_reads_into_the_lent_room(store: ChunkStore) -> None:
    chunk_id, data = make_chunk(70_000)
    store.put(chunk_id, data, lease_s=60)
    buffer = bytearray(100_000)
    asked: list[int] = []
    assert store.read_into(chunk_id, lend(buffer, 42, asked)) == len(data)
    assert asked == [len(data) + 1]
    assert buffer[42 : 42 + len(data)] == data
    with pytest.raises(ValueError, match="room"):
        store.read_into(chunk_id, lend(bytearray(len(data)), 0, []))
    with pytest.raises(ChunkNotStored):
        store.read_into(make_chunk(MIN, seed=9)[0], lend(buffer, 0, asked))
    assert_consistent(store)


@pytest.mark.parametrize("read", ["get", "read_into"])
@pytest.mark.parametrize("change", ["flip", "append", "truncate"])
def test_rotted_chunk_is_not_served_by_either_read(
    store: ChunkStore, read: str, change: str
) -> None:
    """A file whose bytes changed, or that grew or shrank, is rot: deleted, never served."""
    chunk_id, data = make_chunk(10_000)
    store.put(chunk_id, data, lease_s=60)
    path = chunk_path(store.root, chunk_id)
    rotten = bytearray(data)
    if change == "flip":
        rotten[0] ^= 1
    elif change == "append":
        rotten += b"\0"
    else:
        del rotten[-1]
    path.write_bytes(rotten)
    reader: dict[str, Callable[[], object]] = {
        "get": lambda: store.get(chunk_id),
        "read_into": lambda: store.read_into(chunk_id, lend(bytearray(20_000), 0, [])),
    }
    with pytest.raises(ChunkHashMismatch, match="deleted"):
        reader[read]()
    assert not path.exists()
    assert store.has_many([chunk_id]) == [False]
    assert_consistent(store)


def test_chunk_file_deleted_behind_the_store_is_forgotten(store: ChunkStore) -> None:
    chunk_id, data = make_chunk(300)
    store.put(chunk_id, data, lease_s=60)
    chunk_path(store.root, chunk_id).unlink()
    with pytest.raises(ChunkNotStored):
        store.get(chunk_id)
    assert store.has_many([chunk_id]) == [False]
    assert store.used_bytes == 0


def test_reopen_keeps_chunks_and_leases(tmp_path: Path, clock: FakeClock) -> None:
    chunks = [make_chunk(size, size) for size in (MIN, 1000, 70_000)]
    with ChunkStore(tmp_path, quota_bytes=1 << 20, clock=clock) as store:
        for lease_s, (chunk_id, data) in enumerate(chunks, start=1):
            store.put(chunk_id, data, lease_s=lease_s * 100)
    with ChunkStore(tmp_path, quota_bytes=1 << 20, clock=clock) as store:
        assert not store.repair_report.repaired
        assert store.used_bytes == MIN + 1000 + 70_000
        assert sorted(store.ids()) == sorted(cid for cid, _ in chunks)
        for lease_s, (chunk_id, data) in enumerate(chunks, start=1):
            assert store.get(chunk_id) == data
            assert store.lease_expiry(chunk_id) == clock.now + lease_s * 100
        assert_consistent(store)


def test_open_reconciles_orphans_missing_files_and_temp_files(
    tmp_path: Path, clock: FakeClock
) -> None:
    kept, gone, truncated, orphan = (make_chunk(2000, seed) for seed in range(4))
    with ChunkStore(tmp_path, clock=clock) as store:
        for chunk_id, data in (kept, gone, truncated):
            store.put(chunk_id, data, lease_s=60)
    chunk_path(tmp_path, gone[0]).unlink()
    chunk_path(tmp_path, truncated[0]).write_bytes(truncated[1][:1000])
    chunk_path(tmp_path, orphan[0]).write_bytes(orphan[1])
    (tmp_path / "tmp" / "0011223344556677.abc.tmp").write_bytes(b"half a chunk")
    with ChunkStore(tmp_path, clock=clock) as store:
        report = store.repair_report
        assert (report.temp_files, report.orphan_files) == (1, 1)
        assert (report.missing_files, report.size_mismatches) == (1, 1)
        assert store.ids() == [kept[0]]
        assert store.used_bytes == 2000
        assert_consistent(store)
        assert store.put(*orphan, lease_s=60) is True


def test_second_open_of_same_directory_is_refused(tmp_path: Path) -> None:
    with ChunkStore(tmp_path), pytest.raises(StorageError, match="in use by another process"):
        ChunkStore(tmp_path)
    ChunkStore(tmp_path).close()  # the lock went with the first store


def test_index_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    ChunkStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        db.execute("UPDATE schema_version SET version = 3")
    db.close()
    with pytest.raises(StoreCorrupt, match="schema version 3"):
        ChunkStore(tmp_path)


def test_garbage_index_is_reported_as_corrupt(tmp_path: Path) -> None:
    (tmp_path / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreCorrupt, match=r"index\.sqlite3"):
        ChunkStore(tmp_path)
    ChunkStore(tmp_path / "fresh").close()


def test_closed_store_refuses_calls_and_close_is_idempotent(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    store.close()
    store.close()
    chunk_id, data = make_chunk(MIN)
    with pytest.raises(StorageError, match="closed"):
        store.put(chunk_id, data, lease_s=1)
    with pytest.raises(StorageError, match="closed"):
        store.get(chunk_id)


def test_negative_quota_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadOption, match="-1"):
        ChunkStore(tmp_path, quota_bytes=-1)


# The child writes chunks of random sizes (up to 1 MiB, so many kills land mid-write) from
# argv[3] threads at once, and prints each id only after put() returned, i.e. once the store
# acknowledged it.
CHILD = """
import os, random, sys, threading
from pathlib import Path
from p2pmega.core.chunking import chunk_id_of
from p2pmega.storage import ChunkStore
store = ChunkStore(Path(sys.argv[1]), quota_bytes=1 << 40)
out = threading.Lock()
def writer(seed):
    rng = random.Random(seed)
    while True:
        data = bytes((2, 0)) + os.urandom(rng.randint(64, 1 << 20))  # a v2 data chunk's header
        chunk_id = chunk_id_of(data)
        store.put(chunk_id, data, lease_s=3600)
        with out:
            sys.stdout.write(chunk_id.hex() + "\\n")
            sys.stdout.flush()
seed, threads = int(sys.argv[2]), int(sys.argv[3])
for i in range(1, threads):
    threading.Thread(target=writer, args=(seed * 100 + i,), daemon=True).start()
writer(seed * 100)
"""


def run_child_and_kill(
    root: Path, seed: int, rng: random.Random, log_path: Path, threads: int
) -> set[bytes]:
    """Start a writer, let it acknowledge a few chunks, SIGKILL it at a random moment.

    Returns:
        Every id it acknowledged before it died.
    """
    acknowledged: set[bytes] = set()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log_path.open("ab") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), str(seed), str(threads)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    assert child.stdout is not None
    try:
        for _ in range(rng.randint(1, 3)):
            line = child.stdout.readline()
            assert line, f"writer died early: {log_path.read_text()!r}"
            acknowledged.add(bytes.fromhex(line.decode()))
        time.sleep(rng.uniform(0, 0.015))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        acknowledged.update(bytes.fromhex(line.decode()) for line in child.stdout)
    finally:
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return acknowledged


@pytest.mark.parametrize("threads", [1, 4])
def test_kill_9_mid_write_leaves_a_consistent_store(tmp_path: Path, threads: int) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    root = tmp_path / "store"
    acknowledged: set[bytes] = set()
    repaired_rounds = 0
    rounds = 0
    # Keep killing until at least 3 kills provably landed mid-write (a temp file or an
    # unacknowledged file was left behind); about 4 in 10 random kills do.
    while rounds < 5 or (repaired_rounds < 3 and rounds < 40):
        acknowledged |= run_child_and_kill(
            root, seed + rounds, rng, tmp_path / "child.log", threads
        )
        rounds += 1
        with ChunkStore(root, quota_bytes=1 << 40) as store:
            repaired_rounds += store.repair_report.repaired
            assert store.repair_report.missing_files == 0, f"seed {seed}"
            assert store.repair_report.size_mismatches == 0, f"seed {seed}"
            assert_consistent(store)
            lost = [c.hex()[:12] for c in acknowledged if not store.has_many([ChunkId(c)])[0]]
            assert lost == [], f"acknowledged chunks lost (seed {seed})"
            for chunk_id in acknowledged:
                assert chunk_id_of(store.get(ChunkId(chunk_id))) == chunk_id
    assert repaired_rounds >= 1, f"no kill landed mid-write in {rounds} rounds (seed {seed})"
    assert len(acknowledged) >= rounds


def test_stray_files_in_shards_are_left_alone_and_not_served(tmp_path: Path) -> None:
    ChunkStore(tmp_path).close()
    stray = tmp_path / "chunks" / "ab" / "notes.txt"
    stray.write_bytes(b"not a chunk")
    misplaced_id, misplaced = make_chunk(100)
    wrong_shard = "00" if misplaced_id.hex()[:2] != "00" else "01"
    (tmp_path / "chunks" / wrong_shard / misplaced_id.hex()).write_bytes(misplaced)
    with ChunkStore(tmp_path) as store:
        assert not store.repair_report.repaired
        assert store.ids() == []
        assert store.used_bytes == 0
        with pytest.raises(ChunkNotStored):
            store.get(misplaced_id)
    assert stray.read_bytes() == b"not a chunk"


POOL = [make_chunk(size, seed) for seed, size in enumerate((MIN, 300, 999, 1000, 1500, 2000))]


class StoreAgainstModel(RuleBasedStateMachine):
    """Random put/get/renew/GC/clock/reopen sequences agree with a dict model of the store."""

    quota = 4000

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.clock = FakeClock()
        self.store = ChunkStore(Path(self.dir.name), quota_bytes=self.quota, clock=self.clock)
        self.model: dict[bytes, tuple[bytes, float]] = {}  # id -> (data, lease expiry)

    def live(self, chunk_id: bytes) -> bool:
        return chunk_id in self.model and self.model[chunk_id][1] > self.clock.now

    def collect(self) -> int:
        expired = [cid for cid in self.model if not self.live(cid)]
        for cid in expired:
            del self.model[cid]
        return len(expired)

    @rule(chunk=st.sampled_from(POOL), lease_s=st.sampled_from([5.0, 50.0]))
    def put(self, chunk: tuple[ChunkId, bytes], lease_s: float) -> None:
        chunk_id, data = chunk
        expiry = self.clock.now + lease_s
        if chunk_id in self.model:
            assert self.store.put(chunk_id, data, lease_s=lease_s) is False
            self.model[chunk_id] = (data, max(self.model[chunk_id][1], expiry))
            return
        used = sum(len(d) for d, _ in self.model.values())
        if used + len(data) > self.quota:
            self.collect()
            used = sum(len(d) for d, _ in self.model.values())
        if used + len(data) > self.quota:
            with pytest.raises(QuotaExceeded):
                self.store.put(chunk_id, data, lease_s=lease_s)
        else:
            assert self.store.put(chunk_id, data, lease_s=lease_s) is True
            self.model[chunk_id] = (data, expiry)

    @rule(chunk=st.sampled_from(POOL))
    def get(self, chunk: tuple[ChunkId, bytes]) -> None:
        chunk_id, data = chunk
        if self.live(chunk_id):
            assert self.store.get(chunk_id) == data
        else:
            with pytest.raises(ChunkNotStored):
                self.store.get(chunk_id)

    @rule(
        chunks=st.lists(st.sampled_from(POOL), max_size=4),
        lease_s=st.sampled_from([5.0, 50.0]),
    )
    def renew(self, chunks: list[tuple[ChunkId, bytes]], lease_s: float) -> None:
        ids = [chunk_id for chunk_id, _ in chunks]
        expected = [self.live(cid) for cid in ids]
        assert self.store.renew(ids, lease_s=lease_s) == expected
        for cid, live in zip(ids, expected, strict=True):
            if live:
                data, old = self.model[cid]
                self.model[cid] = (data, max(old, self.clock.now + lease_s))

    @rule(seconds=st.sampled_from([1.0, 5.0, 30.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def collect_garbage(self) -> None:
        assert self.store.collect_garbage() == self.collect()

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = ChunkStore(Path(self.dir.name), quota_bytes=self.quota, clock=self.clock)
        assert not self.store.repair_report.repaired

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.store.used_bytes == sum(len(d) for d, _ in self.model.values())
        assert self.store.chunk_count == len(self.model)
        assert self.store.ids() == sorted(cid for cid in self.model if self.live(cid))
        for cid in self.model:
            expected = self.model[cid][1] if self.live(cid) else None
            assert self.store.lease_expiry(ChunkId(cid)) == expected

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()


StoreAgainstModel.TestCase.settings = settings(
    max_examples=15, stateful_step_count=20, deadline=None
)
test_store_against_model = StoreAgainstModel.TestCase


@pytest.mark.parametrize("size", [0, 1, MIN_SEALED_CHUNK_BYTES - 1])
def test_bytes_shorter_than_any_chunk_are_refused(store: ChunkStore, size: int) -> None:
    """A 0-byte "chunk" was stored (issue 16): nothing shorter than a header and a seal is one."""
    chunk_id, data = make_chunk(size)
    with pytest.raises(BadChunk, match="under the 42-byte header and seal"):
        store.put(chunk_id, data, lease_s=60)
    assert store.chunk_count == 0


def test_a_lease_is_capped_at_ninety_days(store: ChunkStore) -> None:
    """A stranger pinned chunks until 2163 with a lease of 2**32 - 1 s (issue 16)."""
    chunk_id, data = make_chunk(100)
    store.put(chunk_id, data, lease_s=2**32 - 1)
    assert store.leases([chunk_id]) == [int(MAX_LEASE_S)]
    assert store.renew([chunk_id], lease_s=10**12) == [True]
    assert store.leases([chunk_id]) == [int(MAX_LEASE_S)]
