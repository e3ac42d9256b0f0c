"""Generate tests/vectors/core_v2.json (files, format v2) and core_v3.json (a folder, format v3).

Run ``python -m tests.vectors.make_vectors`` from the repository root. Keys and nonces come from
a counter-based stream instead of the OS CSPRNG, so the output is byte-for-byte reproducible;
this substitution lives here only and never in p2pmega itself. A diff in the output means the
format changed: bump its version (docs/FORMAT.md). ``core_v1.json`` (format v1, XChaCha20-Poly1305)
was made by this script's version-1 ancestor and stays frozen: p2pmega still reads v1 files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from p2pmega.core import crypto
from p2pmega.core.chunking import FORMAT_VERSION, TREE_VERSION
from p2pmega.core.magnet import ReadCap, format_link
from p2pmega.core.manifest import FileEncoder
from p2pmega.core.tree import TreeEntry, encode_listing

VECTORS_PATH = Path(__file__).with_name("core_v2.json")
LEGACY_VECTORS_PATH = Path(__file__).with_name("core_v1.json")
TREE_VECTORS_PATH = Path(__file__).with_name("core_v3.json")

# (description, file name, chunk size, size): a file in one chunk, one needing padding in two
# chunks, and one whose manifest needs a tree of height 2 (64-byte chunks: 2 ids per node).
FILES = [
    ("empty file: one padded data chunk", "empty", 64, 0),
    ("two chunks, final one padded", "notes.txt", 64, 100),
    ("seven chunks, manifest tree of height 2", "Grüße 🌍.bin", 64, 7 * 64 - 5),
]


@contextmanager
def deterministic_randomness(label: bytes) -> Iterator[None]:
    """Replace crypto's CSPRNG with SHA-256(label || counter) for the duration.

    Args:
        label: Separates the streams of different vectors.

    Yields:
        Nothing; randomness is deterministic inside the block.
    """
    counter = itertools.count()

    def fake_random(count: int) -> bytes:
        block = hashlib.sha256(label + next(counter).to_bytes(8, "big")).digest()
        return (block * (count // len(block) + 1))[:count]

    replacement: Callable[[int], bytes] = fake_random
    with mock.patch.object(crypto, "_random_bytes", replacement):
        yield


def plaintext_of(size: int) -> bytes:
    """The plaintext of a vector file: bytes 0, 1, 2, ... modulo 251."""
    return bytes(index % 251 for index in range(size))


def file_vector(description: str, name: str, chunk_size: int, size: int) -> dict[str, Any]:
    """Encode one file deterministically and describe every stored chunk."""
    data = plaintext_of(size)
    with deterministic_randomness(name.encode("utf-8")):
        encoder = FileEncoder(name=name, size=size, chunk_size=chunk_size)
        data_chunks = [
            encoder.encode_chunk(index, data[index * chunk_size : (index + 1) * chunk_size])
            for index in range(encoder.chunk_count)
        ]
        cap, manifest_chunks = encoder.finish()
    peers_cap = ReadCap(
        cap.root, cap.key, cap.name, cap.size, (("192.0.2.7", 4001), ("2001:db8::1", 4001))
    )
    return {
        "description": description,
        "name": name,
        "size": size,
        "chunk_size": chunk_size,
        "plaintext_hex": data.hex(),
        "file_key_hex": cap.key.hex(),
        "verify_key_hex": cap.keep_cap().verify_key.hex(),
        "root_id_hex": cap.root.hex(),
        "read_link": format_link(cap),
        "read_link_with_peers": format_link(peers_cap),
        "keep_link": format_link(cap.keep_cap()),
        "data_chunks": [{"id_hex": cid.hex(), "stored_hex": raw.hex()} for cid, raw in data_chunks],
        "manifest_chunks": [
            {"id_hex": cid.hex(), "stored_hex": raw.hex()} for cid, raw in manifest_chunks
        ],
    }


# A folder: nested directories, an empty one, an empty file and a non-ASCII name; 64-byte chunks.
TREE = [
    TreeEntry("docs", None),
    TreeEntry("docs/a.txt", 70),
    TreeEntry("docs/empty", None),
    TreeEntry("docs/zero", 0),
    TreeEntry("Grüße 🌍.bin", 30),
]


def tree_vector() -> dict[str, Any]:
    """Encode the folder TREE deterministically: its listing, then each file's bytes (plaintext_of)."""
    listing = encode_listing(TREE)
    files = [plaintext_of(entry.size) for entry in TREE if entry.size is not None]
    stream = listing + b"".join(files)
    chunk_size = 64
    with deterministic_randomness(b"tree"):
        encoder = FileEncoder(
            name="folder", size=len(stream), chunk_size=chunk_size, listing_bytes=len(listing)
        )
        data_chunks = [
            encoder.encode_chunk(index, stream[index * chunk_size : (index + 1) * chunk_size])
            for index in range(encoder.chunk_count)
        ]
        cap, manifest_chunks = encoder.finish()
    return {
        "description": "folder: nested, an empty directory, an empty file, a non-ASCII name",
        "name": "folder",
        "entries": [{"path": e.path, "size": e.size} for e in TREE],
        "listing_hex": listing.hex(),
        "size": len(stream),
        "chunk_size": chunk_size,
        "plaintext_hex": stream.hex(),
        "file_key_hex": cap.key.hex(),
        "root_id_hex": cap.root.hex(),
        "read_link": format_link(cap),
        "data_chunks": [{"id_hex": cid.hex(), "stored_hex": raw.hex()} for cid, raw in data_chunks],
        "manifest_chunks": [
            {"id_hex": cid.hex(), "stored_hex": raw.hex()} for cid, raw in manifest_chunks
        ],
    }


def build_tree_vectors() -> dict[str, Any]:
    """The folder vectors of format v3 as one JSON-ready document."""
    return {
        "format_version": TREE_VERSION,
        "generator": "tests/vectors/make_vectors.py",
        "trees": [tree_vector()],
    }


def key_schedule_vector() -> dict[str, str]:
    """Every derived key of one fixed file key."""
    file_key = bytes(range(32))
    verify_key = crypto.derive_key(file_key, b"p2pmega:verify:v1")
    return {
        "file_key_hex": file_key.hex(),
        "verify_key_hex": verify_key.hex(),
        "file_id_hex": crypto.derive_key(verify_key, b"p2pmega:file-id:v1")[:16].hex(),
        "chunk_key_hex": crypto.derive_key(file_key, b"p2pmega:chunk:v1").hex(),
        "meta_key_hex": crypto.derive_key(file_key, b"p2pmega:meta:v1").hex(),
    }


def build_vectors() -> dict[str, Any]:
    """All golden vectors as one JSON-ready document."""
    return {
        "format_version": FORMAT_VERSION,
        "generator": "tests/vectors/make_vectors.py",
        "key_schedule": key_schedule_vector(),
        "files": [file_vector(*spec) for spec in FILES],
    }


def main() -> None:
    """Write the vectors file."""
    VECTORS_PATH.write_text(json.dumps(build_vectors(), indent=1, ensure_ascii=False) + "\n")
    TREE_VECTORS_PATH.write_text(
        json.dumps(build_tree_vectors(), indent=1, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
