"""core.manifest: round trips through chunks, tree and link; every tamper case; golden vectors."""

from __future__ import annotations

import dataclasses
import json
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pmega.core.chunking import (
    FORMAT_VERSION,
    KIND_DATA,
    KIND_META,
    KIND_NODE,
    KIND_ROOT,
    ROOT_LEVEL,
    ChunkId,
    FileKeys,
    chunk_id_of,
    make_aad,
    seal_chunk,
)
from p2pmega.core.crypto import seal
from p2pmega.core.magnet import KeepCap, ReadCap, format_link, parse_link
from p2pmega.core.manifest import FileEncoder, Manifest, level_counts
from p2pmega.core.manifest_walk import ManifestWalker, decrypt_chunk, decrypt_chunk_into
from p2pmega.errors import (
    BadManifest,
    BadOption,
    ChunkHashMismatch,
    DecryptionFailed,
    IntegrityError,
)
from tests.strategies import files, small_chunk_sizes
from tests.vectors.make_vectors import LEGACY_VECTORS_PATH, VECTORS_PATH, build_vectors

Store = dict[ChunkId, bytes]


def encode(data: bytes, chunk_size: int, name: str = "file.bin") -> tuple[ReadCap, Store]:
    encoder = FileEncoder(name=name, size=len(data), chunk_size=chunk_size)
    store: Store = {}
    view = memoryview(data)
    for index in reversed(range(encoder.chunk_count)):  # any order must work
        chunk_id, stored = encoder.encode_chunk(
            index, view[index * chunk_size : (index + 1) * chunk_size]
        )
        store[chunk_id] = stored
    cap, manifest_chunks = encoder.finish()
    assert manifest_chunks[0][0] == cap.root
    store.update(manifest_chunks)
    return cap, store


def walk(cap: ReadCap | KeepCap, store: Store) -> Manifest:
    walker = ManifestWalker(cap)
    while not walker.done:
        wanted = walker.wanted()
        assert wanted
        for chunk_id in wanted:
            walker.feed(chunk_id, store[chunk_id])
    assert walker.wanted() == []
    return walker.result()


def decrypt_via_buffer(
    cap: ReadCap, manifest: Manifest, index: int, data: bytes, *, id_verified: bool = False
) -> bytes:
    """decrypt_chunk_into, as fetch calls it: into a reused buffer that holds old bytes."""
    out = bytearray(b"\xee" * (manifest.chunk_size or 0))
    length = decrypt_chunk_into(cap, manifest, index, data, out, id_verified=id_verified)
    return bytes(out[:length])


# Every decryption test runs against both ways of opening a data chunk.
DECRYPTORS = pytest.mark.parametrize(
    "decrypt", [decrypt_chunk, decrypt_via_buffer], ids=["decrypt_chunk", "decrypt_chunk_into"]
)


def decode(cap: ReadCap, store: Store) -> bytes:
    manifest = walk(cap, store)
    pieces = [
        decrypt_chunk(cap, manifest, index, store[chunk_id])
        for index, chunk_id in enumerate(manifest.chunk_ids)
    ]
    assert pieces == [
        decrypt_via_buffer(cap, manifest, index, store[chunk_id])
        for index, chunk_id in enumerate(manifest.chunk_ids)
    ]
    return b"".join(pieces)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), chunk_size=small_chunk_sizes)
def test_round_trip_through_chunks_tree_and_link(data, chunk_size):
    plaintext = data.draw(files(chunk_size))
    cap, store = encode(plaintext, chunk_size)
    parsed = parse_link(format_link(cap))
    assert isinstance(parsed, ReadCap)
    assert decode(parsed, store) == plaintext
    manifest = walk(parsed, store)
    assert (manifest.name, manifest.size, manifest.chunk_size) == (
        "file.bin",
        len(plaintext),
        chunk_size,
    )
    assert set(manifest.chunk_ids) | set(manifest.manifest_ids) == set(store)


