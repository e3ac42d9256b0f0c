"""A shared folder's listing: its entries, their byte layout and the rules every path must meet (pure).

A folder is shared as one stream: this listing, then every file's bytes back to back in listing order
(docs/FORMAT.md section 5a). No file system access here; the fetcher applies the rules before it writes.
"""

from __future__ import annotations

import bisect
import struct
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from p2pmega.errors import UnsafePath

# Entry types in the listing.
TYPE_DIR = 0
TYPE_FILE = 1
# Bytes of UTF-8 per path component: NAME_MAX on Linux, macOS and Windows file systems.
MAX_COMPONENT_BYTES = 255
# Bytes of UTF-8 per whole path: PATH_MAX on Linux, so any valid path can be created under a short root.
MAX_PATH_BYTES = 4096
# A listing is read into memory whole before any file is written; 64 MiB holds about a million entries.
MAX_LISTING_BYTES = 64 << 20
MAX_ENTRIES = 1 << 20
# The fetcher keeps unfinished files in this directory at the top of the output; no entry may take its name.
RESERVED_NAME = ".p2pmega-part"
# Listing head: entry count (u32); each entry: type (u8), path length (u16), path, and for a file its size (u64).
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">BH")
_SIZE = struct.Struct(">Q")


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a folder: ``path`` is relative, ``/``-separated; ``size`` is None for a directory."""

    path: str
    size: int | None

    @property
    def is_dir(self) -> bool:
        return self.size is None


def check_path(path: str) -> None:
    """Check that ``path`` can only name something inside the folder, on any common file system.

    Args:
        path: A ``/``-separated relative path.

    Raises:
        ValueError: empty, absolute, an empty, ``.`` or ``..`` component, NUL, a control character or a
            backslash (a separator on Windows), a component over 255 or a path over 4096 bytes of UTF-8,
            or the reserved top-level name.
    """
    if not path:
        raise ValueError("path is empty")
    if path.startswith("/"):
        raise ValueError("path is absolute")
    if len(path.encode("utf-8", errors="surrogatepass")) > MAX_PATH_BYTES:
        raise ValueError(f"path is longer than {MAX_PATH_BYTES} bytes")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"path has a {part or 'empty'!r} component")
        if "\\" in part:
            raise ValueError("path has a backslash")
        if any(unicodedata.category(char) in ("Cc", "Cs") for char in part):
            raise ValueError("path has a control character or is not valid UTF-8")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ValueError(f"a path component is longer than {MAX_COMPONENT_BYTES} bytes")
    if parts[0] == RESERVED_NAME:
        raise ValueError(f"{RESERVED_NAME!r} is reserved for the fetcher's unfinished files")


def encode_listing(entries: Sequence[TreeEntry]) -> bytes:
    """The listing's bytes; `decode_listing` gives ``entries`` back.

    Raises:
        ValueError: an entry breaks a rule of `check_path`, `decode_listing`'s order rules, or the limits
            (a caller bug: the sharer checks each name first, with a message naming the file).
    """
    parts = [_COUNT.pack(len(entries))]
    for entry in entries:
        raw = entry.path.encode("utf-8")
        parts.append(_ENTRY.pack(TYPE_DIR if entry.is_dir else TYPE_FILE, len(raw)))
        parts.append(raw)
        if entry.size is not None:
            parts.append(_SIZE.pack(entry.size))
    listing = b"".join(parts)
    _check_entries(entries)
    if len(listing) > MAX_LISTING_BYTES:
        raise ValueError(f"listing of {len(listing)} bytes exceeds {MAX_LISTING_BYTES}")
    return listing


def decode_listing(data: bytes | memoryview) -> list[TreeEntry]:
    """Decode and check a listing (already authenticated: it came out of the file's data chunks).

    Args:
        data: Exactly the listing's bytes (the manifest's ``listing_bytes``).

    Returns:
        The entries in order.

    Raises:
        UnsafePath: the bytes are not a listing, or a path breaks a rule: absolute, ``..``, empty or ``.``
            components, NUL or control characters, too long, listed twice, or under something that is not
            a directory listed before it.
    """
    view = memoryview(data)
    if len(view) > MAX_LISTING_BYTES or len(view) < _COUNT.size:
        raise UnsafePath(
            f"folder listing of {len(view)} bytes is out of range; the file is corrupt"
        )
    (count,) = _COUNT.unpack_from(view)
    if count > MAX_ENTRIES:
        raise UnsafePath(f"folder listing declares {count} entries, over {MAX_ENTRIES}")
    entries: list[TreeEntry] = []
    offset = _COUNT.size
    try:
        for _ in range(count):
            kind, length = _ENTRY.unpack_from(view, offset)
            offset += _ENTRY.size
            raw = bytes(view[offset : offset + length])
            if len(raw) != length:
                raise UnsafePath("folder listing ends inside an entry; the file is corrupt")
            offset += length
            size: int | None = None
            if kind == TYPE_FILE:
                (size,) = _SIZE.unpack_from(view, offset)
                offset += _SIZE.size
            elif kind != TYPE_DIR:
                raise UnsafePath(f"folder listing has an entry of unknown type {kind}")
            entries.append(TreeEntry(raw.decode("utf-8"), size))
    except struct.error as exc:
        raise UnsafePath("folder listing ends inside an entry; the file is corrupt") from exc
    except UnicodeDecodeError as exc:
        raise UnsafePath("folder listing has a path that is not UTF-8; refused") from exc
    if offset != len(view):
        raise UnsafePath(f"folder listing has {len(view) - offset} bytes after its last entry")
    try:
        _check_entries(entries)
    except ValueError as exc:
        raise UnsafePath(f"folder listing refused: {exc}; nothing was written") from exc
    return entries


def _check_entries(entries: Sequence[TreeEntry]) -> None:
    """Each path passes `check_path`, appears once, and its parent is a directory listed before it.

    So no path can pass through a file, and the fetcher can create the directories in listing order.
    """
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"{len(entries)} entries, over {MAX_ENTRIES}")
    seen: set[str] = set()
    dirs: set[str] = set()
    for entry in entries:
        try:
            check_path(entry.path)
        except ValueError as exc:
            raise ValueError(f"{_show(entry.path)}: {exc}") from None
        if entry.path in seen:
            raise ValueError(f"{_show(entry.path)} is listed twice")
        parent, _, _ = entry.path.rpartition("/")
        if parent and parent not in dirs:
            raise ValueError(f"{_show(entry.path)} is not under a directory listed before it")
        if entry.size is not None and not 0 <= entry.size < 1 << 64:
            raise ValueError(f"{_show(entry.path)} has size {entry.size}")
        seen.add(entry.path)
        if entry.is_dir:
            dirs.add(entry.path)


def _show(path: str) -> str:
    """A path for a message: quoted, control characters escaped, cut to 80 characters."""
    shown = ascii(path[:80]) if any(not ch.isprintable() for ch in path) else repr(path[:80])
    return shown + ("…" if len(path) > 80 else "")


@dataclass(frozen=True)
class Span:
    """Where one file's bytes lie in the stream: ``[start, start + size)``; ``file`` counts files only."""

    file: int
    start: int
    size: int


class Layout:
    """Where each file of a listing lies in the stream: the listing first, then the files in order."""

    def __init__(self, entries: Sequence[TreeEntry], listing_bytes: int) -> None:
        """Lay the files out after a listing of ``listing_bytes`` bytes (directories take no bytes)."""
        self.spans: list[Span] = []
        offset = listing_bytes
        for entry in entries:
            if entry.size is not None:
                self.spans.append(Span(len(self.spans), offset, entry.size))
                offset += entry.size
        self.total_bytes = offset
        self._starts = [span.start for span in self.spans]

    def segments(self, start: int, length: int) -> list[tuple[int, int, int, int]]:
        """The pieces of stream bytes ``[start, start + length)`` that belong to files.

        Returns:
            ``(file, offset in that file, offset in the given bytes, length)`` for each piece, in order;
            the listing's bytes and empty files give none.
        """
        end = start + length
        out = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self.spans) and self.spans[i].start < end:
            span = self.spans[i]
            lo, hi = max(start, span.start), min(end, span.start + span.size)
            if lo < hi:
                out.append((span.file, lo - span.start, lo - start, hi - lo))
            i += 1
        return out
