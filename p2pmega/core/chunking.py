"""Chunk ids, the stored-chunk format (header, associated data, padding) and the key schedule.

Pure functions over bytes; the manifest tree that lists chunks lives in core.manifest.
The byte-level specification is docs/FORMAT.md.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Protocol

from p2pmega.core import crypto

# Ids live in core.ids; these names stay importable from here, where the chunk format defines them.
from p2pmega.core.ids import CHUNK_ID_BYTES as CHUNK_ID_BYTES
from p2pmega.core.ids import DHT_KEY_BYTES as DHT_KEY_BYTES
from p2pmega.core.ids import ChunkId as ChunkId
from p2pmega.core.ids import dht_key_of as dht_key_of
from p2pmega.core.ids import format_id as format_id
from p2pmega.core.ids import short_id as short_id
from p2pmega.errors import BadChunk, ChunkHashMismatch, DecryptionFailed

FORMAT_VERSION = 2  # AEGIS-256; what every new chunk is sealed with
LEGACY_VERSION = 1  # XChaCha20-Poly1305; still opened, never written (docs/FORMAT.md section 8)
# Chunks exactly as version 2; the metadata also gives the length of a folder's listing (docs/FORMAT.md
# section 5a). Written for folders only, so single files stay readable by p2pmega that knows only version 2.
TREE_VERSION = 3
READABLE_VERSIONS = (LEGACY_VERSION, FORMAT_VERSION, TREE_VERSION)
KIND_DATA = 0
KIND_NODE = 1
KIND_ROOT = 2
KIND_META = 3  # the metadata box nested inside the root; never a stored chunk of its own
HEADER_BYTES = 2  # version, kind
CHUNK_OVERHEAD_BYTES = HEADER_BYTES + crypto.SEAL_OVERHEAD_BYTES


class _Opener(Protocol):
    def __call__(
        self, key: bytes, sealed: bytes | memoryview, aad: bytes, *, offset: int = 0
    ) -> bytes: ...


# What opens each readable format version's boxes, and how many bytes its nonce and tag add.
_OPENERS: dict[int, tuple[int, _Opener]] = {
    LEGACY_VERSION: (crypto.XCHACHA_OVERHEAD_BYTES, crypto.open_sealed_xchacha),
    FORMAT_VERSION: (crypto.SEAL_OVERHEAD_BYTES, crypto.open_sealed),
    TREE_VERSION: (crypto.SEAL_OVERHEAD_BYTES, crypto.open_sealed),
}

# Plaintext bytes per data chunk of a new file (each manifest records its own; any size from
# MIN_CHUNK_SIZE to MAX_CHUNK_SIZE is read). 2 MiB halves the per-chunk work of 1 MiB (a file, two
# fsyncs and an index row on each holder, a request, a thread hop and a provider record per chunk):
# 256 MiB shared to the 8-seed testnet took 1.26-1.32 s instead of 1.67-2.02, fetched 0.80-0.89 s
# instead of 0.98-1.32 (docs/FORMAT.md, section 3).
DEFAULT_CHUNK_SIZE = 2 << 20
# 64 bytes is the smallest size that still lets a manifest node list two 32-byte ids; tests use it
# to build deep manifest trees cheaply.
MIN_CHUNK_SIZE = 64
# A manifest may declare at most 4 MiB chunks, so a holder never buffers more than that per chunk.
MAX_CHUNK_SIZE = 4 << 20
# The root manifest chunk carries, beyond a node's ids, a fixed header and the sealed metadata
# (name of at most MAX_NAME_BYTES); 4 KiB bounds both with room to spare (see docs/FORMAT.md).
MAX_NAME_BYTES = 1024
ROOT_EXTRA_MAX_BYTES = 4096
MAX_SEALED_CHUNK_BYTES = MAX_CHUNK_SIZE + ROOT_EXTRA_MAX_BYTES + CHUNK_OVERHEAD_BYTES
# No stored chunk of any readable version is shorter than its header and seal (format v1's, the smaller).
MIN_SEALED_CHUNK_BYTES = HEADER_BYTES + min(
    crypto.XCHACHA_OVERHEAD_BYTES, crypto.SEAL_OVERHEAD_BYTES
)

# The kinds a holder stores (KIND_META only ever travels inside a root chunk).
STORED_KINDS = (KIND_DATA, KIND_NODE, KIND_ROOT)

# Every padded final chunk holds at least this many plaintext bytes (unless the chunk size is
# smaller), so tiny files all look alike.
MIN_PADDED_BYTES = 256

PURPOSE_VERIFY = b"p2pmega:verify:v1"
PURPOSE_FILE_ID = b"p2pmega:file-id:v1"
PURPOSE_CHUNK = b"p2pmega:chunk:v1"
PURPOSE_META = b"p2pmega:meta:v1"
FILE_ID_BYTES = 16
ROOT_LEVEL = 255  # level byte of the root and metadata in the associated data


def chunk_id_of(data: bytes | bytearray | memoryview) -> ChunkId:
    """The id of a stored chunk: the hash of exactly these bytes.

    Args:
        data: The stored (sealed) chunk; not copied.

    Returns:
        Its ``ChunkId``.
    """
    return ChunkId(crypto.hash_bytes(data))


def verify_chunk(chunk_id: ChunkId, data: bytes | bytearray | memoryview) -> None:
    """Check that ``data`` is the chunk named ``chunk_id``; needs no key.

    Args:
        chunk_id: The expected id.
        data: The bytes offered under that id.

    Raises:
        ChunkHashMismatch: The bytes hash to something else.
    """
    if not hmac.compare_digest(crypto.hash_bytes(data), chunk_id):
        raise ChunkHashMismatch(
            f"chunk {short_id(chunk_id)} ({len(data)} bytes) does not match its id; "
            "discard it and fetch from another holder"
        )


def check_stored_chunk(data: bytes | bytearray | memoryview) -> None:
    """Check that ``data`` is shaped like a stored chunk: known version and kind, size in bounds.

    A holder runs this before storing anything (it cannot open the chunk: the rest is ciphertext,
    which looks random by design). Needs no key.

    Args:
        data: The bytes offered for storage; not copied.

    Raises:
        BadChunk: Shorter than its version's header and seal, longer than any chunk, an unknown
            format version, or a kind no stored chunk has.
    """
    check_chunk_header(bytes(data[:HEADER_BYTES]), len(data))


def check_chunk_header(head: bytes, size: int) -> None:
    """`check_stored_chunk` given only a chunk's first HEADER_BYTES bytes and its size.

    Raises:
        BadChunk: As for `check_stored_chunk`.
    """
    if size > MAX_SEALED_CHUNK_BYTES:
        raise BadChunk(
            f"chunk of {size} bytes is over the {MAX_SEALED_CHUNK_BYTES}-byte limit of any chunk"
        )
    if size < MIN_SEALED_CHUNK_BYTES or len(head) < HEADER_BYTES:
        raise BadChunk(
            f"chunk of {size} bytes is under the {MIN_SEALED_CHUNK_BYTES}-byte header and seal "
            "of any chunk"
        )
    version, kind = head[0], head[1]
    opener = _OPENERS.get(version)
    if opener is None:
        raise BadChunk(f"chunk header names format v{version}, not one of {READABLE_VERSIONS}")
    if kind not in STORED_KINDS:
        raise BadChunk(f"chunk header names kind {kind}, not one of {STORED_KINDS}")
    if size < HEADER_BYTES + opener[0]:
        raise BadChunk(
            f"chunk of {size} bytes is under the {HEADER_BYTES + opener[0]}-byte header and seal "
            f"of format v{version}"
        )


@dataclass(frozen=True, repr=False)
class FileKeys:
    """The keys of one file. ``chunk_key`` and ``meta_key`` are None for a keep-alive holder."""

    verify_key: bytes
    file_id: bytes
    chunk_key: bytes | None
    meta_key: bytes | None

    @classmethod
    def from_file_key(cls, file_key: bytes) -> FileKeys:
        """Derive every key from the random file key K of a read link.

        Args:
            file_key: K, ``crypto.KEY_BYTES`` long.

        Returns:
            All four keys.
        """
        verify_key = crypto.derive_key(file_key, PURPOSE_VERIFY)
        return cls(
            verify_key=verify_key,
            file_id=crypto.derive_key(verify_key, PURPOSE_FILE_ID)[:FILE_ID_BYTES],
            chunk_key=crypto.derive_key(file_key, PURPOSE_CHUNK),
            meta_key=crypto.derive_key(file_key, PURPOSE_META),
        )

    @classmethod
    def from_verify_key(cls, verify_key: bytes) -> FileKeys:
        """The keys a keep-alive link gives: enough to open the manifest tree, not the data.

        Args:
            verify_key: V, ``crypto.KEY_BYTES`` long.

        Returns:
            Keys with ``chunk_key`` and ``meta_key`` set to None.
        """
        return cls(
            verify_key=verify_key,
            file_id=crypto.derive_key(verify_key, PURPOSE_FILE_ID)[:FILE_ID_BYTES],
            chunk_key=None,
            meta_key=None,
        )


def make_aad(
    kind: int,
    file_id: bytes,
    index: int,
    *,
    final: bool,
    level: int,
    version: int = FORMAT_VERSION,
) -> bytes:
    """The associated data that binds a sealed box to its place in its file.

    Args:
        kind: ``KIND_*``.
        file_id: The file's ``FILE_ID_BYTES`` id.
        index: Position among its level (data chunk index for data).
        final: Whether it is the last one of its level.
        level: 0 for data, 1.. for tree nodes (1 lists data ids), ``ROOT_LEVEL`` for root/meta.
        version: The format version of the file (one of ``READABLE_VERSIONS``); it also picks the
            cipher `open_chunk` and `open_box` use.

    Returns:
        ``version || kind || file_id || index (u64 BE) || final (u8) || level (u8)``: 28 bytes.
    """
    return b"".join(
        (
            bytes((version, kind)),
            file_id,
            index.to_bytes(8, "big"),
            bytes((int(final), level)),
        )
    )


def seal_chunk(key: bytes, kind: int, plaintext: bytes, aad: bytes) -> tuple[ChunkId, bytes]:
    """Seal one stored chunk: ``version || kind || nonce || ciphertext || tag``, and name it.

    Args:
        key: The chunk key (data) or verify key (manifest nodes).
        kind: ``KIND_DATA``, ``KIND_NODE`` or ``KIND_ROOT``.
        plaintext: Exact plaintext, padding included.
        aad: From `make_aad` with the same kind; its first byte is the version written in the header
            (FORMAT_VERSION, or TREE_VERSION for a folder).

    Returns:
        The chunk id and the stored bytes.
    """
    stored = crypto.seal(key, plaintext, aad, header=bytes((aad[0], kind)))
    return chunk_id_of(stored), stored


def open_chunk(key: bytes, kind: int, stored: bytes, aad: bytes) -> bytes:
    """Check the header and open a stored chunk (its hash is checked by the caller).

    Args:
        key: As for `seal_chunk`.
        kind: The kind this chunk must be.
        stored: The stored bytes.
        aad: The associated data it must have been sealed with; its first byte is the format
            version the chunk must have.

    Returns:
        The plaintext, padding included.

    Raises:
        DecryptionFailed: Unknown version, another version than ``aad`` names, wrong kind, or it
            does not authenticate here.
    """
    _check_header(kind, stored, aad)
    return open_box(key, stored, aad, offset=HEADER_BYTES)


def open_chunk_into(
    key: bytes, kind: int, stored: bytes | memoryview, aad: bytes, out: bytearray | memoryview
) -> int:
    """`open_chunk` writing the plaintext into ``out``; returns its length.

    Raises:
        DecryptionFailed: As for `open_chunk`.
        ValueError: ``out`` is too small (a caller bug).
    """
    _check_header(kind, stored, aad)
    if _OPENERS[aad[0]][1] is not crypto.open_sealed:
        plain = open_box(key, stored, aad, offset=HEADER_BYTES)
        out[: len(plain)] = plain
        return len(plain)
    return crypto.open_sealed_into(key, stored, aad, out, offset=HEADER_BYTES)


def _check_header(kind: int, stored: bytes | memoryview, aad: bytes) -> None:
    version = aad[0]
    opener = _OPENERS.get(version)
    if (
        opener is None
        or len(stored) < HEADER_BYTES + opener[0]
        or stored[0] != version
        or stored[1] != kind
    ):
        header = stored[:HEADER_BYTES].hex()
        raise DecryptionFailed(
            f"chunk header {header!r} ({len(stored)} bytes) is not format v{version} "
            f"kind {kind}; it was altered or needs a newer p2pmega"
        )


def open_box(key: bytes, sealed: bytes | memoryview, aad: bytes, *, offset: int = 0) -> bytes:
    """Open a sealed box with the cipher of the format version that ``aad`` starts with.

    Args:
        key: The key it was sealed with.
        sealed: ``nonce || ciphertext || tag`` after ``offset`` bytes.
        aad: From `make_aad`.
        offset: Header bytes to skip.

    Returns:
        The plaintext.

    Raises:
        DecryptionFailed: An unknown version or it does not authenticate.
    """
    opener = _OPENERS.get(aad[0])
    if opener is None:
        raise DecryptionFailed(f"format v{aad[0]} is unknown; it needs a newer p2pmega")
    return opener[1](key, sealed, aad, offset=offset)


def padme(length: int) -> int:
    """Padmé (Nikitin et al., PETS 2019): round up, leaking O(log log L) bits, overhead < 12%.

    Args:
        length: A non-negative length.

    Returns:
        The smallest Padmé length >= ``length``.
    """
    if length < 2:
        return length
    exponent = length.bit_length() - 1  # E = floor(log2 L)
    size_bits = exponent.bit_length()  # S = floor(log2 E) + 1
    low_bits = exponent - size_bits  # the mantissa keeps S bits; the rest are zeroed
    mask = (1 << low_bits) - 1
    return (length + mask) & ~mask


def data_chunk_count(size: int, chunk_size: int) -> int:
    """How many data chunks a file has: at least one, so an empty file still has a chunk.

    Args:
        size: File size in bytes.
        chunk_size: Plaintext bytes per chunk.

    Returns:
        ``max(1, ceil(size / chunk_size))``.
    """
    return max(1, -(-size // chunk_size))


def padded_final_length(size: int, chunk_size: int) -> int:
    """Plaintext length of the final data chunk after padding.

    The whole file is padded to ``max(padme(size), MIN_PADDED_BYTES)`` but never past the end
    of its last chunk, so padding never adds a chunk.

    Args:
        size: File size in bytes.
        chunk_size: Plaintext bytes per chunk.

    Returns:
        Bytes of plaintext (data then zeros) sealed into the final chunk.
    """
    before_final = (data_chunk_count(size, chunk_size) - 1) * chunk_size
    padded_total = max(padme(size), MIN_PADDED_BYTES)
    return min(chunk_size, padded_total - before_final)
