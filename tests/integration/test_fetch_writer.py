"""fetch's part-file writer: chunks decrypted into reused buffers from several threads give the exact file."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from p2pmega.api.fetch import _download
from p2pmega.core.chunking import ChunkId
from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import FileEncoder, Manifest
from p2pmega.core.manifest_walk import ManifestWalker
from p2pmega.errors import OutputWriteFailed
from p2pmega.storage.part_file import PartWriter

CHUNK = 8192


def _encoded(size: int) -> tuple[bytes, ReadCap, Manifest, dict[ChunkId, bytes]]:
    plaintext = random.Random(size).randbytes(size)
    encoder = FileEncoder(name="f.bin", size=size, chunk_size=CHUNK)
    store: dict[ChunkId, bytes] = {}
    for index in range(encoder.chunk_count):
        chunk_id, stored = encoder.encode_chunk(
            index, plaintext[index * CHUNK : (index + 1) * CHUNK]
        )
        store[chunk_id] = stored
    cap, manifest_chunks = encoder.finish()
    store.update(manifest_chunks)
    walker = ManifestWalker(cap)
    while not walker.done:
        for chunk_id in walker.wanted():
            walker.feed(chunk_id, store[chunk_id])
    return plaintext, cap, walker.result(), store


def _write_all(
    writer: PartWriter, cap: ReadCap, manifest: Manifest, store: dict[ChunkId, bytes]
) -> int:
    order = list(range(len(manifest.chunk_ids)))
    random.Random(1).shuffle(order)
    with ThreadPoolExecutor(4) as pool:
        written = pool.map(
            lambda i: writer.write_chunk(cap, manifest, i, store[manifest.chunk_ids[i]], i * CHUNK),
            order,
        )
        return sum(written)


@pytest.mark.parametrize("size", [CHUNK * 6, CHUNK * 6 + 1234, 100])
def test_part_writer_writes_the_file_exactly(tmp_path: Path, size: int):
    plaintext, cap, manifest, store = _encoded(size)
    part = tmp_path / "part"
    writer = PartWriter.open(part, size, CHUNK, resuming=False)
    try:
        assert _write_all(writer, cap, manifest, store) == size
    finally:
        writer.close()
    assert part.read_bytes() == plaintext
    assert writer.fd == -1


def test_close_waits_for_writes_under_way_and_later_writes_fail(tmp_path: Path):
    size = CHUNK * 3
    plaintext, cap, manifest, store = _encoded(size)
    writer = PartWriter.open(tmp_path / "part", size, CHUNK, resuming=False)
    first = manifest.chunk_ids[0]
    with ThreadPoolExecutor(1) as pool:
        # Hold the writer busy from a worker thread while close() runs on this one.
        with writer._idle:
            writer._busy += 1
        closing = pool.submit(writer.close)
        assert not closing.done()
        with writer._idle:
            writer._busy -= 1
            writer._idle.notify_all()
        closing.result(timeout=10)
    assert writer.fd == -1
    with pytest.raises(OSError, match="closed"):
        writer.write_chunk(cap, manifest, 0, store[first], 0)
    del plaintext


class _Holders:
    """Serves chunks from a dict, as a HolderLocator serves them from the network."""

    def __init__(self, store: dict[ChunkId, bytes]) -> None:
        self.store = store
        self.fetched = 0
        self.dead: set[tuple[str, int]] = set()

    def live_holders(self, chunk_id: ChunkId) -> list[tuple[str, int]]:
        """None known: the fetch schedule hands every chunk to fetch_into, the locator's own failover."""
        del chunk_id
        return []

    async def discover(self, chunk_id: ChunkId) -> None:
        del chunk_id

    async def want(self, ids: list[ChunkId], *, placed_near: Mapping[ChunkId, bytes]) -> None:
        del ids, placed_near

    async def fetch_into(
        self, chunk_id: ChunkId, consume: Callable[[bytes], int], *, spread: int = 0
    ) -> int:
        self.fetched += 1
        return await asyncio.to_thread(consume, self.store[chunk_id])


async def test_a_full_disk_is_one_clear_error_and_the_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = CHUNK * 40 + 77
    plaintext, cap, manifest, store = _encoded(size)
    target = tmp_path / "out.bin"
    real_pwrite = os.pwrite
    writes = 0

    def filling_pwrite(fd: int, data: memoryview, offset: int) -> int:
        nonlocal writes
        writes += 1
        if writes > 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling_pwrite)
    holders = _Holders(store)
    with pytest.raises(OutputWriteFailed) as caught:
        await asyncio.wait_for(_download(holders, cap, manifest, target, None), 30)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "No space left on device" in message
    assert "\n" not in message
    assert caught.value.exit_code == 7
    assert not target.exists()

    monkeypatch.setattr(os, "pwrite", real_pwrite)
    again = _Holders(store)
    result = await asyncio.wait_for(_download(again, cap, manifest, target, None), 30)  # type: ignore[arg-type]
    assert target.read_bytes() == plaintext
    # Every chunk written before the disk filled up is recorded: the workers finish what is under way.
    assert result.chunks_resumed == 20
    assert again.fetched == len(manifest.chunk_ids) - result.chunks_resumed
