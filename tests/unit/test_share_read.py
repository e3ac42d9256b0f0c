"""share's read-and-seal step: chunks read by offset, in any order, and a file that shrank is refused."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from p2pmega.api.share import _read_and_seal
from p2pmega.api.share_source import pread_full
from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.manifest import FileEncoder
from p2pmega.core.manifest_walk import ManifestWalker, decrypt_chunk
from p2pmega.errors import InputFileError


def test_chunks_read_by_offset_in_any_order(tmp_path: Path):
    data = os.urandom(64 * 3 + 10)
    path = tmp_path / "f"
    path.write_bytes(data)
    encoder = FileEncoder(name="f", size=len(data), chunk_size=64)
    fd = os.open(path, os.O_RDONLY)
    sealed_by_index = {}
    try:
        for index in (3, 0, 2, 1):
            chunk_id, sealed, length = _read_and_seal(
                encoder, functools.partial(pread_full, fd), index, 64, len(data)
            )
            assert length == (10 if index == 3 else 64)
            assert chunk_id_of(sealed) == chunk_id
            sealed_by_index[index] = sealed
    finally:
        os.close(fd)
    # Each sealed chunk opens, with the file's key at its place, to the bytes at its offset.
    cap, manifest_chunks = encoder.finish()
    stored = dict(manifest_chunks)
    walker = ManifestWalker(cap)
    while not walker.done:
        for chunk_id in walker.wanted():
            walker.feed(chunk_id, stored[chunk_id])
    manifest = walker.result()
    for index, sealed in sealed_by_index.items():
        assert manifest.chunk_ids[index] == chunk_id_of(sealed)
        assert decrypt_chunk(cap, manifest, index, sealed) == data[index * 64 : (index + 1) * 64]


def test_a_file_that_shrank_is_refused(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(bytes(200))
    encoder = FileEncoder(name="f", size=200, chunk_size=64)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.truncate(path, 100)
        with pytest.raises(InputFileError, match="changed size"):
            _read_and_seal(encoder, functools.partial(pread_full, fd), 2, 64, 200)
    finally:
        os.close(fd)