@pytest.mark.parametrize(
    ("size", "chunk_size", "manifest_chunks"),
    [
        (0, 64, 1),
        (1, 64, 1),
        (63, 64, 1),
        (64, 64, 1),
        (65, 64, 1),  # two data chunks: the root lists both
        (3 * 64, 64, 3),  # 3 chunks > 2 ids per node: root + 2 leaves
        (9 * 64 + 1, 64, 1 + 2 + 3 + 5),  # 10 chunks: levels of 5, 3, 2 nodes
        (10 * 96, 96, 1 + 2 + 4),
    ],
)
def test_tree_shape(size, chunk_size, manifest_chunks):
    plaintext = random.Random(size).randbytes(size)
    cap, store = encode(plaintext, chunk_size)
    manifest = walk(cap, store)
    assert len(manifest.manifest_ids) == manifest_chunks
    assert len(manifest.chunk_ids) == max(1, -(-size // chunk_size))
    assert decode(cap, store) == plaintext


def test_keep_cap_lists_every_chunk_but_no_metadata():
    plaintext = random.Random(1).randbytes(700)
    cap, store = encode(plaintext, 64, name="secret-name.txt")
    full = walk(cap, store)
    keep = parse_link(format_link(cap.keep_cap()))
    assert isinstance(keep, KeepCap)
    listed = walk(keep, store)
    assert listed == Manifest(full.chunk_ids, full.manifest_ids, None, None, None)
    assert "secret-name" not in format_link(cap.keep_cap())
    with pytest.raises(ValueError, match="keep-alive"):
        decrypt_chunk(cap, listed, 0, store[listed.chunk_ids[0]])


def test_encode_from_threads_in_any_order():
    chunk_size = 64
    plaintext = random.Random(2).randbytes(50 * chunk_size + 3)
    encoder = FileEncoder(name="t", size=len(plaintext), chunk_size=chunk_size)
    order = list(range(encoder.chunk_count))
    random.Random(3).shuffle(order)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(
                lambda i: encoder.encode_chunk(i, plaintext[i * chunk_size : (i + 1) * chunk_size]),
                order,
            )
        )
    cap, manifest_chunks = encoder.finish()
    store = dict(results) | dict(manifest_chunks)
    assert decode(cap, store) == plaintext


def test_a_resumed_encoder_adopts_chunks_sealed_by_an_earlier_one():
    """A resumed share lists the chunks an interrupted run stored, sealed under the same key."""
    chunk_size = 64
    plaintext = random.Random(4).randbytes(5 * chunk_size + 9)
    key = bytes(range(32))  # the key the share's state recorded
    first = FileEncoder(name="r", size=len(plaintext), chunk_size=chunk_size, key=key)
    store: Store = {}
    earlier = {}
    for index in (0, 3):
        chunk_id, sealed = first.encode_chunk(index, plaintext[index * 64 : (index + 1) * 64])
        store[chunk_id] = sealed
        earlier[index] = chunk_id
    second = FileEncoder(name="r", size=len(plaintext), chunk_size=chunk_size, key=key)
    for index, chunk_id in earlier.items():
        second.adopt_chunk(index, chunk_id)
    for index in (1, 2, 4, 5):
        chunk_id, sealed = second.encode_chunk(index, plaintext[index * 64 : (index + 1) * 64])
        store[chunk_id] = sealed
    cap, manifest_chunks = second.finish()
    store.update(manifest_chunks)
    assert decode(cap, store) == plaintext
    with pytest.raises(ValueError, match="index 6"):
        second.adopt_chunk(6, earlier[0])
    with pytest.raises(ValueError, match="32 bytes"):
        second.adopt_chunk(0, ChunkId(bytes(31)))


def test_encoder_rejects_misuse():
    encoder = FileEncoder(name="f", size=100, chunk_size=64)
    assert encoder.chunk_count == 2
    with pytest.raises(ValueError, match="63 bytes, expected 64"):
        encoder.encode_chunk(0, bytes(63))
    with pytest.raises(ValueError, match="expected 36"):
        encoder.encode_chunk(1, bytes(64))
    with pytest.raises(ValueError, match="index 2"):
        encoder.encode_chunk(2, bytes(36))
    encoder.encode_chunk(0, bytes(64))
    with pytest.raises(ValueError, match="first is 1"):
        encoder.finish()
    with pytest.raises(BadOption, match="chunk size 32"):
        FileEncoder(name="f", size=1, chunk_size=32)
    with pytest.raises(BadOption, match="control character"):
        FileEncoder(name="a\nb", size=1)


def test_file_key_is_random_not_derived_from_content():
    cap_a, _ = encode(b"same content", 64)
    cap_b, _ = encode(b"same content", 64)
    assert cap_a.key != cap_b.key
    assert cap_a.root != cap_b.root


# Tamper cases on data chunks ------------------------------------------------------------------


@pytest.fixture
def encoded() -> tuple[bytes, ReadCap, Store, Manifest]:
    plaintext = random.Random(4).randbytes(5 * 64 + 10)
    cap, store = encode(plaintext, 64)
    return plaintext, cap, store, walk(cap, store)


def flip(data: bytes, index: int) -> bytes:
    tampered = bytearray(data)
    tampered[index] ^= 0x04
    return bytes(tampered)


REGIONS = {
    "version": 0,
    "kind": 1,
    "nonce": 2,
    "nonce-end": 33,
    "body": 40,
    "tag": -32,
    "tag-end": -1,
}


@pytest.mark.parametrize("where", REGIONS)
@DECRYPTORS
def test_flipped_data_byte_is_caught(encoded, where, decrypt):
    _, cap, store, manifest = encoded
    index = len(manifest.chunk_ids) - 1
    tampered = flip(store[manifest.chunk_ids[index]], REGIONS[where])
    # A holder serving altered bytes is caught by the id check...
    with pytest.raises(ChunkHashMismatch):
        decrypt(cap, manifest, index, tampered)
    # ...and even with an id that matches (a forged manifest entry) the AEAD still refuses.
    ids = list(manifest.chunk_ids)
    ids[index] = chunk_id_of(tampered)
    forged = dataclasses.replace(manifest, chunk_ids=tuple(ids))
    with pytest.raises(DecryptionFailed):
        decrypt(cap, forged, index, tampered)
    # A caller that says it checked the id skips the hash, never the AEAD.
    with pytest.raises(DecryptionFailed):
        decrypt(cap, manifest, index, tampered, id_verified=True)


@DECRYPTORS
def test_id_verified_skips_only_the_hash(encoded, decrypt):
    plaintext, cap, store, manifest = encoded
    pieces = [
        decrypt(cap, manifest, i, store[c], id_verified=True)
        for i, c in enumerate(manifest.chunk_ids)
    ]
    assert b"".join(pieces) == plaintext
    # Another chunk of the same file, offered at the wrong index, still fails to authenticate.
    with pytest.raises(DecryptionFailed):
        decrypt(cap, manifest, 0, store[manifest.chunk_ids[1]], id_verified=True)


@DECRYPTORS
def test_swapped_chunks_are_caught(encoded, decrypt):
    _, cap, store, manifest = encoded
    first, second = manifest.chunk_ids[0], manifest.chunk_ids[1]
    with pytest.raises(ChunkHashMismatch):
        decrypt(cap, manifest, 0, store[second])
    swapped = dataclasses.replace(manifest, chunk_ids=(second, first, *manifest.chunk_ids[2:]))
    with pytest.raises(DecryptionFailed):
        decrypt(cap, swapped, 0, store[second])


@DECRYPTORS
def test_dropped_last_chunk_is_caught(encoded, decrypt):
    _, cap, store, manifest = encoded
    truncated = dataclasses.replace(manifest, chunk_ids=manifest.chunk_ids[:-1], size=4 * 64 + 10)
    last = len(truncated.chunk_ids) - 1
    # The former second-to-last chunk was sealed as "not final": it refuses to end the file.
    with pytest.raises(DecryptionFailed):
        decrypt(cap, truncated, last, store[truncated.chunk_ids[last]])


@DECRYPTORS
def test_chunk_from_another_file_is_caught(encoded, decrypt):
    _, cap, _, manifest = encoded
    other_cap, other_store = encode(random.Random(5).randbytes(5 * 64 + 10), 64)
    other = walk(other_cap, other_store)
    foreign = other_store[other.chunk_ids[2]]
    forged = dataclasses.replace(
        manifest, chunk_ids=(*manifest.chunk_ids[:2], other.chunk_ids[2], *manifest.chunk_ids[3:])
    )
    with pytest.raises(DecryptionFailed):
        decrypt(cap, forged, 2, foreign)
    # The same file encrypted twice has a fresh key, so even identical content does not mix.
    again_cap, again_store = encode(b"x" * 100, 64)
    _, copy_store = encode(b"x" * 100, 64)
    again = walk(again_cap, again_store)
    copy_chunk = next(v for k, v in copy_store.items() if k not in {again_cap.root})
    with pytest.raises(IntegrityError):
        decrypt(again_cap, again, 0, copy_chunk)


# Tamper cases on the manifest -----------------------------------------------------------------


def test_altered_manifest_chunk_is_caught_by_id_and_aead(encoded):
    _, cap, store, _ = encoded
    tampered_root = flip(store[cap.root], 30)
    walker = ManifestWalker(cap)
    with pytest.raises(ChunkHashMismatch):
        walker.feed(cap.root, tampered_root)
    forged = dataclasses.replace(cap, root=chunk_id_of(tampered_root))
    with pytest.raises(DecryptionFailed):
        ManifestWalker(forged).feed(forged.root, tampered_root)
    keep = KeepCap(forged.root, cap.keep_cap().verify_key)
    with pytest.raises(DecryptionFailed):
        ManifestWalker(keep).feed(keep.root, tampered_root)


def test_node_fed_under_wrong_id_or_unwanted(encoded):
    _, cap, store, manifest = encoded
    walker = ManifestWalker(cap)
    with pytest.raises(ChunkHashMismatch):
        walker.feed(cap.root, store[manifest.manifest_ids[1]])
    with pytest.raises(ValueError, match="not wanted"):
        walker.feed(manifest.manifest_ids[1], store[manifest.manifest_ids[1]])
    with pytest.raises(ValueError, match="not done"):
        walker.result()


def _root(keys: FileKeys, plain: bytes) -> tuple[ChunkId, bytes]:
    aad = make_aad(KIND_ROOT, keys.file_id, 0, final=True, level=ROOT_LEVEL)
    return seal_chunk(keys.verify_key, KIND_ROOT, plain, aad)


def _meta(keys: FileKeys, size: int, chunk_size: int, name: bytes) -> bytes:
    assert keys.meta_key is not None
    aad = make_aad(KIND_META, keys.file_id, 0, final=True, level=ROOT_LEVEL)
    return seal(keys.meta_key, struct.pack(">QIH", size, chunk_size, len(name)) + name, aad)


def _walk_forged_root(plain: bytes) -> None:
    key = bytes(range(32))
    root_id, root = _root(FileKeys.from_file_key(key), plain)
    ManifestWalker(ReadCap(root_id, key)).feed(root_id, root)


def test_swapped_manifest_nodes_are_caught(encoded):
    _, cap, store, manifest = encoded
    keys = FileKeys.from_file_key(cap.key)
    # 6 chunks, 2 ids per node: the root lists two level-2 nodes; re-seal it with them swapped.
    first, second = manifest.manifest_ids[1:3]
    meta = _meta(keys, 5 * 64 + 10, 64, b"file.bin")
    plain = struct.pack(">BQIH", 2, 6, 2, len(meta)) + meta + second + first
    root_id, root = _root(keys, plain)
    walker = ManifestWalker(dataclasses.replace(cap, root=root_id))
    walker.feed(root_id, root)
    with pytest.raises(DecryptionFailed):
        walker.feed(second, store[second])


@pytest.mark.parametrize(
    ("height", "count", "fanout", "ids", "match"),
    [
        (1, 2, 2, 2, "height 1, expected 0"),
        (0, 3, 2, 3, "height 0, expected 1"),
        (0, 0, 2, 0, "0 chunks"),
        (0, 2, 1, 2, "fanout 1"),
        (0, 2, 2, 1, "expected 2 ids"),
        (0, 2, 3, 2, "chunk size 64 with fanout 3"),
    ],
)
def test_inconsistent_root_is_bad_manifest(height, count, fanout, ids, match):
    keys = FileKeys.from_file_key(bytes(range(32)))
    meta = _meta(keys, 100, 64, b"f")
    plain = struct.pack(">BQIH", height, count, fanout, len(meta)) + meta + bytes(32 * ids)
    with pytest.raises(BadManifest, match=match):
        _walk_forged_root(plain)


@pytest.mark.parametrize(
    ("size", "chunk_size", "name", "match"),
    [
        (1000, 64, b"f", "2 chunks for 1000 bytes"),
        (100, 32, b"f", "chunk size 32"),
        (100, 64, b"\xff", "name is invalid"),
        (100, 64, b"a\x00b", "name is invalid"),
    ],
)
def test_inconsistent_metadata_is_bad_manifest(size, chunk_size, name, match):
    keys = FileKeys.from_file_key(bytes(range(32)))
    meta = _meta(keys, size, chunk_size, name)
    plain = struct.pack(">BQIH", 0, 2, 2, len(meta)) + meta + bytes(64)
    with pytest.raises(BadManifest, match=match):
        _walk_forged_root(plain)


@DECRYPTORS
def test_wrong_padding_or_length_is_bad_manifest(decrypt):
    key = bytes(range(32))
    keys = FileKeys.from_file_key(key)
    assert keys.chunk_key is not None
    aad = make_aad(KIND_DATA, keys.file_id, 0, final=True, level=0)
    for plain in (b"abc" + b"\x01" + bytes(60), b"abc"):
        chunk_id, stored = seal_chunk(keys.chunk_key, KIND_DATA, plain, aad)
        manifest = Manifest((chunk_id,), (), "f", 3, 64)
        with pytest.raises(BadManifest, match="padding"):
            decrypt(ReadCap(ChunkId(bytes(32)), key), manifest, 0, stored)


def test_level_counts():
    assert level_counts(1, 2) == [1]
    assert level_counts(65536, 32768) == [65536, 2]  # 64 GiB of 1 MiB chunks: one level of nodes
    assert level_counts(10, 2) == [10, 5, 3, 2]


def test_node_layout_uses_node_kind(encoded):
    _, _, store, manifest = encoded
    assert all(
        store[node][:2] == bytes((FORMAT_VERSION, KIND_NODE)) for node in manifest.manifest_ids[1:]
    )
    assert store[manifest.manifest_ids[0]][:2] == bytes((FORMAT_VERSION, KIND_ROOT))


# Golden vectors --------------------------------------------------------------------------------

VECTORS = json.loads(VECTORS_PATH.read_text())
# Format v1 (XChaCha20-Poly1305): frozen; still read, never written.
LEGACY_VECTORS = json.loads(LEGACY_VECTORS_PATH.read_text())


def test_golden_vectors_regenerate_identically():
    assert build_vectors() == VECTORS


@pytest.mark.parametrize(
    "vector",
    [dict(v, version=2) for v in VECTORS["files"]]
    + [dict(v, version=1) for v in LEGACY_VECTORS["files"]],
    ids=lambda v: f"v{v['version']}: {v['description']}",
)
def test_golden_vectors_decode(vector):
    store = {
        ChunkId(bytes.fromhex(c["id_hex"])): bytes.fromhex(c["stored_hex"])
        for c in vector["data_chunks"] + vector["manifest_chunks"]
    }
    for link in (vector["read_link"], vector["read_link_with_peers"]):
        cap = parse_link(link)
        assert isinstance(cap, ReadCap)
        assert cap.key.hex() == vector["file_key_hex"]
        assert decode(cap, store) == bytes.fromhex(vector["plaintext_hex"])
        assert walk(cap, store).name == vector["name"]
        assert walk(cap, store).version == vector["version"]
    assert {raw[0] for raw in store.values()} == {vector["version"]}
    keep = parse_link(vector["keep_link"])
    assert isinstance(keep, KeepCap)
    assert keep.verify_key.hex() == vector["verify_key_hex"]
    assert [c.hex() for c in walk(keep, store).chunk_ids] == [
        c["id_hex"] for c in vector["data_chunks"]
    ]


def test_root_claiming_a_huge_file_costs_nothing_until_nodes_arrive():
    key = bytes(range(32))
    keys = FileKeys.from_file_key(key)
    meta = _meta(keys, (1 << 32) * 64, 64, b"f")
    plain = struct.pack(">BQIH", 31, 1 << 32, 2, len(meta)) + meta + bytes(31) + b"\x01" + bytes(32)
    root_id, root = _root(keys, plain)
    walker = ManifestWalker(ReadCap(root_id, key))
    walker.feed(root_id, root)
    assert len(walker.wanted()) == 2
    too_many = struct.pack(">BQIH", 32, (1 << 32) + 1, 2, len(meta)) + meta + bytes(64)
    with pytest.raises(BadManifest, match="4294967297 chunks"):
        _walk_forged_root(too_many)
    with pytest.raises(BadOption, match="raise the chunk size"):
        FileEncoder(name="f", size=1 << 40, chunk_size=64)
