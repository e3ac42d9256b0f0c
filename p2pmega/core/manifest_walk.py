"""Walking a manifest tree back (sans-I/O): ManifestWalker checks and decodes it from chunks its caller fetches;
decrypt_chunk opens one data chunk. core.manifest writes what this reads; byte layouts: docs/FORMAT.md.
"""

from __future__ import annotations

from p2pmega.core.chunking import (
    CHUNK_ID_BYTES,
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
    short_id,
    verify_chunk,
)
from p2pmega.core.magnet import KeepCap, ReadCap, _check_name
from p2pmega.core.manifest import (
    MAX_CHUNKS,
    META_HEAD,
    META_HEAD_TREE,
    MIN_LISTING_BYTES,
    ROOT_HEAD,
    Manifest,
    fanout_of,
    level_counts,
)
from p2pmega.core.tree import MAX_LISTING_BYTES
from p2pmega.errors import BadManifest


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
        if len(plain) < ROOT_HEAD.size:
            raise BadManifest(f"manifest root has {len(plain)} bytes, too short; it is corrupt")
        height, chunk_count, fanout, meta_len = ROOT_HEAD.unpack_from(plain)
        if (
            not 2 <= fanout <= MAX_CHUNK_SIZE // CHUNK_ID_BYTES
            or not 1 <= chunk_count <= MAX_CHUNKS
        ):
            raise BadManifest(f"manifest root declares fanout {fanout} and {chunk_count} chunks")
        counts = level_counts(chunk_count, fanout)
        if height != len(counts) - 1:
            raise BadManifest(f"manifest root declares height {height}, expected {len(counts) - 1}")
        meta_end = ROOT_HEAD.size + meta_len
        if self._keys.meta_key is not None:
            self._meta = self._read_meta(plain[ROOT_HEAD.size : meta_end], chunk_count, fanout)
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
        head = META_HEAD_TREE if tree else META_HEAD
        if len(plain) < head.size:
            raise BadManifest("manifest metadata is too short; the file's manifest is corrupt")
        listing: int | None = None
        if tree:
            size, chunk_size, name_len, listing = META_HEAD_TREE.unpack_from(plain)
            if not MIN_LISTING_BYTES <= listing <= min(size, MAX_LISTING_BYTES):
                raise BadManifest(f"manifest declares a listing of {listing} bytes in {size}")
        else:
            size, chunk_size, name_len = META_HEAD.unpack_from(plain)
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
