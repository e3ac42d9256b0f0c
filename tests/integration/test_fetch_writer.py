"""fetch's part-file writer: chunks decrypted into reused buffers from several threads give the exact file."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from p2pmega.api.fetch import _PartWriter
from p2pmega.core.chunking import ChunkId
from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import FileEncoder, Manifest, ManifestWalker

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


def test_close_waits_for_writes_under_way_and_later_writes_fail(tmp_path: Path):
    size = CHUNK * 3
    plaintext, cap, manifest, store = _encoded(size)
    writer = _PartWriter.open(tmp_path / "part", size, CHUNK, resuming=False)
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
