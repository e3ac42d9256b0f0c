"""core.tree and folder manifests (format v3): path rules, listing codec, layout, vectors and tampering."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmega.core.chunking import (
    FORMAT_VERSION,
    KIND_DATA,
    TREE_VERSION,
    FileKeys,
    make_aad,
    open_chunk,
)
from p2pmega.core.magnet import KeepCap, ReadCap, parse_link
from p2pmega.core.manifest import FileEncoder, Manifest, StreamEncoder
from p2pmega.core.manifest_walk import ManifestWalker, decrypt_chunk
from p2pmega.core.tree import (
    RESERVED_NAME,
    Layout,
    TreeEntry,
    check_path,
    decode_listing,
    encode_listing,
)
from p2pmega.errors import DecryptionFailed, IntegrityError, UnsafePath
from p2pmega.storage.tree_part import inside
from tests.vectors.make_vectors import TREE_VECTORS_PATH, build_tree_vectors

TREE_VECTORS = json.loads(TREE_VECTORS_PATH.read_text("utf-8"))

BAD_PATHS = [
    "",
    "/etc/x",
    "../x",
    "a/../../x",
    "a/..",
    "..",
    ".",
    "a/./b",
    "a//b",
    "a/",
    "x\x00y",
    "a\nb",
    "a\\..\\b",
    "\udcff",  # a byte that is not UTF-8, as os.fsdecode gives it
    "n" * 256,
    "/".join(["d" * 200] * 21),  # over 4096 bytes
    RESERVED_NAME,
    f"{RESERVED_NAME}/x",
]


def _raw_listing(entries: list[tuple[str, int | None]]) -> bytes:
    parts = [struct.pack(">I", len(entries))]
    for path, size in entries:
        raw = path.encode("utf-8", errors="surrogatepass")
        parts.append(struct.pack(">BH", 0 if size is None else 1, len(raw)) + raw)
        if size is not None:
            parts.append(struct.pack(">Q", size))
    return b"".join(parts)


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_are_refused_by_the_rules_and_the_decoder(path: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the rule
        check_path(path)
    with pytest.raises(UnsafePath) as caught:
        decode_listing(_raw_listing([("a", None), (path, 3)]))
    assert isinstance(caught.value, IntegrityError)
    assert caught.value.exit_code == 5
    with pytest.raises(ValueError):  # noqa: PT011 - the sharer's side refuses it too
        encode_listing([TreeEntry("a", None), TreeEntry(path, 3)])


@pytest.mark.parametrize(
    "entries",
    [
        [("a/b", 1)],  # parent not listed
        [("a", 1), ("a/b", 1)],  # parent is a file
        [("a", None), ("a", None)],  # twice
        [("a/b", None), ("a", None)],  # child before parent
    ],
)
def test_structure_rules(entries: list[tuple[str, int | None]]) -> None:
    with pytest.raises(UnsafePath):
        decode_listing(_raw_listing(entries))


def test_good_names_pass() -> None:
    for path in ["a", "a/b c/d.txt", "ünïcödé/文件", "..a", "a..", ".hidden/x", "🌍", "n" * 255]:
        check_path(path)


def test_truncated_or_padded_listings_are_refused() -> None:
    raw = _raw_listing([("a", None), ("a/b", 5)])
    for cut in range(len(raw)):
        with pytest.raises(UnsafePath):
            decode_listing(raw[:cut])
    with pytest.raises(UnsafePath):
        decode_listing(raw + b"\x00")
    with pytest.raises(UnsafePath):
        decode_listing(_raw_listing([("a", None)])[:4] + b"\x07\x00\x01a")  # unknown type 7


def test_inside_refuses_what_normalises_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert inside(tmp_path, "a/b") == tmp_path / "a" / "b"
    # A relative output (-o ., -o out) is just as good as an absolute one.
    monkeypatch.chdir(tmp_path)
    assert inside(Path("."), "a/b") == tmp_path / "a" / "b"
    assert inside(Path("out"), "a") == tmp_path / "out" / "a"
    with pytest.raises(UnsafePath):
        inside(Path("."), "../x")
    for path in ["../x", "a/../../x", "/etc/x", ".", "a/.."]:
        with pytest.raises(UnsafePath):
            inside(tmp_path, path)


_names = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/\\"),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", "..", RESERVED_NAME) and len(n.encode()) <= 255)


@st.composite
def trees(draw: st.DrawFn) -> list[TreeEntry]:
    entries: list[TreeEntry] = []
    dirs = [""]
    seen: set[str] = set()
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(dirs))
        path = f"{parent}/{draw(_names)}" if parent else draw(_names)
        if path in seen:
            continue
        seen.add(path)
        if draw(st.booleans()):
            entries.append(TreeEntry(path, None))
            dirs.append(path)
        else:
            entries.append(TreeEntry(path, draw(st.integers(0, 300))))
    return entries


@given(trees())
def test_listing_round_trips(entries: list[TreeEntry]) -> None:
    assert decode_listing(encode_listing(entries)) == entries


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_listing_bytes_give_only_unsafe_path(data: bytes) -> None:
    try:
        entries = decode_listing(data)
    except UnsafePath:
        return
    for entry in entries:
        check_path(entry.path)


@given(trees(), st.integers(4, 40))
def test_layout_segments_put_every_file_byte_back(entries: list[TreeEntry], listing: int) -> None:
    layout = Layout(entries, listing)
    files = [bytes((i + j) % 256 for j in range(s.size)) for i, s in enumerate(layout.spans)]
    stream = bytes(listing) + b"".join(files)
    assert len(stream) == layout.total_bytes
    rebuilt = [bytearray(len(f)) for f in files]
    step = 7
    for start in range(0, len(stream), step):
        piece = stream[start : start + step]
        for file, at, offset, length in layout.segments(start, len(piece)):
            rebuilt[file][at : at + length] = piece[offset : offset + length]
    assert [bytes(r) for r in rebuilt] == files


def _walk(cap: ReadCap | KeepCap, stored: Mapping[bytes, bytes]) -> Manifest:
    walker = ManifestWalker(cap)
    while not walker.done:
        for chunk_id in walker.wanted():
            walker.feed(chunk_id, stored[chunk_id])
    return walker.result()


def test_tree_vector_decodes_and_regenerates() -> None:
    assert build_tree_vectors() == TREE_VECTORS
    vector = TREE_VECTORS["trees"][0]
    cap = parse_link(vector["read_link"])
    assert isinstance(cap, ReadCap)
    stored = {
        bytes.fromhex(c["id_hex"]): bytes.fromhex(c["stored_hex"])
        for c in vector["data_chunks"] + vector["manifest_chunks"]
    }
    manifest = _walk(cap, stored)
    assert manifest.is_tree
    assert manifest.version == TREE_VERSION
    assert manifest.listing_bytes == len(bytes.fromhex(vector["listing_hex"]))
    stream = b"".join(
        decrypt_chunk(cap, manifest, i, stored[cid]) for i, cid in enumerate(manifest.chunk_ids)
    )
    assert stream.hex() == vector["plaintext_hex"]
    entries = decode_listing(stream[: manifest.listing_bytes])
    assert [{"path": e.path, "size": e.size} for e in entries] == vector["entries"]
    # Every stored chunk of a folder carries version 3; a keep-alive walk lists the same chunks.
    assert all(raw[0] == TREE_VERSION for raw in stored.values())
    kept = _walk(cap.keep_cap(), stored)
    assert kept.chunk_ids == manifest.chunk_ids
    assert kept.listing_bytes is None


@pytest.mark.parametrize("where", ["root", "data"])
@pytest.mark.parametrize("index", [0, 1, 40, -1])
def test_tampered_tree_chunks_fail(where: str, index: int) -> None:
    vector = TREE_VECTORS["trees"][0]
    cap = parse_link(vector["read_link"])
    assert isinstance(cap, ReadCap)
    chunks = vector["manifest_chunks"] if where == "root" else vector["data_chunks"]
    target = bytes.fromhex(chunks[0]["stored_hex"])
    flipped = bytearray(target)
    flipped[index] ^= 0x01
    stored = {
        bytes.fromhex(c["id_hex"]): bytes.fromhex(c["stored_hex"])
        for c in vector["data_chunks"] + vector["manifest_chunks"]
    }
    if where == "root":
        walker = ManifestWalker(cap)
        with pytest.raises(IntegrityError):
            walker.feed(cap.root, bytes(flipped))
        return
    manifest = _walk(cap, stored)
    with pytest.raises(IntegrityError):
        decrypt_chunk(cap, manifest, 0, bytes(flipped))


def test_a_version_2_chunk_does_not_open_in_a_folder() -> None:
    # The version is in the associated data: a folder's chunks cannot be passed off as a file's or back.
    encoder = FileEncoder(name="f", size=100, chunk_size=64, listing_bytes=4)
    _, stored = encoder.encode_chunk(0, bytes(64))
    as_v2 = bytes((FORMAT_VERSION,)) + stored[1:]
    keys = FileKeys.from_file_key(encoder._key)
    assert keys.chunk_key is not None
    aad = make_aad(KIND_DATA, keys.file_id, 0, final=False, level=0, version=FORMAT_VERSION)
    with pytest.raises(DecryptionFailed):
        open_chunk(keys.chunk_key, KIND_DATA, as_v2, aad)


def test_listing_length_is_checked_against_the_size() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        FileEncoder(name="f", size=3, chunk_size=64, listing_bytes=4)
    with pytest.raises(ValueError, match="does not fit"):
        FileEncoder(name="f", size=100, chunk_size=64, listing_bytes=101)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 64 * 5, 64 * 5 + 17])
def test_stream_encoder_matches_a_file_of_the_same_bytes(size: int) -> None:
    data = os.urandom(size)
    encoder = StreamEncoder(name="stdin", chunk_size=64)
    stored: dict[bytes, bytes] = {}
    count = max(1, -(-size // 64))
    for index in range(count):
        piece = data[index * 64 : (index + 1) * 64]
        chunk_id, raw = encoder.encode_chunk(index, piece, final=index == count - 1)
        stored[chunk_id] = raw
    cap, manifest_chunks = encoder.finish()
    stored.update(manifest_chunks)
    manifest = _walk(cap, stored)
    assert manifest.size == size
    assert manifest.name == "stdin"
    assert not manifest.is_tree
    out = b"".join(
        decrypt_chunk(cap, manifest, i, stored[cid]) for i, cid in enumerate(manifest.chunk_ids)
    )
    assert out == data


def test_stream_encoder_refuses_misuse() -> None:
    encoder = StreamEncoder(name="s", chunk_size=64)
    with pytest.raises(ValueError, match="not the chunk size"):
        encoder.encode_chunk(0, b"short", final=False)
    with pytest.raises(ValueError, match="final chunk was not encoded"):
        encoder.finish()
    encoder.encode_chunk(0, b"x" * 10, final=True)
    with pytest.raises(ValueError, match="already encoded"):
        encoder.encode_chunk(1, b"x", final=True)
