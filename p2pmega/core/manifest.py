"""Encrypting a file into chunks plus a manifest tree (sans-I/O); core.manifest_walk reads it back.

FileEncoder seals data chunks and builds the tree; StreamEncoder does the same for input whose size is known only
at its end. Byte layouts: docs/FORMAT.md.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from p2pmega.core import crypto
from p2pmega.core.chunking import (
    CHUNK_ID_BYTES,
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    KIND_DATA,
    KIND_META,
    KIND_NODE,
    KIND_ROOT,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ROOT_LEVEL,
    TREE_VERSION,
    ChunkId,
    FileKeys,
    data_chunk_count,
    make_aad,
    padded_final_length,
    seal_chunk,
)
from p2pmega.core.magnet import ReadCap, _check_name
from p2pmega.core.tree import MAX_LISTING_BYTES
from p2pmega.errors import BadOption

# 2**32 chunks: 4 PiB at the default chunk size, 256 GiB even at the 64-byte test size.
MAX_CHUNKS = 1 << 32
# Root plaintext: height (u8), data chunk count (u64), fanout (u32), sealed-metadata length (u16).
ROOT_HEAD = struct.Struct(">BQIH")
# Metadata plaintext: file size (u64), chunk size (u32), name length (u16), then the UTF-8 name.
META_HEAD = struct.Struct(">QIH")
# Version 3 (a folder) adds the listing's length (u64) before the name: the stream's first bytes.
META_HEAD_TREE = struct.Struct(">QIHQ")
# A listing holds at least its entry count (u32).
MIN_LISTING_BYTES = 4


def fanout_of(chunk_size: int) -> int:
    """How many ids a manifest node lists: as many as fit in one chunk of plaintext.

    Args:
        chunk_size: The file's chunk size.

    Returns:
        ``chunk_size // 32`` (at least 2 because chunk sizes are at least 64).
    """
    return chunk_size // CHUNK_ID_BYTES


def level_counts(chunk_count: int, fanout: int) -> list[int]:
    """Items per tree level: data chunks first, then nodes per level until the root can list them.

    Args:
        chunk_count: Data chunks (>= 1).
        fanout: Ids per node (>= 2).

    Returns:
        ``counts[0]`` data chunks, ``counts[L]`` nodes at level L; the root lists ``counts[-1]``.
    """
    counts = [chunk_count]
    while counts[-1] > fanout:
        counts.append(-(-counts[-1] // fanout))
    return counts


@dataclass(frozen=True)
class Manifest:
    """A decoded manifest. ``name``/``size``/``chunk_size`` are None when walked with a KeepCap.

    ``version`` is the format version of the file (its root's); every chunk of it has that version.
    ``listing_bytes`` is set for a folder (version 3, walked with a ReadCap): the plaintext stream starts
    with a listing that long (core.tree), then the files' bytes; ``name`` is the folder's name.
    """

    chunk_ids: tuple[ChunkId, ...]
    manifest_ids: tuple[ChunkId, ...]
    name: str | None
    size: int | None
    chunk_size: int | None
    version: int = FORMAT_VERSION
    listing_bytes: int | None = None

    @property
    def is_tree(self) -> bool:
        """Whether this is a shared folder (format version 3)."""
        return self.version == TREE_VERSION


class FileEncoder:
    """Seals one file's data chunks (in any order, from any thread) and then its manifest tree."""

    def __init__(
        self,
        *,
        name: str,
        size: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        key: bytes | None = None,
        listing_bytes: int | None = None,
    ) -> None:
        """Prepare to encode a file.

        Args:
            name: File name stored (encrypted) in the manifest.
            size: Exact plaintext size in bytes.
            chunk_size: Plaintext bytes per data chunk.
            key: The file key K; a fresh random one when None (never derive it from content).
            listing_bytes: For a folder: the plaintext is its listing (this many bytes, core.tree) then its
                files, and the manifest is written as format version 3. None for a single file (version 2).

        Raises:
            BadOption: ``chunk_size`` out of range or ``name`` too long or with control characters.
            ValueError: Negative size or a key of the wrong length (a caller bug).
        """
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise BadOption(
                f"chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}; "
                "pick one inside"
            )
        try:
            _check_name(name)
        except ValueError as exc:
            raise BadOption(f"file name cannot be stored: {exc}; rename the file") from exc
        if size < 0:
            raise ValueError(f"size {size} is negative")
        if listing_bytes is not None and not MIN_LISTING_BYTES <= listing_bytes <= min(
            size, MAX_LISTING_BYTES
        ):
            raise ValueError(f"listing of {listing_bytes} bytes does not fit a stream of {size}")
        if data_chunk_count(size, chunk_size) > MAX_CHUNKS:
            raise BadOption(
                f"file of {size} bytes needs over {MAX_CHUNKS} chunks; raise the chunk size"
            )
        self._key = crypto.new_key() if key is None else key
        if len(self._key) != crypto.KEY_BYTES:
            raise ValueError(f"file key must be {crypto.KEY_BYTES} bytes")
        self._keys = FileKeys.from_file_key(self._key)
        self._name = name
        self._size = size
        self._chunk_size = chunk_size
        self._listing_bytes = listing_bytes
        self._version = FORMAT_VERSION if listing_bytes is None else TREE_VERSION
        self.chunk_count = data_chunk_count(size, chunk_size)
        self._final_length = size - (self.chunk_count - 1) * chunk_size
        self._final_padding = padded_final_length(size, chunk_size) - self._final_length
        self._ids: list[ChunkId | None] = [None] * self.chunk_count
        self._lock = threading.Lock()

    def encode_chunk(self, index: int, plaintext: bytes | memoryview) -> tuple[ChunkId, bytes]:
        """Seal data chunk ``index``. Thread-safe; encoding an index again replaces its chunk.

        Args:
            index: 0 .. chunk_count-1.
            plaintext: Exactly ``chunk_size`` bytes, except the final chunk: the remainder.

        Returns:
            The chunk id and the stored bytes.

        Raises:
            ValueError: Index out of range or wrong plaintext length (a caller bug).
        """
        if not 0 <= index < self.chunk_count:
            raise ValueError(f"chunk index {index} is outside 0..{self.chunk_count - 1}")
        final = index == self.chunk_count - 1
        expected = self._final_length if final else self._chunk_size
        if len(plaintext) != expected:
            raise ValueError(f"chunk {index} has {len(plaintext)} bytes, expected {expected}")
        if final:
            # Zero padding, authenticated like the data; built in one allocation.
            padded = b"".join((plaintext, bytes(self._final_padding)))
        else:
            padded = plaintext if isinstance(plaintext, bytes) else bytes(plaintext)
        chunk_id, stored = _seal_data(self._keys, index, padded, final, self._version)
        with self._lock:
            self._ids[index] = chunk_id
        return chunk_id, stored

    def adopt_chunk(self, index: int, chunk_id: ChunkId) -> None:
        """Record data chunk ``index`` as sealed earlier, under this encoder's key, as ``chunk_id``.

        A resumed share does not seal the chunks it already stored again (a new random nonce would give them
        new ids); it lists the ids it recorded. The caller vouches that ``chunk_id`` is data chunk ``index``
        of this file sealed under this key: a wrong id makes a manifest whose chunk fails to authenticate.

        Raises:
            ValueError: Index out of range or an id of the wrong length (a caller bug).
        """
        if not 0 <= index < self.chunk_count:
            raise ValueError(f"chunk index {index} is outside 0..{self.chunk_count - 1}")
        if len(chunk_id) != CHUNK_ID_BYTES:
            raise ValueError(f"chunk ids are {CHUNK_ID_BYTES} bytes, got {len(chunk_id)}")
        with self._lock:
            self._ids[index] = chunk_id

    def finish(self) -> tuple[ReadCap, list[tuple[ChunkId, bytes]]]:
        """Build and seal the manifest tree once every data chunk is encoded.

        Returns:
            The read capability (root, key, name and size hints) and the manifest chunks:
            the root first, then each level of nodes from the top down.

        Raises:
            ValueError: A data chunk was not encoded yet (a caller bug).
        """
        with self._lock:
            ids = list(self._ids)
        missing = [index for index, chunk_id in enumerate(ids) if chunk_id is None]
        if missing:
            raise ValueError(f"{len(missing)} data chunks not encoded, first is {missing[0]}")
        items = [chunk_id for chunk_id in ids if chunk_id is not None]
        keys, fanout, version = self._keys, fanout_of(self._chunk_size), self._version
        levels: list[list[tuple[ChunkId, bytes]]] = []
        while len(items) > fanout:
            level = len(levels) + 1
            count = -(-len(items) // fanout)
            nodes = []
            for index in range(count):
                aad = make_aad(
                    KIND_NODE,
                    keys.file_id,
                    index,
                    final=index == count - 1,
                    level=level,
                    version=version,
                )
                body = b"".join(items[index * fanout : (index + 1) * fanout])
                nodes.append(seal_chunk(keys.verify_key, KIND_NODE, body, aad))
            levels.append(nodes)
            items = [chunk_id for chunk_id, _ in nodes]
        assert keys.meta_key is not None  # noqa: S101 - always set from a file key
        name = self._name.encode("utf-8")
        meta_aad = make_aad(
            KIND_META, keys.file_id, 0, final=True, level=ROOT_LEVEL, version=version
        )
        if self._listing_bytes is None:
            meta_head = META_HEAD.pack(self._size, self._chunk_size, len(name))
        else:
            meta_head = META_HEAD_TREE.pack(
                self._size, self._chunk_size, len(name), self._listing_bytes
            )
        meta = crypto.seal(keys.meta_key, meta_head + name, meta_aad)
        head = ROOT_HEAD.pack(len(levels), self.chunk_count, fanout, len(meta))
        root_aad = make_aad(
            KIND_ROOT, keys.file_id, 0, final=True, level=ROOT_LEVEL, version=version
        )
        root = seal_chunk(keys.verify_key, KIND_ROOT, b"".join((head, meta, *items)), root_aad)
        chunks = [root]
        for nodes in reversed(levels):
            chunks.extend(nodes)
        cap = ReadCap(root=root[0], key=self._key, name=self._name, size=self._size)
        return cap, chunks


def _seal_data(
    keys: FileKeys, index: int, padded: bytes, final: bool, version: int
) -> tuple[ChunkId, bytes]:
    """Seal data chunk ``index`` (padding included) at its place in the file."""
    assert keys.chunk_key is not None  # noqa: S101 - always set from a file key
    aad = make_aad(KIND_DATA, keys.file_id, index, final=final, level=0, version=version)
    return seal_chunk(keys.chunk_key, KIND_DATA, padded, aad)


class StreamEncoder:
    """Seals a file whose size is known only at its end (a pipe): chunks in order, the last one marked.

    The chunks and manifest are exactly those `FileEncoder` makes for the same bytes and key.
    """

    def __init__(
        self, *, name: str, chunk_size: int = DEFAULT_CHUNK_SIZE, key: bytes | None = None
    ) -> None:
        """Prepare to encode a stream.

        Raises:
            BadOption: As `FileEncoder`.
            ValueError: As `FileEncoder`.
        """
        # Checks the name, chunk size and key once; replaced by the real size's encoder at the end.
        self._probe = FileEncoder(name=name, size=0, chunk_size=chunk_size, key=key)
        self._name, self._chunk_size, self._key = name, chunk_size, self._probe._key
        self._ids: dict[int, ChunkId] = {}
        self._lock = threading.Lock()
        self._final: FileEncoder | None = None

    def encode_chunk(self, index: int, plaintext: bytes, *, final: bool) -> tuple[ChunkId, bytes]:
        """Seal chunk ``index``: ``chunk_size`` bytes, or for the ``final`` one at most that (0 only alone).

        Thread-safe; the final chunk fixes the size, so it is encoded once every earlier index is known.

        Raises:
            ValueError: A wrong length, or a chunk after the final one (a caller bug).
            BadOption: The stream outgrew MAX_CHUNKS chunks.
        """
        if self._final is not None:
            raise ValueError("the final chunk is already encoded")
        if not final:
            if len(plaintext) != self._chunk_size:
                raise ValueError(f"chunk {index} has {len(plaintext)} bytes, not the chunk size")
            if index + 1 >= MAX_CHUNKS:
                raise BadOption(f"the input needs over {MAX_CHUNKS} chunks; raise the chunk size")
            chunk_id, stored = _seal_data(
                self._probe._keys, index, plaintext, False, FORMAT_VERSION
            )
            with self._lock:
                self._ids[index] = chunk_id
            return chunk_id, stored
        size = index * self._chunk_size + len(plaintext)
        if len(plaintext) > self._chunk_size or (index and not plaintext):
            raise ValueError(f"final chunk {index} has {len(plaintext)} bytes")
        encoder = FileEncoder(
            name=self._name, size=size, chunk_size=self._chunk_size, key=self._key
        )
        chunk_id, stored = encoder.encode_chunk(index, plaintext)
        self._final = encoder
        return chunk_id, stored

    @property
    def size(self) -> int | None:
        """The stream's size once its final chunk is encoded."""
        return None if self._final is None else self._final._size

    def finish(self) -> tuple[ReadCap, list[tuple[ChunkId, bytes]]]:
        """As `FileEncoder.finish`, once the final chunk and every one before it are encoded.

        Raises:
            ValueError: The final chunk, or one before it, was not encoded (a caller bug).
        """
        if self._final is None:
            raise ValueError("the final chunk was not encoded")
        with self._lock:
            for index, chunk_id in self._ids.items():
                self._final.adopt_chunk(index, chunk_id)
        return self._final.finish()
