"""Encrypting a file into chunks plus a manifest tree, and walking that tree back (sans-I/O).

FileEncoder seals data chunks and builds the tree; ManifestWalker checks and decodes it from
chunks its caller fetches; decrypt_chunk opens one data chunk. Byte layouts: docs/FORMAT.md.
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
    READABLE_VERSIONS,
    ROOT_LEVEL,
    TREE_VERSION,
    ChunkId,
    FileKeys,
    data_chunk_count,
    make_aad,
    open_box,
    open_chunk,
    open_chunk_into,
    padded_final_length,
    seal_chunk,
    short_id,
    verify_chunk,
)
from p2pmega.core.magnet import KeepCap, ReadCap, _check_name
from p2pmega.core.tree import MAX_LISTING_BYTES
from p2pmega.errors import BadManifest, BadOption

# 2**32 chunks: 4 PiB at the default chunk size, 256 GiB even at the 64-byte test size.
MAX_CHUNKS = 1 << 32
# Root plaintext: height (u8), data chunk count (u64), fanout (u32), sealed-metadata length (u16).
_ROOT_HEAD = struct.Struct(">BQIH")
# Metadata plaintext: file size (u64), chunk size (u32), name length (u16), then the UTF-8 name.
_META_HEAD = struct.Struct(">QIH")
# Version 3 (a folder) adds the listing's length (u64) before the name: the stream's first bytes.
_META_HEAD_TREE = struct.Struct(">QIHQ")
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
            meta_head = _META_HEAD.pack(self._size, self._chunk_size, len(name))
        else:
            meta_head = _META_HEAD_TREE.pack(
                self._size, self._chunk_size, len(name), self._listing_bytes
            )
        meta = crypto.seal(keys.meta_key, meta_head + name, meta_aad)
        head = _ROOT_HEAD.pack(len(levels), self.chunk_count, fanout, len(meta))
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


class ManifestWalker:
    """Checks and decodes a manifest tree from chunks the caller fetches; does no I/O itself."""

    def __init__(self, cap: ReadCap | KeepCap) -> None:
        """Start a walk at the capability's root.

        Args:
            cap: A read capability (full manifest) or keep-alive capability (ids only).
        """
        if isinstance(cap, ReadCap):
            self._keys = FileKeys.from_file_key(cap.key)
        else:
            self._keys = FileKeys.from_verify_key(cap.verify_key)
        # Pending chunk id -> (level, index among its level, is last of its level).
        self._pending: dict[ChunkId, tuple[int, int, bool]] = {cap.root: (ROOT_LEVEL, 0, True)}
        self._root = cap.root
        # _lists[L][j]: the ids listed by node j of level L (1 lists data ids); the root's list
        # sits at level height + 1. Filled as nodes arrive, so a root that merely claims a huge
        # file costs nothing until its nodes really exist.
        self._lists: list[dict[int, list[ChunkId]]] = []
        self._counts: list[int] = []
        self._fanout = 0
        self._meta: tuple[str, int, int, int | None] | None = None
        # The root's format version; every node and data chunk of the file must have the same.
        self._version = FORMAT_VERSION

    @property
    def done(self) -> bool:
        """True once every manifest chunk has been fed and checked."""
        return not self._pending

    def wanted(self) -> list[ChunkId]:
        """Manifest chunks to fetch next (all of them can be fetched in parallel).

        Returns:
            Ids not yet fed; empty when `done`.
        """
        return list(self._pending)

    def feed(self, chunk_id: ChunkId, data: bytes) -> None:
        """Check one fetched manifest chunk and learn the chunks it lists.

        Args:
            chunk_id: One of `wanted`.
            data: Its stored bytes as fetched.

        Raises:
            ChunkHashMismatch: ``data`` is not that chunk (try another holder).
            DecryptionFailed: It does not authenticate at its place in this file's tree.
            BadManifest: It authenticates but its contents are inconsistent.
            ValueError: ``chunk_id`` was not wanted (a caller bug).
        """
        if chunk_id not in self._pending:
            raise ValueError(f"manifest chunk {short_id(chunk_id)} is not wanted")
        verify_chunk(chunk_id, data)
        level, index, final = self._pending[chunk_id]
        keys = self._keys
        if level == ROOT_LEVEL:
            if data and data[0] in READABLE_VERSIONS:
                self._version = data[0]
            aad = make_aad(
                KIND_ROOT, keys.file_id, 0, final=True, level=ROOT_LEVEL, version=self._version
            )
            self._read_root(open_chunk(keys.verify_key, KIND_ROOT, data, aad))
        else:
            aad = make_aad(
                KIND_NODE, keys.file_id, index, final=final, level=level, version=self._version
            )
            self._add_list(open_chunk(keys.verify_key, KIND_NODE, data, aad), level, index)
        del self._pending[chunk_id]

    def _add_list(self, body: bytes, level: int, node_index: int) -> None:
        first = node_index * self._fanout
        below = self._counts[level - 1]
        expected = min(self._fanout, below - first)
        if len(body) != expected * CHUNK_ID_BYTES:
            raise BadManifest(
                f"manifest node {node_index} at level {level} lists {len(body)} bytes of ids, "
                f"expected {expected} ids; the file's manifest is corrupt"
            )
        ids = [ChunkId(body[i : i + CHUNK_ID_BYTES]) for i in range(0, len(body), CHUNK_ID_BYTES)]
        self._lists[level][node_index] = ids
        if level == 1:
            return
        for position, child in enumerate(ids):
            if child in self._pending or child == self._root:
                raise BadManifest(f"manifest lists node {short_id(child)} twice; it is corrupt")
            index = first + position
            self._pending[child] = (level - 1, index, index == below - 1)

    def _read_root(self, plain: bytes) -> None:
        if len(plain) < _ROOT_HEAD.size:
            raise BadManifest(f"manifest root has {len(plain)} bytes, too short; it is corrupt")
        height, chunk_count, fanout, meta_len = _ROOT_HEAD.unpack_from(plain)
        if (
            not 2 <= fanout <= MAX_CHUNK_SIZE // CHUNK_ID_BYTES
            or not 1 <= chunk_count <= MAX_CHUNKS
        ):
            raise BadManifest(f"manifest root declares fanout {fanout} and {chunk_count} chunks")
        counts = level_counts(chunk_count, fanout)
        if height != len(counts) - 1:
            raise BadManifest(f"manifest root declares height {height}, expected {len(counts) - 1}")
        meta_end = _ROOT_HEAD.size + meta_len
        if self._keys.meta_key is not None:
            self._meta = self._read_meta(plain[_ROOT_HEAD.size : meta_end], chunk_count, fanout)
        self._counts, self._fanout = [*counts, 1], fanout
        self._lists = [{} for _ in self._counts]
        self._add_list(plain[meta_end:], height + 1, 0)

    def _read_meta(
        self, sealed: bytes, chunk_count: int, fanout: int
    ) -> tuple[str, int, int, int | None]:
        assert self._keys.meta_key is not None  # noqa: S101 - checked by the caller
        aad = make_aad(
            KIND_META, self._keys.file_id, 0, final=True, level=ROOT_LEVEL, version=self._version
        )
        plain = open_box(self._keys.meta_key, sealed, aad)
        tree = self._version == TREE_VERSION
        head = _META_HEAD_TREE if tree else _META_HEAD
        if len(plain) < head.size:
            raise BadManifest("manifest metadata is too short; the file's manifest is corrupt")
        listing: int | None = None
        if tree:
            size, chunk_size, name_len, listing = _META_HEAD_TREE.unpack_from(plain)
            if not MIN_LISTING_BYTES <= listing <= min(size, MAX_LISTING_BYTES):
                raise BadManifest(f"manifest declares a listing of {listing} bytes in {size}")
        else:
            size, chunk_size, name_len = _META_HEAD.unpack_from(plain)
        if len(plain) != head.size + name_len:
            raise BadManifest(f"manifest metadata length {len(plain)} does not match its name")
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or fanout != fanout_of(chunk_size):
            raise BadManifest(f"manifest declares chunk size {chunk_size} with fanout {fanout}")
        if chunk_count != data_chunk_count(size, chunk_size):
            raise BadManifest(f"manifest declares {chunk_count} chunks for {size} bytes")
        try:
            name = plain[head.size :].decode("utf-8")
            _check_name(name)
        except ValueError as exc:
            raise BadManifest(f"manifest file name is invalid ({exc}); it is corrupt") from exc
        return name, size, chunk_size, listing

    def _level_ids(self, level: int) -> list[ChunkId]:
        lists = self._lists[level]
        return [chunk_id for index in range(len(lists)) for chunk_id in lists[index]]

    def result(self) -> Manifest:
        """The decoded manifest.

        Returns:
            Data chunk ids in order, every manifest chunk id (root first, then each level from
            the top down, as FileEncoder.finish lists them) and, for a ReadCap, the metadata.

        Raises:
            ValueError: Called before `done` (a caller bug).
        """
        if not self.done:
            raise ValueError(f"manifest walk not done: {len(self._pending)} chunks still wanted")
        manifest_ids = [self._root]
        for level in range(len(self._lists) - 1, 1, -1):
            manifest_ids.extend(self._level_ids(level))
        data_ids = tuple(self._level_ids(1))
        meta = self._meta if self._meta is not None else (None, None, None, None)
        name, size, chunk_size, listing = meta
        return Manifest(
            data_ids, tuple(manifest_ids), name, size, chunk_size, self._version, listing
        )


def decrypt_chunk(
    cap: ReadCap, manifest: Manifest, index: int, data: bytes, *, id_verified: bool = False
) -> bytes:
    """Check and open data chunk ``index``, returning exactly its plaintext (padding removed).

    Args:
        cap: The read capability the manifest was walked with.
        manifest: From `ManifestWalker.result` with that capability.
        index: 0 .. len(manifest.chunk_ids)-1.
        data: The stored chunk as fetched.
        id_verified: The caller has already checked that ``data`` hashes to ``manifest.chunk_ids[index]``
            (the transfer client does for every fetched chunk), so the hash is not computed twice. The
            AEAD still authenticates the chunk at its place in this file either way.

    Returns:
        The plaintext bytes of chunk ``index`` of the file.

    Raises:
        ChunkHashMismatch: ``data`` is not the chunk listed at ``index`` (try another holder).
        DecryptionFailed: It does not authenticate at that place of this file.
        BadManifest: It authenticates but has the wrong length or non-zero padding.
        ValueError: Index out of range or a manifest walked without the key (a caller bug).
    """
    key, aad, final = _data_chunk_context(cap, manifest, index, data, id_verified=id_verified)
    plain = open_chunk(key, KIND_DATA, data, aad)
    real = _check_data_plaintext(manifest, index, final, len(plain), plain)
    return plain if real == len(plain) else plain[:real]


def decrypt_chunk_into(
    cap: ReadCap,
    manifest: Manifest,
    index: int,
    data: bytes | memoryview,
    out: bytearray | memoryview,
    *,
    id_verified: bool = False,
) -> int:
    """`decrypt_chunk` writing into ``out`` (at least the chunk size long) instead of returning bytes.

    Returns:
        How many bytes of the file this chunk holds: the file's bytes are ``out[:n]``; the final chunk's
        padding, checked to be zeros, may follow them in ``out``.

    Raises:
        As `decrypt_chunk`.
    """
    key, aad, final = _data_chunk_context(cap, manifest, index, data, id_verified=id_verified)
    length = open_chunk_into(key, KIND_DATA, data, aad, out)
    with memoryview(out) as view:
        return _check_data_plaintext(manifest, index, final, length, view[:length])


def _data_chunk_context(
    cap: ReadCap, manifest: Manifest, index: int, data: bytes | memoryview, *, id_verified: bool
) -> tuple[bytes, bytes, bool]:
    """The key, associated data and final flag of data chunk ``index``, after the id check."""
    if manifest.size is None or manifest.chunk_size is None:
        raise ValueError("manifest was walked with a keep-alive link; it cannot decrypt")
    count = len(manifest.chunk_ids)
    if not 0 <= index < count:
        raise ValueError(f"chunk index {index} is outside 0..{count - 1}")
    if not id_verified:
        verify_chunk(manifest.chunk_ids[index], data)
    keys = FileKeys.from_file_key(cap.key)
    assert keys.chunk_key is not None  # noqa: S101 - always set from a file key
    final = index == count - 1
    aad = make_aad(KIND_DATA, keys.file_id, index, final=final, level=0, version=manifest.version)
    return keys.chunk_key, aad, final


def _check_data_plaintext(
    manifest: Manifest, index: int, final: bool, length: int, plain: bytes | memoryview
) -> int:
    """Check an opened data chunk's length and padding; return how many of its bytes are the file's."""
    assert manifest.size is not None  # noqa: S101 - checked by _data_chunk_context
    assert manifest.chunk_size is not None  # noqa: S101 - checked by _data_chunk_context
    if not final:
        if length != manifest.chunk_size:
            raise BadManifest(f"data chunk {index} opened to {length} bytes, not the chunk size")
        return length
    count = len(manifest.chunk_ids)
    real = manifest.size - (count - 1) * manifest.chunk_size
    padded = padded_final_length(manifest.size, manifest.chunk_size)
    if length != padded or bytes(plain[real:padded]).count(0) != padded - real:
        raise BadManifest(f"final data chunk {index} has the wrong length or non-zero padding")
    return real
