"""fetch's part-file writer: O_DIRECT from aligned buffers where possible, the page cache otherwise, same bytes."""

from __future__ import annotations

import errno
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from p2pmega.api.fetch import _PartWriter
from p2pmega.core.chunking import ChunkId
from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import FileEncoder, Manifest, ManifestWalker

CHUNK = 8192  # a multiple of 4 KiB, so whole chunks may go through O_DIRECT


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
    writer: _PartWriter, cap: ReadCap, manifest: Manifest, store: dict[ChunkId, bytes]
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
    writer = _PartWriter.open(part, size, CHUNK, resuming=False)
    try:
        assert _write_all(writer, cap, manifest, store) == size
    finally:
        writer.close()
    assert part.read_bytes() == plaintext
    assert writer.fd == -1


def test_direct_io_is_used_where_the_file_system_allows(tmp_path: Path):
    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | getattr(os, "O_DIRECT", 0)))
    except (OSError, AttributeError):
        pytest.skip("no O_DIRECT here")
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    writer = _PartWriter.open(tmp_path / "part", CHUNK * 2, CHUNK, resuming=False)
    try:
        assert writer._direct_fd is not None
    finally:
        writer.close()
    # A chunk size that is not a multiple of 4 KiB never tries O_DIRECT.
    writer = _PartWriter.open(tmp_path / "part2", 300, 100, resuming=False)
    try:
        assert writer._direct_fd is None
    finally:
        writer.close()


def test_refused_direct_writes_fall_back_to_the_page_cache(tmp_path: Path, monkeypatch):
    size = CHUNK * 4 + 7
    plaintext, cap, manifest, store = _encoded(size)
    part = tmp_path / "part"
    writer = _PartWriter.open(part, size, CHUNK, resuming=False)
    if writer._direct_fd is None:
        writer.close()
        pytest.skip("no O_DIRECT here")
    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd: int, data, offset: int) -> int:
        if fd == writer._direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        assert _write_all(writer, cap, manifest, store) == size
    finally:
        writer.close()
    monkeypatch.undo()
    assert part.read_bytes() == plaintext
    assert (
        1 <= len(refused) <= 4
    )  # each thread may have tried once before the first refusal was seen
