"""core.chunking: chunk ids, stored-chunk format, padding, size bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmega.core import chunking, crypto
from p2pmega.core.chunking import (
    CHUNK_OVERHEAD_BYTES,
    FORMAT_VERSION,
    KIND_DATA,
    KIND_NODE,
    MAX_CHUNK_SIZE,
    MAX_NAME_BYTES,
    MAX_SEALED_CHUNK_BYTES,
    ChunkId,
    FileKeys,
    chunk_id_of,
    dht_key_of,
    make_aad,
    open_chunk,
    padded_final_length,
    padme,
    seal_chunk,
    short_id,
    verify_chunk,
)
from p2pmega.core.manifest import FileEncoder
from p2pmega.errors import ChunkHashMismatch, DecryptionFailed


def test_chunk_id_is_sha256_of_stored_bytes():
    data = b"stored bytes"
    assert chunk_id_of(data) == crypto.hash_bytes(data)
    assert chunk_id_of(memoryview(data)) == chunk_id_of(bytearray(data))
    verify_chunk(chunk_id_of(data), data)


def test_verify_chunk_rejects_other_bytes_and_names_the_id():
    chunk_id = chunk_id_of(b"one")
    with pytest.raises(ChunkHashMismatch, match=short_id(chunk_id)[:12]):
        verify_chunk(chunk_id, b"two")


def test_dht_key_is_id_prefix():
    chunk_id = ChunkId(bytes(range(32)))
    assert dht_key_of(chunk_id) == bytes(range(20))


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0), (1, 1), (9, 10), (100, 104), (1000, 1024), (12345, 12800), (1 << 20, 1 << 20)],
)
def test_padme_known_values(length, expected):
    assert padme(length) == expected


@settings(max_examples=200)
@given(st.integers(min_value=1, max_value=1 << 40))
def test_padme_overhead_is_below_12_percent(length):
    padded = padme(length)
    assert length <= padded < length * 1.12 + 1
    assert padme(padded) == padded


@settings(max_examples=100)
@given(size=st.integers(min_value=0, max_value=1 << 30), chunk_size=st.sampled_from([64, 1 << 20]))
def test_padding_never_adds_a_chunk_and_covers_the_data(size, chunk_size):
    count = chunking.data_chunk_count(size, chunk_size)
    final = size - (count - 1) * chunk_size
    padded = padded_final_length(size, chunk_size)
    assert final <= padded <= chunk_size
    assert padded >= min(chunk_size, chunking.MIN_PADDED_BYTES - (count - 1) * chunk_size)


def test_small_files_look_alike():
    assert {padded_final_length(size, 1 << 20) for size in (0, 1, 17, 255, 256)} == {256}


def _sealed_data_chunk(index: int = 3, final: bool = False) -> tuple[FileKeys, bytes, bytes]:
    keys = FileKeys.from_file_key(crypto.new_key())
    aad = make_aad(KIND_DATA, keys.file_id, index, final=final, level=0)
    assert keys.chunk_key is not None
    _, stored = seal_chunk(keys.chunk_key, KIND_DATA, b"x" * 50, aad)
    return keys, aad, stored


def test_stored_chunk_layout():
    keys, aad, stored = _sealed_data_chunk()
    assert stored[:2] == bytes((FORMAT_VERSION, KIND_DATA)) == b"\x02\x00"
    assert len(stored) == 50 + CHUNK_OVERHEAD_BYTES
    assert len(aad) == 28
    assert keys.chunk_key is not None
    assert open_chunk(keys.chunk_key, KIND_DATA, stored, aad) == b"x" * 50


def test_version_in_header_must_be_the_one_the_aad_names():
    keys, aad, stored = _sealed_data_chunk()
    assert keys.chunk_key is not None
    as_v1 = bytes((1,)) + stored[1:]
    with pytest.raises(DecryptionFailed, match="not format v2"):
        open_chunk(keys.chunk_key, KIND_DATA, as_v1, aad)
    # Read as a v1 file, a v2 chunk fails too: v1 boxes are XChaCha20-Poly1305 with another AAD.
    v1_aad = bytes((1,)) + aad[1:]
    with pytest.raises(DecryptionFailed):
        open_chunk(keys.chunk_key, KIND_DATA, as_v1, v1_aad)
    # Version 3 (folders) is known; 4 is not.
    with pytest.raises(DecryptionFailed, match="needs a newer p2pmega"):
        open_chunk(keys.chunk_key, KIND_DATA, bytes((4,)) + stored[1:], bytes((4,)) + aad[1:])


@pytest.mark.parametrize("index", [0, 1, 2, 33, 34, 60, -33, -32, -1])
def test_any_flipped_byte_fails(index):
    keys, aad, stored = _sealed_data_chunk()
    assert keys.chunk_key is not None
    tampered = bytearray(stored)
    tampered[index] ^= 0x80
    with pytest.raises(DecryptionFailed):
        open_chunk(keys.chunk_key, KIND_DATA, bytes(tampered), aad)


def test_chunk_bound_to_place_kind_and_file():
    keys, _, stored = _sealed_data_chunk(index=3, final=False)
    assert keys.chunk_key is not None
    for aad in (
        make_aad(KIND_DATA, keys.file_id, 4, final=False, level=0),
        make_aad(KIND_DATA, keys.file_id, 3, final=True, level=0),
        make_aad(KIND_DATA, bytes(16), 3, final=False, level=0),
    ):
        with pytest.raises(DecryptionFailed):
            open_chunk(keys.chunk_key, KIND_DATA, stored, aad)
    with pytest.raises(DecryptionFailed, match="kind 1"):
        open_chunk(
            keys.chunk_key,
            KIND_NODE,
            stored,
            make_aad(KIND_NODE, keys.file_id, 3, final=False, level=1),
        )


def test_keep_alive_keys_cannot_open_data():
    file_keys = FileKeys.from_file_key(bytes(32))
    keep_keys = FileKeys.from_verify_key(file_keys.verify_key)
    assert keep_keys.file_id == file_keys.file_id
    assert keep_keys.chunk_key is None
    assert keep_keys.meta_key is None
    assert file_keys.verify_key not in (file_keys.chunk_key, file_keys.meta_key)
    assert "verify_key" not in repr(file_keys)


@pytest.mark.parametrize("chunk_size", [64, 96, 4096])
def test_max_sealed_bound_holds_for_a_full_root(chunk_size):
    # A root listing a full node of ids with the longest name is the biggest chunk a file makes.
    fanout = chunk_size // 32
    encoder = FileEncoder(
        name="n" * MAX_NAME_BYTES, size=fanout * chunk_size, chunk_size=chunk_size
    )
    for index in range(encoder.chunk_count):
        _, stored = encoder.encode_chunk(index, bytes(chunk_size))
        assert len(stored) == chunk_size + CHUNK_OVERHEAD_BYTES
    _, manifest_chunks = encoder.finish()
    assert len(manifest_chunks) == 1
    root_extra = len(manifest_chunks[0][1]) - chunk_size - CHUNK_OVERHEAD_BYTES
    assert 0 < root_extra <= chunking.ROOT_EXTRA_MAX_BYTES
    assert (
        MAX_SEALED_CHUNK_BYTES
        == MAX_CHUNK_SIZE + chunking.ROOT_EXTRA_MAX_BYTES + CHUNK_OVERHEAD_BYTES
    )


def test_ids_are_shown_in_the_links_base32() -> None:
    """check, errors and --json show ids as the link's xt does (issue 21, bug 8)."""
    from p2pmega.core.chunking import format_id
    from p2pmega.core.magnet import ReadCap, format_link

    root = ChunkId(bytes(range(32)))
    link = format_link(ReadCap(root=root, key=bytes(32)))
    assert f"urn:p2pmega:{format_id(root)}&" in link
    assert short_id(root) == f"{format_id(root)[:12]}…{format_id(root)[-4:]}"


def test_a_chunk_id_is_the_whole_chunk_hash() -> None:
    from p2pmega.core import crypto
    from p2pmega.core.ids import CHUNK_ID_BYTES

    assert CHUNK_ID_BYTES == crypto.HASH_BYTES == len(chunk_id_of(b"x"))
