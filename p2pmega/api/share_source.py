"""What share reads: one regular file, or a folder as one stream (its listing, then every file's bytes).

Both read any range by offset, from any thread, so chunks are read and sealed in any order. Blocking I/O:
share calls these through worker threads.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from p2pmega.core.tree import Layout, TreeEntry, check_path, encode_listing
from p2pmega.errors import InputFileError
from p2pmega.storage.share_state import FileIdentity

log = logging.getLogger(__name__)

CHANGED_SIZE = "the file changed size while it was being shared; try again"


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, or fewer only where the file ends.

    Raises:
        OSError: the read failed.
    """
    data = os.pread(fd, length, offset)
    # A read may return less than asked short of the end (network file systems): read on.
    while 0 < len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


@dataclass
class FileSource:
    """One regular file, open."""

    fd: int
    name: str
    size: int
    identity: FileIdentity
    listing_bytes: None = None
    skipped: tuple[str, ...] = ()

    def read_at(self, length: int, offset: int) -> bytes:
        """Plaintext bytes ``[offset, offset + length)``; fewer if the file shrank.

        Raises:
            OSError: the read failed.
        """
        return pread_full(self.fd, length, offset)

    def size_now(self) -> int:
        """The file's size now (compared with ``size`` once every chunk is read)."""
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class TreeSource:
    """A folder: its listing (in memory) and its files (opened as each range is read)."""

    root: Path
    name: str
    entries: list[TreeEntry]
    listing: bytes
    identity: FileIdentity
    skipped: tuple[str, ...]
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout(self.entries, len(self.listing))
        self._files = [e.path for e in self.entries if not e.is_dir]

    @property
    def size(self) -> int:
        return self.layout.total_bytes

    @property
    def listing_bytes(self) -> int:
        return len(self.listing)

    def read_at(self, length: int, offset: int) -> bytes:
        """Stream bytes ``[offset, offset + length)``: listing bytes, then file bytes in listing order.

        Raises:
            InputFileError: a file is gone or shorter than when the folder was listed.
            OSError: a read failed.
        """
        parts = [self.listing[offset : offset + length]]
        for file, at, _, size in self.layout.segments(offset, length):
            path = self.root / self._files[file]
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                raise InputFileError(
                    f"cannot read {str(path)!r} ({exc.strerror}); it changed while being shared"
                ) from exc
            try:
                data = pread_full(fd, size, at)
            finally:
                os.close(fd)
            if len(data) != size:
                raise InputFileError(f"{str(path)!r} shrank while it was being shared; try again")
            parts.append(data)
        return b"".join(parts)

    def size_now(self) -> int:
        """The stream's size as the folder is now (a file that grew makes it differ)."""
        total = self.listing_bytes
        for rel in self._files:
            try:
                total += os.lstat(self.root / rel).st_size
            except OSError:
                return -1
        return total

    def close(self) -> None:
        """Nothing stays open between reads."""


def open_file(path: Path) -> FileSource:
    """Open ``path`` for reading; refuse anything but a regular file before reading a byte.

    Raises:
        InputFileError: the file is missing or unreadable, or is a FIFO, a device or a socket.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever if none comes.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputFileError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputFileError(
                f"{str(path)!r} is {kind_of(info.st_mode)}, not a regular file; share reads regular files "
                "and folders"
            )
        os.set_blocking(fd, True)
        resolved = path.resolve()
        return FileSource(fd, path.name, info.st_size, FileIdentity.of(resolved, info))
    except BaseException:
        os.close(fd)
        raise


def kind_of(mode: int) -> str:
    kinds = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")


def scan_tree(path: Path) -> TreeSource:
    """List a folder: every directory (empty ones too) and regular file, sorted by name, parents first.

    Symbolic links and special files (FIFOs, sockets, devices) are skipped and named in ``skipped``: a link
    could lead outside the folder, and a fetcher never creates links. The folder's identity for the share
    state is its path, device and inode, the stream's size, and the newest mtime and ctime of everything
    listed (a write, create, delete or rename anywhere in it moves one).

    Raises:
        InputFileError: the folder cannot be read, or a name cannot be stored (not UTF-8, a backslash or
            control character, too long), named.
    """
    root = path.resolve()
    entries: list[TreeEntry] = []
    skipped: list[str] = []
    try:
        top = os.stat(root)
    except OSError as exc:
        raise InputFileError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    newest = [top.st_mtime_ns, top.st_ctime_ns]

    def listed(rel: str) -> list[tuple[str, os.DirEntry[str]]]:
        where = root / rel if rel else root
        try:
            with os.scandir(where) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise InputFileError(f"cannot list {str(where)!r}: {exc.strerror}") from exc
        return [(f"{rel}/{item.name}" if rel else item.name, item) for item in items]

    # Depth first, each directory's entries sorted, a directory before its contents; a stack of pending
    # entries rather than recursion, since a 4096-byte path can be 2048 levels deep.
    pending = listed("")[::-1]
    while pending:
        sub, item = pending.pop()
        try:
            info = item.stat(follow_symlinks=False)
        except OSError as exc:
            raise InputFileError(f"cannot read {item.path!r}: {exc.strerror}") from exc
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            skipped.append(ascii(sub) if not sub.isprintable() else sub)
            continue
        try:
            check_path(sub)
        except ValueError as exc:
            raise InputFileError(
                f"cannot share {os.fsdecode(item.path)!a}: {exc}; rename it"
            ) from None
        newest[0] = max(newest[0], info.st_mtime_ns)
        newest[1] = max(newest[1], info.st_ctime_ns)
        if stat.S_ISDIR(info.st_mode):
            entries.append(TreeEntry(sub, None))
            pending.extend(listed(sub)[::-1])
        else:
            entries.append(TreeEntry(sub, info.st_size))

    try:
        listing = encode_listing(entries)
    except ValueError as exc:
        raise InputFileError(f"cannot share {str(path)!r}: {exc}") from exc
    name = root.name or "folder"
    size = Layout(entries, len(listing)).total_bytes
    identity = FileIdentity(os.fsdecode(root), top.st_dev, top.st_ino, size, *newest)
    return TreeSource(root, name, entries, listing, identity, tuple(skipped))


def open_source(path: Path) -> FileSource | TreeSource:
    """A folder as a `TreeSource`, anything else through `open_file`.

    Raises:
        InputFileError: as `open_file` or `scan_tree`.
    """
    return scan_tree(path) if path.is_dir() else open_file(path)
